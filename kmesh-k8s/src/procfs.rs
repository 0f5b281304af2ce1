//! Finding a running pod's network namespace without the CNI plugin: from the processes of its
//! containers. Kubelet puts every container of a pod under a cgroup named after the pod's uid
//! (`.../pod<uid>/...` with the cgroupfs driver, `...-pod<uid with _>.slice/...` with
//! systemd's), so the processes whose cgroup path names the uid are the pod's, and their
//! network namespace is the pod's. A `/run/netns` bind mount of that namespace (what container
//! runtimes create for a pod sandbox) is preferred over `/proc/<pid>/ns/net`, because it lives
//! as long as the sandbox and not only as long as one process.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where runtimes bind-mount pod network namespaces.
pub const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

fn is_uid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pod uid a cgroup path names, if it is a pod's cgroup (or below one).
pub fn pod_uid_in_cgroup_path(path: &str) -> Option<String> {
    for seg in path.split('/') {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        // cgroupfs: `pod<uid>`; systemd: `kubepods[-<qos>]-pod<uid_with_underscores>`.
        let cand = match seg.strip_prefix("pod") {
            Some(rest) => rest,
            None => match seg.rfind("-pod") {
                Some(i) if seg.starts_with("kubepods") => &seg[i + 4..],
                _ => continue,
            },
        };
        let uid = cand.replace('_', "-").to_ascii_lowercase();
        if is_uid(&uid) {
            return Some(uid);
        }
    }
    None
}

/// Pids of the processes of each pod in `wanted` (pod uids), read from `proc_root`
/// (`/proc`; the daemon needs the host's pid namespace to see the pods' processes).
pub fn pod_processes(proc_root: &Path, wanted: &BTreeSet<String>) -> BTreeMap<String, Vec<u32>> {
    let mut found: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    if wanted.is_empty() {
        return found;
    }
    let Ok(entries) = std::fs::read_dir(proc_root) else { return found };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // A process that exits meanwhile simply has no cgroup file any more.
        let Ok(text) = std::fs::read_to_string(e.path().join("cgroup")) else { continue };
        for line in text.lines() {
            // `hierarchy-id:controllers:path`; cgroup v2 is the `0::` line.
            let Some(path) = line.splitn(3, ':').nth(2) else { continue };
            if let Some(uid) = pod_uid_in_cgroup_path(path)
                && wanted.contains(&uid)
            {
                found.entry(uid).or_default().push(pid);
                break;
            }
        }
    }
    found
}

/// (device, inode) of a namespace file: two paths name the same namespace when these match.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The network namespace of a pod whose processes are `pids`: a bind mount in one of
/// `netns_dirs` of the same namespace if there is one, else `/proc/<pid>/ns/net` of the first
/// process that is not in `host` (the daemon's own namespace: a host-network process is never
/// taken for the pod's namespace).
pub fn netns_of(proc_root: &Path, pids: &[u32], netns_dirs: &[PathBuf], host: &Path) -> Option<PathBuf> {
    let host = ns_id(host);
    let (proc_path, id) = pids.iter().find_map(|pid| {
        let p = proc_root.join(pid.to_string()).join("ns/net");
        let id = ns_id(&p)?;
        (Some(id) != host).then_some((p, id))
    })?;
    for dir in netns_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            if ns_id(&e.path()) == Some(id) {
                return Some(e.path());
            }
        }
    }
    Some(proc_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8a9b-acbdcedfe0f1";

    #[test]
    fn pod_cgroups_of_both_kubelet_drivers_name_the_pod() {
        for p in [
            format!("/kubepods/besteffort/pod{UID}/8a1b"),
            format!("/kubepods/pod{UID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-ab.scope",
                UID.replace('-', "_")
            ),
            format!("/kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_")),
            format!("/nested/test/kubepods/besteffort/pod{}/pause", UID.to_uppercase()),
        ] {
            assert_eq!(pod_uid_in_cgroup_path(&p).as_deref(), Some(UID), "{p}");
        }
        for p in [
            "/",
            "/system.slice/kubelet.service",
            "/kubepods/besteffort",
            "/user.slice/podman-1234.scope",
            "/pod1234",
        ] {
            assert_eq!(pod_uid_in_cgroup_path(p), None, "{p}");
        }
    }

    #[test]
    fn a_fake_proc_tree_gives_each_pods_processes() {
        let root = std::env::temp_dir().join(format!("kmesh-k8s-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (pid, cg) in [
            ("10", format!("0::/kubepods/besteffort/pod{UID}/c1\n")),
            ("11", format!("12:cpu:/x\n0::/kubepods/besteffort/pod{UID}/c2\n")),
            ("12", "0::/system.slice/sshd.service\n".to_string()),
            ("self", format!("0::/kubepods/pod{UID}\n")),
        ] {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("cgroup"), cg).unwrap();
        }
        let wanted: BTreeSet<String> =
            [UID.to_string(), "11111111-2222-3333-4444-555555555555".into()].into();
        let found = pod_processes(&root, &wanted);
        let mut pids = found[UID].clone();
        pids.sort();
        assert_eq!(pids, vec![10, 11]);
        assert_eq!(found.len(), 1);
        assert!(pod_processes(&root, &BTreeSet::new()).is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_hosts_own_namespace_is_never_a_pods() {
        let me = std::process::id();
        let host = PathBuf::from("/proc/self/ns/net");
        assert_eq!(netns_of(Path::new("/proc"), &[me], &[], &host), None);
        assert_eq!(
            netns_of(Path::new("/proc"), &[me], &[], Path::new("/nonexistent")),
            Some(PathBuf::from(format!("/proc/{me}/ns/net")))
        );
    }
}
