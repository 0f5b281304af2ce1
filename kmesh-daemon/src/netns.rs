//! Network-namespace identity: the cookie that the kernel gives every namespace, read with
//! SO_NETNS_COOKIE from a socket opened inside it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace (give /run/netns/NAME or /proc/PID/ns/net)")]
    NotNetns { path: PathBuf },
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The path of a process's network namespace.
pub fn path_of_pid(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// Cookie of the network namespace of the calling thread.
pub fn current_cookie() -> std::io::Result<u64> {
    use std::os::fd::FromRawFd;
    // SAFETY: a socket syscall; the descriptor is owned by the OwnedFd at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket_cookie(&unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Cookie of the network namespace a socket was created in.
pub fn socket_cookie(fd: &impl AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 on a descriptor the caller owns.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `ioctl(NS_GET_NSTYPE)`: the kind of namespace an nsfs file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens `path` as a network namespace: without blocking (a FIFO or a device given as a path
/// cannot stall the caller) and refusing anything that is not a network namespace.
pub fn open_netns(path: &Path) -> Result<File, NetnsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| NetnsError::Open { path: path.into(), source })?;
    // SAFETY: an ioctl without arguments on a descriptor owned here.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(NetnsError::NotNetns { path: path.into() });
    }
    Ok(file)
}

/// Cookie of the network namespace at `path` (a `/run/netns/NAME` bind mount or
/// `/proc/PID/ns/net`). Enters it on a short-lived thread, so the caller's own namespace is
/// never changed.
pub fn cookie_of(path: &Path) -> Result<u64, NetnsError> {
    let file = open_netns(path)?;
    let p = path.to_owned();
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace fd we own.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetnsError::Enter { path: p, source: std::io::Error::last_os_error() });
        }
        current_cookie().map_err(|source| NetnsError::Cookie { path: p, source })
    })
    .join()
    .expect("netns cookie thread panicked")
}

/// Creates sockets inside other network namespaces. A socket belongs to the namespace of the
/// thread that created it for its whole life, so one thread of its own enters the namespace
/// asked (when it is not there already) and creates the socket; nothing else ever runs on it,
/// and no other thread's namespace changes.
#[derive(Clone)]
pub struct SocketFactory {
    tx: std::sync::mpsc::Sender<SocketRequest>,
}

struct SocketRequest {
    netns: std::sync::Arc<File>,
    domain: libc::c_int,
    ty: libc::c_int,
    mark: Option<u32>,
    reply: tokio::sync::oneshot::Sender<std::io::Result<std::os::fd::OwnedFd>>,
}

impl SocketFactory {
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<SocketRequest>();
        std::thread::Builder::new().name("kmesh-netns-sockets".into()).spawn(move || {
            // Held so that the namespace (and its descriptor's address) cannot be reused while
            // this thread believes it is inside it.
            let mut current: Option<std::sync::Arc<File>> = None;
            while let Ok(r) = rx.recv() {
                let here = current.as_ref().is_some_and(|c| std::sync::Arc::ptr_eq(c, &r.netns));
                if !here {
                    // SAFETY: setns on this thread only, with a namespace fd the request owns.
                    if unsafe { libc::setns(r.netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        current = None;
                        let _ = r.reply.send(Err(std::io::Error::last_os_error()));
                        continue;
                    }
                    current = Some(r.netns.clone());
                }
                let _ = r.reply.send(new_socket(r.domain, r.ty, r.mark));
            }
        })?;
        Ok(Self { tx })
    }

    /// A new non-blocking socket (`libc::AF_INET`/`AF_INET6`, `SOCK_DGRAM`/`SOCK_STREAM`) in the
    /// namespace `netns` (from [`open_netns`]), with `SO_MARK` set when `mark` is given.
    pub async fn socket(
        &self,
        netns: &std::sync::Arc<File>,
        domain: libc::c_int,
        ty: libc::c_int,
        mark: Option<u32>,
    ) -> std::io::Result<std::os::fd::OwnedFd> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(SocketRequest { netns: netns.clone(), domain, ty, mark, reply })
            .map_err(|_| std::io::Error::other("the namespace socket thread is gone"))?;
        rx.await.map_err(|_| std::io::Error::other("the namespace socket thread is gone"))?
    }
}

fn new_socket(
    domain: libc::c_int,
    ty: libc::c_int,
    mark: Option<u32>,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket syscalls; the descriptor is owned by the returned OwnedFd at once.
    unsafe {
        let fd = libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        if let Some(m) = mark {
            let rc = libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&m as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            );
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(fd)
    }
}
