//! `kmesh-testbed`: make pods on this machine, and the small agent that runs inside them.
//!
//! For people:   up, exec, cleanup
//! Inside pods:  serve (TCP/UDP server that answers with its pod name), connect (client that
//!               reports where each connection went, one JSON line per attempt)
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kmesh_testbed::*;

#[derive(Parser)]
#[command(
    name = "kmesh-testbed",
    about = "Pods on this machine: network namespaces, veths, a bridge, cgroups"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a testbed and keep it until Ctrl-C (or --secs), then remove everything.
    Up {
        /// A pod as NAME:NODE:ZONE (repeat).
        #[arg(long = "pod", required = true)]
        pods: Vec<String>,
        /// Remove the testbed after this many seconds.
        #[arg(long, default_value_t = 3600)]
        secs: u64,
    },
    /// Run a command inside a pod of a running testbed.
    Exec {
        /// Testbed name as printed by `up` (kt<pid>-<n>).
        #[arg(long)]
        bed: String,
        #[arg(long)]
        pod: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Remove leftovers of testbeds whose process died (with --all: of every testbed).
    Cleanup {
        #[arg(long)]
        all: bool,
    },
    /// Agent: serve TCP and UDP on all addresses; each answer starts with the pod name.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long = "tcp")]
        tcp: Vec<u16>,
        #[arg(long = "udp")]
        udp: Vec<u16>,
        /// TCP ports whose connections open with a PROXY protocol v2 header (a waypoint's):
        /// the answer line says what the header carried, then the rest is echoed.
        #[arg(long = "proxy-tcp")]
        proxy_tcp: Vec<u16>,
        /// TCP ports that speak HTTP/1.1: every request is answered `200 <name> <path>`,
        /// except that every other request for a path under `/flaky` gets a 503.
        #[arg(long = "http")]
        http: Vec<u16>,
    },
    /// Agent: hold one TCP connection open for SECS seconds, exchanging a line every
    /// INTERVAL_MS; print one JSON line with the outcome.
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 30)]
        secs: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Agent: connect to a target COUNT times and print one JSON line per attempt.
    Connect {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 0)]
        interval_us: u64,
        /// Stop after this long even if COUNT is not reached (0: no limit).
        #[arg(long, default_value_t = 0)]
        duration_ms: u64,
        /// TCP: after the server's name line, send this many bytes and read the echo.
        #[arg(long, default_value_t = 0)]
        send: u32,
        /// UDP: never connect(): sendto() the target and report the address recvfrom() says
        /// the answer came from.
        #[arg(long)]
        unconnected: bool,
        /// UDP: every attempt from one socket (one source port), as a long-lived client.
        #[arg(long)]
        one_socket: bool,
        /// TCP: write a line before reading the server's (a client-first protocol), and read
        /// it echoed after the server's line.
        #[arg(long)]
        client_first: bool,
        /// TCP: send one HTTP/1.1 GET for this path (and report `<status> <first body line>`).
        #[arg(long)]
        http_path: Option<String>,
        /// With --http-path: a request header, `name: value` (repeat).
        #[arg(long = "http-header")]
        http_headers: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up { pods, secs } => up(pods, secs),
        Cmd::Exec { bed, pod, command } => {
            let p = Pod {
                spec: PodSpec::new(&pod, "", ""),
                netns: format!("{bed}-{pod}"),
                ipv4: std::net::Ipv4Addr::UNSPECIFIED,
                ipv6: None,
                cgroup: testbeds_cgroup()?.join(&bed).join(&pod),
            };
            let st = p.command(&command[0]).args(&command[1..]).status().context("running the command")?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cmd::Cleanup { all } => {
            for r in sweep(None, all) {
                println!("removed {r}");
            }
            Ok(())
        }
        Cmd::Serve { name, tcp, udp, proxy_tcp, http } => serve(name, tcp, udp, proxy_tcp, http),
        Cmd::Hold { target, secs, interval_ms } => hold(target, secs, interval_ms),
        Cmd::Connect {
            target,
            count,
            udp,
            timeout_ms,
            interval_us,
            duration_ms,
            send,
            unconnected,
            one_socket,
            client_first,
            http_path,
            http_headers,
        } => {
            let udp = udp.then_some(UdpMode { unconnected, one_socket });
            let http = http_path.map(|path| (path, http_headers));
            let tcp = TcpMode { send, client_first, http };
            connect(target, count, udp, Duration::from_millis(timeout_ms), interval_us, duration_ms, tcp)
        }
    }
}

