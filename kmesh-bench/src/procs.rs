//! Processes: bounded runs with their CPU time, CPU and memory of running processes, waiting
//! for a listener inside a pod without sending it anything, and BPF map memory.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("starting `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` did not finish within {limit:?} and was killed")]
    Timeout { cmd: String, limit: Duration },
    #[error("`{cmd}` exited with {code}: {stderr}")]
    Failed { cmd: String, code: i32, stderr: String },
    #[error("nothing listened on port {port} in the namespace of pid {pid} within {limit:?}")]
    NotListening { pid: u32, port: u16, limit: Duration },
    #[error("process {0} exited before it was ready")]
    Exited(u32),
}

/// What a bounded run produced, with the CPU time of the process and its reaped children.
#[derive(Debug)]
pub struct Finished {
    pub stdout: String,
    pub stderr: String,
    pub cpu_s: f64,
    pub wall_s: f64,
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion, killing it after `limit`, and returns its output and the CPU
/// seconds (user + system) it used, from wait4's rusage. Fails on a non-zero exit.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Finished, ProcError> {
    let text = describe(cmd);
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ProcError::Spawn { cmd: text.clone(), source })?;
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data, zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut timed_out = false;
    loop {
        // SAFETY: valid out pointers; pid is our own unreaped child.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 {
            // Already reaped or not ours: nothing more to learn.
            break;
        }
        if t0.elapsed() > limit && !timed_out {
            timed_out = true;
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if timed_out {
        return Err(ProcError::Timeout { cmd: text, limit });
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu_s = tv(usage.ru_utime) + tv(usage.ru_stime);
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
    if code != 0 {
        return Err(ProcError::Failed { cmd: text, code, stderr: stderr.trim().to_string() });
    }
    Ok(Finished { stdout, stderr, cpu_s, wall_s })
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

/// Fields of /proc/PID/stat after the command name (index 0 = state, field 3 of the file).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU seconds (user + system, all threads) a running process has used so far; 0 when gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Some(f) = stat_fields(pid) else { return 0.0 };
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
}

/// Total CPU seconds of a set of processes: from each one's CPU clock (exact), or /proc's ticks
/// when the clock cannot be read.
pub fn cpu_total(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|p| cpu_clock_ns(&[*p]).map(|ns| ns as f64 / 1e9).unwrap_or_else(|| cpu_seconds(*p)))
        .sum()
}

/// CPU time of a set of processes in nanoseconds, read from each one's CPU clock: exact, where
/// /proc's figures come in ticks of 10 ms. None when one cannot be read (it has exited).
pub fn cpu_clock_ns(pids: &[u32]) -> Option<u64> {
    let mut total = 0u64;
    for &pid in pids {
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: out pointers to locals of the right types.
        unsafe {
            if libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) != 0
                || libc::clock_gettime(clock, &mut ts) != 0
            {
                return None;
            }
        }
        total += ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    }
    Some(total)
}

/// The CPU time of `pids` in each of `of` turns of `slice` on the monotonic clock (slice `k`
/// since the clock's zero is turn `k % of`, as `probe::Turns` counts them), read at every slice
/// boundary until `stop` is set; nanoseconds per turn. None when the processes cannot be read.
pub fn cpu_by_turn(
    pids: &[u32],
    slice: Duration,
    of: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Option<Vec<u64>> {
    let slice = slice.as_nanos().max(1) as u64;
    let of = of.max(1);
    let mut per = vec![0u64; of];
    let mut last = cpu_clock_ns(pids)?;
    let mut k = crate::probe::monotonic_ns() / slice;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        k += 1;
        let at = k * slice;
        let until = libc::timespec { tv_sec: (at / 1_000_000_000) as _, tv_nsec: (at % 1_000_000_000) as _ };
        // SAFETY: a valid absolute time; an interrupted sleep just reads a little early.
        unsafe {
            libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &until, std::ptr::null_mut())
        };
        let now = cpu_clock_ns(pids)?;
        // The slice that just ended is k - 1.
        per[((k - 1) % of as u64) as usize] += now.saturating_sub(last);
        last = now;
    }
    Some(per)
}

/// Busy CPU seconds of the whole machine (every state but idle and iowait), from /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    busy / clock_ticks()
}

