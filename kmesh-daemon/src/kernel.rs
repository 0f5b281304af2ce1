//! The only module that makes bpf() calls: loads the programs, attaches them to a cgroup,
//! pins maps and links under a bpffs directory, adopts what an earlier run pinned, and writes
//! [`MapState`] diffs in make-before-break order with capacity checks and rollback.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::IterableMap as _;
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf};
use aya::programs::CgroupAttachMode;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SkLookup, SkMsg};
use aya::{Ebpf, EbpfLoader, Pod};
use kmesh_common::*;
use serde::Serialize;

use crate::authz::{AuthzDiff, AuthzState};
use crate::compile::{Diff, MapCounts, MapState, changed_entries, diff_owned, union_len};

mod grow;
mod prewrite;
pub use grow::{Grown, INITIAL_CAPACITY, PendingGrow, capacity_for, open_pinned};
pub use prewrite::{Ahead, Prewritten, WriteAhead};

/// The eBPF object built by build.rs.
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kmesh-ebpf"));

/// The programs and the hook each one attaches to.
pub const PROGRAMS: [&str; 6] = [
    "kmesh_connect4",
    "kmesh_connect6",
    "kmesh_sendmsg4",
    "kmesh_sendmsg6",
    "kmesh_recvmsg4",
    "kmesh_recvmsg6",
];
/// The telemetry program (sock_ops), attached to the cgroup next to the connect programs.
pub const TELEMETRY_PROGRAM: &str = "kmesh_sockops";
/// How often an open connection reports its counters unless configured otherwise.
pub const DEFAULT_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// The authorization program, attached to each enrolled network namespace.
pub const AUTHZ_PROGRAM: &str = "kmesh_authz";
/// Every program loaded against the maps (the sk_msg program of waypoint headers aside).
const LOADED_PROGRAMS: [&str; 8] = [
    PROGRAMS[0],
    PROGRAMS[1],
    PROGRAMS[2],
    PROGRAMS[3],
    PROGRAMS[4],
    PROGRAMS[5],
    TELEMETRY_PROGRAM,
    AUTHZ_PROGRAM,
];
/// Maps with fixed capacities (pinned next to the others): counters, ring buffers, socket
/// storage, and maps the kernel writes.
const FIXED_MAPS: [&str; 20] = [
    "STATS",
    "RR_TURNS",
    "ACTIVE",
    "LB_CONN",
    "AUTHZ_COUNTS",
    "AUTHZ_EVENTS",
    "CONNS",
    "ORIG_HANDOFF",
    "TELEMETRY",
    "TALLIES",
    "TELEMETRY_CONF",
    "NODE_CONNS",
    "UDP_REV",
    "DNS_PODS",
    "DNS_ORIG",
    "DNS_TCP",
    "WP_CONN",
    "WAYPOINT_SOCKS",
    "PP_IDENT",
    "PP_HOST",
];
/// The sk_msg program that writes the PROXY header of waypoint connections, attached to the
/// `WAYPOINT_SOCKS` map.
pub const PROXY_HEADER_PROGRAM: &str = "kmesh_proxy_header";

/// Loads the eBPF object, every map pinned at `pin_of(name)` (adopted when a pin is there,
/// created and pinned there otherwise). The maps the daemon writes are outer maps here; what
/// their slots hold is made by [`Maps::take`].
fn load_object(pin_of: impl Fn(&str) -> PathBuf) -> Result<Ebpf, KernelError> {
    let pins: Vec<(&'static str, PathBuf)> = Capacities::default()
        .all()
        .into_iter()
        .map(|(n, _)| n)
        .chain(FIXED_MAPS)
        .map(|n| (n, pin_of(n)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(EBPF_OBJ).map_err(KernelError::Load)
}

/// Runs a program load, again when the kernel answered EAGAIN: the verifier gives up with
/// EAGAIN when a signal is pending for the loading thread, whatever the program (libbpf
/// retries the same way).
pub(crate) fn retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut tries = 0;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 =>
            {
                tries += 1;
                tracing::debug!(tries, "program load interrupted (EAGAIN); loading again");
            }
            r => return r,
        }
    }
}

