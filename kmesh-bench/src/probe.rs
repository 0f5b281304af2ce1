//! The in-repo client, run inside a client pod (`kmesh-bench probe`).
//!
//! `connect` mode times the connect() system call alone, in a loop of socket / connect / close
//! (SO_LINGER 0, so closes send a reset and leave no TIME_WAIT behind). That is where every
//! service path does its work: the eBPF program rewrites the address inside connect(), and
//! iptables or nftables rewrite the SYN that connect() sends. `http` mode times a whole short
//! transaction: socket, connect, one request, the full response, close.
//!
//! With [`Turns`], several probes (one per path, each in its own pod) share one stretch of
//! time in alternating slices of the system's monotonic clock, so that whatever the machine is
//! doing in that stretch (on shared cores its speed moves for seconds at a time) weighs on every
//! path alike.

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::stats::quantile_sorted;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeResult {
    pub count: u64,
    pub errors: u64,
    /// errno of the first failure, if any.
    pub first_errno: Option<i32>,
    /// Where the first socket ended up connected (after any rewrite done in connect()).
    pub peer: Option<String>,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// One socket connected to `target`, and the time connect() took.
fn connect_once(target: &libc::sockaddr_in) -> Result<(Fd, Duration), i32> {
    // SAFETY: plain socket calls on values we own; lengths match the structures passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        let fd = Fd(fd);
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
        let t0 = Instant::now();
        let r = libc::connect(
            fd.0,
            (target as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let dt = t0.elapsed();
        if r != 0 {
            return Err(errno());
        }
        Ok((fd, dt))
    }
}

fn peer_of(fd: &Fd) -> Option<String> {
    // SAFETY: out buffer of the right size.
    unsafe {
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getpeername(fd.0, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) != 0 {
            return None;
        }
        let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Some(format!("{ip}:{}", u16::from_be(sa.sin_port)))
    }
}

/// A request and its full response over a connected socket; false when the answer is not a
/// 200 with a body.
fn transact(fd: &Fd) -> bool {
    let req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
    // SAFETY: the descriptor is open; ManuallyDrop keeps the File from closing it.
    let mut f =
        std::mem::ManuallyDrop::new(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd.0) });
    if f.write_all(req).is_err() {
        return false;
    }
    let mut buf = Vec::with_capacity(512);
    if std::io::Read::read_to_end(&mut *f, &mut buf).is_err() {
        return false;
    }
    buf.starts_with(b"HTTP/1.1 200") && buf.windows(4).any(|w| w == b"\r\n\r\n")
}

/// This probe's share of time among `of` probes run at once: it works only in the slices
/// `index`, `index + of`, ... of `slice` each, counted on the monotonic clock (common to every
/// process of the machine, so the probes need not talk to each other).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Turns {
    pub index: u32,
    pub of: u32,
    pub slice: Duration,
}

/// No transaction starts closer than this to the end of its slice: it would run into the next
/// probe's turn.
const TURN_GUARD: Duration = Duration::from_millis(2);

/// The monotonic clock in nanoseconds (the clock turns are counted on).
pub(crate) fn monotonic_ns() -> u64 {
    // SAFETY: a valid out pointer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Turns {
    /// How long to wait, at monotonic time `now` (ns), before a transaction may start: zero
    /// inside this probe's slice (short of its guard), else until its next slice begins.
    fn wait_at(&self, now: u64) -> Duration {
        let slice = self.slice.as_nanos().max(1) as u64;
        let of = self.of.max(1) as u64;
        let cycle = slice * of;
        let start = (self.index as u64 % of) * slice;
        let at = now % cycle;
        let guard = (TURN_GUARD.as_nanos() as u64).min(slice / 2);
        if at >= start && at + guard < start + slice {
            return Duration::ZERO;
        }
        Duration::from_nanos((start + cycle - at) % cycle)
    }
}

/// What one client's loop gathered.
#[derive(Default)]
struct Loop {
    samples: Vec<u32>,
    errors: u64,
    first_errno: Option<i32>,
    peer: Option<String>,
}

