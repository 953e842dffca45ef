//! The Dispatcher actor: the single owner of all job state. It admits jobs
//! (limits, unique keys, dependencies), keeps per-pool priority queues and
//! delay timers, hands a job to a pool only when one of its workers is idle
//! (credit-based dispatch; while none is, it offers the best queued jobs in
//! the pool's handoff slot, see `pool`), enforces timeouts, schedules
//! retries, answers waiters, keeps stats and finished records, and runs the
//! shutdown drain. Workers' reports come through an inbox it reads first
//! thing on every message and timer (`drain`).
//!
//! This file holds the actor itself: its struct, construction, the inbox
//! drain and its lifecycle, with the public types of its API. The rest,
//! one concern a module: `state` (what it keeps per pool and per job),
//! `admission` (a job comes in, waits for its time, is queued),
//! `dispatch` (a queued job goes to a worker), `endings` (an attempt ends:
//! retried, finished, cancelled, timed out), `pools` (live pool changes),
//! `waits` (`wait` and `wait_any`), `shutdown` (the drain),
//! `queries` (list and stats), `messages` (the other message types and
//! their handlers), `persist` (the store side: group commit),
//! `recovery` (what the store held, back at start) and `store_reads`
//! (answers that fall back to the store).
//!
//! Nothing here blocks: the actor lives on the System arbiter.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message, SpawnHandle};
use serde_json::Value;

use crate::context::{AttemptShared, Interrupt};
use crate::error::JobError;
use crate::express::Express;
use crate::job::{Attempt, ErrorInfo, JobId, JobRecord, JobSpec, JobState, now_ms};
use crate::pool::{
    Adopted, Failure, OFFER_DEPTH, PANIC_PREFIX, PoolConfig, PoolLink, Report, RunJob, ThreadCount,
    Worker, start_pool,
};
use crate::registry::Registry;
use crate::reply::{DirectReply, Outcome, Reply};
use crate::stats::{KindTotals, PairTotals, PoolStats, StatsSnapshot, StoreStats, pool_breakdown};
use crate::store::{Change, Commit, Recovered, StoreActor, StoreError, StoreRead};

mod admission;
mod dispatch;
mod endings;
mod messages;
mod persist;
mod pools;
mod queries;
mod recovery;
mod shutdown;
mod state;
mod store_reads;
mod waits;

pub(crate) use endings::outcome_of;
pub(crate) use messages::{AttemptDone, Query, Submit, SubmitBatch, Wake};
pub(crate) use persist::Committed;
use persist::PRUNE_BATCH;
pub(crate) use queries::list_records;
use state::{Active, Admission, IdMap, KindMap, QueueEntry, RecordWaiter, Stamp, Waiter};
pub(crate) use state::{PoolState, StoreLink};
use store_reads::{ListLoaded, RetryLoaded};
pub(crate) use waits::{Wait, WaitAny};

/// How long finished jobs are kept for `status`/`wait`, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished records older than this are pruned.
    pub ttl: Duration,
    /// At most this many finished records are kept (oldest pruned first).
    pub max_jobs: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            ttl: Duration::from_secs(24 * 3600),
            max_jobs: 100_000,
        }
    }
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitAck {
    /// The job's id (the existing job's, when deduplicated).
    pub id: JobId,
    /// Its state right after admission.
    pub state: JobState,
    /// True when a job with the same kind and unique key was still active,
    /// and this is its id.
    pub deduplicated: bool,
}

/// Filter and page of a `list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this pool.
    pub pool: Option<String>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// At most this many (default 100, capped at 10,000).
    pub limit: Option<usize>,
    /// Continue after this id (from the previous page's `cursor`).
    pub cursor: Option<JobId>,
    /// Oldest first instead of newest first.
    pub oldest_first: bool,
}

/// One page of a `list`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    /// The matching records.
    pub jobs: Vec<JobRecord>,
    /// Pass this as `cursor` to get the next page; None on the last page.
    pub cursor: Option<JobId>,
}

