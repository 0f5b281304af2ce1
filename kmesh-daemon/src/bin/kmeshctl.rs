//! `kmeshctl`: the operator's command line. It talks only to a daemon's admin API.
use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kmesh_daemon::admin;
use kmesh_daemon::telemetry::LogFormat;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "kmeshctl", version, about = "Inspect and control a kmesh-daemon through its admin API")]
struct Cli {
    /// The daemon's read-only admin API (what the show/dump commands read).
    #[arg(long, global = true, default_value = "127.0.0.1:15200", env = "KMESH_ADMIN_ADDR")]
    admin: SocketAddr,
    /// The daemon's admin socket, for the commands that change something (log levels,
    /// monitoring switches); it is root-only.
    #[arg(long, global = true, default_value = admin::DEFAULT_SOCKET, env = "KMESH_ADMIN_SOCKET")]
    admin_socket: std::path::PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    /// The model: workloads, services, policies, enrolled namespaces.
    Config,
    /// What the kernel maps hold, decoded into names.
    Maps,
}

#[derive(Subcommand)]
enum Cmd {
    /// Versions of kmeshctl and of the daemon.
    Version,
    /// Dump the configuration or the kernel maps.
    Dump {
        what: What,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show the log filter, or set it (EnvFilter syntax: `debug`, `info,kmesh::authz=warn`).
    Log { filter: Option<String> },
    /// Show connection telemetry, or switch access logs and metric families on or off.
    ///
    /// Without options: what is on, the report interval, events received and lost. With
    /// `--all off` the kernel stops collecting entirely.
    Monitoring {
        /// Every switch below at once.
        #[arg(long, value_enum)]
        all: Option<Switch>,
        /// One line per closed or failed connection.
        #[arg(long, value_enum)]
        access_log: Option<Switch>,
        /// Access-log lines as text or JSON.
        #[arg(long, value_enum)]
        access_log_format: Option<Format>,
        /// `kmesh_tcp_*` by destination service.
        #[arg(long, value_enum)]
        service_metrics: Option<Switch>,
        /// `kmesh_tcp_workload_*` by destination workload.
        #[arg(long, value_enum)]
        workload_metrics: Option<Switch>,
        /// `kmesh_tcp_connection_*`: one series per open connection.
        #[arg(long, value_enum)]
        connection_metrics: Option<Switch>,
        /// How often open connections report their counters (at least 100).
        #[arg(long)]
        report_interval_ms: Option<u64>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Authorization: where it is enforced, the policies in force and what they decided.
    Authz {
        #[arg(value_enum, default_value = "status")]
        action: AuthzAction,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The pods' DNS proxies: which pods have one, the queries they saw, the names they answer.
    Dns {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuthzAction {
    Status,
}

fn get(admin_addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let body = admin::request(admin_addr, "GET", path, None)?;
    serde_json::from_str(&body)
        .with_context(|| format!("the daemon answered {path} with something that is not JSON"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Version => {
            println!("kmeshctl {}", env!("CARGO_PKG_VERSION"));
            let v = get(cli.admin, "/version")?;
            println!(
                "kmesh-daemon {} (map layout v{})",
                v["version"].as_str().unwrap_or("?"),
                v["map_layout"]
            );
        }
        Cmd::Dump { what, output } => {
            let v = match what {
                What::Config => get(cli.admin, "/debug/config_dump")?,
                What::Maps => get(cli.admin, "/debug/bpf_maps")?,
            };
            match (output, what) {
                (Output::Json, _) => println!("{}", serde_json::to_string_pretty(&v)?),
                (Output::Table, What::Config) => print_config(&v),
                (Output::Table, What::Maps) => print_maps(&v),
            }
        }
        Cmd::Log { filter: None } => {
            println!("{}", get(cli.admin, "/debug/loggers")?["filter"].as_str().unwrap_or("?"))
        }
        Cmd::Log { filter: Some(f) } => {
            let body = serde_json::json!({ "filter": f }).to_string();
            let r = admin::request(&cli.admin_socket, "POST", "/debug/loggers", Some(&body))?;
            let v: Value = serde_json::from_str(&r)?;
            println!("log filter is now {}", v["filter"].as_str().unwrap_or("?"));
        }
        Cmd::Monitoring {
            all,
            access_log,
            access_log_format,
            service_metrics,
            workload_metrics,
            connection_metrics,
            report_interval_ms,
            output,
        } => {
            let on = |s: Option<Switch>| s.or(all).map(|s| matches!(s, Switch::On));
            let req = admin::MonitoringRequest {
                access_log: on(access_log),
                access_log_format: access_log_format.map(|f| match f {
                    Format::Text => LogFormat::Text,
                    Format::Json => LogFormat::Json,
                }),
                service_metrics: on(service_metrics),
                workload_metrics: on(workload_metrics),
                connection_metrics: on(connection_metrics),
                report_interval_ms,
            };
            let body = serde_json::to_string(&req)?;
            let v: Value = if body == "{}" {
                get(cli.admin, "/debug/monitoring")?
            } else {
                serde_json::from_str(&admin::request(
                    &cli.admin_socket,
                    "POST",
                    "/debug/monitoring",
                    Some(&body),
                )?)?
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => print_monitoring(&v),
            }
        }
        Cmd::Authz { action: AuthzAction::Status, output } => {
            let v = get(cli.admin, "/debug/authz")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => print_authz(&v),
            }
        }
        Cmd::Dns { output } => {
            let v = get(cli.admin, "/debug/dns")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => print_dns(&v),
            }
        }
    }
    Ok(())
}

fn print_dns(v: &Value) {
    if v["enabled"].as_bool() != Some(true) {
        println!("DNS proxy off (--dns-proxy off): pods' queries go to their resolvers untouched");
        return;
    }
    println!("port\t{} on 127.0.0.1 and ::1 in each pod", v["port"]);
    println!("cluster domain\t{}", v["cluster_domain"].as_str().unwrap_or("?"));
    if let Some(q) = v["queries"].as_object() {
        let parts: Vec<String> = q.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("queries\t{}", parts.join(", "));
    }
    println!("\nPODS\tNAMESPACE\tLISTENING");
    for p in v["pods"].as_array().into_iter().flatten() {
        let listening: Vec<&str> =
            p["listening"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
        println!(
            "{}\t{}\t{}",
            p["netns"].as_str().unwrap_or("?"),
            p["namespace"].as_str().unwrap_or("-"),
            listening.join(" ")
        );
    }
    for p in v["pods_without_proxy"].as_array().into_iter().flatten() {
        println!("cookie {}\t-\tnone: {}", p["netns_cookie"], p["error"].as_str().unwrap_or("?"));
    }
    println!("\nNAME\tTTL\tADDRESSES");
    for n in v["names"].as_array().into_iter().flatten() {
        let addrs: Vec<&str> = [&n["ipv4"], &n["ipv6"]]
            .into_iter()
            .flat_map(|a| a.as_array().into_iter().flatten())
            .filter_map(|a| a.as_str())
            .collect();
        let kind = if n["headless"].as_bool() == Some(true) { " (headless)" } else { "" };
        println!("{}{kind}\t{}\t{}", n["name"].as_str().unwrap_or("?"), n["ttl"], addrs.join(" "));
    }
}

fn on_off(v: &Value) -> &'static str {
    if v.as_bool() == Some(true) { "on" } else { "off" }
}

fn print_monitoring(v: &Value) {
    let s = &v["settings"];
    println!("kernel telemetry\t{}", on_off(&v["kernel_telemetry"]));
    println!("access log\t{} ({})", on_off(&s["access_log"]), s["access_log_format"].as_str().unwrap_or("?"));
    println!("service metrics\t{}", on_off(&s["service_metrics"]));
    println!("workload metrics\t{}", on_off(&s["workload_metrics"]));
    println!("connection metrics\t{}", on_off(&s["connection_metrics"]));
    println!("report interval\t{} ms", v["report_interval_ms"]);
    println!("open connections\t{}", v["open_connections"]);
    println!("events received\t{}", v["events_received"]);
    println!("connections summed in kernel\t{}", v["connections_summed_in_kernel"]);
    println!("events lost\t{}", v["events_lost"]);
}

fn print_authz(v: &Value) {
    let policies: Vec<&str> =
        v["policies"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    println!("policies in force\t{}\t{}", policies.len(), policies.join(", "));
    println!("destinations with rules\t{}", v["destinations"]);
    println!("events lost\t{}", v["events_lost"]);
    println!("\nNAMESPACE\tWORKLOAD\tENFORCED");
    for n in v["namespaces"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}",
            n["netns"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("cookie {}", n["netns_cookie"])),
            n["workload"].as_str().unwrap_or("-"),
            if n["enforced"].as_bool() == Some(true) { "yes" } else { "no" }
        );
    }
    println!("\nPOLICY\tACTION\tCONNECTIONS");
    for d in v["decisions"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}",
            d["policy"].as_str().unwrap_or("?"),
            d["action"].as_str().unwrap_or("?"),
            d["connections"]
        );
    }
}

fn print_config(v: &Value) {
    let m = &v["model"];
    println!("WORKLOAD\tNAMESPACE\tADDRESSES\tNODE\tZONE\tSTATUS");
    for w in m["workloads"].as_object().into_iter().flat_map(|o| o.values()) {
        let addrs: Vec<&str> =
            w["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            w["name"].as_str().unwrap_or(""),
            w["namespace"].as_str().unwrap_or(""),
            addrs.join(","),
            w["node"].as_str().unwrap_or(""),
            w["locality"]["zone"].as_str().unwrap_or(""),
            w["status"].as_str().unwrap_or("")
        );
    }
    println!("\nSERVICE\tADDRESSES\tPORTS\tLOAD BALANCING");
    for (key, s) in m["services"].as_object().into_iter().flatten() {
        let addrs: Vec<&str> =
            s["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let ports: Vec<String> = s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}->{}", p["service_port"], p["target_port"]))
            .collect();
        println!(
            "{key}\t{}\t{}\t{}",
            addrs.join(","),
            ports.join(","),
            s["load_balancing"]["mode"].as_str().unwrap_or("")
        );
    }
    println!("\nPOLICY\tSCOPE\tACTION\tDRY RUN");
    for (key, p) in m["policies"].as_object().into_iter().flatten() {
        println!(
            "{key}\t{}\t{}\t{}",
            p["scope"].as_str().unwrap_or(""),
            p["action"].as_str().unwrap_or(""),
            p["dry_run"]
        );
    }
    if let Some(e) = v["config_error"].as_str() {
        println!("\nlast configuration refused: {e}");
    }
}

fn print_maps(v: &Value) {
    println!("FRONTEND\tSERVICE\tCLASS\tFAMILY\tGEN\tBACKENDS BY LOCALITY LEVEL");
    for f in v["frontends"].as_array().into_iter().flatten() {
        for t in f["tables"].as_array().into_iter().flatten() {
            let levels: Vec<String> = t["levels"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    l.as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .collect();
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}",
                f["frontend"].as_str().unwrap_or(""),
                f["service"].as_str().unwrap_or(""),
                t["client_class"],
                t["family"].as_str().unwrap_or(""),
                t["generation"],
                if levels.is_empty() { "(none)".to_string() } else { levels.join(" | ") }
            );
        }
    }
    println!("\nENROLLED NETNS\tWORKLOAD\tCLASS");
    for e in v["enrolled"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}",
            e["netns"].as_str().map(str::to_string).unwrap_or_else(|| e["netns_cookie"].to_string()),
            e["workload"].as_str().unwrap_or("-"),
            e["client_class"]
        );
    }
}
