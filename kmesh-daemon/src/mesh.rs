//! The daemon's state: the model, the enrolled namespaces and the loaded data plane, kept in
//! step. Every change is compiled and applied whole; if the kernel refuses it, the previous
//! model and enrollments stay in force, in memory and in the maps.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::compile::{Enrollment, Ids, compile};
use crate::kernel::{ApplyReport, Dataplane, KernelError};
use crate::model::Model;

/// Counters the operator surface exports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub applies: u64,
    pub apply_errors: u64,
    /// By map name.
    pub map_full_errors: BTreeMap<String, u64>,
    pub config_errors: u64,
}

pub struct Mesh {
    dp: Dataplane,
    model: Model,
    enrolled: BTreeMap<u64, Enrollment>,
    ids: Ids,
    pub counters: Counters,
}

impl Mesh {
    /// Wraps a loaded data plane. Namespaces enrolled by an earlier run (found in the adopted
    /// NETNS map) stay enrolled.
    pub fn new(dp: Dataplane) -> Self {
        let enrolled = dp.applied().netns.keys().map(|c| (*c, Enrollment::default())).collect();
        let ids = Ids::adopting(dp.applied());
        Self { dp, model: Model::default(), enrolled, ids, counters: Counters::default() }
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

    fn sync(
        &mut self,
        model: &Model,
        enrolled: &BTreeMap<u64, Enrollment>,
    ) -> Result<ApplyReport, KernelError> {
        let mut ids = self.ids.clone();
        let next = compile(model, enrolled, &mut ids, self.dp.applied());
        match self.dp.apply(next) {
            Ok(r) => {
                // The maps now hold only entries with ids from the pool.
                ids.release_reserved();
                self.ids = ids;
                self.counters.applies += 1;
                Ok(r)
            }
            Err(e) => {
                self.counters.apply_errors += 1;
                if let KernelError::MapFull { map, .. } = &e {
                    *self.counters.map_full_errors.entry(map.to_string()).or_default() += 1;
                }
                Err(e)
            }
        }
    }

    /// Replaces the model. On error nothing changes.
    pub fn set_model(&mut self, model: Model) -> Result<ApplyReport, KernelError> {
        let enrolled = self.enrolled.clone();
        let r = self.sync(&model, &enrolled)?;
        self.model = model;
        Ok(r)
    }

    /// Puts a network namespace in the mesh; `workload` (a uid) gives its pods' locality.
    pub fn enroll(&mut self, cookie: u64, workload: Option<String>) -> Result<ApplyReport, KernelError> {
        let mut enrolled = self.enrolled.clone();
        enrolled.insert(cookie, Enrollment { workload });
        let model = self.model.clone();
        let r = self.sync(&model, &enrolled)?;
        self.enrolled = enrolled;
        Ok(r)
    }

    /// Takes a namespace out of the mesh. Returns false if it was not enrolled.
    pub fn unenroll(&mut self, cookie: u64) -> Result<bool, KernelError> {
        if !self.enrolled.contains_key(&cookie) {
            return Ok(false);
        }
        let mut enrolled = self.enrolled.clone();
        enrolled.remove(&cookie);
        let model = self.model.clone();
        self.sync(&model, &enrolled)?;
        self.enrolled = enrolled;
        Ok(true)
    }
}
