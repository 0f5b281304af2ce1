//! Maps sized from what the configuration needs. A fresh map starts small
//! ([`INITIAL_CAPACITY`]); an apply that would not fit first grows the maps it needs to:
//! bigger maps are created next to the old ones and filled with what the old ones hold, a new
//! copy of the programs is loaded against them (every other map shared through its pin), each
//! attached link is switched to the new program in one step (BPF_LINK_UPDATE), and only then
//! do the new maps take the old ones' pins. Until the switch every hook runs the old programs
//! on the old maps, which nothing has touched; a failure before or during the switch puts
//! every link back and leaves no trace. The capacity flags are ceilings, never sizes.

use std::fs;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{HashMap, MapData};
use aya::{Ebpf, Pod};

use super::*;

/// Capacity of a map created before any configuration asks for more (16 KiB of hash
/// buckets in the kernel).
pub const INITIAL_CAPACITY: u32 = 1024;

/// The capacity a map holding `needed` entries at its peak should have: `current` if they
/// fit; else room for half as many again, rounded up to a power of two (the kernel sizes its
/// bucket array so anyway), and at most `ceiling`. `None` when even the ceiling is too small.
pub fn capacity_for(current: u32, needed: usize, ceiling: u32) -> Option<u32> {
    if needed <= current as usize {
        return Some(current);
    }
    if needed > ceiling as usize {
        return None;
    }
    let want = (needed + needed / 2).next_power_of_two();
    Some(u32::try_from(want).unwrap_or(u32::MAX).min(ceiling))
}

/// Link pins whose program is this data plane's: the cgroup hooks and every namespace's
/// authorization hook, with the program each one runs.
fn link_pins(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let links = dir.join("links");
    let mut out: Vec<(PathBuf, &'static str)> =
        PROGRAMS.iter().chain(&[TELEMETRY_PROGRAM]).map(|n| (links.join(n), *n)).collect();
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("authz_") && !n.ends_with("_new") {
                out.push((e.path(), AUTHZ_PROGRAM));
            }
        }
    }
    out.sort();
    out
}

