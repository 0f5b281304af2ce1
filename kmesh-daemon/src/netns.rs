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
    // SAFETY: plain socket syscalls on a descriptor owned here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
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