/// Loads the sk_msg program and attaches it to `WAYPOINT_SOCKS` (replacing what an earlier
/// run attached). The attachment is left in place when the daemon exits, like the pinned
/// links: a waypoint connection made while no daemon runs still gets its header. Sockets
/// already in the map keep the program they joined with.
fn attach_proxy_header(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    let name = PROXY_HEADER_PROGRAM;
    let err = |source| KernelError::Program { name, source };
    let socks = {
        let m = ebpf.map("WAYPOINT_SOCKS").ok_or(KernelError::MissingMap("WAYPOINT_SOCKS"))?;
        let h: aya::maps::SockHash<&MapData, u64> = aya::maps::SockHash::try_from(m)
            .map_err(|source| KernelError::MapType { name: "WAYPOINT_SOCKS", source })?;
        h.fd()
            .try_clone()
            .map_err(|e| KernelError::Pin { path: PathBuf::from("WAYPOINT_SOCKS"), reason: e.to_string() })?
    };
    let prog: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or(KernelError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
        .try_into()
        .map_err(err)?;
    retrying(|| prog.load()).map_err(err)?;
    let id = prog.attach(&socks).map_err(err)?;
    // Dropping the link would detach the program.
    std::mem::forget(prog.take_link(id).map_err(err)?);
    Ok(())
}

/// Loads (verifies) the named programs without attaching them, on as many threads as there
/// are CPUs (at most four): the verifier takes hundreds of milliseconds for each
/// load-balancing program, in the loading thread, and the programs are independent.
pub(crate) fn load_programs(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), KernelError> {
    let threads = crate::cpus().clamp(1, 4);
    let mut progs: Vec<(&'static str, &mut aya::programs::Program)> = Vec::new();
    for (n, p) in ebpf.programs_mut() {
        if let Some(name) = names.iter().find(|x| **x == n) {
            progs.push((name, p));
        }
    }
    if let Some(name) = names.iter().find(|n| !progs.iter().any(|(p, _)| p == *n)) {
        return Err(KernelError::Program { name, source: aya::programs::ProgramError::NotLoaded });
    }
    // Deal them out in turn: the costly load-balancing programs come first in PROGRAMS, so
    // each thread gets its share of them.
    let mut shares: Vec<Vec<(&'static str, &mut aya::programs::Program)>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (i, p) in progs.into_iter().enumerate() {
        shares[i % threads].push(p);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                s.spawn(move || {
                    for (name, p) in share {
                        let t = std::time::Instant::now();
                        load_one(p, name)?;
                        tracing::debug!(
                            program = name,
                            elapsed_ms = t.elapsed().as_millis() as u64,
                            verified_insns = p.info().ok().and_then(|i| i.verified_instruction_count()),
                            "program verified"
                        );
                    }
                    Ok::<(), KernelError>(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

/// Loads one of the data plane's programs (not attached).
fn load_one(p: &mut aya::programs::Program, name: &'static str) -> Result<(), KernelError> {
    use aya::programs::Program;
    let err = |source| KernelError::Program { name, source };
    match p {
        Program::CgroupSockAddr(p) => retrying(|| p.load()).map_err(err),
        Program::SockOps(p) => retrying(|| p.load()).map_err(err),
        Program::SkLookup(p) => retrying(|| p.load()).map_err(err),
        _ => Err(err(aya::programs::ProgramError::NotLoaded)),
    }
}

/// Attaches a loaded cgroup program (connect4/6 or sock_ops) with a bpf_link.
fn attach_to_cgroup(
    p: &mut aya::programs::Program,
    name: &'static str,
    cgroup: &fs::File,
) -> Result<FdLink, KernelError> {
    let err = |source| KernelError::Program { name, source };
    let pin_err = |e: aya::programs::links::LinkError| KernelError::Pin {
        path: PathBuf::from(name),
        reason: e.to_string(),
    };
    match p {
        aya::programs::Program::CgroupSockAddr(prog) => {
            let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            prog.take_link(id).map_err(err)?.try_into().map_err(pin_err)
        }
        aya::programs::Program::SockOps(prog) => {
            let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            prog.take_link(id).map_err(err)?.try_into().map_err(pin_err)
        }
        _ => Err(KernelError::Program { name, source: aya::programs::ProgramError::NotLoaded }),
    }
}

/// Map capacities (max entries), per map the daemon writes. As [`LoadOptions::ceilings`]
/// they are limits: maps start at [`INITIAL_CAPACITY`] and grow as the configuration needs
/// (see `grow`), up to these. The default ceilings hold 100k frontends and 200k endpoints with
/// room for make-before-break transitions. Hash maps are created without preallocation, so an
/// empty entry costs nothing; the kernel reserves 16 bytes of buckets per unit of capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Capacities {
    pub netns: u32,
    pub frontends: u32,
    pub tables: u32,
    pub endpoints: u32,
    pub backends: u32,
    pub ports: u32,
    /// Authorization: destinations with a policy (one per workload address).
    pub authz_dest: u32,
    /// Authorization: addresses with a known identity.
    pub identity: u32,
    /// Authorization: source ranges named by policies, per destination.
    pub authz_region: u32,
    /// Authorization: compiled verdict rows.
    pub authz_verdict: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            netns: 65_536,
            frontends: 262_144,
            tables: 262_144,
            endpoints: 1_048_576,
            backends: 524_288,
            ports: 524_288,
            authz_dest: 262_144,
            identity: 524_288,
            authz_region: 262_144,
            authz_verdict: 1_048_576,
        }
    }
}

/// The authorization maps whose capacity is configurable, in the order of
/// [`Capacities::authz_by_name`].
pub const AUTHZ_MAP_NAMES: [&str; 4] = ["AUTHZ_DEST", "IDENTITY", "AUTHZ_REGION", "AUTHZ_VERDICT"];

impl Capacities {
    fn by_name(&self) -> [(&'static str, u32); 6] {
        let n = [self.netns, self.frontends, self.tables, self.endpoints, self.backends, self.ports];
        std::array::from_fn(|i| (LB_MAP_NAMES[i], n[i]))
    }

    fn authz_by_name(&self) -> [(&'static str, u32); 4] {
        let n = [self.authz_dest, self.identity, self.authz_region, self.authz_verdict];
        std::array::from_fn(|i| (AUTHZ_MAP_NAMES[i], n[i]))
    }

    /// Every map's capacity, load balancing first.
    pub fn all(&self) -> [(&'static str, u32); 10] {
        let lb = self.by_name();
        let az = self.authz_by_name();
        std::array::from_fn(|i| if i < 6 { lb[i] } else { az[i - 6] })
    }

    fn slot(&mut self, map: &str) -> Option<&mut u32> {
        Some(match map {
            "NETNS" => &mut self.netns,
            "FRONTENDS" => &mut self.frontends,
            "LB_TABLES" => &mut self.tables,
            "ENDPOINTS" => &mut self.endpoints,
            "BACKENDS" => &mut self.backends,
            "PORTS" => &mut self.ports,
            "AUTHZ_DEST" => &mut self.authz_dest,
            "IDENTITY" => &mut self.identity,
            "AUTHZ_REGION" => &mut self.authz_region,
            "AUTHZ_VERDICT" => &mut self.authz_verdict,
            _ => return None,
        })
    }

    /// The capacity of the map named `map` (0 for a map without one here).
    pub fn get(&self, map: &str) -> u32 {
        let mut c = *self;
        c.slot(map).map_or(0, |v| *v)
    }

    /// Sets the capacity of the map named `map` (ignored for a map without one here).
    pub fn set(&mut self, map: &str, v: u32) {
        if let Some(s) = self.slot(map) {
            *s = v;
        }
    }

    /// Each capacity no more than `cap`.
    pub fn at_most(&self, cap: u32) -> Capacities {
        let mut c = *self;
        for (n, v) in self.all() {
            c.set(n, v.min(cap));
        }
        c
    }
}

/// The command-line flag (without its dashes) that sets a map's capacity.
pub fn capacity_flag(map: &str) -> String {
    format!("{}-capacity", map.to_ascii_lowercase().replace('_', "-"))
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{path} is not on a bpffs mount (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    MapType {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(crate::netns::NetnsError),
    #[error(transparent)]
    Policy(#[from] crate::authz::AuthzError),
    #[error("cannot pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error(
        "map {map} is full: the new configuration needs {needed} entries at its peak, its ceiling is {capacity}; nothing was changed (raise the ceiling with --{flag})"
    )]
    MapFull { map: &'static str, flag: String, needed: usize, capacity: u32 },
    #[error("writing map {map} failed: {source}; the previous state was restored")]
    Write {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading map {map} failed: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// How and where to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// cgroup2 directory the programs attach to (covers every descendant cgroup).
    pub cgroup: PathBuf,
    /// bpffs directory under which maps and links are pinned.
    pub pin_dir: PathBuf,
    /// How far each map may grow (the `--*-capacity` flags).
    pub ceilings: Capacities,
    /// The capacity of a map created before the configuration asks for more.
    pub initial_capacity: u32,
    /// Map layout version the pins are kept under (`MAP_LAYOUT_VERSION`; tests set another to
    /// play an older release).
    pub layout_version: u32,
}

impl LoadOptions {
    pub fn new(cgroup: PathBuf, pin_dir: PathBuf) -> Self {
        Self {
            cgroup,
            pin_dir,
            ceilings: Capacities::default(),
            initial_capacity: INITIAL_CAPACITY,
            layout_version: MAP_LAYOUT_VERSION,
        }
    }
}

/// What one [`Dataplane::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    pub writes: usize,
    pub deletes: usize,
}

/// Loaded programs, their maps and links, and what the maps hold.
pub struct Dataplane {
    /// Handles of the maps (replaced with the programs when maps grow).
    m: Maps,
    authz_applied: AuthzState,
    /// The loaded programs; replaced (with the maps' handles) when maps grow.
    ebpf: Ebpf,
    _links: Vec<PinnedLink>,
    pin_dir: PathBuf,
    /// `<pin_dir>/v<layout version>`.
    dir: PathBuf,
    /// Pin directories of other layout versions, retired once this one is in force.
    old_layouts: Vec<PathBuf>,
    /// The capacities the maps have now.
    capacities: Capacities,
    /// How far they may grow.
    ceilings: Capacities,
    /// How many times maps were grown since load.
    grows: u64,
    applied: MapState,
    adopted: bool,
}

/// Handles of the maps a loaded object holds (taken out of its [`Ebpf`]). The growable ones
/// are the maps in their outer maps' slots (see `grow`).
struct Maps {
    /// The outer maps of the growable ones, by name.
    outers: Vec<(&'static str, grow::Outer)>,
    netns: HashMap<MapData, u64, NetnsValue>,
    frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    tables: HashMap<MapData, TableKey, TableValue>,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    ports: HashMap<MapData, PortKey, PortValue>,
    stats: PerCpuArray<MapData, u64>,
    authz_dest: HashMap<MapData, [u32; 4], DestValue>,
    identity: HashMap<MapData, [u32; 4], IdentityValue>,
    authz_region: LpmTrie<MapData, RegionKey, u32>,
    authz_verdict: HashMap<MapData, VerdictKey, VerdictValue>,
    authz_counts: PerCpuHashMap<MapData, CountKey, u64>,
    /// The rings, only to pin them again: the observer reads them through its own handles
    /// ([`EventMaps`]). Not `RingBuf`s: a `RingBuf` maps the ring's pages (twice, for reads
    /// that wrap), 2.5 MiB of resident memory for these two rings.
    authz_events: MapData,
    telemetry: MapData,
    telemetry_conf: aya::maps::Array<MapData, u64>,
}

impl Maps {
    /// The maps that grow with the configuration, by name.
    fn growable(&self) -> [(&'static str, &MapData); 10] {
        [
            ("NETNS", self.netns.map()),
            ("FRONTENDS", self.frontends.map()),
            ("LB_TABLES", self.tables.map()),
            ("ENDPOINTS", self.endpoints.map()),
            ("BACKENDS", self.backends.map()),
            ("PORTS", self.ports.map()),
            ("AUTHZ_DEST", self.authz_dest.map()),
            ("IDENTITY", self.identity.map()),
            ("AUTHZ_REGION", self.authz_region.map()),
            ("AUTHZ_VERDICT", self.authz_verdict.map()),
        ]
    }

    /// Takes the maps out of `ebpf`. An outer map with an empty slot (created by this load)
    /// gets a map with the capacity `initial` gives it; an adopted one keeps what it holds.
    fn take(ebpf: &mut Ebpf, initial: Capacities) -> Result<Maps, KernelError> {
        fn other<T: TryFrom<aya::maps::Map, Error = MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, KernelError> {
            let m = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
            T::try_from(m).map_err(|source| KernelError::MapType { name, source })
        }
        fn ring(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, KernelError> {
            match ebpf.take_map(name).ok_or(KernelError::MissingMap(name))? {
                aya::maps::Map::RingBuf(d) => Ok(d),
                // Another type: the error a `RingBuf` of it would give.
                m => Err(KernelError::MapType {
                    name,
                    source: RingBuf::try_from(m).err().unwrap_or(MapError::InvalidMapType { map_type: 0 }),
                }),
            }
        }
        let mut outers = Vec::new();
        let mut slot = |ebpf: &mut Ebpf, name: &'static str| -> Result<aya::maps::Map, KernelError> {
            let ty = |source| KernelError::MapType { name, source };
            let m = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
            let mut outer = grow::Outer::new(name, m)?;
            let inner = grow::slot_map(&mut outer, name, initial.get(name))?;
            outers.push((name, outer));
            aya::maps::Map::from_map_data(inner).map_err(ty)
        };
        fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
            name: &'static str,
            m: Result<aya::maps::Map, KernelError>,
        ) -> Result<T, KernelError> {
            T::try_from(m?).map_err(|source| KernelError::MapType { name, source })
        }
        let netns = typed("NETNS", slot(ebpf, "NETNS"))?;
        let frontends = typed("FRONTENDS", slot(ebpf, "FRONTENDS"))?;
        let tables = typed("LB_TABLES", slot(ebpf, "LB_TABLES"))?;
        let endpoints = typed("ENDPOINTS", slot(ebpf, "ENDPOINTS"))?;
        let backends = typed("BACKENDS", slot(ebpf, "BACKENDS"))?;
        let ports = typed("PORTS", slot(ebpf, "PORTS"))?;
        let authz_dest = typed("AUTHZ_DEST", slot(ebpf, "AUTHZ_DEST"))?;
        let identity = typed("IDENTITY", slot(ebpf, "IDENTITY"))?;
        let authz_region = typed("AUTHZ_REGION", slot(ebpf, "AUTHZ_REGION"))?;
        let authz_verdict = typed("AUTHZ_VERDICT", slot(ebpf, "AUTHZ_VERDICT"))?;
        Ok(Maps {
            outers,
            netns,
            frontends,
            tables,
            endpoints,
            backends,
            ports,
            stats: other(ebpf, "STATS")?,
            authz_dest,
            identity,
            authz_region,
            authz_verdict,
            authz_counts: other(ebpf, "AUTHZ_COUNTS")?,
            authz_events: ring(ebpf, "AUTHZ_EVENTS")?,
            telemetry: ring(ebpf, "TELEMETRY")?,
            telemetry_conf: other(ebpf, "TELEMETRY_CONF")?,
        })
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// The versioned directory inside the pin dir that holds this layout's pins.
pub fn layout_dir(pin_dir: &Path) -> PathBuf {
    layout_dir_of(pin_dir, MAP_LAYOUT_VERSION)
}

fn layout_dir_of(pin_dir: &Path, version: u32) -> PathBuf {
    pin_dir.join(format!("v{version}"))
}

/// Pin directories of other layout versions under `pin_dir` (left by an older or newer
/// daemon).
pub fn other_layouts(pin_dir: &Path, version: u32) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(pin_dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix('v').and_then(|v| v.parse::<u32>().ok()).is_some_and(|v| v != version)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn read_all<K: Pod + Ord, V: Pod>(
    m: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, KernelError> {
    let mut out = BTreeMap::new();
    for item in m.iter() {
        match item {
            Ok((k, v)) => {
                out.insert(k, v);
            }
            // An entry deleted while iterating is simply gone.
            Err(e) if is_not_found(&e) => {}
            Err(source) => return Err(KernelError::Read { map: name, source }),
        }
    }
    Ok(out)
}

/// Every record of type `T` waiting in a ring buffer (the kernel writes them with
/// `output_untyped::<T>`).
fn drain<T: Pod>(ring: &mut RingBuf<MapData>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<T>() {
            // SAFETY: T is Pod and the record holds at least size_of::<T>() bytes; the ring
            // gives no alignment, so read unaligned.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) });
        }
    }
    out
}

/// One write that may need undoing.
enum Undo<K, V> {
    Restore(K, V),
    Remove(K),
}

/// Entries written per `BPF_MAP_UPDATE_BATCH` call.
const WRITE_BATCH: usize = 4096;

/// Fresh entries (see [`Dataplane::write_lb`]) from each side at least this many: written on
/// two threads at once. Below, a thread costs more than it saves.
const PARALLEL_WRITES: usize = 8192;

/// Entries of a map's state, borrowed, in key order.
type Entries<'a, K, V> = Vec<(&'a K, &'a V)>;

/// The entries of `set` whose keys `old` lacks, and those it holds: by one walk over both
/// when `set` is a good part of `old`, else a search each.
fn split_fresh<'a, K: Ord, V>(
    old: &BTreeMap<K, V>,
    set: &'a BTreeMap<K, V>,
) -> (Entries<'a, K, V>, Entries<'a, K, V>) {
    if old.is_empty() {
        return (set.iter().collect(), Vec::new());
    }
    if set.len() * 8 < old.len() {
        return set.iter().partition(|(k, _)| !old.contains_key(*k));
    }
    let mut held = old.keys().peekable();
    set.iter().partition(|(k, _)| kmesh_model::sorted::seek(&mut held, *k, |h| *h).is_none())
}

/// Upserts `set` into `m`, recording how to undo each write. Entries go in batches
/// (`BPF_MAP_UPDATE_BATCH`, one system call for up to [`WRITE_BATCH`] of them: a full push
/// writes hundreds of thousands); the kernel says how many of a batch it wrote before an
/// error, and exactly those are undone with the rest.
fn upsert<K: Pod + Ord, V: Pod>(
    m: &mut HashMap<MapData, K, V>,
    name: &'static str,
    old: &BTreeMap<K, V>,
    set: &BTreeMap<K, V>,
    undo: &mut Vec<Undo<K, V>>,
) -> Result<(), KernelError> {
    upsert_entries(m, name, old, &set.iter().collect::<Vec<_>>(), undo)
}

/// [`upsert`] of a list of entries.
fn upsert_entries<K: Pod + Ord, V: Pod>(
    m: &mut HashMap<MapData, K, V>,
    name: &'static str,
    old: &BTreeMap<K, V>,
    entries: &[(&K, &V)],
    undo: &mut Vec<Undo<K, V>>,
) -> Result<(), KernelError> {
    write_entries(m, name, old, entries, undo).inspect_err(|_| rollback(m, undo))
}

/// [`upsert_entries`] on two threads at once (for many roots: every key they lead to is
/// written already), each half recorded in `undo`; on error the caller rolls back.
fn upsert_split<K: Pod + Ord + Send + Sync, V: Pod + Send + Sync>(
    m: &HashMap<MapData, K, V>,
    name: &'static str,
    old: &BTreeMap<K, V>,
    set: &BTreeMap<K, V>,
    undo: &mut Vec<Undo<K, V>>,
) -> Result<(), KernelError> {
    let entries: Entries<'_, K, V> = set.iter().collect();
    if entries.len() < 2 * PARALLEL_WRITES {
        return write_entries(m, name, old, &entries, undo);
    }
    let (a, b) = entries.split_at(entries.len() / 2);
    let mut undo_b = Vec::new();
    let (ra, rb) = std::thread::scope(|s| {
        let hb = s.spawn(|| write_entries(m, name, old, b, &mut undo_b));
        let ra = write_entries(m, name, old, a, undo);
        (ra, hb.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    undo.append(&mut undo_b);
    ra.and(rb)
}

/// Writes `entries` into `m` in batches, recording in `undo` how to undo what was written
/// (also when a batch fails part way: the kernel says how much of it was written).
fn write_entries<K: Pod + Ord, V: Pod>(
    m: &HashMap<MapData, K, V>,
    name: &'static str,
    old: &BTreeMap<K, V>,
    entries: &[(&K, &V)],
    undo: &mut Vec<Undo<K, V>>,
) -> Result<(), KernelError> {
    use std::os::fd::AsFd as _;
    undo.reserve(entries.len());
    let mut keys = Vec::with_capacity(WRITE_BATCH.min(entries.len()));
    let mut values = Vec::with_capacity(WRITE_BATCH.min(entries.len()));
    for chunk in entries.chunks(WRITE_BATCH) {
        keys.clear();
        values.clear();
        keys.extend(chunk.iter().map(|(k, _)| **k));
        values.extend(chunk.iter().map(|(_, v)| **v));
        let (written, error) = sys::update_batch(m.map().fd().as_fd(), &keys, &values);
        for k in &keys[..written.min(keys.len())] {
            undo.push(match old.get(k) {
                Some(o) => Undo::Restore(*k, *o),
                None => Undo::Remove(*k),
            });
        }
        if let Some(io_error) = error {
            return Err(batch_write_error(name, io_error));
        }
    }
    Ok(())
}

/// The `fresh` entries (keys the maps do not hold, in key order) less those written ahead
/// with the same value (`pre`, in key order). Each one written ahead is recorded in `undo`
/// (unless `fresh` writes it again with another value, which records it), and those `fresh`
/// does not hold at all go to `strays`.
fn skip_written<'a, K: Ord + Copy, V: PartialEq + Copy>(
    fresh: Entries<'a, K, V>,
    pre: &[(K, V)],
    undo: &mut Vec<Undo<K, V>>,
    strays: &mut Vec<(K, V)>,
) -> Entries<'a, K, V> {
    if pre.is_empty() {
        return fresh;
    }
    undo.reserve(pre.len());
    let mut left = Vec::with_capacity(fresh.len().saturating_sub(pre.len()));
    let mut fresh = fresh.into_iter().peekable();
    for (k, v) in pre {
        while let Some(e) = fresh.next_if(|(f, _)| *f < k) {
            left.push(e);
        }
        match fresh.peek() {
            Some((f, fv)) if *f == k => {
                if *fv == v {
                    fresh.next();
                    undo.push(Undo::Remove(*k));
                }
            }
            _ => {
                undo.push(Undo::Remove(*k));
                strays.push((*k, *v));
            }
        }
    }
    left.extend(fresh);
    left
}

/// The error of a `BPF_MAP_UPDATE_BATCH` into map `name` that failed with `io_error`.
fn batch_write_error(name: &'static str, io_error: std::io::Error) -> KernelError {
    let source = MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_batch", io_error });
    KernelError::Write { map: name, source }
}

fn rollback<K: Pod, V: Pod>(m: &mut HashMap<MapData, K, V>, undo: &mut Vec<Undo<K, V>>) {
    while let Some(u) = undo.pop() {
        let r = match &u {
            Undo::Restore(k, v) => m.insert(k, v, 0),
            Undo::Remove(k) => m.remove(k),
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "rollback write failed");
        }
    }
}

/// Undo records of one load-balancing write phase.
#[derive(Default)]
struct LbUndo {
    backends: Vec<Undo<u32, BackendValue>>,
    ports: Vec<Undo<PortKey, PortValue>>,
    endpoints: Vec<Undo<EndpointKey, EndpointValue>>,
    tables: Vec<Undo<TableKey, TableValue>>,
    frontends: Vec<Undo<FrontendKey, FrontendValue>>,
    netns: Vec<Undo<u64, NetnsValue>>,
}

/// Undo records of one authorization write phase.
#[derive(Default)]
struct AuthzUndo {
    identity: Vec<Undo<[u32; 4], IdentityValue>>,
    region: Vec<Undo<(RegionKey, u32), u32>>,
    verdict: Vec<Undo<VerdictKey, VerdictValue>>,
    counts: Vec<CountKey>,
    dest: Vec<Undo<[u32; 4], DestValue>>,
}

/// The entries of `next` that `old` lacks or holds with another value.
fn remove_all<K: Pod>(m: &mut HashMap<MapData, K, impl Pod>, name: &'static str, keys: &[K]) -> usize {
    let mut failed = 0;
    for k in keys {
        if let Err(e) = m.remove(k)
            && !is_not_found(&e)
        {
            failed += 1;
            tracing::error!(map = name, error = %e, "delete failed; the entry is unreachable but stays");
        }
    }
    failed
}

impl Dataplane {
    /// Loads the programs, creates or adopts the pinned maps, attaches to the cgroup and pins
    /// the links. Maps pinned by an earlier run are adopted with their contents, so traffic
    /// keeps flowing across a restart; the first [`apply`](Self::apply) then changes only
    /// what differs. A first start that fails (a program the kernel refuses, a cgroup that
    /// is not there) leaves no pin behind: what it pinned is removed with the directories it
    /// made. An adopted layout is left as it is, whatever happens.
    pub fn load(opts: &LoadOptions) -> Result<Self, KernelError> {
        let dir = layout_dir_of(&opts.pin_dir, opts.layout_version);
        let (fresh_root, fresh) = (!opts.pin_dir.exists(), !dir.exists());
        let r = Self::load_at(opts);
        if r.is_err() && fresh {
            if let Err(e) = uninstall(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the pins of a failed start");
            }
            if fresh_root {
                let _ = fs::remove_dir(&opts.pin_dir);
            }
        }
        r
    }

    fn load_at(opts: &LoadOptions) -> Result<Self, KernelError> {
        let parent = opts.pin_dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(&opts.pin_dir) && !is_bpffs(parent) {
            return Err(KernelError::NotBpffs { path: opts.pin_dir.clone() });
        }
        let dir = layout_dir_of(&opts.pin_dir, opts.layout_version);
        let old_layouts = other_layouts(&opts.pin_dir, opts.layout_version);
        for d in [dir.join("maps"), dir.join("links")] {
            fs::create_dir_all(&d).map_err(|source| KernelError::PinDir { path: d.clone(), source })?;
        }
        let adopted = dir.join("maps").join("FRONTENDS").exists();

        // A map this run creates starts small and grows with the configuration; an adopted
        // one keeps the capacity it has.
        let initial = opts.ceilings.at_most(opts.initial_capacity.max(1));
        let maps_dir = dir.join("maps");
        let mut ebpf = load_object(|n| maps_dir.join(n))?;

        let mut m = Maps::take(&mut ebpf, initial)?;
        let telemetry_conf = &mut m.telemetry_conf;
        // A fresh map (no interval yet): telemetry on, reports every 5 s, before any program
        // is attached. An adopted map keeps what the operator last set.
        if telemetry_conf.get(&TCONF_INTERVAL_NS, 0).unwrap_or(0) == 0 {
            let err = |source| KernelError::Write { map: "TELEMETRY_CONF", source };
            telemetry_conf
                .set(TCONF_INTERVAL_NS, DEFAULT_REPORT_INTERVAL.as_nanos() as u64, 0)
                .map_err(err)?;
            telemetry_conf.set(TCONF_FLAGS, TFLAG_ON, 0).map_err(err)?;
        }
        let started = std::time::Instant::now();
        load_programs(&mut ebpf, &LOADED_PROGRAMS)?;
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "programs loaded (verified)");

        let cgroup = fs::File::open(&opts.cgroup)
            .map_err(|source| KernelError::Cgroup { path: opts.cgroup.clone(), source })?;
        let mut links = Vec::new();
        for name in PROGRAMS.into_iter().chain([TELEMETRY_PROGRAM]) {
            let p = ebpf
                .program_mut(name)
                .ok_or(KernelError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
            let fd = attach_to_cgroup(p, name, &cgroup)?;
            // A bpf_link on a cgroup always coexists with other links (link_create takes no
            // ALLOW_MULTI flag: mode Single passes 0). A restarted daemon attaches its new
            // program next to the old one and then replaces the old link's pin, so the hook is
            // never empty. Two programs in a row are harmless: the second sees a backend
            // address, not a frontend.
            let final_path = dir.join("links").join(name);
            let tmp = dir.join("links").join(format!("{name}_new")); // bpffs names take no dots
            let _ = fs::remove_file(&tmp);
            let pinned =
                fd.pin(&tmp).map_err(|e| KernelError::Pin { path: tmp.clone(), reason: e.to_string() })?;
            // rename() replaces an older link pin atomically; dropping that pin detaches the
            // older program.
            fs::rename(&tmp, &final_path)
                .map_err(|e| KernelError::Pin { path: final_path.clone(), reason: e.to_string() })?;
            links.push(pinned);
        }

        attach_proxy_header(&mut ebpf)?;

        let mut dp = Self {
            ebpf,
            m,
            authz_applied: AuthzState::default(),
            _links: links,
            pin_dir: opts.pin_dir.clone(),
            dir: dir.clone(),
            old_layouts,
            capacities: initial,
            ceilings: opts.ceilings,
            grows: 0,
            applied: MapState::default(),
            adopted,
        };
        dp.capacities = dp.pinned_capacities();
        dp.applied = dp.read_state()?;
        dp.authz_applied = dp.read_authz()?;
        Ok(dp)
    }

    /// The capacities the maps really have: an adopted map keeps the one it was created with
    /// (it grows from there when it must).
    fn pinned_capacities(&self) -> Capacities {
        let mut c = self.capacities;
        for (name, m) in self.m.growable() {
            if let Ok(info) = m.info() {
                c.set(name, info.max_entries());
            }
        }
        c
    }

    /// Pin directories of other layout versions found at load.
    pub fn old_layouts(&self) -> &[PathBuf] {
        &self.old_layouts
    }

    /// Removes the pins of other layout versions: their links go (detaching the old programs,
    /// which ran next to this version's until now) and their maps are freed. Call once this
    /// version's maps hold the configuration.
    pub fn retire_old_layouts(&mut self) -> Vec<PathBuf> {
        let mut done = Vec::new();
        for d in std::mem::take(&mut self.old_layouts) {
            match uninstall(&d) {
                Ok(_) => done.push(d),
                Err(e) => {
                    tracing::error!(dir = %d.display(), error = %e, "cannot remove an old layout's pins")
                }
            }
        }
        done
    }

    /// True when maps pinned by an earlier run were adopted.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The capacities the maps have now.
    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    /// How far the maps may grow.
    pub fn ceilings(&self) -> Capacities {
        self.ceilings
    }

    /// How many times maps were grown since load.
    pub fn grows(&self) -> u64 {
        self.grows
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `<pin_dir>/v<layout version>`: where this layout's maps and links are pinned.
    pub fn layout_dir(&self) -> &Path {
        &self.dir
    }

    /// What the daemon last wrote (its intent).
    pub fn applied(&self) -> &MapState {
        &self.applied
    }

    /// What the kernel maps hold now (observed).
    pub fn read_state(&self) -> Result<MapState, KernelError> {
        Ok(MapState {
            netns: read_all(&self.m.netns, "NETNS")?,
            frontends: read_all(&self.m.frontends, "FRONTENDS")?,
            tables: read_all(&self.m.tables, "LB_TABLES")?,
            endpoints: read_all(&self.m.endpoints, "ENDPOINTS")?,
            backends: read_all(&self.m.backends, "BACKENDS")?,
            ports: read_all(&self.m.ports, "PORTS")?,
        })
    }

    /// Makes the maps hold exactly `next`. Writes go leaves first (backends, ports, endpoints,
    /// tables, frontends, netns) and deletions roots first, so a concurrent connect() only ever
    /// follows keys that exist. A transition that does not fit is refused before any write; a
    /// write that fails undoes the writes before it.
    pub fn apply(&mut self, next: MapState) -> Result<ApplyReport, KernelError> {
        let d = diff_owned(&self.applied, next);
        self.apply_diff(d)
    }

    /// Applies a diff against what the maps hold (see [`apply`](Self::apply) for the order);
    /// the authorization maps keep what they hold.
    pub fn apply_diff(&mut self, d: Diff) -> Result<ApplyReport, KernelError> {
        self.apply_all(d, AuthzDiff::default())
    }

    /// One transaction across every map family: the load-balancing diff `d` and the
    /// authorization state `authz`. Both are checked against the capacities before any write;
    /// then every new entry is written (load balancing leaves first, then authorization lookups
    /// before the destinations that switch to them), and only then is anything deleted (roots
    /// first). A write that fails undoes every write before it, in both families, and nothing
    /// is deleted: the maps hold exactly what they held.
    pub fn apply_all(&mut self, d: Diff, authz: AuthzDiff) -> Result<ApplyReport, KernelError> {
        self.apply_prewritten(d, authz, Prewritten::default())
    }

    /// [`apply_all`](Self::apply_all) of a diff some of whose new entries were written ahead
    /// (`pre`, see [`compile_prewriting`](Self::compile_prewriting)): those are not written
    /// again, and they are deleted with the rest of the transaction's writes if it fails.
    pub fn apply_prewritten(
        &mut self,
        d: Diff,
        authz: AuthzDiff,
        mut pre: Prewritten,
    ) -> Result<ApplyReport, KernelError> {
        // Every new key is written before any old one is deleted: the peak holds both.
        let peak = self.applied.peak_counts(&d.set);
        let old = &self.authz_applied;
        let authz_peak = [
            union_len(&old.dest, &authz.set.dest),
            union_len(&old.identity, &authz.set.identity),
            union_len(&old.region, &authz.set.region),
            union_len(&old.verdict, &authz.set.verdict),
        ];
        let before = self.capacities;
        let fitted = self.fit(&peak, authz_peak);
        pre.forget_grown(&before, &self.capacities);
        if let Err(e) = fitted {
            self.unwrite(&pre);
            return Err(e);
        }
        let mut lb = LbUndo::default();
        let strays = match self.write_lb(&d, &mut lb, &pre) {
            Ok(strays) => strays,
            Err(e) => {
                self.rollback_lb(&mut lb);
                return Err(e);
            }
        };
        let mut az = AuthzUndo::default();
        if let Err(e) = self.write_authz(&authz.set, &mut az) {
            self.rollback_authz(&mut az);
            self.rollback_lb(&mut lb);
            return Err(e);
        }
        remove_all(&mut self.m.netns, "NETNS", &d.del_netns);
        remove_all(&mut self.m.frontends, "FRONTENDS", &d.del_frontends);
        remove_all(&mut self.m.tables, "LB_TABLES", &d.del_tables);
        remove_all(&mut self.m.endpoints, "ENDPOINTS", &d.del_endpoints);
        remove_all(&mut self.m.ports, "PORTS", &d.del_ports);
        remove_all(&mut self.m.backends, "BACKENDS", &d.del_backends);
        self.unwrite(&strays);
        self.delete_authz(&authz);
        let aw = az.identity.len() + az.region.len() + az.verdict.len() + az.counts.len() + az.dest.len();
        let report = ApplyReport { writes: d.writes() + aw, deletes: d.deletes() + authz.deletes() };
        self.applied.apply(d);
        self.authz_applied.apply(authz);
        Ok(report)
    }

    /// Writes the load-balancing entries of `d` so that a lookup never finds an entry that
    /// leads to one not written yet. Keys the maps do not hold are referenced by nothing they
    /// hold, so those of the maps below the frontends are written first, in any order: with
    /// many of them (a full push), on two threads at once. Then the keys the maps hold, in the
    /// order references go (backends and ports, slots, tables), then frontends and namespaces,
    /// the roots of every lookup.
    ///
    /// Entries written ahead (`pre`) are skipped, and recorded to be undone with the rest.
    /// Returns those of them that `d` does not write: the apply deletes them once it is done.
    fn write_lb(&mut self, d: &Diff, u: &mut LbUndo, pre: &Prewritten) -> Result<Prewritten, KernelError> {
        let old = &self.applied;
        let set = &d.set;
        let mut strays = Prewritten::default();
        let (nb, cb) = split_fresh(&old.backends, &set.backends);
        let (np, cp) = split_fresh(&old.ports, &set.ports);
        let (ne, ce) = split_fresh(&old.endpoints, &set.endpoints);
        let (nt, ct) = split_fresh(&old.tables, &set.tables);
        let nb = skip_written(nb, &pre.backends, &mut u.backends, &mut strays.backends);
        let np = skip_written(np, &pre.ports, &mut u.ports, &mut strays.ports);
        let ne = skip_written(ne, &pre.endpoints, &mut u.endpoints, &mut strays.endpoints);
        let nt = skip_written(nt, &pre.tables, &mut u.tables, &mut strays.tables);
        let m = &mut self.m;
        let (ub, up, ue, ut) = (&mut u.backends, &mut u.ports, &mut u.endpoints, &mut u.tables);
        let mut leaves = || -> Result<(), KernelError> {
            upsert_entries(&mut m.backends, "BACKENDS", &old.backends, &nb, ub)?;
            upsert_entries(&mut m.ports, "PORTS", &old.ports, &np, up)
        };
        let mut slots = || -> Result<(), KernelError> {
            upsert_entries(&mut m.endpoints, "ENDPOINTS", &old.endpoints, &ne, ue)?;
            upsert_entries(&mut m.tables, "LB_TABLES", &old.tables, &nt, ut)
        };
        if nb.len() + np.len() >= PARALLEL_WRITES && ne.len() + nt.len() >= PARALLEL_WRITES {
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(leaves);
                let b = slots();
                (a.join().expect("a map write does not panic"), b)
            });
            a?;
            b?;
        } else {
            leaves()?;
            slots()?;
        }
        upsert_entries(&mut m.backends, "BACKENDS", &old.backends, &cb, &mut u.backends)?;
        upsert_entries(&mut m.ports, "PORTS", &old.ports, &cp, &mut u.ports)?;
        upsert_entries(&mut m.endpoints, "ENDPOINTS", &old.endpoints, &ce, &mut u.endpoints)?;
        upsert_entries(&mut m.tables, "LB_TABLES", &old.tables, &ct, &mut u.tables)?;
        // The roots: a full push of 100k services has as many frontends as slots.
        upsert_split(&m.frontends, "FRONTENDS", &old.frontends, &set.frontends, &mut u.frontends)?;
        upsert(&mut m.netns, "NETNS", &old.netns, &set.netns, &mut u.netns)?;
        Ok(strays)
    }

    /// Deletes entries written ahead (see [`Prewritten`]).
    fn unwrite(&mut self, pre: &Prewritten) {
        fn keys<K: Copy, V>(v: &[(K, V)]) -> Vec<K> {
            v.iter().map(|e| e.0).collect()
        }
        let m = &mut self.m;
        remove_all(&mut m.tables, "LB_TABLES", &keys(&pre.tables));
        remove_all(&mut m.endpoints, "ENDPOINTS", &keys(&pre.endpoints));
        remove_all(&mut m.ports, "PORTS", &keys(&pre.ports));
        remove_all(&mut m.backends, "BACKENDS", &keys(&pre.backends));
    }

    /// Undoes in the reverse order of writing: roots first.
    fn rollback_lb(&mut self, u: &mut LbUndo) {
        rollback(&mut self.m.netns, &mut u.netns);
        rollback(&mut self.m.frontends, &mut u.frontends);
        rollback(&mut self.m.tables, &mut u.tables);
        rollback(&mut self.m.endpoints, &mut u.endpoints);
        rollback(&mut self.m.ports, &mut u.ports);
        rollback(&mut self.m.backends, &mut u.backends);
    }
}

impl Dataplane {
    /// What the authorization maps hold now.
    pub fn read_authz(&self) -> Result<AuthzState, KernelError> {
        let mut s = AuthzState {
            dest: read_all(&self.m.authz_dest, "AUTHZ_DEST")?,
            identity: read_all(&self.m.identity, "IDENTITY")?.into_iter().map(|(k, v)| (k, v.id)).collect(),
            verdict: read_all(&self.m.authz_verdict, "AUTHZ_VERDICT")?,
            ..Default::default()
        };
        for item in self.m.authz_region.iter() {
            let (k, v) = item.map_err(|source| KernelError::Read { map: "AUTHZ_REGION", source })?;
            s.region.insert((k.data(), k.prefix_len()), v);
        }
        for k in self.m.authz_counts.keys() {
            let k = k.map_err(|source| KernelError::Read { map: "AUTHZ_COUNTS", source })?;
            s.counts.insert(k);
        }
        Ok(s)
    }

    /// Writes what `next` adds or changes: the lookups a destination follows before the
    /// destination switches to them. Records how to undo each write.
    fn write_authz(&mut self, set: &AuthzState, u: &mut AuthzUndo) -> Result<(), KernelError> {
        let old = &self.authz_applied;
        // IDENTITY holds each id with the check of its address (see `key_check`).
        let seal = |k: &[u32; 4], id: u32| IdentityValue { id, check: 0 }.sealed(k);
        let identity: BTreeMap<[u32; 4], IdentityValue> =
            changed_entries(&old.identity, &set.identity).iter().map(|(k, id)| (*k, seal(k, *id))).collect();
        // What the written entries held, to undo a failed write.
        let identity_old: BTreeMap<[u32; 4], IdentityValue> =
            identity.keys().filter_map(|k| Some((*k, seal(k, *old.identity.get(k)?)))).collect();
        upsert(&mut self.m.identity, "IDENTITY", &identity_old, &identity, &mut u.identity)?;
        for ((k, len), v) in &set.region {
            let prev = old.region.get(&(*k, *len));
            if prev == Some(v) {
                continue;
            }
            self.m
                .authz_region
                .insert(&LpmKey::new(*len, *k), v, 0)
                .map_err(|source| KernelError::Write { map: "AUTHZ_REGION", source })?;
            u.region.push(match prev {
                Some(p) => Undo::Restore((*k, *len), *p),
                None => Undo::Remove((*k, *len)),
            });
        }
        upsert(
            &mut self.m.authz_verdict,
            "AUTHZ_VERDICT",
            &old.verdict,
            &changed_entries(&old.verdict, &set.verdict),
            &mut u.verdict,
        )?;
        let cpus = aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1);
        for k in set.counts.difference(&old.counts) {
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| KernelError::Pin {
                path: PathBuf::from("AUTHZ_COUNTS"),
                reason: e.to_string(),
            })?;
            self.m
                .authz_counts
                .insert(k, zeros, 0)
                .map_err(|source| KernelError::Write { map: "AUTHZ_COUNTS", source })?;
            u.counts.push(*k);
        }
        upsert(
            &mut self.m.authz_dest,
            "AUTHZ_DEST",
            &old.dest,
            &changed_entries(&old.dest, &set.dest),
            &mut u.dest,
        )
    }

    fn rollback_authz(&mut self, u: &mut AuthzUndo) {
        rollback(&mut self.m.authz_dest, &mut u.dest);
        for k in u.counts.drain(..) {
            let _ = self.m.authz_counts.remove(&k);
        }
        rollback(&mut self.m.authz_verdict, &mut u.verdict);
        while let Some(x) = u.region.pop() {
            let r = match x {
                Undo::Restore((k, len), v) => self.m.authz_region.insert(&LpmKey::new(len, k), v, 0),
                Undo::Remove((k, len)) => self.m.authz_region.remove(&LpmKey::new(len, k)),
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "rollback write failed");
            }
        }
        rollback(&mut self.m.identity, &mut u.identity);
    }

    /// Deletes what `d` removes, roots first.
    fn delete_authz(&mut self, d: &AuthzDiff) {
        for k in &d.del_dest {
            let _ = self.m.authz_dest.remove(k);
        }
        for k in &d.del_verdict {
            let _ = self.m.authz_verdict.remove(k);
        }
        for (k, len) in &d.del_region {
            let _ = self.m.authz_region.remove(&LpmKey::new(*len, *k));
        }
        for k in &d.del_identity {
            let _ = self.m.identity.remove(k);
        }
        for k in &d.del_counts {
            let _ = self.m.authz_counts.remove(k);
        }
    }

    /// Attaches the authorization program to a network namespace (idempotent).
    ///
    /// A link pinned by an earlier run of this layout gets this daemon's program in its place
    /// atomically (BPF_LINK_UPDATE), so a restart or a new build always enforces with the
    /// program it ships. A pinned link that cannot be updated (its namespace was recreated) is
    /// replaced by a new link: attached first, then its pin moved over the old one.
    pub fn attach_authz(&mut self, cookie: u64, netns: &Path) -> Result<(), KernelError> {
        let pin = self.dir.join("links").join(format!("authz_{cookie}"));
        let name = AUTHZ_PROGRAM;
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(name)
            .ok_or(KernelError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })?;
        if pin.exists() {
            use std::os::fd::AsFd;
            let fd = prog.fd().map_err(|source| KernelError::Program { name, source })?;
            match sys::replace_link_program(&pin, fd.as_fd()) {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(pin = %pin.display(), error = %e,
                    "cannot update the pinned authorization link; attaching a new one"),
            }
        }
        let ns = crate::netns::open_netns(netns).map_err(KernelError::Netns)?;
        let id = prog.attach(&ns).map_err(|source| KernelError::Program { name, source })?;
        let link = prog.take_link(id).map_err(|source| KernelError::Program { name, source })?;
        let fd: FdLink = link.into();
        // The pin keeps the link, and so the program, in place once the fd is closed. Pinned
        // next to the old pin and renamed over it: the namespace is never left without one.
        let tmp = self.dir.join("links").join(format!("authz_{cookie}_new"));
        let _ = fs::remove_file(&tmp);
        fd.pin(&tmp).map_err(|e| KernelError::Pin { path: tmp.clone(), reason: e.to_string() })?;
        fs::rename(&tmp, &pin).map_err(|e| KernelError::Pin { path: pin.clone(), reason: e.to_string() })?;
        Ok(())
    }

    /// The id of the program a namespace's authorization link runs, and of the program this
    /// daemon loaded (equal once [`attach_authz`](Self::attach_authz) has run for it).
    pub fn authz_program_ids(&self, cookie: u64) -> Result<(u32, u32), KernelError> {
        let name = AUTHZ_PROGRAM;
        let pin = self.dir.join("links").join(format!("authz_{cookie}"));
        let link = PinnedLink::from_pin(&pin)
            .map_err(|e| KernelError::Pin { path: pin.clone(), reason: e.to_string() })?;
        let linked = FdLink::from(link)
            .info()
            .map_err(|e| KernelError::Pin { path: pin.clone(), reason: e.to_string() })?
            .program_id();
        let prog: &SkLookup = self
            .ebpf
            .program(name)
            .ok_or(KernelError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })?;
        let loaded = prog.info().map_err(|source| KernelError::Program { name, source })?.id();
        Ok((linked, loaded))
    }

    /// The kernel's id of the loaded program `name` (`None` for a program not loaded).
    pub fn program_id(&self, name: &str) -> Option<u32> {
        self.ebpf.program(name)?.info().ok().map(|i| i.id())
    }

    /// Whether the authorization program is attached to a namespace (its link is pinned).
    pub fn authz_attached(&self, cookie: u64) -> bool {
        self.dir.join("links").join(format!("authz_{cookie}")).exists()
    }

    /// What the authorization maps hold, as last applied.
    pub fn authz_applied(&self) -> &AuthzState {
        &self.authz_applied
    }

    /// Detaches the authorization program from a namespace.
    pub fn detach_authz(&mut self, cookie: u64) {
        let pin = self.dir.join("links").join(format!("authz_{cookie}"));
        let _ = fs::remove_file(pin);
    }
}

/// The maps the kernel reports through (connection and authorization events, per-CPU
/// counters, decision counts) and the telemetry switch: handles of their own, opened from this
/// layout's pins, so that whoever drains and scrapes them needs no lock the data plane's
/// writer holds. Only one `EventMaps` may drain a ring buffer.
pub struct EventMaps {
    telemetry: RingBuf<MapData>,
    authz_events: RingBuf<MapData>,
    telemetry_conf: aya::maps::Array<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    authz_counts: PerCpuHashMap<MapData, CountKey, u64>,
    tallies: PerCpuHashMap<MapData, TallyKey, TallyCounts>,
    /// The epoch the programs sum short connections under (`TCONF_TALLY_EPOCH`).
    epoch: u32,
}

impl EventMaps {
    /// Sums of the per-CPU counters of the programs, indexed by `kmesh_common::stat`.
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], KernelError> {
        let mut out = [0u64; stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|source| KernelError::Read { map: "STATS", source })?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }

    /// Turns connection telemetry in the kernel on or off and sets how often open connections
    /// report. Off, the programs return at once (no per-socket state, no events). With
    /// `eager_opens`, a connection reports its open when it is established (for outlier
    /// detection); without, its open comes with its first report or its close.
    ///
    /// With `tally` (and without `eager_opens`), a connection that closes before its first
    /// record sends none: the kernel sums it with its peers' (see [`drain_tallies`](Self::drain_tallies)).
    pub fn set_telemetry(
        &mut self,
        on: bool,
        eager_opens: bool,
        tally: bool,
        interval: std::time::Duration,
    ) -> Result<(), KernelError> {
        let err = |source| KernelError::Write { map: "TELEMETRY_CONF", source };
        let ns = (interval.as_nanos() as u64).max(1_000_000);
        self.telemetry_conf.set(TCONF_INTERVAL_NS, ns, 0).map_err(err)?;
        let flags = match (on, eager_opens) {
            (false, _) => 0,
            (true, false) if tally => TFLAG_ON | TFLAG_TALLY,
            (true, false) => TFLAG_ON,
            (true, true) => TFLAG_ON | TFLAG_EAGER_OPEN,
        };
        self.telemetry_conf.set(TCONF_FLAGS, flags, 0).map_err(err)
    }

    /// The short connections the kernel summed (`TFLAG_TALLY`) and nobody took yet, by peers,
    /// summed over CPUs; taken out of the map. Moves the epoch on first: sums of the epoch in
    /// force until now may still be added to by a program that read it a moment ago, so they
    /// are taken at the next call, and only older ones now (no program runs for a drain's
    /// period, so nothing is added to a sum once it is taken).
    pub fn drain_tallies(&mut self) -> Result<Vec<(TallyKey, TallyCounts)>, KernelError> {
        let (was, next) = (self.epoch, self.epoch.wrapping_add(1));
        self.telemetry_conf
            .set(TCONF_TALLY_EPOCH, next as u64, 0)
            .map_err(|source| KernelError::Write { map: "TELEMETRY_CONF", source })?;
        self.epoch = next;
        let mut keys = Vec::new();
        for k in self.tallies.keys() {
            match k {
                Ok(k) if k.epoch != was && k.epoch != next => keys.push(k),
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(KernelError::Read { map: "TALLIES", source }),
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let sums = match self.tallies.get(&k, 0) {
                Ok(per_cpu) => per_cpu.iter().fold(TallyCounts::default(), |a, v| a.plus(v)),
                Err(e) if is_not_found(&e) => continue,
                // What was taken out so far is returned; the rest waits for the next call.
                Err(e) => {
                    tracing::warn!(error = %e, "reading TALLIES");
                    break;
                }
            };
            match self.tallies.remove(&k) {
                Ok(()) => out.push((k, sums)),
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "taking an entry out of TALLIES");
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Whether telemetry is on in the kernel, and the report interval.
    pub fn telemetry_conf(&self) -> Result<(bool, std::time::Duration), KernelError> {
        let err = |source| KernelError::Read { map: "TELEMETRY_CONF", source };
        let flags = self.telemetry_conf.get(&TCONF_FLAGS, 0).map_err(err)?;
        let ns = self.telemetry_conf.get(&TCONF_INTERVAL_NS, 0).map_err(err)?;
        Ok((flags & TFLAG_ON != 0, std::time::Duration::from_nanos(ns)))
    }

    /// Decisions per (policy id, action) since the counters were created.
    pub fn authz_counts(&self) -> BTreeMap<CountKey, u64> {
        self.authz_counts.iter().filter_map(Result::ok).map(|(k, v)| (k, v.iter().sum())).collect()
    }

    /// Connection open and close events since the last call.
    pub fn drain_telemetry(&mut self) -> Vec<ConnEvent> {
        drain(&mut self.telemetry)
    }

    /// Denials (and dry-run differences) the kernel reported since the last call.
    pub fn drain_authz_events(&mut self) -> Vec<AuthzEvent> {
        drain(&mut self.authz_events)
    }
}

impl Dataplane {
    /// Connections opened from the network namespace with this cookie (the node's, where
    /// kubelet runs) into pods with policies are admitted without consulting them; `None`:
    /// every connection is subject to policy.
    pub fn set_node_netns(&mut self, cookie: Option<u64>) -> Result<(), KernelError> {
        let err = |source| KernelError::Write { map: "TELEMETRY_CONF", source };
        self.m.telemetry_conf.set(TCONF_NODE_NETNS, cookie.unwrap_or(0), 0).map_err(err)
    }

    /// Connections from the node marked for exemption and not closed yet.
    pub fn node_conns_open(&self) -> usize {
        match self.ebpf.map("NODE_CONNS") {
            Some(m) => HashMap::<&MapData, NodeConnKey, u8>::try_from(m)
                .map(|m| m.keys().filter(Result::is_ok).count())
                .unwrap_or(0),
            None => 0,
        }
    }

    /// The cookie set by [`set_node_netns`](Self::set_node_netns).
    pub fn node_netns(&self) -> Result<Option<u64>, KernelError> {
        let err = |source| KernelError::Read { map: "TELEMETRY_CONF", source };
        let c = self.m.telemetry_conf.get(&TCONF_NODE_NETNS, 0).map_err(err)?;
        Ok((c != 0).then_some(c))
    }

    /// Opens the event maps of this data plane from its pins (call once, right after load:
    /// pins removed by hand later do not matter, the handles stay).
    pub fn open_event_maps(&self) -> Result<EventMaps, KernelError> {
        let open = |name: &'static str| {
            let path = self.dir.join("maps").join(name);
            MapData::from_pin(&path).map_err(|source| KernelError::MapType { name, source })
        };
        let ty = |name: &'static str| move |source| KernelError::MapType { name, source };
        Ok(EventMaps {
            telemetry: RingBuf::try_from(aya::maps::Map::RingBuf(open("TELEMETRY")?))
                .map_err(ty("TELEMETRY"))?,
            authz_events: RingBuf::try_from(aya::maps::Map::RingBuf(open("AUTHZ_EVENTS")?))
                .map_err(ty("AUTHZ_EVENTS"))?,
            telemetry_conf: aya::maps::Array::try_from(aya::maps::Map::Array(open("TELEMETRY_CONF")?))
                .map_err(ty("TELEMETRY_CONF"))?,
            stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open("STATS")?)).map_err(ty("STATS"))?,
            authz_counts: PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(open("AUTHZ_COUNTS")?))
                .map_err(ty("AUTHZ_COUNTS"))?,
            tallies: PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(open("TALLIES")?))
                .map_err(ty("TALLIES"))?,
            // Where the daemon that ran before left it.
            epoch: self
                .m
                .telemetry_conf
                .get(&TCONF_TALLY_EPOCH, 0)
                .map_err(|source| KernelError::Read { map: "TELEMETRY_CONF", source })?
                as u32,
        })
    }
}

/// The DNS proxy's side of the maps (`DNS_PODS`, `DNS_ORIG`, the port in `TELEMETRY_CONF`):
/// handles of its own, opened from this layout's pins, so that the proxy's servers read where
/// a query was going without the mesh's lock.
pub struct DnsMaps {
    pods: HashMap<MapData, u64, DnsPodValue>,
    orig: HashMap<MapData, DnsOrigKey, DnsOrig>,
    conf: aya::maps::Array<MapData, u64>,
}

impl DnsMaps {
    /// Sets the port the proxies listen on in every pod (`None`: queries go to resolvers
    /// directly everywhere, whatever `DNS_PODS` holds).
    pub fn set_port(&mut self, port: Option<u16>) -> Result<(), KernelError> {
        let err = |source| KernelError::Write { map: "TELEMETRY_CONF", source };
        self.conf.set(TCONF_DNS_PORT, port.unwrap_or(0) as u64, 0).map_err(err)
    }

    /// Sends the queries of the pods in this namespace over the families in `flags`
    /// (`DNS_POD_V4`, `DNS_POD_V6`: those its proxy listens on; call once it does) to its proxy,
    /// or (0) to their resolvers again.
    pub fn set_pod(&mut self, cookie: u64, flags: u32) -> Result<(), KernelError> {
        if flags != 0 {
            let v = DnsPodValue { flags, check: 0 }.sealed(&cookie);
            self.pods.insert(cookie, v, 0).map_err(|source| KernelError::Write { map: "DNS_PODS", source })
        } else {
            match self.pods.remove(&cookie) {
                Err(e) if !is_not_found(&e) => Err(KernelError::Write { map: "DNS_PODS", source: e }),
                _ => Ok(()),
            }
        }
    }

    /// Namespaces whose queries go to a proxy now (an earlier daemon's included).
    pub fn pods(&self) -> Vec<u64> {
        self.pods.keys().filter_map(Result::ok).collect()
    }

    /// The resolver a pod's socket asked, as the proxy sees the socket.
    pub fn orig(&self, key: &DnsOrigKey) -> Option<DnsOrig> {
        self.orig.get(key, 0).ok()
    }

    /// Forgets a TCP socket's resolver once its connection is accepted.
    pub fn forget(&mut self, key: &DnsOrigKey) {
        let _ = self.orig.remove(key);
    }
}

impl Dataplane {
    /// Opens the DNS proxy's maps from this layout's pins.
    pub fn open_dns_maps(&self) -> Result<DnsMaps, KernelError> {
        let ty = |name: &'static str| move |source| KernelError::MapType { name, source };
        Ok(DnsMaps {
            pods: HashMap::try_from(aya::maps::Map::HashMap(self.pinned("DNS_PODS")?))
                .map_err(ty("DNS_PODS"))?,
            orig: HashMap::try_from(aya::maps::Map::LruHashMap(self.pinned("DNS_ORIG")?))
                .map_err(ty("DNS_ORIG"))?,
            conf: aya::maps::Array::try_from(aya::maps::Map::Array(self.pinned("TELEMETRY_CONF")?))
                .map_err(ty("TELEMETRY_CONF"))?,
        })
    }

    /// A map of this layout, opened from its pin.
    fn pinned(&self, name: &'static str) -> Result<MapData, KernelError> {
        let path = self.dir.join("maps").join(name);
        MapData::from_pin(&path).map_err(|source| KernelError::MapType { name, source })
    }
}

/// The TLV slots the waypoint header program reads: the client identity per enrolled
/// namespace, the service hostname per frontend with a waypoint.
pub struct WaypointMaps {
    ident: HashMap<MapData, u64, PpSlot>,
    host: HashMap<MapData, FrontendKey, PpSlot>,
}

impl WaypointMaps {
    pub fn set_ident(&mut self, cookie: u64, slot: &PpSlot) -> Result<(), KernelError> {
        self.ident.insert(cookie, slot, 0).map_err(|source| KernelError::Write { map: "PP_IDENT", source })
    }

    pub fn remove_ident(&mut self, cookie: u64) {
        let _ = self.ident.remove(&cookie);
    }

    pub fn idents(&self) -> BTreeMap<u64, PpSlot> {
        self.ident.iter().filter_map(Result::ok).collect()
    }

    pub fn set_host(&mut self, fk: &FrontendKey, slot: &PpSlot) -> Result<(), KernelError> {
        self.host.insert(fk, slot, 0).map_err(|source| KernelError::Write { map: "PP_HOST", source })
    }

    pub fn remove_host(&mut self, fk: &FrontendKey) {
        let _ = self.host.remove(fk);
    }

    pub fn hosts(&self) -> BTreeMap<FrontendKey, PpSlot> {
        self.host.iter().filter_map(Result::ok).collect()
    }
}

impl Dataplane {
    /// Opens the waypoint header's maps from this layout's pins.
    pub fn open_waypoint_maps(&self) -> Result<WaypointMaps, KernelError> {
        let ty = |name: &'static str| move |source| KernelError::MapType { name, source };
        Ok(WaypointMaps {
            ident: HashMap::try_from(aya::maps::Map::HashMap(self.pinned("PP_IDENT")?))
                .map_err(ty("PP_IDENT"))?,
            host: HashMap::try_from(aya::maps::Map::HashMap(self.pinned("PP_HOST")?))
                .map_err(ty("PP_HOST"))?,
        })
    }
}

impl Dataplane {
    /// Pins of maps and links that should exist under the pin directory but do not (removed by
    /// hand, or the bpffs unmounted). Maps and programs keep working while this process holds
    /// them; a restart would start from empty maps.
    pub fn missing_pins(&self) -> Vec<PathBuf> {
        let dir = &self.dir;
        let maps = self.capacities.all().into_iter().map(|(n, _)| n).chain(FIXED_MAPS);
        let mut out: Vec<PathBuf> = maps.map(|n| dir.join("maps").join(n)).filter(|p| !p.exists()).collect();
        out.extend(
            PROGRAMS
                .iter()
                .chain(&[TELEMETRY_PROGRAM])
                .map(|n| dir.join("links").join(n))
                .filter(|p| !p.exists()),
        );
        out
    }

    /// Pins again every map whose pin is missing; returns what was restored. Link pins cannot
    /// be restored from here: the programs stay attached while the daemon runs.
    pub fn repin_maps(&self) -> Vec<PathBuf> {
        use std::os::fd::{AsFd, BorrowedFd};
        let dir = self.dir.join("maps");
        let _ = fs::create_dir_all(&dir);
        fn fd(m: &MapData) -> BorrowedFd<'_> {
            m.fd().as_fd()
        }
        let mut maps: Vec<(&str, BorrowedFd<'_>)> = self.m.outers.iter().map(|(n, m)| (*n, m.fd())).collect();
        maps.extend([
            ("STATS", fd(self.m.stats.map())),
            ("AUTHZ_COUNTS", fd(self.m.authz_counts.map())),
            ("AUTHZ_EVENTS", fd(&self.m.authz_events)),
            ("TELEMETRY", fd(&self.m.telemetry)),
            ("TELEMETRY_CONF", fd(self.m.telemetry_conf.map())),
        ]);
        for name in ["CONNS", "ORIG_HANDOFF"] {
            if let Some(aya::maps::Map::Array(d)) = self.ebpf.map(name) {
                maps.push((name, d.fd().as_fd()));
            }
        }
        if let Some(aya::maps::Map::LruHashMap(d)) = self.ebpf.map("NODE_CONNS") {
            maps.push(("NODE_CONNS", d.fd().as_fd()));
        }
        if let Some(aya::maps::Map::PerCpuArray(d)) = self.ebpf.map("RR_TURNS") {
            maps.push(("RR_TURNS", d.fd().as_fd()));
        }
        if let Some(aya::maps::Map::HashMap(d)) = self.ebpf.map("ACTIVE") {
            maps.push(("ACTIVE", d.fd().as_fd()));
        }
        for name in ["UDP_REV", "DNS_TCP", "LB_CONN"] {
            if let Some(aya::maps::Map::SkStorage(d)) = self.ebpf.map(name) {
                maps.push((name, d.fd().as_fd()));
            }
        }
        if let Some(aya::maps::Map::HashMap(d)) = self.ebpf.map("DNS_PODS") {
            maps.push(("DNS_PODS", d.fd().as_fd()));
        }
        if let Some(aya::maps::Map::PerCpuHashMap(d)) = self.ebpf.map("TALLIES") {
            maps.push(("TALLIES", d.fd().as_fd()));
        }
        if let Some(aya::maps::Map::LruHashMap(d)) = self.ebpf.map("DNS_ORIG") {
            maps.push(("DNS_ORIG", d.fd().as_fd()));
        }
        if let Some(aya::maps::Map::SkStorage(d)) = self.ebpf.map("WP_CONN") {
            maps.push(("WP_CONN", d.fd().as_fd()));
        }
        if let Some(aya::maps::Map::SockHash(d)) = self.ebpf.map("WAYPOINT_SOCKS") {
            maps.push(("WAYPOINT_SOCKS", d.fd().as_fd()));
        }
        for name in ["PP_IDENT", "PP_HOST"] {
            if let Some(aya::maps::Map::HashMap(d)) = self.ebpf.map(name) {
                maps.push((name, d.fd().as_fd()));
            }
        }
        let mut restored = Vec::new();
        for (name, fd) in maps {
            let p = dir.join(name);
            if p.exists() {
                continue;
            }
            match sys::pin(fd, &p) {
                Ok(()) => restored.push(p),
                Err(e) => tracing::error!(map = name, error = %e, "cannot pin the map again"),
            }
        }
        restored
    }
}

/// The kernel memory each map pinned under a layout directory takes (see [`layout_dir`]), in
/// bytes, by map name; for a map that grows, its outer map and the map in its slot together.
/// Maps whose memory cannot be read are left out.
pub fn map_memory(layout_dir: &Path) -> Vec<(String, u64)> {
    use std::os::fd::AsFd as _;
    let Ok(entries) = fs::read_dir(layout_dir.join("maps")) else { return Vec::new() };
    let growable = Capacities::default().all().map(|(n, _)| n);
    let mut out: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mut bytes = sys::memlock(&e.path()).ok()?;
            if let Some(n) = growable.iter().find(|n| **n == name) {
                let inner = open_pinned(layout_dir, n).ok()?;
                bytes += sys::memlock_of(inner.fd().as_fd()).ok()?;
            }
            Some((name, bytes))
        })
        .collect();
    out.sort();
    out
}

/// Removes every pin under `pin_dir`: links (which detaches the programs once no process
/// holds them) and maps. Returns the paths removed.
pub fn uninstall(pin_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    fn walk(dir: &Path, removed: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let p = entry?.path();
            if p.is_dir() {
                walk(&p, removed)?;
                fs::remove_dir(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
            removed.push(p);
        }
        Ok(())
    }
    walk(pin_dir, &mut removed)?;
    fs::remove_dir(pin_dir)?;
    removed.push(pin_dir.to_owned());
    Ok(removed)
}

/// The two bpf() commands aya does not expose: pinning any fd (ring buffers included) and
/// swapping the program of an existing link.
mod sys {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

    /// `union bpf_attr` as the batch commands read it.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    /// Writes `keys[i] -> values[i]` into the map in one call (`BPF_ANY`). Returns how many
    /// the kernel wrote (all, unless there is an error: then those before the failing one).
    pub fn update_batch<K, V>(map: BorrowedFd<'_>, keys: &[K], values: &[V]) -> (usize, Option<io::Error>) {
        assert_eq!(keys.len(), values.len());
        if keys.is_empty() {
            return (0, None);
        }
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: attr points at arrays of `count` keys and values of the map's sizes (the
        // typed map they come from has these key and value types); the kernel writes back
        // only `count`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // `count` is what was written before the failure.
            return ((attr.count as usize).min(keys.len()), Some(e));
        }
        (keys.len(), None)
    }

    /// `union bpf_attr` as the object commands read it (pathname, bpf_fd, file_flags), padded.
    #[repr(C)]
    #[derive(Default)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _pad: [u64; 6],
    }

    /// `union bpf_attr` as BPF_LINK_UPDATE reads it.
    #[repr(C)]
    #[derive(Default)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
        _pad: [u64; 6],
    }

    fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
        // SAFETY: attr is a valid, fully initialised bpf_attr prefix of the given size.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
    }

    fn c_path(p: &Path) -> io::Result<CString> {
        CString::new(p.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    /// Pins the bpf object behind `fd` at `path`.
    pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
        let c = c_path(path)?;
        let attr =
            ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, ..Default::default() };
        bpf(BPF_OBJ_PIN, &attr).map(|_| ())
    }

    /// The kernel memory charged to the bpf object pinned at `path` (`memlock` in its fdinfo:
    /// buckets, preallocated elements, and for maps without preallocation the entries in use).
    pub fn memlock(path: &Path) -> io::Result<u64> {
        let c = c_path(path)?;
        let attr = ObjAttr { pathname: c.as_ptr() as u64, ..Default::default() };
        let fd = bpf(BPF_OBJ_GET, &attr)?;
        // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        memlock_of(fd.as_fd())
    }

    /// The kernel memory charged to the bpf object behind `fd` (see [`memlock`]).
    pub fn memlock_of(fd: BorrowedFd<'_>) -> io::Result<u64> {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:").and_then(|v| v.trim().parse().ok()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no memlock in fdinfo"))
    }

    /// Swaps the program of the link pinned at `pin` for `prog` in one step: the hook never
    /// runs without a program, nor with both.
    pub fn replace_link_program(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
        let c = c_path(pin)?;
        let attr = ObjAttr { pathname: c.as_ptr() as u64, ..Default::default() };
        let fd = bpf(BPF_OBJ_GET, &attr)?;
        // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
        let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let attr = LinkUpdateAttr {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: prog.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_LINK_UPDATE, &attr).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_split_into_keys_the_maps_lack_and_keys_they_hold_either_way() {
        let old: BTreeMap<u32, u32> = (0..100).map(|k| (k * 2, 0)).collect();
        let keys = |v: &[(&u32, &u32)]| v.iter().map(|(k, _)| **k).collect::<Vec<_>>();
        // A good part of the maps (one walk), then a few keys (a search each), then no maps.
        let many: BTreeMap<u32, u32> = (150..250).map(|k| (k, 1)).collect();
        let (fresh, held) = split_fresh(&old, &many);
        assert_eq!(keys(&fresh), (150..250).filter(|k| k % 2 == 1 || *k >= 200).collect::<Vec<_>>());
        assert_eq!(keys(&held), (150..200).filter(|k| k % 2 == 0).collect::<Vec<_>>());
        let few: BTreeMap<u32, u32> = [(3, 1), (4, 1), (500, 1)].into();
        let (fresh, held) = split_fresh(&old, &few);
        assert_eq!((keys(&fresh), keys(&held)), (vec![3, 500], vec![4]));
        let (fresh, held) = split_fresh(&BTreeMap::new(), &few);
        assert_eq!((keys(&fresh), keys(&held)), (vec![3, 4, 500], vec![]));
    }
}