fn up(pods: Vec<String>, secs: u64) -> anyhow::Result<()> {
    cleanup_signal_handler(Arc::new(Mutex::new(Vec::new())));
    let mut bed = Testbed::new()?;
    for p in pods {
        let parts: Vec<&str> = p.split(':').collect();
        let [name, node, zone] = parts[..] else { bail!("--pod {p:?}: expected NAME:NODE:ZONE") };
        bed.add_pod(PodSpec::new(name, node, zone))?;
    }
    println!("testbed {} (cgroup {})", bed.name(), bed.cgroup().display());
    for p in bed.pods() {
        println!(
            "  pod {:<10} node={:<8} zone={:<8} {} {} netns={}",
            p.spec.name,
            p.spec.node,
            p.spec.zone,
            p.ipv4,
            p.ipv6.map(|a| a.to_string()).unwrap_or_default(),
            p.netns_path().display()
        );
    }
    println!(
        "run commands with: kmesh-testbed exec --bed {} --pod NAME -- CMD; Ctrl-C removes it all",
        bed.name()
    );
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}

fn hold(target: SocketAddr, secs: u64, interval_ms: u64) -> anyhow::Result<()> {
    die_with_parent();
    let started = Instant::now();
    let mut exchanges = 0u64;
    let r = (|| -> std::io::Result<String> {
        let s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut server = String::new();
        reader.read_line(&mut server)?;
        let mut w = s;
        while started.elapsed() < Duration::from_secs(secs) {
            let msg = format!("ping {exchanges}\n");
            w.write_all(msg.as_bytes())?;
            let mut back = String::new();
            reader.read_line(&mut back)?;
            if back != msg {
                return Err(std::io::Error::other(format!("echo mismatch: {back:?}")));
            }
            exchanges += 1;
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
        Ok(server.trim().to_string())
    })();
    let line = match r {
        Ok(server) => {
            serde_json::json!({"ok": true, "server": server, "exchanges": exchanges, "secs": started.elapsed().as_secs_f64()})
        }
        Err(e) => {
            serde_json::json!({"ok": false, "error": e.to_string(), "exchanges": exchanges, "secs": started.elapsed().as_secs_f64()})
        }
    };
    println!("{line}");
    Ok(())
}

fn die_with_parent() {
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

/// What a TCP port of the agent's server speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Speaks {
    Echo,
    Proxy,
    Http,
}

fn serve(
    name: String,
    tcp: Vec<u16>,
    udp: Vec<u16>,
    proxy_tcp: Vec<u16>,
    http: Vec<u16>,
) -> anyhow::Result<()> {
    die_with_parent();
    let name = Arc::new(name);
    let flaky = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut listeners = Vec::new();
    let ports = tcp.iter().map(|p| (*p, Speaks::Echo));
    let ports = ports
        .chain(proxy_tcp.iter().map(|p| (*p, Speaks::Proxy)))
        .chain(http.iter().map(|p| (*p, Speaks::Http)));
    for (p, proxy) in ports {
        // [::] with the default bindv6only=0 takes IPv4 too.
        listeners.push((TcpListener::bind(("::", p)).with_context(|| format!("bind tcp {p}"))?, proxy));
    }
    let mut sockets = Vec::new();
    for p in udp {
        sockets.push(UdpSocket::bind(("::", p)).with_context(|| format!("bind udp {p}"))?);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut handles = Vec::new();
    for (l, speaks) in listeners {
        let name = name.clone();
        let flaky = flaky.clone();
        handles.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                let flaky = flaky.clone();
                match speaks {
                    Speaks::Echo => std::thread::spawn(move || echo(s, &name)),
                    Speaks::Proxy => std::thread::spawn(move || proxy_echo(s, &name)),
                    Speaks::Http => std::thread::spawn(move || http_answer(s, &name, &flaky)),
                };
            }
        }));
    }
    for s in sockets {
        let name = name.clone();
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let mut reply = format!("{name}\n").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, from);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn echo(mut s: TcpStream, name: &str) {
    if s.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 16384];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// HTTP/1.1 requests on one connection (keep-alive unless the client says close): `200` with
