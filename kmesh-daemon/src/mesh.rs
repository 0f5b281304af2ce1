//! The daemon's state: the model, the enrolled namespaces and the loaded data plane, kept in
//! step. A change to workloads or services recompiles only the services it touches; a change
//! of the node or of client localities recompiles everything. If the kernel refuses a change,
//! the previous model and enrollments stay in force, in memory and in the maps.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex, MutexGuard};

use crate::authz::{AuthzCompiler, AuthzDiff};
use crate::compile::{Compiler, Diff, Enrollment, Ids, words_addr};
use crate::kernel::{Ahead, ApplyReport, Dataplane, KernelError, PendingGrow, Prewritten, WriteAhead};
use crate::model::{Locality, Model, NodeInfo, Workload};
pub use crate::observe::Counters;
use crate::observe::{Observer, Published};
use kmesh_model::delta::{ModelChange, ModelKeys, ModelSource};

/// One enrollment as saved in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SavedEnrollment {
    pub netns_cookie: u64,
    pub netns: PathBuf,
    pub workload: Option<String>,
}

pub struct Mesh {
    dp: Dataplane,
    model: Model,
    enrolled: BTreeMap<u64, Enrollment>,
    compiler: Compiler,
    authz: AuthzCompiler,
    /// Namespace paths of enrollments (for authorization links and liveness checks).
    paths: BTreeMap<u64, PathBuf>,
    /// Where enrollments are saved, so that a restarted or upgraded daemon knows them.
    state_file: Option<PathBuf>,
    /// A configuration has been applied since start: before that, an enrollment is only
    /// recorded (applying it against an empty model would wipe adopted entries).
    has_model: bool,
    /// The maps may hold entries the compiler does not know (adopted from an earlier run, or
    /// left by a failed apply): the next change must be a full compilation.
    needs_full: bool,
    pub counters: Counters,
    /// Events, kernel counters and the published state (see [`crate::observe`]).
    observer: Arc<Mutex<Observer>>,
    /// Bumped whenever the model changes (the DNS proxies rebuild their name table then).
    model_gen: u64,
    /// Frontends claimed by more than one service in the configuration in force.
    conflicts: Vec<crate::compile::FrontendConflict>,
    /// This node's locality as the cluster says it (the Node's topology labels); overrides
    /// what the configuration source says.
    node_locality: Option<Locality>,
    /// The node locality the configuration source gave, restored when the override goes.
    source_locality: Locality,
    /// Woken after every change (the DNS proxies follow enrollments and the model).
    changed: Arc<tokio::sync::Notify>,
    /// The TLV slots of waypoint connections' PROXY headers.
    headers: crate::waypoint::Headers,
    /// Passive outlier detection (what it ejects, the compiler leaves out).
    pub outlier: crate::outlier::Detector,
    /// Maps being grown on another thread for a batch not applied yet (see
    /// [`grow_ahead`](Self::grow_ahead)).
    pending_grow: Option<PendingGrow>,
    /// See [`set_write_ahead`](Self::set_write_ahead).
    write_ahead: WriteAhead,
    /// A bulk change filled the model's maps since the last [`tidy`](Self::tidy).
    untidy_model: bool,
    /// Set while a change is applied with [`apply_change_leaving_tidy`](Self::apply_change_leaving_tidy).
    defer_tidy: bool,
    /// Changes applied with [`apply_change_leaving_tidy`](Self::apply_change_leaving_tidy)
    /// that telemetry has not taken in yet (it does in [`tidy`](Self::tidy)).
    untold: Vec<ModelChange>,
}

/// Models of at least this many services and workloads are compiled while their new entries
/// are written (see `kernel::prewrite`); below, a thread costs more than it saves.
pub const PREWRITE_MIN: usize = 4096;

