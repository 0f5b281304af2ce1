//! Writing a full compilation's new entries while it runs. A key that the maps below the
//! frontends (backends, ports, slots, tables) do not hold yet is reachable by no program until
//! an entry the maps hold, or one written after it, points to it (the order of
//! [`Dataplane::write_lb`]). So while the compiler works on one CPU, another thread writes the
//! entries it has made so far under such keys. The apply that follows skips what was written,
//! and undoes it with everything else if it fails: the transaction stays one transaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use super::grow::{Slots, finish, prepare, put_in_force, wanted};
use super::*;
use crate::compile::Piece;

/// Entries sent to the writing thread at once.
const SEND_BATCH: usize = 2048;

/// Whether and how a full compilation's entries are written while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAhead {
    /// Not at all (a small model: a thread costs more than it saves).
    No,
    /// In batches, until the compilation ends; what is left the apply writes on two threads.
    WhileCompiling,
    /// Service by service, every one before the compilation returns (tests: the same path,
    /// with no race in what gets written ahead).
    Everything,
}

/// Entries of the maps below the frontends, by map: as the compiler makes them (the batches
/// the writing thread is sent), and as it wrote them ahead of an apply (see the module's
/// documentation), then sorted by key: keys the maps did not hold, with the values written
/// under them. Hand those to [`Dataplane::apply_prewritten`], which skips them, and deletes
/// them if it fails.
#[derive(Debug, Default)]
pub struct Prewritten {
    pub(super) backends: Vec<(u32, BackendValue)>,
    pub(super) ports: Vec<(PortKey, PortValue)>,
    pub(super) endpoints: Vec<(EndpointKey, EndpointValue)>,
    pub(super) tables: Vec<(TableKey, TableValue)>,
}

impl Prewritten {
    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.backends.len() + self.ports.len() + self.endpoints.len() + self.tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the entries of a compiled fragment.
    fn add(&mut self, f: &Piece) {
        self.backends.extend_from_slice(&f.backends);
        self.ports.extend_from_slice(&f.ports);
        self.endpoints.extend_from_slice(&f.endpoints);
        self.tables.extend_from_slice(&f.tables);
    }

    /// Forgets what was written into maps that have been replaced by grown ones since (see
    /// `grow`): those are filled from what the maps held before, not from these.
    pub(super) fn forget_grown(&mut self, before: &Capacities, now: &Capacities) {
        let grown = |map| before.get(map) != now.get(map);
        if grown("BACKENDS") {
            self.backends.clear();
        }
        if grown("PORTS") {
            self.ports.clear();
        }
        if grown("ENDPOINTS") {
            self.endpoints.clear();
        }
        if grown("LB_TABLES") {
            self.tables.clear();
        }
    }
}

/// How the maps get ready for a full compilation's entries before they are written.
pub enum Ahead {
    /// They have room.
    Nothing,
    /// Maps being grown on another thread (see [`Dataplane::grow_in_background`]).
    Pending(PendingGrow),
    /// Grow them to this guess of the peaks (see `compile::expected_peaks`).
    Guess(MapCounts),
}

/// Writes what a batch holds under keys the maps do not hold, while each map has room.
struct Writer<'a> {
    held: &'a MapState,
    /// Entries each map may still take, in the order of [`Prewritten`]; `None` once a write to
    /// it failed (the apply writes the rest and reports the error).
    room: [Option<usize>; 4],
    out: Prewritten,
}

impl<'a> Writer<'a> {
    fn new(held: &'a MapState, capacities: &Capacities) -> Self {
        let room = |map, len: usize| Some((capacities.get(map) as usize).saturating_sub(len));
        Writer {
            held,
            room: [
                room("BACKENDS", held.backends.len()),
                room("PORTS", held.ports.len()),
                room("ENDPOINTS", held.endpoints.len()),
                room("LB_TABLES", held.tables.len()),
            ],
            out: Prewritten::default(),
        }
    }

    fn write(&mut self, m: &Maps, batch: Prewritten) {
        let (h, room, out) = (self.held, &mut self.room, &mut self.out);
        let whole = [
            put(&m.backends, "BACKENDS", &h.backends, &mut room[0], batch.backends, &mut out.backends),
            put(&m.ports, "PORTS", &h.ports, &mut room[1], batch.ports, &mut out.ports),
            put(&m.endpoints, "ENDPOINTS", &h.endpoints, &mut room[2], batch.endpoints, &mut out.endpoints),
        ];
        // A table is written only after every slot, backend and port its service has: once
        // one of those is left to the apply, so are all tables from then on.
        if whole.contains(&false) {
            room[3] = None;
        }
        put(&m.tables, "LB_TABLES", &h.tables, &mut room[3], batch.tables, &mut out.tables);
    }

