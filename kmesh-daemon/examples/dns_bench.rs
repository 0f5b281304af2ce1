//! DNS proxy benchmark (not a test): queries per second and latency (p50/p99) from a pod, for
//! a name the pod's proxy answers from the mesh, a name it forwards to the resolver, and the
//! same forwarded name sent straight to the resolver by a pod outside the mesh. The resolver
//! is dnsmasq in a pod of the testbed (local zones only). Needs root, dnsmasq.
//!
//!   cargo build --release --examples && target/release/examples/dns_bench [seconds] [clients]
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use kmesh_daemon::dns::{DnsOptions, DnsProxy, MeshView};
use kmesh_daemon::kernel::{Dataplane, LoadOptions};
use kmesh_daemon::mesh::Mesh;
use kmesh_testbed::{Pod, PodSpec, Testbed};

/// Inside a pod: `clients` threads, each sending one query at a time to `server` for `secs`;
/// prints `qps p50_us p99_us errors`.
fn load(server: SocketAddr, name: &str, secs: f64, clients: usize) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let name = Name::from_ascii(name).unwrap();
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let name = name.clone();
            std::thread::spawn(move || {
                let s = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
                s.connect(server).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut buf = [0u8; 4096];
                let mut id: u16 = (t as u16) << 12;
                while Instant::now() < deadline {
                    id = id.wrapping_add(1);
                    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
                    m.metadata.recursion_desired = true;
                    m.add_query(Query::query(name.clone(), RecordType::A));
                    let q = m.to_vec().unwrap();
                    let t0 = Instant::now();
                    s.send(&q).unwrap();
                    match s.recv(&mut buf) {
                        Ok(n) if n >= 12 && buf[..2] == q[..2] && buf[3] & 0x0f == 0 => {
                            lat.push(t0.elapsed().as_micros() as u64)
                        }
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().unwrap();
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0);
    println!("{:.0} {} {} {errors}", all.len() as f64 / secs, pct(0.5), pct(0.99));
}

fn run_in(pod: &Pod, server: SocketAddr, name: &str, secs: f64, clients: usize) -> anyhow::Result<String> {
    let out = pod
        .command(std::env::current_exe()?)
        .args(["load", &server.to_string(), name, &secs.to_string(), &clients.to_string()])
        .output()?;
    anyhow::ensure!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("load") {
        load(args[2].parse()?, &args[3], args[4].parse()?, args[5].parse()?);
        return Ok(());
    }
    let secs: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let clients: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(4);
    let mut bed = Testbed::new()?;
    let client = bed.add_pod(PodSpec::new("client", "node-a", "zone-a"))?;
    let outside = bed.add_pod(PodSpec::new("outside", "node-a", "zone-a"))?;
    let dnspod = bed.add_pod(PodSpec::new("dns", "node-a", "zone-a"))?;
    let _dnsmasq = Kill(
        dnspod
            .dnsmasq_command()
            .args(["--local=/corp.test/", "--cache-size=1000"])
            .arg("--host-record=db.corp.test,10.1.2.3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(300));

    let rt = tokio::runtime::Runtime::new()?;
    let pins = PathBuf::from(format!("/sys/fs/bpf/kmesh-dns-bench-{}", std::process::id()));
    let dp = Dataplane::load(&LoadOptions::new(bed.cgroup().to_owned(), pins.clone()))?;
    let dns_maps = dp.open_dns_maps()?;
    let mut mesh = Mesh::new(dp);
    let model = kmesh_daemon::config::parse(&format!(
        "services:\n  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [10.96.0.10], ports: [{{service_port: 80}}]}}\nworkloads:\n  - {{uid: client, name: client, namespace: default, addresses: [{}]}}\n",
        client.ipv4
    ))?;
    mesh.set_model(model)?;
    let cookie = kmesh_daemon::netns::cookie_of(&client.netns_path())?;
    mesh.enroll(cookie, Some(&client.netns_path()), Some("client".into()))?;
    let proxy: Arc<DnsProxy> = rt.block_on(async { DnsProxy::start(DnsOptions::default(), dns_maps) })?;
    rt.block_on(proxy.reconcile(MeshView {
        generation: 1,
        model: Some(mesh.model().clone()),
        pods: mesh.enrolled_pods(),
    }));
    anyhow::ensure!(proxy.pods_listening() == 1, "the proxy did not start: {}", proxy.status());

    let server: SocketAddr = format!("{}:53", dnspod.ipv4).parse()?;
    println!(
        "DNS over UDP, {clients} clients one query at a time each, {secs} s per row (dnsmasq as the resolver)\n"
    );
    println!("{:<58} {:>9} {:>8} {:>8} {:>6}", "", "qps", "p50 us", "p99 us", "errors");
    let rows = [
        ("mesh name, answered by the pod's proxy", &client, "echo.default.svc.cluster.local"),
        ("other name, forwarded by the proxy to the resolver", &client, "db.corp.test"),
        ("same name, straight to the resolver (pod outside the mesh)", &outside, "db.corp.test"),
    ];
    for (label, pod, name) in rows {
        let r = run_in(pod, server, name, secs, clients)?;
        let f: Vec<&str> = r.split_whitespace().collect();
        println!("{label:<58} {:>9} {:>8} {:>8} {:>6}", f[0], f[1], f[2], f[3]);
    }
    println!("\nproxy counters: {}", proxy.status()["queries"]);
    proxy.shutdown();
    drop(mesh);
    let _ = kmesh_daemon::kernel::uninstall(&pins);
    Ok(())
}
