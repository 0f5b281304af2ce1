//! What watches the data plane, under a lock of its own: the kernel's event rings (connection
//! telemetry, authorization decisions), its counters, the telemetry switch, and a snapshot of
//! the daemon's own state published after every change. A scrape or a drain takes only this
//! lock, briefly, so it never waits for an apply (which holds the mesh's lock for as long as
//! compiling and writing take); an apply takes it only to publish what it did.

use std::collections::BTreeMap;
use std::time::Duration;

use kmesh_common::{AuthzEvent, VERDICT_ALLOW, VERDICT_DENY, stat};
use serde::Serialize;

use crate::compile::{MapCounts, words_addr};
use crate::kernel::{Capacities, EventMaps, KernelError};
use crate::model::Model;
use crate::telemetry::{Monitoring, Telemetry};

/// Counters the operator surface exports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub applies: u64,
    /// Applies that recompiled only the services a change touched.
    pub incremental_applies: u64,
    pub apply_errors: u64,
    /// Map entries written and deleted by successful applies (a restart on an unchanged
    /// configuration adds nothing).
    pub map_writes: u64,
    pub map_deletes: u64,
    /// Of the writes, those made while a full compilation ran (see `kernel::prewrite`),
    /// counted also when the apply then failed and undid them.
    pub map_writes_ahead: u64,
    /// By map name.
    pub map_full_errors: BTreeMap<String, u64>,
    pub config_errors: u64,
    /// Pins found missing at the last check and not restored.
    pub pins_missing: u64,
    pub pins_restored: u64,
    /// Hostname slots of waypoint headers that could not be written (`PP_HOST` full).
    pub waypoint_slot_errors: u64,
}

/// The daemon's state as of its last change, for scrapes and dumps that must not wait.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Published {
    pub counters: Counters,
    pub map_counts: MapCounts,
    pub capacities: Capacities,
    pub ceilings: Capacities,
    /// Times maps were grown since the daemon started.
    pub map_grows: u64,
    /// Where the maps are pinned (their memory is read from there at scrape time).
    pub layout_dir: std::path::PathBuf,
    pub frontend_conflicts: usize,
    pub enrolled: usize,
    pub authz_destinations: usize,
    /// Models applied since start: which configuration is in force.
    pub model_generation: u64,
    /// Endpoints ejected by outlier detection now, and ejections since start.
    pub outlier_ejected: usize,
    pub outlier_ejections: u64,
}

/// The most connection outcomes kept between two takes.
const MAX_OUTCOMES: usize = 1 << 16;

pub struct Observer {
    pub telemetry: Telemetry,
    /// Keep connection outcomes for outlier detection.
    pub collect_outcomes: bool,
    outcomes: Vec<(std::net::IpAddr, bool)>,
    maps: EventMaps,
    /// Policy names by the ids the kernel reports.
    policy_names: BTreeMap<u32, String>,
    report_interval: Duration,
    pub published: Published,
}

impl Observer {
    pub fn new(maps: EventMaps) -> Self {
        Self {
            telemetry: Telemetry::default(),
            collect_outcomes: false,
            outcomes: Vec::new(),
            maps,
            policy_names: BTreeMap::new(),
            report_interval: crate::kernel::DEFAULT_REPORT_INTERVAL,
            published: Published::default(),
        }
    }

    /// Takes a new model in (names for events and labels), with the policy ids in force.
    pub fn model_changed(
        &mut self,
        model: &Model,
        change: &kmesh_model::delta::ModelChange,
        policy_names: BTreeMap<u32, String>,
    ) {
        self.telemetry.model_changed(model, change);
        self.policy_names = policy_names;
    }

    pub fn stats(&self) -> [u64; stat::COUNT as usize] {
        self.maps.stats().unwrap_or_default()
    }

    /// Turns the kernel's connection events into metrics; returns access-log lines.
    pub fn drain_telemetry(&mut self) -> Vec<String> {
        let events = self.maps.drain_telemetry();
        if self.collect_outcomes {
            for e in &events {
                if e.direction != kmesh_common::DIR_OUTBOUND || e.has_orig != 1 {
                    continue;
                }
                let ok = match e.kind {
                    kmesh_common::CONN_OPEN => true,
                    // An open that came with the connection's first record (eager opens are
                    // on while outcomes are collected, so only around a switch).
                    kmesh_common::CONN_REPORT | kmesh_common::CONN_CLOSE
                        if e.flags & kmesh_common::EV_OPENED != 0 =>
                    {
                        true
                    }
                    kmesh_common::CONN_FAILED => false,
                    _ => continue,
                };
                if self.outcomes.len() < MAX_OUTCOMES {
                    self.outcomes.push((words_addr(e.remote), ok));
                }
            }
        }
        let lines = self.telemetry.record_all(&events);
        match self.maps.drain_tallies() {
            Ok(sums) => self.telemetry.record_tallies(&sums),
            Err(e) => tracing::warn!(error = %e, "draining the kernel's sums of short connections"),
        }
        lines
    }