/// One client's loop until `t_end` (at most `max` samples).
fn client_loop(sa: &libc::sockaddr_in, http: bool, t_end: Instant, max: usize, turns: Option<Turns>) -> Loop {
    let mut l = Loop { samples: Vec::with_capacity(max.min(1 << 20)), ..Default::default() };
    while Instant::now() < t_end && l.samples.len() < max {
        if let Some(turns) = &turns {
            let wait = turns.wait_at(monotonic_ns());
            if !wait.is_zero() {
                std::thread::sleep(wait.min(t_end.saturating_duration_since(Instant::now())));
                continue;
            }
        }
        let t0 = Instant::now();
        match connect_once(sa) {
            Ok((fd, dt)) => {
                if l.peer.is_none() {
                    l.peer = peer_of(&fd);
                }
                if http {
                    if !transact(&fd) {
                        l.errors += 1;
                        continue;
                    }
                    drop(fd);
                    l.samples.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                } else {
                    l.samples.push(dt.as_nanos().min(u32::MAX as u128) as u32);
                }
            }
            Err(e) => {
                l.errors += 1;
                l.first_errno.get_or_insert(e);
                // A path that refuses fails fast; do not spin.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    l
}

/// Runs the loop for `duration` (at most `max` samples in all) in `clients` threads at once,
/// each with one connection at a time, and summarises it; with `turns`, `duration` is the whole
/// stretch shared with the other probes, of which this one works a `1 / turns.of` share.
pub fn run(
    target: SocketAddr,
    http: bool,
    duration: Duration,
    max: usize,
    turns: Option<Turns>,
    clients: usize,
) -> ProbeResult {
    let SocketAddr::V4(t) = target else {
        return ProbeResult { errors: 1, first_errno: Some(libc::EAFNOSUPPORT), ..Default::default() };
    };
    let sa = sockaddr(t);
    let clients = clients.max(1);
    let t_end = Instant::now() + duration;
    let per = max.div_ceil(clients);
    let loops: Vec<Loop> = if clients == 1 {
        vec![client_loop(&sa, http, t_end, max, turns)]
    } else {
        std::thread::scope(|s| {
            let running: Vec<_> =
                (0..clients).map(|_| s.spawn(|| client_loop(&sa, http, t_end, per, turns))).collect();
            running.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    };
    let mut res = ProbeResult::default();
    let mut samples: Vec<u32> = Vec::new();
    for l in loops {
        samples.extend_from_slice(&l.samples);
        res.errors += l.errors;
        if res.first_errno.is_none() {
            res.first_errno = l.first_errno;
        }
        if res.peer.is_none() {
            res.peer = l.peer;
        }
    }
    samples.sort_unstable();
    res.count = samples.len() as u64;
    let us = |q| quantile_sorted(&samples, q).map(|ns| ns as f64 / 1000.0).unwrap_or(0.0);
    res.p50_us = us(0.5);
    res.p90_us = us(0.9);
    res.p99_us = us(0.99);
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A loopback server answering `n` connections' requests with a 200, one at a time.
    fn http_server(n: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            for s in l.incoming().take(n) {
                let mut s = s.unwrap();
                let mut b = [0u8; 256];
                let _ = s.read(&mut b);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        });
        (addr, srv)
    }

    #[test]
    fn probes_a_loopback_server() {
        let (addr, srv) = http_server(3);
        let r = run(addr, true, Duration::from_secs(5), 3, None, 1);
        assert_eq!((r.count, r.errors), (3, 0), "{r:?}");
        assert_eq!(r.peer.as_deref(), Some(addr.to_string().as_str()));
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us);
        srv.join().unwrap();
        // Four clients share the sample budget, two transactions each: the server's eight
        // answers, all counted once.
        let (addr, srv) = http_server(8);
        let r = run(addr, true, Duration::from_secs(5), 8, None, 4);
        assert_eq!((r.count, r.errors, r.peer.is_some()), (8, 0, true), "{r:?}");
        srv.join().unwrap();
        // A port held by a bound socket that does not listen (a freed port could be taken by
        // a test running alongside): every attempt fails with ECONNREFUSED.
        // SAFETY: plain socket calls on a descriptor this test owns; `sa` outlives the calls.
        let fd = Fd(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) });
        let mut sa = sockaddr(SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0));
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        unsafe {
            assert_eq!(libc::bind(fd.0, std::ptr::from_ref(&sa).cast(), len), 0);
            assert_eq!(libc::getsockname(fd.0, std::ptr::from_mut(&mut sa).cast(), &mut len), 0);
        }
        let held = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, u16::from_be(sa.sin_port)));
        let r = run(held, false, Duration::from_millis(20), 1000, None, 1);
        assert_eq!(r.count, 0);
        assert_eq!(r.first_errno, Some(libc::ECONNREFUSED));
    }

    #[test]
    fn turns_never_overlap_and_each_probe_waits_for_its_own_slice() {
        let ms = 1_000_000u64;
        let t = |index| Turns { index, of: 3, slice: Duration::from_millis(10) };
        // The cycle is 30 ms: probe 0 works in [0, 8), probe 1 in [10, 18), probe 2 in [20, 28).
        assert_eq!(t(0).wait_at(0), Duration::ZERO);
        assert_eq!(t(0).wait_at(7 * ms), Duration::ZERO);
        assert_eq!(t(0).wait_at(9 * ms), Duration::from_millis(21), "inside the guard");
        assert_eq!(t(1).wait_at(3 * ms), Duration::from_millis(7));
        assert_eq!(t(2).wait_at(31 * ms), Duration::from_millis(19));
        // Over a whole cycle, at every microsecond at most one probe may start.
        for at in (0..30_000u64).map(|us| 1_000_000_000 + us * 1_000) {
            let free = (0..3).filter(|&i| t(i).wait_at(at).is_zero()).count();
            assert!(free <= 1, "{free} probes free at {at}");
        }
        // A probe that has to wait wakes up at the start of its slice, free to go.
        let w = t(1).wait_at(1_000_000_000 + 25 * ms);
        assert!(t(1).wait_at(1_000_000_000 + 25 * ms + w.as_nanos() as u64).is_zero());
    }
}
