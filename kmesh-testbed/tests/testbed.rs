//! The testbed itself: isolation, reachability and cleanup. Needs root.
use std::net::SocketAddr;

use kmesh_testbed::*;

fn skip() -> bool {
    if !is_root() {
        eprintln!("SKIPPED: the testbed tests need root (network namespaces, cgroups)");
        return true;
    }
    false
}

#[test]
fn pods_reach_each_other_and_nothing_else() {
    if skip() {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    let client = bed.add_pod(PodSpec::new("client", "node-a", "zone-a")).unwrap();
    let server = bed.add_pod(PodSpec::new("server", "node-a", "zone-b")).unwrap();
    bed.serve(&server, &[8080], &[5353]).unwrap();

    for addr in server.addresses() {
        let a = client.connect(SocketAddr::new(addr, 8080), 2, false).unwrap();
        assert!(a.iter().all(|a| a.ok && a.server.as_deref() == Some("server")), "{a:?}");
        let u = client.connect(SocketAddr::new(addr, 5353), 1, true).unwrap();
        assert_eq!(u[0].server.as_deref(), Some("server"), "{u:?}");
    }
    // No route anywhere but the pod subnet: a service VIP is unreachable without the mesh.
    let a = client.connect("10.96.0.1:80".parse().unwrap(), 1, false).unwrap();
    assert_eq!(a[0].errno, Some(libc::ENETUNREACH), "{a:?}");
    let a = client.connect("[fd00:96::1]:80".parse().unwrap(), 1, false).unwrap();
    assert_eq!(a[0].errno, Some(libc::ENETUNREACH), "{a:?}");
}

#[test]
fn drop_removes_namespaces_and_cgroups() {
    if skip() {
        return;
    }
    let (netns, cgroup) = {
        let mut bed = Testbed::new().unwrap();
        let p = bed.add_pod(PodSpec::new("p", "n", "z")).unwrap();
        bed.serve(&p, &[9000], &[]).unwrap();
        (p.netns.clone(), bed.cgroup().to_owned())
    };
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    let list = ip(&["netns", "list"]).unwrap();
    assert!(!list.contains(&netns), "{netns} left behind: {list}");
}

#[test]
fn a_panicking_test_still_cleans_up() {
    if skip() {
        return;
    }
    let names = std::sync::Arc::new(std::sync::Mutex::new(None));
    let n2 = names.clone();
    let r = std::thread::spawn(move || {
        let mut bed = Testbed::new().unwrap();
        let p = bed.add_pod(PodSpec::new("p", "n", "z")).unwrap();
        *n2.lock().unwrap() = Some((p.netns.clone(), bed.cgroup().to_owned()));
        panic!("deliberate");
    })
    .join();
    assert!(r.is_err());
    let (netns, cgroup) = names.lock().unwrap().clone().unwrap();
    assert!(!cgroup.exists());
    assert!(!ip(&["netns", "list"]).unwrap().contains(&netns));
}
