//! Persistence of jobs. The `Store` trait is what a backend implements; the
//! `StoreActor` runs one on its own `SyncArbiter` thread (the only thread
//! that ever touches it), takes batches of changes from the Dispatcher and
//! commits each batch in one transaction (group commit).
//!
//! Implementations: [`MemoryStore`] (tests, and embedding without disk) and
//! [`SqliteStore`] (the daemon's default).
//!
//! ## Shape for a shared store
//! The Dispatcher keeps the queues; the store is told every state change.
//! A store shared by several daemons (PostgreSQL) would keep the same calls
//! and add a lease: a `running` record carries its owner and lease expiry
//! (`JobRecord::started_at` plus the timeout), recovery reclaims only jobs
//! whose lease expired, and claiming uses `SELECT … FOR UPDATE SKIP LOCKED`.
//! Nothing in the trait assumes that only one process reads the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};

pub(crate) use crate::dispatcher::list_records;
use crate::dispatcher::{Committed, Dispatcher, ListPage, ListQuery};
use crate::job::{JobId, JobRecord};
use crate::reply::Reply;

mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::{SqliteStore, Sync as SqliteSync};

/// A store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// One change to persist. Changes in a batch are applied in order, in one
/// transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Insert or replace a job's record.
    Put(Box<JobRecord>),
    /// Remember whether a pool is paused.
    Paused(String, bool),
    /// Delete up to `limit` finished jobs that finished before `before_ms`.
    Prune {
        /// Cut-off, ms since the epoch.
        before_ms: u64,
        /// Most rows deleted by this change (keeps the write lock short).
        limit: usize,
    },
}

/// What a store holds at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovered {
    /// Jobs that were not final, in id order.
    pub active: Vec<JobRecord>,
    /// The newest finished jobs, at most the number asked for.
    pub finished: Vec<JobRecord>,
    /// Pools that were paused.
    pub paused: Vec<String>,
    /// The largest job id ever stored (0 when empty).
    pub max_id: u64,
}

/// A persistence backend. Called only from the store's own thread.
pub trait Store: Send + 'static {
    /// Load what the Dispatcher needs to resume: non-final jobs, the newest
    /// `finished_limit` finished ones, paused pools, the largest id.
    fn recover(&mut self, finished_limit: usize) -> Result<Recovered, StoreError>;

    /// Apply a batch atomically: all of it or nothing.
    fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError>;

    /// One job by id (jobs no longer kept in memory).
    fn get(&mut self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// One page of jobs matching a query.
    fn list(&mut self, q: &ListQuery) -> Result<ListPage, StoreError>;

    /// Bytes the store occupies, if it can tell.
    fn size_bytes(&mut self) -> Option<u64> {
        None
    }
}

/// Reads the store answers on its own thread, straight to the caller.
pub(crate) enum StoreRead {
    Get(JobId, Reply<Result<Option<JobRecord>, StoreError>>),
    /// Several jobs, answered in the order asked.
    GetMany(
        Vec<JobId>,
        Reply<Result<Vec<Option<JobRecord>>, StoreError>>,
    ),
    List(ListQuery, Reply<Result<ListPage, StoreError>>),
}

impl Message for StoreRead {
    type Result = ();
}

/// A batch to commit; the outcome goes back to the Dispatcher as
/// `Committed` with the same sequence number.
pub(crate) struct Commit {
    pub(crate) seq: u64,
    pub(crate) batch: Vec<Change>,
}

impl Message for Commit {
    type Result = ();
}

/// The store's thread.
pub(crate) struct StoreActor {
    store: Box<dyn Store>,
    dispatcher: Addr<Dispatcher>,
    /// Store size, refreshed after a commit (at most every
    /// `SIZE_REFRESH`), read by `stats`.
    size: Arc<AtomicU64>,
    /// When `size` was last refreshed.
    size_at: Option<std::time::Instant>,
    /// True when a commit failed and none has succeeded since.
    failing: Arc<AtomicBool>,
    /// Keeps the live-thread count up while the store thread exists.
    _guard: crate::pool::ThreadGuard,
}

/// How stale the store size in `stats` may be.
const SIZE_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

impl Actor for StoreActor {
    type Context = SyncContext<Self>;
}

impl Handler<Commit> for StoreActor {
    type Result = ();

    fn handle(&mut self, msg: Commit, _: &mut SyncContext<Self>) {
        let result = self.store.commit(&msg.batch);
        self.failing.store(result.is_err(), Ordering::Relaxed);
        // Measuring costs two queries and a stat: under load, at most a few
        // times a second, not after every one of thousands of commits.
        if self.size_at.is_none_or(|t| t.elapsed() >= SIZE_REFRESH)
            && let Some(n) = self.store.size_bytes()
        {
            self.size.store(n, Ordering::Relaxed);
            self.size_at = Some(std::time::Instant::now());
        }
        self.dispatcher.do_send(Committed {
            seq: msg.seq,
            batch: msg.batch,
            result,
        });
    }
}

impl Handler<StoreRead> for StoreActor {
    type Result = ();

    fn handle(&mut self, msg: StoreRead, _: &mut SyncContext<Self>) {
        match msg {
            StoreRead::Get(id, r) => r.send(self.store.get(id)),
            StoreRead::GetMany(ids, r) => {
                r.send(ids.into_iter().map(|id| self.store.get(id)).collect())
            }
            StoreRead::List(q, r) => r.send(self.store.list(&q)),
        }
    }
}

/// Start the store's SyncArbiter of one thread (`jobd-store`). Must run
/// inside the actix System.
pub(crate) fn start_store(
    store: Box<dyn Store>,
    dispatcher: Addr<Dispatcher>,
    size: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    threads: crate::pool::ThreadCount,
) -> Addr<StoreActor> {
    // The factory is called exactly once (one thread, never restarted: the
    // store actor never stops itself), so the store moves in through a slot.
    let slot = Mutex::new(Some(store));
    threads.add(1);
    SyncArbiter::start_with_thread_builder(
        1,
        || std::thread::Builder::new().name("jobd-store".into()),
        move || {
            let store = slot
                .lock()
                .ok()
                .and_then(|mut s| s.take())
                .unwrap_or_else(|| Box::new(MemoryStore::default()));
            StoreActor {
                store,
                dispatcher: dispatcher.clone(),
                size: size.clone(),
                size_at: None,
                failing: failing.clone(),
                _guard: threads.guard(),
            }
        },
    )
}

/// Apply a batch to a map of records (shared by the memory store and tests).
pub(crate) fn apply_to_map(
    jobs: &mut HashMap<JobId, JobRecord>,
    paused: &mut HashMap<String, bool>,
    batch: &[Change],
) {
    for c in batch {
        match c {
            Change::Put(r) => {
                jobs.insert(r.id, (**r).clone());
            }
            Change::Paused(p, v) => {
                paused.insert(p.clone(), *v);
            }
            Change::Prune { before_ms, limit } => {
                let mut old: Vec<JobId> = jobs
                    .values()
                    .filter(|r| r.finished_at.is_some_and(|f| f < *before_ms))
                    .map(|r| r.id)
                    .collect();
                old.sort_unstable();
                for id in old.into_iter().take(*limit) {
                    jobs.remove(&id);
                }
            }
        }
    }
}
