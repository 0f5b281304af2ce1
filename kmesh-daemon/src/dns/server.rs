//! One pod's DNS proxy: UDP and TCP servers on 127.0.0.1 and ::1 inside the pod's network
//! namespace. A query the name table answers is answered at once; any other is forwarded,
//! unchanged, to the resolver the pod asked (found in `DNS_ORIG` under the pod's socket), from
//! a socket of the pod's own namespace marked so that the kernel lets it through, and the
//! upstream's answer is passed back unchanged. An upstream that fails or does not answer in
//! time gives SERVFAIL.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kmesh_common::{DNS_UPSTREAM_MARK, DnsOrig, DnsOrigKey, PROTO_TCP, PROTO_UDP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::message::{self, Action};
use super::proxy::ProxyShared;

/// Forwarded queries of one pod in flight at once; beyond, queries are dropped (counted), so a
/// flood from one pod holds a bounded amount of memory and sockets.
pub const MAX_INFLIGHT: usize = 256;
/// TCP connections of one pod served at once.
pub const MAX_TCP: usize = 64;
/// A TCP client silent this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What one pod's servers share.
pub struct Pod {
    pub cookie: u64,
    pub netns: Arc<File>,
    /// The pod's Kubernetes namespace (for its search domains), when its workload is known.
    pub namespace: std::sync::RwLock<Option<String>>,
    pub proxy: Arc<ProxyShared>,
    inflight: Arc<Semaphore>,
    tcp: Arc<Semaphore>,
    /// Connected sockets to upstream resolvers not in use, kept for the next query (creating
    /// one means a trip to the thread that enters the pod's namespace).
    idle_upstreams: std::sync::Mutex<std::collections::HashMap<SocketAddr, Vec<UdpSocket>>>,
}

/// Idle upstream sockets kept per resolver and pod (descriptors are the daemon's: a node runs
/// hundreds of pods).
const IDLE_UPSTREAMS: usize = 8;

impl Pod {
    pub fn new(cookie: u64, netns: Arc<File>, namespace: Option<String>, proxy: Arc<ProxyShared>) -> Self {
        Self {
            cookie,
            netns,
            namespace: std::sync::RwLock::new(namespace),
            proxy,
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
            tcp: Arc::new(Semaphore::new(MAX_TCP)),
            idle_upstreams: Default::default(),
        }
    }

    fn namespace(&self) -> Option<String> {
        self.namespace.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the pod's socket on `port` (as the proxy sees it) was sending its query.
    fn orig(&self, port: u16, proto: u8, family: u8, forget: bool) -> Option<SocketAddr> {
        let key = DnsOrigKey { netns: self.cookie, port, proto, family, _pad: 0 };
        let mut maps = self.proxy.maps.lock().unwrap_or_else(|p| p.into_inner());
        let o = maps.orig(&key);
        if forget && o.is_some() {
            maps.forget(&key);
        }
        o.map(orig_addr)
    }

    /// What to do with one query: answered from the table (the reply), dropped, or to be
    /// forwarded (`Err(())`).
    fn decide(&self, query: &[u8], tcp: bool) -> Result<Option<Vec<u8>>, ()> {
        let table = self.proxy.table();
        let ns = self.namespace();
        let h = message::handle_query(query, &table, ns.as_deref(), tcp);
        let stats = &self.proxy.stats;
        match h.action {
            Action::Reply(r) => {
                stats.count(&h.outcome);
                Ok(Some(r))
            }
            Action::Drop => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Action::Forward => Err(()),
        }
    }

    /// The upstream's answer to a query the table does not answer, or SERVFAIL. `upstream`
    /// holds a TCP client's connection to it, kept for the client's next queries.
    async fn forward(
        &self,
        query: &[u8],
        to: Option<SocketAddr>,
        tcp: bool,
        upstream: &mut Option<TcpStream>,
    ) -> Option<Vec<u8>> {
        let r = match to {
            None => Err(std::io::Error::other("the resolver the pod asked is not known")),
            Some(to) if tcp => self.forward_tcp(to, query, upstream).await,
            Some(to) => self.forward_udp(to, query).await,
        };
        let stats = &self.proxy.stats;
        match r {
            Ok(resp) => {
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
                Some(resp)
            }
            Err(e) => {
                tracing::debug!(cookie = self.cookie, error = %e, "DNS query not answered upstream: SERVFAIL");
                stats.servfail.fetch_add(1, Ordering::Relaxed);
                message::servfail(query)
            }
        }
    }

    async fn upstream_socket(
        &self,
        to: SocketAddr,
        ty: libc::c_int,
    ) -> std::io::Result<std::os::fd::OwnedFd> {
        let domain = if to.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        self.proxy.factory.socket(&self.netns, domain, ty, Some(DNS_UPSTREAM_MARK)).await
    }

    async fn forward_udp(&self, to: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let idle =
            self.idle_upstreams.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&to).and_then(Vec::pop);
        let s = match idle {
            Some(s) => s,
            None => {
                let fd = self.upstream_socket(to, libc::SOCK_DGRAM).await?;
                let s = UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
                s.connect(to).await?;
                s
            }
        };
        s.send(query).await?;
        let mut buf = vec![0u8; 65535];
        let wait = async {
            loop {
                let n = s.recv(&mut buf).await?;
                // Only the answer to this query (same id) is passed back.
                if n >= 12 && buf[..2] == query[..2] {
                    return Ok::<_, std::io::Error>(buf[..n].to_vec());
                }
            }
        };
        let r = tokio::time::timeout(self.proxy.opts.upstream_timeout, wait).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream resolver did not answer")
        })?;
        if r.is_ok() {
            // Answered: fit for the next query (a socket that timed out or failed is dropped,
            // so no late answer can meet a later query).
            let mut idle = self.idle_upstreams.lock().unwrap_or_else(|p| p.into_inner());
            let v = idle.entry(to).or_default();
            if v.len() < IDLE_UPSTREAMS {
                v.push(s);
            }
        }
        r
    }

    async fn forward_tcp(
        &self,
        to: SocketAddr,
        query: &[u8],
        upstream: &mut Option<TcpStream>,
    ) -> std::io::Result<Vec<u8>> {
        let timeout = self.proxy.opts.upstream_timeout;
        let exchange = async {
            if upstream.is_none() {
                let fd = self.upstream_socket(to, libc::SOCK_STREAM).await?;
                let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
                *upstream = Some(sock.connect(to).await?);
            }
            let s = upstream.as_mut().expect("connected above");
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
            framed.extend_from_slice(query);
            s.write_all(&framed).await?;
            let len = s.read_u16().await? as usize;
            let mut resp = vec![0u8; len];
            s.read_exact(&mut resp).await?;
            Ok::<_, std::io::Error>(resp)
        };
        let r = match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream resolver did not answer"))
            }
        };
        if r.is_err() {
            *upstream = None;
        }
        r
    }
}