impl Mesh {
    /// Wraps a loaded data plane. Namespaces enrolled by an earlier run (found in the adopted
    /// NETNS map) stay enrolled.
    pub fn new(dp: Dataplane) -> Self {
        let maps = dp.open_event_maps().expect("the event maps of a data plane just loaded are pinned");
        let observer = Arc::new(Mutex::new(Observer::new(maps)));
        let enrolled = dp.applied().netns.keys().map(|c| (*c, Enrollment::default())).collect();
        let compiler = Compiler::with_ids(Ids::adopting(dp.applied()));
        let authz = AuthzCompiler::adopting(dp.authz_applied());
        let headers = crate::waypoint::Headers::new(
            dp.open_waypoint_maps().expect("the waypoint maps of a data plane just loaded are pinned"),
        );
        let mesh = Self {
            headers,
            dp,
            model: Model::default(),
            enrolled,
            compiler,
            authz,
            paths: BTreeMap::new(),
            state_file: None,
            has_model: false,
            needs_full: true,
            counters: Counters::default(),
            observer,
            model_gen: 0,
            conflicts: Vec::new(),
            node_locality: None,
            source_locality: Locality::default(),
            changed: Arc::new(tokio::sync::Notify::new()),
            outlier: crate::outlier::Detector::default(),
            pending_grow: None,
            write_ahead: WriteAhead::WhileCompiling,
            untidy_model: false,
            defer_tidy: false,
            untold: Vec::new(),
        };
        mesh.publish();
        mesh
    }

    /// The observer this mesh publishes to (share it: its lock is independent of the mesh's).
    pub fn observer_handle(&self) -> Arc<Mutex<Observer>> {
        self.observer.clone()
    }

    /// Locks the observer (briefly: drains and scrapes take it too).
    pub fn observer(&self) -> MutexGuard<'_, Observer> {
        self.observer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes counters and map counts for scrapes that must not wait for the mesh's lock
    /// (done after every change made here; call it after changing `counters` from outside).
    pub fn publish(&self) {
        let p = Published {
            counters: self.counters.clone(),
            map_counts: self.dp.applied().counts(),
            capacities: self.dp.capacities(),
            ceilings: self.dp.ceilings(),
            map_grows: self.dp.grows(),
            layout_dir: self.dp.layout_dir().to_owned(),
            frontend_conflicts: self.conflicts.len(),
            enrolled: self.enrolled.len(),
            authz_destinations: self.dp.authz_applied().dest.len(),
            model_generation: self.model_gen,
            outlier_ejected: self.outlier.ejected().len(),
            outlier_ejections: self.outlier.ejections_total,
        };
        self.observer().published = p;
        self.changed.notify_one();
    }

    /// Notified after every change of the model or of the enrollments.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    /// A configuration has been applied since start.
    pub fn has_model(&self) -> bool {
        self.has_model
    }

    /// Bumped whenever the model changes.
    pub fn model_generation(&self) -> u64 {
        self.model_gen
    }

