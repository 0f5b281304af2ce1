//! `kmeshctl`: the operator's command line. It talks only to a daemon's admin API.
use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kmesh_daemon::admin;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "kmeshctl", version, about = "Inspect and control a kmesh-daemon through its admin API")]
struct Cli {
    /// Admin API of the daemon.
    #[arg(long, global = true, default_value = "127.0.0.1:15200", env = "KMESH_ADMIN_ADDR")]
    admin: SocketAddr,
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
            let r = admin::request(cli.admin, "POST", "/debug/loggers", Some(&body))?;
            let v: Value = serde_json::from_str(&r)?;
            println!("log filter is now {}", v["filter"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
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