/// The resolver as a socket address.
fn orig_addr(o: DnsOrig) -> SocketAddr {
    let ip: IpAddr = crate::compile::words_addr(o.addr);
    SocketAddr::new(ip, u16::from_be(o.port))
}

fn family_of(a: &SocketAddr) -> u8 {
    crate::compile::family_of(&a.ip())
}

/// Serves queries over UDP on `sock` until aborted: those the table answers at once, in
/// turn; those forwarded each in a task of its own (at most `MAX_INFLIGHT` per pod).
pub async fn serve_udp(pod: Arc<Pod>, sock: UdpSocket) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(cookie = pod.cookie, error = %e, "DNS proxy: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match pod.decide(&buf[..n], false) {
            Ok(Some(r)) => {
                let _ = sock.send_to(&r, peer).await;
            }
            Ok(None) => {}
            Err(()) => {
                let Ok(permit) = pod.inflight.clone().try_acquire_owned() else {
                    pod.proxy.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let query = buf[..n].to_vec();
                let to = pod.orig(peer.port(), PROTO_UDP, family_of(&peer), false);
                let (pod, sock) = (pod.clone(), sock.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(r) = pod.forward(&query, to, false, &mut None).await {
                        let _ = sock.send_to(&r, peer).await;
                    }
                });
            }
        }
    }
}

/// Serves DNS over TCP (RFC 7766 framing, several queries per connection) until aborted.
pub async fn serve_tcp(pod: Arc<Pod>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(cookie = pod.cookie, error = %e, "DNS proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = pod.tcp.clone().try_acquire_owned() else {
            pod.proxy.stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let pod = pod.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let orig = pod.orig(peer.port(), PROTO_TCP, family_of(&peer), true);
            let _ = tcp_client(&pod, stream, orig).await;
        });
    }
}

async fn tcp_client(pod: &Pod, mut s: TcpStream, orig: Option<SocketAddr>) -> std::io::Result<()> {
    let mut upstream = None;
    loop {
        let Ok(len) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else { return Ok(()) };
        let len = len? as usize;
        let mut q = vec![0u8; len];
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut q))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "query not sent in time"))??;
        let r = match pod.decide(&q, true) {
            Ok(r) => r,
            Err(()) => pod.forward(&q, orig, true, &mut upstream).await,
        };
        let Some(r) = r else { return Ok(()) };
        let mut framed = Vec::with_capacity(r.len() + 2);
        framed.extend_from_slice(&(r.len() as u16).to_be_bytes());
        framed.extend_from_slice(&r);
        s.write_all(&framed).await?;
    }
}