fn program_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, KernelError> {
    let p = ebpf
        .program(name)
        .ok_or(KernelError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    Ok(p.fd().map_err(|source| KernelError::Program { name, source })?.as_fd())
}

fn fill<K: Pod, V: Pod>(
    m: &mut HashMap<MapData, K, V>,
    name: &'static str,
    from: &BTreeMap<K, V>,
) -> Result<(), KernelError> {
    for (k, v) in from {
        m.insert(k, v, 0).map_err(|source| KernelError::Write { map: name, source })?;
    }
    Ok(())
}

/// Grown maps, filled, with programs loaded against them and pinned next to the maps in
/// force, not yet switched to (see [`Dataplane::prepare_grow`]). Dropped unswitched, it
/// removes its pins.
pub struct Grown {
    /// The capacities the maps had when these were made, and the ones they have.
    from: Capacities,
    want: Capacities,
    grown: Vec<&'static str>,
    /// Where each of `grown` is pinned until the switch.
    tmp: Vec<PathBuf>,
    ebpf: Option<(Ebpf, Maps)>,
    started: std::time::Instant,
    /// For maps made on another thread: what the maps held when they were copied.
    snapshot: Option<Box<(MapState, AuthzState)>>,
}

impl Drop for Grown {
    fn drop(&mut self) {
        // Switched, the pins were moved into place and these paths are gone.
        for t in &self.tmp {
            let _ = fs::remove_file(t);
        }
    }
}

impl Dataplane {
    /// Grows the maps that the peaks of the next apply (`lb`: load balancing,
    /// `authz`: [`AUTHZ_MAP_NAMES`]) do not fit, or refuses it, naming the first map whose
    /// ceiling is too small, before anything is written.
    pub(super) fn fit(&mut self, lb: &MapCounts, authz: [usize; 4]) -> Result<(), KernelError> {
        let want = self.wanted(lb, authz)?;
        if want != self.capacities { self.grow(want) } else { Ok(()) }
    }

    /// The capacities the peaks `lb` and `authz` need (see [`fit`](Self::fit)).
    fn wanted(&self, lb: &MapCounts, authz: [usize; 4]) -> Result<Capacities, KernelError> {
        let needed = lb.as_array().into_iter().chain(AUTHZ_MAP_NAMES.into_iter().zip(authz));
        let mut want = self.capacities;
        for (map, needed) in needed {
            let ceiling = self.ceilings.get(map);
            match capacity_for(self.capacities.get(map), needed, ceiling) {
                Some(c) => want.set(map, c),
                None => {
                    return Err(KernelError::MapFull {
                        map,
                        flag: capacity_flag(map),
                        needed,
                        capacity: ceiling,
                    });
                }
            }
        }
        Ok(want)
    }

    /// Makes the grown maps that load-balancing peaks of at least `lb` will need, and loads
    /// the programs against them, without putting them in force: the part of a grow that
    /// takes time (the verifier), from a shared reference so that it can run while the
    /// compiler works on another thread. `None` when the maps are big enough already, or the
    /// peaks are over a ceiling (the apply refuses that when it knows the real peaks).
    /// [`switch_grown`](Self::switch_grown) puts the result in force; nothing may be written
    /// to the maps in between.
    pub fn prepare_grow(&self, lb: &MapCounts) -> Result<Option<Grown>, KernelError> {
        let Ok(want) = self.wanted(lb, [0; 4]) else { return Ok(None) };
        self.prepare(want)
    }

    /// Replaces the maps whose capacity `want` raises by bigger ones holding the same
    /// entries, make-before-break (see the module's documentation).
    pub fn grow(&mut self, want: Capacities) -> Result<(), KernelError> {
        match self.prepare(want)? {
            Some(g) => self.switch_grown(g),
            None => Ok(()),
        }
    }

    fn prepare(&self, want: Capacities) -> Result<Option<Grown>, KernelError> {
        prepare(&self.dir, self.capacities, want, &self.applied, &self.authz_applied)
    }

    /// [`prepare_grow`](Self::prepare_grow) on a thread of its own, from a copy of what the
    /// maps hold: for a large batch of resources the daemon has only decoded, so that the
    /// verifier runs while the batch is merged and compiled. `None` when nothing needs to
    /// grow. The maps are switched to only if the ones it replaces still hold what was copied
    /// (see [`switch_grown`](Self::switch_grown)).
    pub fn grow_in_background(
        &self,
        lb: &MapCounts,
    ) -> Option<std::thread::JoinHandle<Result<Option<Grown>, KernelError>>> {
        let want = self.wanted(lb, [0; 4]).ok().filter(|w| *w != self.capacities)?;
        let (dir, from) = (self.dir.clone(), self.capacities);
        let snapshot = Box::new((self.applied.clone(), self.authz_applied.clone()));
        let spawned = std::thread::Builder::new().name("kmesh-grow".into()).spawn(move || {
            let g = prepare(&dir, from, want, &snapshot.0, &snapshot.1)?;
            Ok(g.map(|mut g| {
                g.snapshot = Some(snapshot);
                g
            }))
        });
        match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to grow the maps ahead");
                None
            }
        }
    }

    /// Puts maps made by [`prepare_grow`](Self::prepare_grow) in force: each hook is
    /// switched to the new programs, and the new maps take the old ones' pins. Maps prepared
    /// before another grow, or (made on another thread) from entries the maps no longer hold,
    /// are dropped: the next apply grows what it needs.
    pub fn switch_grown(&mut self, mut g: Grown) -> Result<(), KernelError> {
        let Some((ebpf, maps)) = g.ebpf.take() else { return Ok(()) };
        if g.from != self.capacities {
            return Ok(());
        }
        if let Some(snap) = &g.snapshot
            && g.grown
                .iter()
                .any(|n| !same_entries(n, (&snap.0, &snap.1), (&self.applied, &self.authz_applied)))
        {
            tracing::debug!("maps grown ahead are dropped: the maps they replace changed meanwhile");
            return Ok(());
        }
        let want = g.want;
        // The switch: each hook runs the new programs from here on.
        let mut switched: Vec<(PathBuf, &'static str)> = Vec::new();
        for (pin, name) in link_pins(&self.dir) {
            let r = program_fd(&ebpf, name).and_then(|fd| match sys::replace_link_program(&pin, fd) {
                Ok(()) => Ok(true),
                // A namespace that is gone (its link detached: ENOLINK) or went away with its
                // pin runs nothing to switch; its unenrollment removes the pin.
                Err(e) if e.raw_os_error() == Some(libc::ENOLINK) || !pin.exists() => Ok(false),
                Err(e) => Err(KernelError::Pin {
                    path: pin.clone(),
                    reason: format!("switching to grown maps: {e}"),
                }),
            });
            match r {
                Ok(true) => switched.push((pin, name)),
                Ok(false) => tracing::debug!(pin = %pin.display(), "a detached link is left as it is"),
                Err(e) => {
                    for (pin, name) in switched.iter().rev() {
                        if let Err(e) = program_fd(&self.ebpf, name).and_then(|fd| {
                            sys::replace_link_program(pin, fd)
                                .map_err(|e| KernelError::Pin { path: pin.clone(), reason: e.to_string() })
                        }) {
                            tracing::error!(pin = %pin.display(), error = %e, "cannot put the old program back");
                        }
                    }
                    return Err(e);
                }
            }
        }
        let maps_dir = self.dir.join("maps");
        for (n, t) in g.grown.iter().zip(&g.tmp) {
            // rename() replaces the old pin atomically; the old map lives on until the old
            // programs and handles are dropped below.
            if let Err(e) = fs::rename(t, maps_dir.join(n)) {
                tracing::error!(map = n, error = %e, "cannot move the grown map's pin into place; it is pinned again by the pin check");
            }
        }
        let old: Vec<(&str, u32)> = g.grown.iter().map(|n| (*n, self.capacities.get(n))).collect();
        self.m = maps;
        self.ebpf = ebpf;
        self.capacities = want;
        self.grows += 1;
        for (map, from) in old {
            tracing::info!(
                map,
                from,
                to = want.get(map),
                elapsed_ms = g.started.elapsed().as_millis() as u64,
                "map grown"
            );
        }
        Ok(())
    }
}