/// `<name> <path>`, or `503` for every other request of the server under `/flaky`.
fn http_answer(s: TcpStream, name: &str, flaky: &std::sync::atomic::AtomicU64) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(read) = s.try_clone() else { return };
    let mut r = BufReader::new(read);
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut close = false;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h.trim().is_empty() {
                break;
            }
            close |= h.to_ascii_lowercase().replace(' ', "").starts_with("connection:close");
        }
        let fail = path.starts_with("/flaky")
            && flaky.fetch_add(1, std::sync::atomic::Ordering::SeqCst).is_multiple_of(2);
        let (status, body) = if fail {
            ("503 Service Unavailable", String::new())
        } else {
            ("200 OK", format!("{name} {path}\n"))
        };
        let conn = if close { "Connection: close\r\n" } else { "" };
        // One write: a head and a body in two would wait on Nagle and the peer's delayed ACK.
        let resp = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n{conn}\r\n{body}", body.len());
        if w.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// One HTTP/1.1 GET on a fresh connection: `<status code> <first line of the body>`.
fn http_get(s: &TcpStream, path: &str, headers: &[String]) -> std::io::Result<String> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    (&*s).write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    (&*s).read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text.split_whitespace().nth(1).unwrap_or("").to_string();
    if status.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no HTTP response"));
    }
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok(format!("{status} {}", body.lines().next().unwrap_or("")).trim().to_string())
}

/// A connection that opens with a PROXY protocol v2 header: answers with a line saying what
/// the header carried (`<name> proxy src=.. dst=.. id=.. host=..`, or `<name> proxy=none`
/// when the first bytes are not one), then echoes everything after the header.
fn proxy_echo(mut s: TcpStream, name: &str) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = [0u8; 16];
    if s.read_exact(&mut head).is_err() {
        return;
    }
    let mut rest = Vec::new();
    let line = if head[..12] == *b"\r\n\r\n\0\r\nQUIT\n" {
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let mut body = vec![0u8; len];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        describe_proxy_header(head[13], &body)
    } else {
        rest.extend_from_slice(&head);
        "proxy=none".to_string()
    };
    if s.write_all(format!("{name} {line}\n").as_bytes()).is_err() || s.write_all(&rest).is_err() {
        return;
    }
    let mut buf = [0u8; 16384];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// `proxy src=<addr:port> dst=<addr:port> id=<TLV 0xD0> host=<TLV 0xD1>` of a header body.
fn describe_proxy_header(family: u8, body: &[u8]) -> String {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let (src, dst, at): (SocketAddr, SocketAddr, usize) = match family {
        0x11 if body.len() >= 12 => {
            let ip = |o: usize| Ipv4Addr::new(body[o], body[o + 1], body[o + 2], body[o + 3]);
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            ((ip(0), port(8)).into(), (ip(4), port(10)).into(), 12)
        }
        0x21 if body.len() >= 36 => {
            let ip = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&body[o..o + 16]).unwrap());
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            ((ip(0), port(32)).into(), (ip(16), port(34)).into(), 36)
        }
        _ => return format!("proxy=bad-family-{family:#x}"),
    };
    let (mut id, mut host, mut at) = (String::new(), String::new(), at);
    while at + 3 <= body.len() {
        let (kind, len) = (body[at], u16::from_be_bytes([body[at + 1], body[at + 2]]) as usize);
        let Some(value) = body.get(at + 3..at + 3 + len) else { return "proxy=bad-tlv".into() };
        match kind {
            0xD0 => id = String::from_utf8_lossy(value).into_owned(),
            0xD1 => host = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
        at += 3 + len;
    }
    format!("proxy src={src} dst={dst} id={id} host={host}")
}