    /// Enrolled namespaces that can be entered (their path is known), with the Kubernetes
    /// namespace of their workload when it is in the model.
    pub fn enrolled_pods(&self) -> Vec<(u64, PathBuf, Option<String>)> {
        self.paths
            .iter()
            .filter(|(c, _)| self.enrolled.contains_key(c))
            .map(|(c, p)| {
                let ns = self.enrolled[c].workload.as_ref().and_then(|uid| {
                    match self.model.workloads.get(uid.as_str()) {
                        Some(w) => Some(w.namespace().to_string()),
                        // Not in the model (yet): Istio's uid says it, `<cluster>//Pod/<ns>/<name>`.
                        None => uid
                            .split_once("//Pod/")
                            .and_then(|(_, r)| r.split_once('/'))
                            .map(|(ns, _)| ns.to_string()),
                    }
                });
                (*c, p.clone(), ns)
            })
            .collect()
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn enrolled(&self) -> &BTreeMap<u64, Enrollment> {
        &self.enrolled
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    /// Frontends two or more services claim, with the service that owns each.
    pub fn frontend_conflicts(&self) -> &[crate::compile::FrontendConflict] {
        &self.conflicts
    }

    fn record(&mut self, r: &Result<ApplyReport, KernelError>, incremental: bool) {
        match r {
            Ok(rep) => {
                self.counters.applies += 1;
                self.counters.map_writes += rep.writes as u64;
                self.counters.map_deletes += rep.deletes as u64;
                if incremental {
                    self.counters.incremental_applies += 1;
                }
            }
            Err(e) => {
                self.counters.apply_errors += 1;
                if let KernelError::MapFull { map, .. } = e {
                    *self.counters.map_full_errors.entry(map.to_string()).or_default() += 1;
                }
            }
        }
    }

    /// Compiles and applies the model in `self.model` with `enrolled`, incrementally when
    /// `change` says what changed and the enrollments did not, as one transaction across the
    /// load-balancing and authorization maps (see [`Dataplane::apply_all`]). On error the maps
    /// hold what they held and the authorization compiler is back to the state in force; the
    /// caller puts the model back and calls [`recompile_in_force`](Self::recompile_in_force).
    fn sync(
        &mut self,
        change: Option<&ModelChange>,
        enrolled: &BTreeMap<u64, Enrollment>,
    ) -> Result<ApplyReport, KernelError> {
        let t0 = std::time::Instant::now();
        let incremental = match change {
            Some(c) if !self.needs_full && *enrolled == self.enrolled => {
                self.compiler.incremental(&self.model, c, self.dp.applied())
            }
            _ => None,
        };
        let is_incremental = incremental.is_some();
        let t_lb = std::time::Instant::now();
        let authz = match change
            .and_then(|c| self.authz.compile_change(&self.model, c, self.dp.authz_applied()))
        {
            Some(r) => r,
            None => self.authz.compile(&self.model).map(|s| AuthzDiff::between(self.dp.authz_applied(), &s)),
        };
        let t_authz = std::time::Instant::now();
        // Time of the full load-balancing compilation (when not incremental) and of the writes.
        let (mut full_us, mut write_us, mut prewritten) = (0, 0, 0);
        let r = match authz {
            Err(e) => Err(KernelError::from(e)),
            Ok(authz) => {
                let (d, pre) = match incremental {
                    Some(d) => (d, Prewritten::default()),
                    None => self.compile_full_growing(enrolled),
                };
                if let Some(pending) = self.pending_grow.take() {
                    self.dp.finish_grow(pending);
                }
                let compiler = &self.compiler;
                let del = self.headers.before_apply(&d, &self.model, |fk| compiler.frontend_owner(fk));
                self.counters.waypoint_slot_errors = self.headers.host_write_errors();
                let t_write = std::time::Instant::now();
                prewritten = pre.len();
                self.counters.map_writes_ahead += prewritten as u64;
                let r = self.dp.apply_prewritten(d, authz, pre);
                (full_us, write_us) =
                    ((t_write - t_authz).as_micros() as u64, t_write.elapsed().as_micros() as u64);
                if r.is_ok() {
                    self.headers.after_apply(&del);
                }
                r
            }
        };
        tracing::debug!(
            incremental = is_incremental,
            lb_compile_us = (t_lb - t0).as_micros() as u64 + full_us,
            authz_compile_us = (t_authz - t_lb).as_micros() as u64,
            kernel_write_us = write_us,
            prewritten,
            "sync phases"
        );
        self.record(&r, is_incremental);
        match &r {
            Ok(_) => {
                let conflicts = self.compiler.conflicts();
                if conflicts != self.conflicts {
                    for c in conflicts.iter().filter(|c| !self.conflicts.contains(c)) {
                        tracing::warn!(frontend = %c.frontend, owner = %c.owner, ignored = ?c.ignored,
                            "services share an address and port: the first service key owns it");
                    }
                    self.conflicts = conflicts;
                }
                self.sync_headers(enrolled);
                // The maps now hold only entries with ids from the pool.
                self.compiler.ids.release_reserved();
                self.authz.release_adopted();
                self.needs_full = false;
            }
            // The authorization compiler's memory is read back from the maps in force.
            Err(_) => self.authz = AuthzCompiler::adopting(self.dp.authz_applied()),
        }
        if !self.defer_tidy {
            self.compiler.tidy();
        }
        r
    }

    /// Rebuilds the indexes a bulk change filled in key order (the model's, the compiler's),
    /// whose B-tree nodes that order left half empty (see `kmesh_model::repack`). Memory, not
    /// correctness: every change does it before it returns, except one applied with
    /// [`apply_change_leaving_tidy`](Self::apply_change_leaving_tidy).
    pub fn tidy(&mut self) {
        let started = std::time::Instant::now();
        self.tell_observer();
        let told = started.elapsed();
        self.compiler.tidy();
        if std::mem::take(&mut self.untidy_model) {
            kmesh_model::repack::map(&mut self.model.workloads);
            kmesh_model::repack::map(&mut self.model.services);
        }
        tracing::debug!(
            telemetry_us = told.as_micros() as u64,
            elapsed_us = started.elapsed().as_micros() as u64,
            "model and compiler tidied"
        );
    }

    /// Gives telemetry the changes it has not taken in, as the model now has them (which a
    /// later change may have changed again: each is read from the model, not replayed).
    fn tell_observer(&mut self) {
        let untold = std::mem::take(&mut self.untold);
        if untold.is_empty() {
            return;
        }
        let names: BTreeMap<u32, String> =
            self.authz.policy_ids.iter().map(|(k, v)| (*v, k.clone())).collect();
        let mut o = self.observer();
        for change in &untold {
            o.model_changed(&self.model, change, names.clone());
        }
    }

    /// [`apply_change`](Self::apply_change), leaving [`tidy`](Self::tidy) to the caller: the
    /// xDS client acknowledges the change first, since the ACK waits on nothing but the maps.
    /// Telemetry takes the change in at the tidy too: until then a connection event names
    /// what the model held before (the drain that reads events already ran independently of
    /// the writes, so events of the newest connections could always be named from the model
    /// before them).
    pub fn apply_change_leaving_tidy(
        &mut self,
        src: &(impl ModelSource + ?Sized),
        keys: &ModelKeys,
    ) -> Result<ApplyReport, KernelError> {
        self.defer_tidy = true;
        let r = self.apply_change(src, keys);
        self.defer_tidy = false;
        r
    }

    /// Starts growing the maps on another thread when a batch that will hold at least `lb`
    /// (from the resources alone: see `xds::handle_batch_with`) does not fit them, so that the
    /// verifier runs while the batch is merged and compiled. The next apply puts the grown maps
    /// in force before its writes, if they still fit what the maps hold then.
    pub fn grow_ahead(&mut self, lb: &crate::compile::MapCounts) {
        if self.pending_grow.is_some() {
            return;
        }
        self.pending_grow = self.dp.grow_in_background(&lb.max(&self.dp.applied().counts()));
    }

    /// A full load-balancing compilation, as the diff from what the maps hold. When the model
    /// looks bigger than the maps, the grown maps are made on a second thread while this one
    /// compiles, and put in force before the writes; the apply then grows again only if the
    /// guess fell short. A large model's new entries are written on that thread while the
    /// compilation goes on (see `kernel::prewrite`): the apply skips them.
    fn compile_full_growing(&mut self, enrolled: &BTreeMap<u64, Enrollment>) -> (Diff, Prewritten) {
        let ahead = match self.pending_grow.take() {
            // Started when the batch was decoded.
            Some(pending) => Ahead::Pending(pending),
            None => {
                let guess = crate::compile::expected_peaks(&self.model, self.dp.applied());
                let caps = self.dp.capacities();
                let fits = guess.as_array().into_iter().all(|(m, n)| n <= caps.get(m) as usize);
                if fits { Ahead::Nothing } else { Ahead::Guess(guess) }
            }
        };
        let write = match self.write_ahead {
            WriteAhead::WhileCompiling
                if self.model.services.len() + self.model.workloads.len() < PREWRITE_MIN =>
            {
                WriteAhead::No
            }
            w => w,
        };
        let (compiler, model) = (&mut self.compiler, &self.model);
        if write == WriteAhead::No && matches!(ahead, Ahead::Nothing) {
            let next = compiler.full(model, enrolled, self.dp.applied());
            return (crate::compile::diff_owned(self.dp.applied(), next), Prewritten::default());
        }
        self.dp.compile_prewriting(ahead, write, |applied, sink| {
            let next = compiler.full_with(model, enrolled, applied, sink);
            crate::compile::diff_owned(applied, next)
        })
    }

    /// How full compilations write ahead (see `kernel::prewrite`): by default
    /// [`WriteAhead::WhileCompiling`] for models of at least [`PREWRITE_MIN`] services and
    /// workloads; tests ask for [`WriteAhead::Everything`] of any model.
    pub fn set_write_ahead(&mut self, w: WriteAhead) {
        self.write_ahead = w;
    }

    /// Brings the identity slots of waypoint headers to `enrolled` (after the maps took it).
    fn sync_headers(&mut self, enrolled: &BTreeMap<u64, Enrollment>) {
        if let Err(e) = self.headers.sync_idents(&self.model, enrolled) {
            tracing::error!(error = %e, "cannot write the identities of waypoint headers");
        }
    }

    /// After a refused apply, once the model and enrollments in force are back: the
    /// load-balancing compiler's memory goes back to them, and the next change is a full
    /// compilation.
    fn recompile_in_force(&mut self) {
        let _ = self.compiler.full(&self.model, &self.enrolled, self.dp.applied());
        self.needs_full = true;
    }

    /// Applies a change of enrollments alone: only NETNS entries when the namespaces fall into
    /// locality classes that already have tables (most enrollments), else a full compilation.
    fn sync_enrollment(&mut self, enrolled: &BTreeMap<u64, Enrollment>) -> Result<ApplyReport, KernelError> {
        let r = match (!self.needs_full)
            .then(|| self.compiler.enrollment(&self.model, &self.enrolled, enrolled))
            .flatten()
        {
            Some(d) => {
                let r = self.dp.apply_diff(d);
                self.record(&r, true);
                if r.is_ok() {
                    self.sync_headers(enrolled);
                }
                r
            }
            None => self.sync(None, enrolled),
        };
        if r.is_err() {
            self.recompile_in_force();
        }
        self.publish();
        r
    }

    /// Replaces the model with `model` (a source that produces whole models: the local file).
    /// Compares every entry to find what changed; see [`apply_change`](Self::apply_change).
    pub fn set_model(&mut self, model: Model) -> Result<ApplyReport, KernelError> {
        let mut keys = ModelKeys::between(&self.model, &model);
        // The node is compared after this node's own locality (from the cluster) is laid over.
        keys.node = true;
        self.apply_change(&model, &keys)
    }

    /// Takes the entries `keys` names (and the node, if `keys.node`) from `src` and applies
    /// the result, recompiling only what they touch. On error nothing changes. `src` is the
    /// source's whole model; nothing it holds besides the named entries is read.
    pub fn apply_change(
        &mut self,
        src: &(impl ModelSource + ?Sized),
        keys: &ModelKeys,
    ) -> Result<ApplyReport, KernelError> {
        let t0 = std::time::Instant::now();
        let before_node = self.model.node.clone();
        let mut change = self.model.take_from(src, keys);
        let t_take = t0.elapsed();
        let source_locality =
            if keys.node { src.node().locality.clone() } else { self.source_locality.clone() };
        if keys.node
            && let Some(l) = &self.node_locality
        {
            self.model.node.locality = l.clone();
        }
        change.node = (self.model.node != before_node).then_some(before_node);
        if change.is_empty() && self.has_model && !self.needs_full {
            self.source_locality = source_locality;
            return Ok(ApplyReport::default());
        }
        let enrolled = self.enrolled.clone();
        let t_sync = std::time::Instant::now();
        let r = self.sync(Some(&change), &enrolled);
        let t_sync = t_sync.elapsed();
        if r.is_err() {
            self.model.revert(change);
            self.recompile_in_force();
            self.publish();
            return r;
        }
        self.source_locality = source_locality;
        self.model_gen += 1;
        // A bulk change filled the model's maps in key order: see `tidy`.
        self.untidy_model |=
            kmesh_model::repack::worth_it(keys.len(), self.model.workloads.len() + self.model.services.len());
        let t_obs = std::time::Instant::now();
        self.untold.push(change);
        if !self.defer_tidy {
            self.tell_observer();
        }
        let t_obs = t_obs.elapsed();
        let t_pub = std::time::Instant::now();
        self.publish();
        tracing::debug!(
            take_us = t_take.as_micros() as u64,
            sync_us = t_sync.as_micros() as u64,
            telemetry_us = t_obs.as_micros() as u64,
            publish_us = t_pub.elapsed().as_micros() as u64,
            "model change applied"
        );
        self.has_model = true;
        // This layout's maps now hold the configuration: pins of another layout version (an
        // upgrade from an older daemon) can go, detaching the programs that used them.
        for d in self.dp.retire_old_layouts() {
            tracing::info!(dir = %d.display(), "retired the pins of another map layout version");
        }
        if !self.defer_tidy {
            self.tidy();
        }
        r
    }

    /// Takes the outcomes of connections in, and makes the interval check: endpoints ejected
    /// or returned are recompiled at once (only the services they back).
    pub fn outlier_step(&mut self, outcomes: &[(std::net::IpAddr, bool)], now: std::time::Instant) {
        let changed = self.outlier.record(&self.model, outcomes, now) | self.outlier.tick(&self.model, now);
        if !changed || !self.has_model {
            return;
        }
        let next = self.outlier.ejected().clone();
        let flipped: BTreeSet<std::net::IpAddr> =
            next.symmetric_difference(&self.compiler.ejected).copied().collect();
        // Only the workloads of services that eject (those with outlier detection, or all with
        // the node's default) are recompiled.
        let everywhere = self.outlier.default.is_some();
        self.compiler.eject_everywhere = everywhere;
        let ejecting = |w: &Workload| {
            everywhere
                || w.services
                    .keys()
                    .any(|k| self.model.services.get(k.as_str()).is_some_and(|s| s.outlier.is_some()))
        };
        let mut change = kmesh_model::delta::ModelChange::default();
        for (uid, w) in &self.model.workloads {
            if w.addresses.iter().any(|a| flipped.contains(a)) && ejecting(w) {
                change.workloads.insert(uid.clone(), Some(w.clone()));
            }
        }
        let before = std::mem::replace(&mut self.compiler.ejected, next);
        let enrolled = self.enrolled.clone();
        let started = std::time::Instant::now();
        let r = self.sync(Some(&change), &enrolled);
        tracing::debug!(
            workloads = change.workloads.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "outlier ejections applied"
        );
        if let Err(e) = r {
            tracing::error!(error = %e, "applying outlier ejections failed; keeping the tables as they were");
            self.compiler.ejected = before;
            self.recompile_in_force();
        }
        self.publish();
    }

    /// Sets this node's locality from the cluster (`None`: what the configuration says). A
    /// change recompiles what depends on it; on error the previous locality stays.
    pub fn set_node_locality(&mut self, locality: Option<Locality>) -> Result<(), KernelError> {
        if locality == self.node_locality {
            return Ok(());
        }
        let previous = std::mem::replace(&mut self.node_locality, locality);
        if !self.has_model {
            return Ok(());
        }
        let node = NodeInfo { locality: self.source_locality.clone(), ..self.model.node.clone() };
        let src = Model { node, ..Default::default() };
        if let Err(e) = self.apply_change(&src, &ModelKeys { node: true, ..Default::default() }) {
            self.node_locality = previous;
            return Err(e);
        }
        Ok(())
    }

    /// Saves enrollments to `path` from now on.
    pub fn set_state_file(&mut self, path: PathBuf) {
        self.state_file = Some(path);
        self.save();
    }

    fn save(&self) {
        let Some(path) = &self.state_file else { return };
        let entries: Vec<SavedEnrollment> = self
            .paths
            .iter()
            .map(|(c, p)| SavedEnrollment {
                netns_cookie: *c,
                netns: p.clone(),
                workload: self.enrolled.get(c).and_then(|e| e.workload.clone()),
            })
            .collect();
        let r = (|| -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&entries)?)?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = r {
            tracing::error!(path = %path.display(), error = %e, "cannot save enrollments");
        }
    }

    /// Takes back enrollments saved by an earlier daemon: those whose namespace still exists
    /// with the same cookie are kept (with their workload) and their authorization attached;
    /// the others are pods that are gone and are dropped.
    pub fn restore(&mut self, saved: Vec<SavedEnrollment>) {
        for s in saved {
            match crate::netns::cookie_of(&s.netns) {
                Ok(c) if c == s.netns_cookie => {
                    self.enrolled.insert(c, Enrollment { workload: s.workload });
                    if let Err(e) = self.dp.attach_authz(c, &s.netns) {
                        tracing::error!(netns = %s.netns.display(), error = %e, "cannot attach authorization");
                    }
                    self.paths.insert(c, s.netns);
                }
                _ => {
                    tracing::info!(netns = %s.netns.display(), "enrolled namespace is gone; dropping it");
                    self.enrolled.remove(&s.netns_cookie);
                    self.dp.detach_authz(s.netns_cookie);
                }
            }
        }
        self.save();
    }

    /// The enrolled namespaces' paths, to check for liveness without holding the mesh's lock
    /// (entering each namespace takes a thread and a setns).
    pub fn enrolled_paths(&self) -> Vec<(u64, PathBuf)> {
        self.paths.iter().map(|(c, p)| (*c, p.clone())).collect()
    }

    /// Which of `paths` no longer lead to the namespace enrolled under their cookie (the pod is
    /// gone, or its path was reused). Call without the mesh's lock.
    pub fn gone(paths: &[(u64, PathBuf)]) -> Vec<u64> {
        paths.iter().filter(|(c, p)| crate::netns::cookie_of(p).ok() != Some(*c)).map(|(c, _)| *c).collect()
    }

    /// Unenrolls namespaces found gone by [`gone`](Self::gone) (those still enrolled).
    pub fn unenroll_gone(&mut self, gone: &[u64]) -> Vec<u64> {
        let mut done = Vec::new();
        for c in gone {
            match self.unenroll(*c) {
                Ok(true) => done.push(*c),
                Ok(false) => {}
                Err(e) => tracing::error!(cookie = c, error = %e, "cannot unenroll a namespace that is gone"),
            }
        }
        done
    }

    /// Puts a network namespace in the mesh: its sockets are load-balanced, and connections
    /// into it are authorized (when `netns` is given). `workload` (a uid) gives its pods'
    /// locality.
    pub fn enroll(
        &mut self,
        cookie: u64,
        netns: Option<&Path>,
        workload: Option<String>,
    ) -> Result<ApplyReport, KernelError> {
        let mut enrolled = self.enrolled.clone();
        enrolled.insert(cookie, Enrollment { workload });
        let r = if self.has_model { self.sync_enrollment(&enrolled)? } else { ApplyReport::default() };
        if let Some(path) = netns {
            self.dp.attach_authz(cookie, path)?;
            self.paths.insert(cookie, path.to_owned());
        }
        self.enrolled = enrolled;
        self.save();
        self.publish();
        Ok(r)
    }

    /// What the kernel maps hold now, decoded into names: per frontend, the service and the
    /// backends at each locality level of each table.
    pub fn dump_maps(&self) -> Result<serde_json::Value, KernelError> {
        use kmesh_common::PROTO_UDP;
        let s = self.dp.read_state()?;
        let names: BTreeMap<u32, &kmesh_model::model::Istr> =
            self.compiler.ids.services.iter().map(|(k, v)| (*v, k)).collect();
        let obs = self.observer();
        let who = |a: [u32; 4]| {
            let ip = words_addr(a);
            match obs.telemetry.workload_at(ip) {
                Some(w) => format!("{ip} ({}/{})", w.namespace(), w.name),
                None => ip.to_string(),
            }
        };
        let tables_of = |service_id: u32| {
            let mut tables = Vec::new();
            for (tk, t) in
                s.tables.range(kmesh_common::TableKey { service_id, class_id: 0, family: 0, _pad: [0; 3] }..)
            {
                if tk.service_id != service_id {
                    break;
                }
                let levels: Vec<Vec<String>> = s
                    .table_levels(tk, t)
                    .into_iter()
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        l.into_iter().map(|a| a.map(who).unwrap_or_else(|| "(missing)".into())).collect()
                    })
                    .collect();
                tables.push(serde_json::json!({
                    "client_class": tk.class_id,
                    "family": if tk.family == kmesh_common::FAMILY_V4 { "IPv4" } else { "IPv6" },
                    "generation": t.generation,
                    "strict": t.flags & kmesh_common::TBL_F_STRICT != 0,
                    "weighted": t.flags & kmesh_common::TBL_F_WEIGHTED != 0,
                    "port_overrides": t.flags & kmesh_common::TBL_F_PORTS != 0,
                    "levels": levels,
                }));
            }
            tables
        };
        let mut frontends = Vec::new();
        for (fk, fv) in &s.frontends {
            let proto = if fk.proto == PROTO_UDP { "UDP" } else { "TCP" };
            let port = u16::from_be(fk.port);
            let frontend = std::net::SocketAddr::new(words_addr(fk.addr), port);
            let mut f = serde_json::json!({
                "frontend": if port == kmesh_common::PORT_ANY { format!("{}:*/{proto}", words_addr(fk.addr)) } else { format!("{frontend}/{proto}") },
                "service": names.get(&fv.service_id).map(|s| s.as_str()).unwrap_or(if fv.service_id == 0 { "(workload address)" } else { "?" }),
                "target_port": u16::from_be(fv.target_port),
                "tables": tables_of(fv.service_id),
            });
            if fv.waypoint_id != 0 {
                // Where every client but the waypoints themselves goes.
                f["waypoint"] = serde_json::json!({
                    "route": names.get(&fv.waypoint_id).map(|s| s.as_str()).unwrap_or("?"),
                    "tables": tables_of(fv.waypoint_id),
                });
            }
            frontends.push(f);
        }
        let netns: Vec<_> = s
            .netns
            .iter()
            .map(|(c, v)| {
                serde_json::json!({
                    "netns_cookie": c,
                    "netns": self.paths.get(c),
                    "workload": self.enrolled.get(c).and_then(|e| e.workload.clone()),
                    "client_class": v.class_id,
                    "waypoint": v.flags & kmesh_common::NS_F_WAYPOINT != 0,
                })
            })
            .collect();
        Ok(serde_json::json!({ "frontends": frontends, "enrolled": netns, "entries": s.counts() }))
    }

    /// What `kmeshctl authz` shows: where authorization is enforced and what it decided.
    pub fn authz_status(&self) -> serde_json::Value {
        let enforced: Vec<serde_json::Value> = self
            .enrolled
            .iter()
            .map(|(c, e)| {
                serde_json::json!({
                    "netns_cookie": c,
                    "netns": self.paths.get(c),
                    "workload": e.workload,
                    "enforced": self.dp.authz_attached(*c),
                    "program": self.dp.authz_program_ids(*c).ok().map(|(linked, loaded)| {
                        serde_json::json!({"linked": linked, "loaded": loaded})
                    }),
                })
            })
            .collect();
        let obs = self.observer();
        let decisions: Vec<serde_json::Value> = obs
            .authz_decisions()
            .into_iter()
            .map(|(policy, action, n)| serde_json::json!({"policy": policy, "action": action, "connections": n}))
            .collect();
        let stats = obs.stats();
        serde_json::json!({
            "policies": self.model.policies.keys().collect::<Vec<_>>(),
            "destinations": self.dp.authz_applied().dest.len(),
            "namespaces": enforced,
            "decisions": decisions,
            "events_lost": stats[kmesh_common::stat::AUTHZ_EVENTS_LOST as usize],
            "node_netns_exempt": self.dp.node_netns().ok().flatten().is_some(),
            "node_connections_exempted": stats[kmesh_common::stat::AUTHZ_NODE_EXEMPT as usize],
            "node_connections_open": self.dp.node_conns_open(),
        })
    }

    /// Takes a namespace out of the mesh. Returns false if it was not enrolled.
    pub fn unenroll(&mut self, cookie: u64) -> Result<bool, KernelError> {
        if !self.enrolled.contains_key(&cookie) {
            return Ok(false);
        }
        let mut enrolled = self.enrolled.clone();
        enrolled.remove(&cookie);
        if self.has_model {
            self.sync_enrollment(&enrolled)?;
        }
        self.dp.detach_authz(cookie);
        self.paths.remove(&cookie);
        self.enrolled = enrolled;
        self.save();
        self.publish();
        Ok(true)
    }
}