/// What the heartbeat hook sees on each tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Jobs queued or delayed, all pools.
    pub waiting: usize,
    /// Jobs running, all pools.
    pub running: usize,
}

/// A callback run on the Dispatcher's own event loop at a fixed interval (a
/// stalled loop stops it: the daemon's systemd watchdog relies on this).
pub(crate) type HeartbeatFn = Box<dyn FnMut(Heartbeat) + Send>;

/// The Dispatcher actor.
pub struct Dispatcher {
    /// Kinds and their handlers.
    registry: Arc<Registry>,
    /// Pools by index; `pool_names` maps names to indexes.
    pools: Vec<PoolState>,
    pool_names: HashMap<String, usize>,
    /// Jobs that are not final.
    /// Boxed: the map's slots stay small (a map grows by doubling, and a
    /// slot is paid for whether it is used or not), and growing it moves
    /// pointers rather than whole jobs.
    active: IdMap<Box<Active>>,
    /// Finished jobs kept for `status`, `wait` and `list`.
    finished: IdMap<JobRecord>,
    /// Finished ids in finishing order, for pruning.
    finished_order: VecDeque<(u64, JobId)>,
    retention: Retention,
    /// (kind, unique_key) → the active job holding the key.
    unique: HashMap<(String, String), JobId>,
    /// job → jobs waiting for it to succeed.
    dependents: IdMap<Vec<JobId>>,
    /// Queue sequence numbers, for FIFO within a priority.
    seq: u64,
    /// Per-kind totals.
    kinds: KindMap,
    /// Set once shutdown started.
    closing: Option<Closing>,
    heartbeat: Option<(Duration, HeartbeatFn)>,
    /// The durable store, if any (none: everything lives in memory only).
    store: Option<StoreLink>,
    /// What the store held at start, restored when the actor starts.
    recovered: Option<Recovered>,
    /// A `Wake` to ourselves is queued: the report inboxes must be read
    /// once more after a flag the workers read was raised.
    recheck_queued: bool,
    /// Last token given to a waiter with an expiry.
    wait_tokens: u64,
    /// Live worker threads, for the pools a resize starts.
    threads: ThreadCount,
    /// The express lane's table of kinds and pool links (shared with every
    /// `Handle`).
    express: Arc<Express>,
}

struct Closing {
    replies: Vec<Reply<()>>,
    /// The drain is over; stop as soon as the store is flushed.
    stop_requested: bool,
}