/// How a TCP client behaves.
#[derive(Clone)]
struct TcpMode {
    send: u32,
    client_first: bool,
    /// One HTTP GET (path, headers) instead of the line protocol.
    http: Option<(String, Vec<String>)>,
}

fn attempt_tcp(
    target: SocketAddr,
    timeout: Duration,
    mode: &TcpMode,
) -> std::io::Result<(String, SocketAddr)> {
    let s = TcpStream::connect_timeout(&target, timeout)?;
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(timeout))?;
    if let Some((path, headers)) = &mode.http {
        return Ok((http_get(&s, path, headers)?, peer));
    }
    if mode.client_first {
        (&s).write_all(b"hi\n")?;
    }
    let mut reader = BufReader::new(&s);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before answering"));
    }
    if mode.client_first {
        let mut echo = String::new();
        reader.read_line(&mut echo)?;
        if echo != "hi\n" {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("echoed {echo:?}, not hi"),
            ));
        }
    }
    let send = mode.send;
    if send > 0 {
        (&s).write_all(&vec![b'x'; send as usize])?;
        let mut back = vec![0u8; send as usize];
        reader.read_exact(&mut back)?;
    }
    Ok((line.trim().to_string(), peer))
}

/// How a UDP client behaves.
#[derive(Clone, Copy)]
struct UdpMode {
    unconnected: bool,
    one_socket: bool,
}

fn udp_socket(target: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr =
        if target.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

fn attempt_udp(
    target: SocketAddr,
    timeout: Duration,
    mode: UdpMode,
    shared: &mut Option<UdpSocket>,
) -> std::io::Result<(String, SocketAddr)> {
    let fresh;
    let s = if mode.one_socket {
        if shared.is_none() {
            *shared = Some(udp_socket(target, timeout)?);
        }
        shared.as_ref().expect("just set")
    } else {
        fresh = udp_socket(target, timeout)?;
        &fresh
    };
    let mut buf = [0u8; 2048];
    let (n, peer) = if mode.unconnected {
        s.send_to(b"hello", target)?;
        s.recv_from(&mut buf)?
    } else {
        s.connect(target)?;
        s.send(b"hello")?;
        (s.recv(&mut buf)?, s.peer_addr()?)
    };
    let text = String::from_utf8_lossy(&buf[..n]);
    Ok((text.lines().next().unwrap_or("").to_string(), peer))
}

fn connect(
    target: SocketAddr,
    count: u32,
    udp: Option<UdpMode>,
    timeout: Duration,
    interval_us: u64,
    duration_ms: u64,
    tcp: TcpMode,
) -> anyhow::Result<()> {
    die_with_parent();
    let deadline = (duration_ms > 0).then(|| Instant::now() + Duration::from_millis(duration_ms));
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut shared = None;
    for i in 0..count {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if i > 0 && interval_us > 0 {
            std::thread::sleep(Duration::from_micros(interval_us));
        }
        let start_ns = monotonic_ns();
        let r = match udp {
            Some(mode) => attempt_udp(target, timeout, mode, &mut shared),
            None => attempt_tcp(target, timeout, &tcp),
        };
        let a = match r {
            Ok((server, peer)) => Attempt {
                ok: true,
                server: Some(server),
                peer: Some(peer.to_string()),
                errno: None,
                error: None,
                start_ns,
                elapsed_us: (monotonic_ns() - start_ns) / 1000,
            },
            Err(e) => Attempt {
                ok: false,
                server: None,
                peer: None,
                errno: e.raw_os_error(),
                error: Some(e.to_string()),
                start_ns,
                elapsed_us: (monotonic_ns() - start_ns) / 1000,
            },
        };
        serde_json::to_writer(&mut out, &a)?;
        out.write_all(b"\n")?;
        out.flush()?;
    }
    Ok(())
}