    /// The outcomes of outbound connections sent to an endpoint since the last call
    /// (`true`: established), for outlier detection.
    pub fn take_outcomes(&mut self) -> Vec<(std::net::IpAddr, bool)> {
        std::mem::take(&mut self.outcomes)
    }

    /// Log lines for the denials (and dry-run differences) since the last call.
    pub fn drain_denials(&mut self) -> Vec<String> {
        let events: Vec<AuthzEvent> = self.maps.drain_authz_events();
        events.iter().map(|e| self.describe(e)).collect()
    }

    /// Switches access logs and metric families; the kernel collects events only while
    /// something uses them.
    pub fn set_monitoring(
        &mut self,
        m: Monitoring,
        report_interval: Option<Duration>,
    ) -> Result<(), KernelError> {
        let interval = report_interval.unwrap_or(self.report_interval);
        // Outlier detection reads the same events: the kernel keeps sending them for it.
        let kernel_on = m.kernel_on() || self.collect_outcomes;
        // It needs each success when it happens, not with the connection's first record. A
        // short connection needs no record of its own unless it is logged or judged.
        let tally = !m.access_log && !self.collect_outcomes;
        self.maps.set_telemetry(kernel_on, self.collect_outcomes, tally, interval)?;
        if !kernel_on {
            // No close event will come for what is open now.
            self.telemetry.forget_open();
        }
        self.report_interval = interval;
        self.telemetry.settings = m;
        Ok(())
    }

    /// What `kmeshctl monitoring` shows.
    pub fn monitoring(&self) -> serde_json::Value {
        let (kernel_on, interval) = self.maps.telemetry_conf().unwrap_or_default();
        let stats = self.stats();
        serde_json::json!({
            "settings": self.telemetry.settings,
            "kernel_telemetry": kernel_on,
            "report_interval_ms": interval.as_millis() as u64,
            "events_received": self.telemetry.events,
            "connections_summed_in_kernel": self.telemetry.tallied,
            "events_lost": stats[stat::TELEMETRY_LOST as usize],
            "open_connections": self.telemetry.open_connections(),
            "open_connections_evicted": self.telemetry.open_evicted,
        })
    }

    fn policy_label(&self, id: u32, action: u8) -> String {
        match (id, action) {
            (0, VERDICT_DENY) => "default deny (no ALLOW policy matched)".to_string(),
            (0, _) => "default allow".to_string(),
            (id, _) => self.policy_names.get(&id).cloned().unwrap_or_else(|| format!("policy #{id}")),
        }
    }

    fn describe(&self, e: &AuthzEvent) -> String {
        let who = |a: [u32; 4], port: u16| {
            let ip = words_addr(a);
            let sa = std::net::SocketAddr::new(ip, port);
            match self.telemetry.workload_at(ip) {
                Some(w) => format!("{sa} ({}/{})", w.namespace(), w.name),
                None => format!("{sa} (outside the mesh)"),
            }
        };
        let verb = |a: u8| if a == VERDICT_ALLOW { "allow" } else { "deny" };
        let mut line = format!(
            "{} connection src={} dst={} policy={}",
            if e.action == VERDICT_DENY { "denied" } else { "allowed" },
            who(e.src, e.src_port),
            who(e.dst, e.dst_port),
            self.policy_label(e.policy_id, e.action)
        );
        if e.dry_action != 0 {
            line += &format!(
                "; dry-run would {} (policy={})",
                verb(e.dry_action),
                self.policy_label(e.dry_policy_id, e.dry_action)
            );
        }
        line
    }

    /// Decisions by policy and action: (policy, "allow"|"deny", count).
    pub fn authz_decisions(&self) -> Vec<(String, &'static str, u64)> {
        self.maps
            .authz_counts()
            .into_iter()
            .map(|(k, n)| {
                let action = if k.action == VERDICT_ALLOW as u32 { "allow" } else { "deny" };
                let policy = if k.policy_id == 0 {
                    "default".to_string()
                } else {
                    self.policy_names
                        .get(&k.policy_id)
                        .cloned()
                        .unwrap_or_else(|| format!("#{}", k.policy_id))
                };
                (policy, action, n)
            })
            .collect()
    }
}