impl Dispatcher {
    pub(crate) fn new(
        registry: Arc<Registry>,
        pools: Vec<PoolState>,
        retention: Retention,
        heartbeat: Option<(Duration, HeartbeatFn)>,
        threads: ThreadCount,
    ) -> Self {
        let pool_names = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.cfg.name.clone(), i))
            .collect();
        let kinds = registry
            .kinds
            .keys()
            .map(|k| (k.clone(), KindTotals::new()))
            .collect();
        let links: Vec<(&str, Arc<PoolLink>)> = pools
            .iter()
            .map(|p| (p.cfg.name.as_str(), p.link.clone()))
            .collect();
        let express = Arc::new(Express::new(&registry, &links));
        Dispatcher {
            registry,
            pools,
            pool_names,
            active: IdMap::default(),
            finished: IdMap::default(),
            finished_order: VecDeque::new(),
            retention,
            unique: HashMap::new(),
            dependents: IdMap::default(),
            seq: 0,
            kinds,
            closing: None,
            heartbeat,
            store: None,
            recovered: None,
            recheck_queued: false,
            wait_tokens: 0,
            threads,
            express,
        }
    }

    /// The express lane, for the `Handle`.
    pub(crate) fn express(&self) -> Arc<Express> {
        self.express.clone()
    }

    /// Persist through this store, resuming from what it held.
    pub(crate) fn set_store(&mut self, link: StoreLink, recovered: Recovered) {
        // Reports of finished jobs do not wake the Dispatcher for the store:
        // it reads them at its next turn, which under load comes with the
        // next commit, and idle within a second (the inbox tick). A job
        // whose end was not committed yet when the process died runs again
        // (at-least-once, as for any running job).
        self.store = Some(link);
        self.recovered = Some(recovered);
    }

    /// Give each pool its SyncArbiter address (done right after start, in
    /// the same System tick, before any job can arrive).
    pub(crate) fn set_pool_addrs(&mut self, addrs: Vec<Addr<Worker>>) {
        for (p, a) in self.pools.iter_mut().zip(addrs) {
            p.addr = Some(a);
        }
    }

    /// The totals of `kind` in `pool`.
    fn kind_totals(&mut self, kind: &str, pool: usize) -> &mut PairTotals {
        kind_totals(&mut self.kinds, kind).pool(pool)
    }

    fn record(&self, id: JobId) -> Option<&JobRecord> {
        self.active
            .get(&id)
            .map(|a| &a.rec)
            .or_else(|| self.finished.get(&id))
    }

    /// Handle every report the workers filed. Called first thing on every
    /// message and timer, so nothing is answered from stale state.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        self.drain_reports(ctx);
        // Submissions filed without a message of their own (see
        // `Express::file_submit`), after the reports so that the workers'
        // credits are counted. Clearing the flag first: a submission filed
        // after the loop below sends a new `Wake`.
        self.express.woken();
        while let Some(s) = self.express.next_submit() {
            self.submit(s, ctx);
        }
    }

    fn drain_reports(&mut self, ctx: &mut Context<Self>) {
        for i in 0..self.pools.len() {
            while let Some(report) = self.pools[i].link.next_report() {
                match report {
                    Report::Done(done) => self.on_report(done, ctx),
                    Report::Adopt(job) => self.adopt(*job, ctx),
                }
            }
            let mut k = 0;
            while k < self.pools[i].retired.len() {
                while let Some(report) = self.pools[i].retired[k].0.next_report() {
                    match report {
                        Report::Done(done) => self.on_retired_report(i, k, done, ctx),
                        Report::Adopt(job) => self.adopt(*job, ctx),
                    }
                }
                // No report comes after the last leaving one.
                if self.pools[i].retired[k].1 == 0 {
                    self.pools[i].retired.swap_remove(k);
                } else {
                    k += 1;
                }
            }
        }
    }
}

/// A kind's totals, created on first use. A lookup by `&str`: no `String`
/// is built per job (every kind is registered at start, so the insert
/// happens at most once per kind).
fn kind_totals<'a>(kinds: &'a mut KindMap, kind: &str) -> &'a mut KindTotals {
    if !kinds.contains_key(kind) {
        kinds.insert(kind.to_string(), KindTotals::new());
    }
    // Invariant: present, inserted just above if it was missing.
    kinds
        .get_mut(kind)
        .expect("kind totals exist once inserted")
}

impl Drop for Dispatcher {
    /// However the Dispatcher ends, its workers must leave their pools'
    /// job channels, or the runtime could not wait for their threads.
    fn drop(&mut self) {
        self.express.close();
        for p in &self.pools {
            p.link.revoke();
            p.link.retire();
            for (old, _) in &p.retired {
                old.retire();
            }
        }
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The Dispatcher's mailbox is unbounded for do_send; callers are
        // bounded by max_queued and by their own waiting.
        // Reading the inboxes here too bounds how long a report filed
        // without a wake-up (see `pool`) waits when nothing else happens.
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            act.drain(ctx);
            act.prune_expired(ctx)
        });
        if let Some(recovered) = self.recovered.take() {
            self.restore(recovered, ctx);
        }
        for i in 0..self.pools.len() {
            self.update_starving(i, ctx);
        }
        if let Some((every, _)) = &self.heartbeat {
            ctx.run_interval(*every, |act, ctx| {
                act.drain(ctx);
                let waiting = act.pools.iter().map(|p| p.queued + p.delayed).sum();
                let running = act.pools.iter().map(|p| p.running).sum();
                if let Some((_, f)) = &mut act.heartbeat {
                    f(Heartbeat { waiting, running });
                }
            });
        }
    }
}
