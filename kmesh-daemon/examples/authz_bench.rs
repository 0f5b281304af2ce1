//! Authorization benchmark (not a test): connection set-up rate and latency from a client pod
//! to a policed server pod, with the authorization program not attached, attached with no
//! policy, and with 10, 100 and 1,000 policies in force. Needs root.
//!
//!   cargo build --release --bins --examples && target/release/examples/authz_bench [connections]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use kmesh_daemon::config;
use kmesh_daemon::kernel::{self, Dataplane, LoadOptions};
use kmesh_daemon::mesh::Mesh;
use kmesh_daemon::netns;
use kmesh_testbed::{ClientOptions, PodSpec, Testbed, parse_attempts};

/// N policies in the shape teams write them: half ALLOW a team's namespace on the service
/// port, a quarter DENY a namespace, a quarter ALLOW a service account; one of them admits
/// the benchmark's client.
fn policies(n: usize) -> String {
    let mut s = String::from("policies:\n");
    if n == 0 {
        return s + "  []\n";
    }
    s += "  - {name: allow-client, namespace: prod, rules: [{clauses: [{matches: [{namespaces: [{exact: bench}], destination_ports: [8080]}]}]}]}\n";
    for i in 1..n {
        s += &match i % 4 {
            0 | 1 => format!(
                "  - {{name: p{i}, namespace: prod, rules: [{{clauses: [{{matches: [{{namespaces: [{{exact: team-{i}}}], destination_ports: [8080]}}]}}]}}]}}\n"
            ),
            2 => format!(
                "  - {{name: p{i}, namespace: prod, action: DENY, rules: [{{clauses: [{{matches: [{{namespaces: [{{prefix: blocked-{i}}}]}}]}}]}}]}}\n"
            ),
            _ => format!(
                "  - {{name: p{i}, namespace: prod, rules: [{{clauses: [{{matches: [{{service_accounts: [{{namespace: team-{i}, service_account: sa-{i}}}]}}]}}]}}]}}\n"
            ),
        };
    }
    s
}

fn main() -> anyhow::Result<()> {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3000);
    let mut bed = Testbed::new()?;
    let client = bed.add_pod(PodSpec::new("client", "node-a", "zone-a"))?;
    let server = bed.add_pod(PodSpec::new("server", "node-a", "zone-a"))?;
    bed.serve(&server, &[8080], &[])?;
    client.for_many_short_connections()?;
    let pins = PathBuf::from(format!("/sys/fs/bpf/kmesh-authz-bench-{}", std::process::id()));
    let dp = Dataplane::load(&LoadOptions::new(bed.cgroup().to_owned(), pins.clone()))?;
    let mut mesh = Mesh::new(dp);
    let workloads = format!(
        "workloads:\n  - {{uid: client, name: client, namespace: bench, service_account: load, addresses: [{}]}}\n  - {{uid: server, name: server, namespace: prod, service_account: web, addresses: [{}]}}\n",
        client.ipv4, server.ipv4
    );
    let target: SocketAddr = format!("{}:8080", server.ipv4).parse()?;
    let run = |label: &str| -> anyhow::Result<()> {
        let mut c = client.connect_command(target, &ClientOptions { count: n, ..Default::default() })?;
        let t = Instant::now();
        let out = c.output()?;
        let secs = t.elapsed().as_secs_f64();
        let a = parse_attempts(&String::from_utf8_lossy(&out.stdout))?;
        let ok = a.iter().filter(|x| x.ok).count();
        let mut lat: Vec<u64> = a.iter().map(|x| x.elapsed_us).collect();
        lat.sort_unstable();
        let p = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(0);
        println!(
            "| {label} | {:.0} | {} | {} | {} | {ok}/{} |",
            a.len() as f64 / secs,
            p(0.5),
            p(0.9),
            p(0.99),
            a.len()
        );
        Ok(())
    };
    println!("| policies in force | connections/s | p50 us | p90 us | p99 us | answered |");
    println!("|---|---|---|---|---|---|");
    mesh.set_model(config::parse(&format!("{workloads}{}", policies(0)))?)?;
    let _ = run("none (authorization program not attached)");
    let cookie = netns::cookie_of(&server.netns_path())?;
    mesh.enroll(cookie, Some(&server.netns_path()), Some("server".into()))?;
    run("0 (program attached, no policy)")?;
    for k in [10usize, 100, 1000] {
        let t = Instant::now();
        mesh.set_model(config::parse(&format!("{workloads}{}", policies(k)))?)?;
        let compile = t.elapsed();
        run(&format!("{k} (compiled and applied in {:.1} ms)", compile.as_secs_f64() * 1000.0))?;
    }
    drop(mesh);
    kernel::uninstall(&pins)?;
    Ok(())
}
