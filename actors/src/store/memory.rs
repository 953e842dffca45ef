//! `MemoryStore`: a `Store` kept in a map. It survives nothing, but it goes
//! through the same commit path as SQLite, which makes it the store for
//! tests; it can also be told to fail writes, to exercise `unavailable`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Change, Recovered, Store, StoreError, apply_to_map};
use crate::dispatcher::{ListPage, ListQuery};
use crate::job::{JobId, JobRecord};

/// An in-memory store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    jobs: HashMap<JobId, JobRecord>,
    paused: HashMap<String, bool>,
    fail_writes: Arc<AtomicBool>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A switch that makes every commit fail while it is on (for testing
    /// how the runtime behaves when the disk is full).
    pub fn fail_switch(&self) -> Arc<AtomicBool> {
        self.fail_writes.clone()
    }
}

impl Store for MemoryStore {
    fn recover(&mut self, finished_limit: usize) -> Result<Recovered, StoreError> {
        let mut active: Vec<JobRecord> = Vec::new();
        let mut finished: Vec<JobRecord> = Vec::new();
        for r in self.jobs.values() {
            if r.state.is_final() {
                finished.push(r.clone());
            } else {
                active.push(r.clone());
            }
        }
        active.sort_by_key(|r| r.id);
        finished.sort_by_key(|r| std::cmp::Reverse(r.id));
        finished.truncate(finished_limit);
        Ok(Recovered {
            active,
            finished,
            paused: self
                .paused
                .iter()
                .filter(|(_, p)| **p)
                .map(|(n, _)| n.clone())
                .collect(),
            max_id: self.jobs.keys().map(|id| id.0).max().unwrap_or(0),
        })
    }

    fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(StoreError("write failed (simulated)".into()));
        }
        apply_to_map(&mut self.jobs, &mut self.paused, batch);
        Ok(())
    }

    fn get(&mut self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.jobs.get(&id).cloned())
    }

    fn list(&mut self, q: &ListQuery) -> Result<ListPage, StoreError> {
        Ok(super::list_records(self.jobs.values(), q))
    }
}