/// Loads the programs again with the grown maps (created and pinned at `tmp`, filled with
/// what the old ones hold) and every other map shared through its pin; attaches nothing.
fn load_grown(
    dir: &Path,
    want: Capacities,
    grown: &[&'static str],
    tmp: &[PathBuf],
    a: &MapState,
    z: &AuthzState,
) -> Result<(Ebpf, Maps), KernelError> {
    let maps_dir = dir.join("maps");
    let mut ebpf = load_object(want, |n| match grown.iter().position(|g| *g == n) {
        Some(i) => tmp[i].clone(),
        None => maps_dir.join(n),
    })?;
    let mut maps = Maps::take(&mut ebpf)?;
    for n in grown {
        match *n {
            "NETNS" => fill(&mut maps.netns, n, &a.netns)?,
            "FRONTENDS" => fill(&mut maps.frontends, n, &a.frontends)?,
            "LB_TABLES" => fill(&mut maps.tables, n, &a.tables)?,
            "ENDPOINTS" => fill(&mut maps.endpoints, n, &a.endpoints)?,
            "BACKENDS" => fill(&mut maps.backends, n, &a.backends)?,
            "PORTS" => fill(&mut maps.ports, n, &a.ports)?,
            "AUTHZ_DEST" => fill(&mut maps.authz_dest, n, &z.dest)?,
            "IDENTITY" => {
                let sealed =
                    z.identity.iter().map(|(k, id)| (*k, IdentityValue { id: *id, check: 0 }.sealed(k)));
                fill(&mut maps.identity, n, &sealed.collect())?
            }
            "AUTHZ_REGION" => {
                for ((k, len), v) in &z.region {
                    maps.authz_region
                        .insert(&LpmKey::new(*len, *k), v, 0)
                        .map_err(|source| KernelError::Write { map: n, source })?;
                }
            }
            "AUTHZ_VERDICT" => fill(&mut maps.authz_verdict, n, &z.verdict)?,
            _ => {}
        }
    }
    load_programs(&mut ebpf, &LOADED_PROGRAMS)?;
    Ok((ebpf, maps))
}

/// Makes the maps `want` grows, next to those of layout directory `dir` (capacities `from`),
/// filled with `a` and `z` (what the maps hold), and loads the programs against them.
fn prepare(
    dir: &Path,
    from: Capacities,
    want: Capacities,
    a: &MapState,
    z: &AuthzState,
) -> Result<Option<Grown>, KernelError> {
    let grown: Vec<&'static str> =
        want.all().into_iter().filter(|(n, c)| *c > from.get(n)).map(|(n, _)| n).collect();
    if grown.is_empty() {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let maps_dir = dir.join("maps");
    // bpffs names take no dots.
    let tmp: Vec<PathBuf> = grown.iter().map(|n| maps_dir.join(format!("{n}_grown"))).collect();
    for t in &tmp {
        let _ = fs::remove_file(t);
    }
    // From here on a failure or a grow never switched removes the new pins (on drop).
    let mut g = Grown { from, want, grown, tmp, ebpf: None, started, snapshot: None };
    let (ebpf, maps) = load_grown(dir, want, &g.grown, &g.tmp, a, z)?;
    g.ebpf = Some((ebpf, maps));
    Ok(Some(g))
}

/// Whether map `name` holds the same entries in `a` and `b` (the load-balancing and the
/// authorization mirrors).
fn same_entries(name: &str, a: (&MapState, &AuthzState), b: (&MapState, &AuthzState)) -> bool {
    match name {
        "NETNS" => a.0.netns == b.0.netns,
        "FRONTENDS" => a.0.frontends == b.0.frontends,
        "LB_TABLES" => a.0.tables == b.0.tables,
        "ENDPOINTS" => a.0.endpoints == b.0.endpoints,
        "BACKENDS" => a.0.backends == b.0.backends,
        "PORTS" => a.0.ports == b.0.ports,
        "AUTHZ_DEST" => a.1.dest == b.1.dest,
        "IDENTITY" => a.1.identity == b.1.identity,
        "AUTHZ_REGION" => a.1.region == b.1.region,
        "AUTHZ_VERDICT" => a.1.verdict == b.1.verdict,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_grows_to_half_again_its_need_in_powers_of_two_up_to_its_ceiling() {
        assert_eq!(capacity_for(1024, 1024, 1 << 20), Some(1024), "a full map that fits stays");
        assert_eq!(capacity_for(1024, 1025, 1 << 20), Some(2048));
        assert_eq!(capacity_for(1024, 1500, 1 << 20), Some(4096), "1500 + 750 = 2250 -> 4096");
        assert_eq!(capacity_for(1024, 110_000, 1 << 20), Some(262_144));
        assert_eq!(capacity_for(1024, 110_000, 200_000), Some(200_000), "capped at the ceiling");
        assert_eq!(capacity_for(1024, 200_000, 200_000), Some(200_000), "exactly the ceiling fits");
        assert_eq!(capacity_for(1024, 200_001, 200_000), None);
        assert_eq!(capacity_for(4, 5, 4), None);
        assert_eq!(capacity_for(u32::MAX, usize::MAX, u32::MAX), None);
    }
}