/// A process and all its descendants (e.g. nginx's master and workers).
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parent: BTreeMap<u32, u32> = BTreeMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// (VmRSS, VmHWM) in MiB.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// True when a TCP socket listens on `port` in the network namespace of `pid` (read from
/// /proc/PID/net/tcp, so nothing is sent to the listener).
pub fn listening(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default().lines().skip(1).any(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() > 3 && c[1].ends_with(&want) && c[3] == "0A"
        })
    })
}

/// Waits until `child` listens on every port, failing if it exits first.
pub fn wait_listening(child: &mut Child, ports: &[u16], limit: Duration) -> Result<(), ProcError> {
    let t0 = Instant::now();
    let pid = child.id();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Err(ProcError::Exited(pid));
        }
        match ports.iter().find(|p| !listening(pid, **p)) {
            None => return Ok(()),
            Some(p) if t0.elapsed() > limit => {
                return Err(ProcError::NotListening { pid, port: *p, limit });
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One BPF map a process holds open.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct MapMemory {
    pub id: u64,
    /// From `bpftool map show` when bpftool is installed.
    pub name: String,
    pub map_type: String,
    pub max_entries: u64,
    /// The kernel's accounting of the map's memory (`memlock`).
    pub bytes: u64,
}

/// The BPF maps a process holds open, one per distinct map id, from the fdinfo of its map
/// fds (`map_id`, `map_type`, `max_entries`, `memlock`: the kernel's own accounting of the
/// map's memory); names from `bpftool -j map show` when bpftool is there.
pub fn bpf_maps(pid: u32) -> Vec<MapMemory> {
    let mut maps: BTreeMap<u64, MapMemory> = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in entries.flatten() {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
            let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
            if let (Some(id), Some(bytes)) = (num("map_id:"), num("memlock:")) {
                maps.insert(
                    id,
                    MapMemory {
                        id,
                        name: String::new(),
                        map_type: get("map_type:").unwrap_or_default(),
                        max_entries: num("max_entries:").unwrap_or(0),
                        bytes,
                    },
                );
            }
        }
    }
    if let Ok(out) = Command::new("bpftool").args(["-j", "map", "show"]).output()
        && let Ok(serde_json::Value::Array(all)) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
    {
        for m in all {
            let Some(id) = m.get("id").and_then(|v| v.as_u64()) else { continue };
            if let Some(entry) = maps.get_mut(&id) {
                entry.name = m.get("name").and_then(|v| v.as_str()).unwrap_or("").to_string();
                if let Some(t) = m.get("type").and_then(|v| v.as_str()) {
                    entry.map_type = t.to_string();
                }
            }
        }
    }
    maps.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_charged_to_the_turn_it_was_spent_in() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let slice = Duration::from_millis(20);
        let stop = AtomicBool::new(false);
        let me = [std::process::id()];
        let per = std::thread::scope(|s| {
            let meter = s.spawn(|| cpu_by_turn(&me, slice, 2, &stop));
            // Burn CPU only in the middle of turn 0's slices, for about 0.6 s.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_millis(600) {
                let at = crate::probe::monotonic_ns() % 40_000_000;
                if (3_000_000..17_000_000).contains(&at) {
                    std::hint::black_box((0..1000u64).sum::<u64>());
                } else {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
            stop.store(true, Ordering::Relaxed);
            meter.join().unwrap()
        })
        .expect("this process's CPU clock");
        assert!(per[0] > 100_000_000, "turn 0 had the busy loop: {per:?}");
        assert!(per[1] * 5 < per[0], "turn 1 only slept: {per:?}");
    }

    #[test]
    fn bounded_run_reports_output_and_cpu() {
        let f = run_bounded(
            Command::new("sh").args(["-c", "echo hi; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"]),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(f.stdout.trim(), "hi");
        assert!(f.cpu_s > 0.0);
        let e = run_bounded(Command::new("sh").args(["-c", "echo no >&2; exit 3"]), Duration::from_secs(5));
        assert!(matches!(e, Err(ProcError::Failed { code: 3, .. })), "{e:?}");
        let e = run_bounded(Command::new("sleep").arg("5"), Duration::from_millis(100));
        assert!(matches!(e, Err(ProcError::Timeout { .. })), "{e:?}");
    }

    #[test]
    fn own_process_is_visible() {
        let me = std::process::id();
        assert!(process_tree(me).contains(&me));
        assert!(memory_mib(me).0 > 0.0);
        assert!(machine_busy_seconds() > 0.0);
    }
}