    /// What was written, sorted by key; of a key written twice, the value written last.
    fn finish(mut self) -> Prewritten {
        fn settle<K: Ord + Copy, V>(v: &mut Vec<(K, V)>) {
            v.reverse();
            v.sort_by_key(|e| e.0);
            v.dedup_by_key(|e| e.0);
        }
        settle(&mut self.out.backends);
        settle(&mut self.out.ports);
        settle(&mut self.out.endpoints);
        settle(&mut self.out.tables);
        self.out
    }
}

/// Writes the `entries` whose keys `held` lacks into `m`, at most `room` of them, and records
/// them in `out`. False when some were left unwritten (no room, or a write failed).
fn put<K: Pod + Ord, V: Pod>(
    m: &HashMap<MapData, K, V>,
    name: &'static str,
    held: &BTreeMap<K, V>,
    room: &mut Option<usize>,
    entries: Vec<(K, V)>,
    out: &mut Vec<(K, V)>,
) -> bool {
    use std::os::fd::AsFd as _;
    let fresh: Vec<(K, V)> = if held.is_empty() {
        entries
    } else {
        entries.into_iter().filter(|(k, _)| !held.contains_key(k)).collect()
    };
    let Some(left) = room else { return fresh.is_empty() };
    let take = fresh.len().min(*left);
    if take == 0 {
        return fresh.is_empty();
    }
    let keys: Vec<K> = fresh[..take].iter().map(|e| e.0).collect();
    let values: Vec<V> = fresh[..take].iter().map(|e| e.1).collect();
    let (written, error) = sys::update_batch(m.map().fd().as_fd(), &keys, &values);
    let written = written.min(take);
    out.extend_from_slice(&fresh[..written]);
    *left -= written;
    if let Some(e) = error {
        tracing::debug!(map = name, error = %e, "a write ahead failed; the apply writes the rest");
        *room = None;
    }
    written == fresh.len()
}

impl Dataplane {
    /// Runs `compile` on this thread, given what the maps hold and a sink for the entries it
    /// makes, while a second thread first puts maps grown `ahead` in force and then writes
    /// what the sink was given under keys the maps below the frontends do not hold (see the
    /// module's documentation and [`WriteAhead`]). Returns its result and what was
    /// written; nothing else may write to the maps until that has been handed to
    /// [`apply_prewritten`](Self::apply_prewritten).
    pub fn compile_prewriting<R>(
        &mut self,
        ahead: Ahead,
        write: WriteAhead,
        compile: impl FnOnce(&MapState, &mut dyn FnMut(&Piece)) -> R,
    ) -> (R, Prewritten) {
        let Dataplane { m, capacities, ceilings, grows, applied, authz_applied, .. } = self;
        let (held, authz_held): (&MapState, &AuthzState) = (applied, authz_applied);
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<Prewritten>();
        std::thread::scope(|s| {
            let writer = std::thread::Builder::new().name("kmesh-prewrite".into()).spawn_scoped(s, || {
                let slots = Slots { m: &mut *m, capacities: &mut *capacities, grows: &mut *grows };
                get_ready(slots, ceilings, (held, authz_held), ahead);
                let mut w = Writer::new(held, capacities);
                for batch in rx {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    w.write(m, batch);
                }
                w.finish()
            });
            let writer = match writer {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a thread to write ahead; the apply writes all");
                    None
                }
            };
            let mut batch = Prewritten::default();
            let send_every = if write == WriteAhead::WhileCompiling { SEND_BATCH } else { 1 };
            let r = compile(held, &mut |f: &Piece| {
                if write == WriteAhead::No {
                    return;
                }
                batch.add(f);
                if batch.len() >= send_every {
                    // A writer that is gone leaves the entries to the apply.
                    let _ = tx.send(std::mem::take(&mut batch));
                }
            });
            if write != WriteAhead::Everything {
                stop.store(true, Ordering::Relaxed);
            }
            drop(tx);
            let pre = writer.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            (r, pre.unwrap_or_default())
        })
    }
}

/// Puts maps grown `ahead` in force (see [`Ahead`]); on failure the apply grows what it needs.
fn get_ready(slots: Slots<'_>, ceilings: &Capacities, held: (&MapState, &AuthzState), ahead: Ahead) {
    match ahead {
        Ahead::Nothing => {}
        Ahead::Pending(h) => finish(slots, held, h),
        Ahead::Guess(lb) => match wanted(slots.capacities, ceilings, &lb, [0; 4]) {
            Ok(want) if want != *slots.capacities => {
                let grown = prepare(*slots.capacities, want, held.0, held.1);
                put_in_force(slots, held, grown)
            }
            _ => {}
        },
    }
}
