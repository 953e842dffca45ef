//! The Dispatcher actor: the single owner of all job state. It admits jobs
//! (limits, unique keys, dependencies), keeps per-pool priority queues and
//! delay timers, hands a job to a pool only when one of its workers is idle
//! (credit-based dispatch; while none is, it offers the best queued jobs in
//! the pool's handoff slot, see `pool`), enforces timeouts, schedules
//! retries, answers waiters, keeps stats and finished records, and runs the
//! shutdown drain. Workers' reports come through an inbox it reads first
//! thing on every message and timer (`drain`).
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
mod messages;
mod persist;
mod state;

pub(crate) use messages::{AttemptDone, Query, Submit, SubmitBatch, Wait, WaitAny, Wake};
pub(crate) use persist::Committed;
use persist::{ListLoaded, PRUNE_BATCH, RetryLoaded};
use state::{Active, Admission, IdMap, KindMap, QueueEntry, RecordWaiter, Stamp, Waiter};
pub(crate) use state::{PoolState, StoreLink};

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
        // Finished jobs should reach the store soon, not at the next
        // message: every report wakes the Dispatcher.
        for p in &self.pools {
            p.link.set_eager();
        }
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

    // ----- endings ---------------------------------------------------------

    /// End the running attempt of `id` with an error; retry or finish.
    fn attempt_failed(
        &mut self,
        id: JobId,
        message: String,
        final_state: JobState,
        code: &str,
        ctx: &mut Context<Self>,
    ) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        let pool = job.pool;
        self.pools[pool].running -= 1;
        if let Some(a) = job.rec.attempts.last_mut() {
            a.end = Some(now_ms());
            a.error = Some(message.clone());
        }
        job.rec.error = Some(Box::new(ErrorInfo::new(code, message.clone())));
        if let Some(t) = job.timer.take() {
            ctx.cancel_future(t);
        }
        let shared = job.attempt.take();
        if job.rec.attempt < job.rec.max_attempts {
            // Retry: back to delayed with backoff; the direct waiter (if the
            // worker did not answer it) comes back with the job.
            if let Some(s) = shared {
                job.direct.set(s.take_direct());
            }
            let delay = job
                .rec
                .backoff
                .delay(job.rec.attempt, id.0 ^ (u64::from(job.rec.attempt) << 48));
            job.rec.run_at = now_ms() + delay.as_millis() as u64;
            job.rec.state = JobState::Delayed;
            let run_at = job.rec.run_at;
            let kind = job.rec.kind.clone();
            self.pools[pool].delayed += 1;
            self.pools[pool].counters.retried += 1;
            self.kind_totals(&kind, pool).counters.retried += 1;
            let timer = self.ready_timer(id, run_at, ctx);
            if let Some(job) = self.active.get_mut(&id) {
                job.timer = Some(timer);
            }
            self.persist(id, ctx);
        } else {
            let state = if job.rec.max_attempts > 1 {
                JobState::Dead
            } else {
                final_state
            };
            if let Some(s) = shared
                && job.direct.is_none()
            {
                job.direct.set(s.take_direct());
            }
            self.finish(id, state, None, ctx);
        }
    }

    /// Make a job final: record, answer every waiter, release its unique key,
    /// settle its dependents, and keep the record for `status`.
    fn finish(
        &mut self,
        id: JobId,
        state: JobState,
        result: Option<Value>,
        ctx: &mut Context<Self>,
    ) {
        // Jobs cancelled because a dependency failed; allocated only then.
        let mut cascade = Vec::new();
        let mut next = Some((id, state, result));
        while let Some((id, state, result)) = next.take().or_else(|| cascade.pop()) {
            let Some(mut job) = self.active.remove(&id) else {
                continue;
            };
            if let Some(t) = job.timer.take() {
                ctx.cancel_future(t);
            }
            let now = now_ms();
            job.rec.state = state;
            job.rec.finished_at = Some(now);
            if result.is_some() {
                job.rec.result = result.map(Box::new);
                job.rec.error = None;
            }
            if let Some(a) = job.rec.attempts.last_mut() {
                a.end.get_or_insert(now);
            }
            let pool = &mut self.pools[job.pool];
            let c = &mut pool.counters;
            let k = &mut kind_totals(&mut self.kinds, &job.rec.kind)
                .pool(job.pool)
                .counters;
            match state {
                JobState::Succeeded => {
                    c.succeeded += 1;
                    k.succeeded += 1;
                }
                JobState::Failed => {
                    c.failed += 1;
                    k.failed += 1;
                }
                JobState::Dead => {
                    c.dead += 1;
                    k.dead += 1;
                }
                JobState::Cancelled => {
                    c.cancelled += 1;
                    k.cancelled += 1;
                }
                JobState::TimedOut => {}
                _ => {}
            }
            if let Some(key) = &job.rec.unique_key {
                let k = (job.rec.kind.to_string(), key.to_string());
                if self.unique.get(&k) == Some(&id) {
                    self.unique.remove(&k);
                }
            }
            if let Some(d) = job.direct.take() {
                d.send(outcome_of(&job.rec));
            }
            for w in job.waiters.take() {
                w.send(Ok(job.rec.clone()), ctx);
            }
            for dep in self.dependents.remove(&id).unwrap_or_default() {
                let Some(d) = self.active.get_mut(&dep) else {
                    continue;
                };
                if state == JobState::Succeeded {
                    d.deps_left = d.deps_left.saturating_sub(1);
                    if d.deps_left == 0 {
                        let run_at = d.rec.run_at;
                        let t = self.ready_timer(dep, run_at, ctx);
                        if let Some(d) = self.active.get_mut(&dep) {
                            d.timer = Some(t);
                        }
                    }
                } else {
                    self.pools[d.pool].delayed -= 1;
                    d.rec.error = Some(Box::new(ErrorInfo::new(
                        "dependency_failed",
                        format!("dependency {id} ended {state}"),
                    )));
                    cascade.push((dep, JobState::Cancelled, None));
                }
            }
            self.retain(job.rec);
            self.persist(id, ctx);
        }
    }

    fn retain(&mut self, rec: JobRecord) {
        let id = rec.id;
        self.finished_order
            .push_back((rec.finished_at.unwrap_or(0), id));
        self.finished.insert(id, rec);
        while self.finished.len() > self.retention.max_jobs {
            self.prune_one();
        }
    }

    fn prune_one(&mut self) {
        if let Some((at, id)) = self.finished_order.pop_front() {
            // A retried-and-finished-again job has a newer entry; skip stale.
            if self.finished.get(&id).and_then(|r| r.finished_at) == Some(at) {
                self.finished.remove(&id);
            }
        }
    }

    fn prune_expired(&mut self, ctx: &mut Context<Self>) {
        let cutoff = now_ms().saturating_sub(self.retention.ttl.as_millis() as u64);
        if self.store.as_ref().is_some_and(|s| s.failing.is_none()) {
            // Small batches: one prune per tick keeps each transaction short.
            self.persist_change(
                Change::Prune {
                    before_ms: cutoff,
                    limit: PRUNE_BATCH,
                },
                ctx,
            );
        }
        while self
            .finished_order
            .front()
            .is_some_and(|(at, _)| *at < cutoff)
        {
            self.prune_one();
        }
    }

    /// A worker's claimed outcome for the current attempt of a job.
    fn attempt_done(&mut self, msg: AttemptDone, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&msg.id) else {
            return;
        };
        kind_totals(&mut self.kinds, &job.rec.kind)
            .pool(job.pool)
            .run_time
            .record(msg.run_time);
        match msg.outcome {
            Ok(v) => {
                job.attempt = None;
                if let Some(a) = job.rec.attempts.last_mut() {
                    a.end = Some(now_ms());
                }
                self.pools[job.pool].running -= 1;
                self.finish(msg.id, JobState::Succeeded, Some(v), ctx);
            }
            Err(f) => self.attempt_failed(msg.id, f.message(), JobState::Failed, "job_failed", ctx),
        }
    }

    fn on_timeout(&mut self, id: JobId, attempt: u32, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        if job.rec.state != JobState::Running || job.rec.attempt != attempt {
            return;
        }
        job.timer = None;
        let won = job
            .attempt
            .as_ref()
            .is_some_and(|s| s.claim_interrupt(Interrupt::TimedOut));
        if !won {
            // The worker finished first; its report is on its way.
            return;
        }
        let ms = job.rec.timeout_ms.unwrap_or(0);
        let pool = job.pool;
        kind_totals(&mut self.kinds, &job.rec.kind)
            .pool(pool)
            .counters
            .timed_out += 1;
        self.pools[pool].counters.timed_out += 1;
        self.attempt_failed(
            id,
            format!("timed out after {ms} ms"),
            JobState::TimedOut,
            "timed_out",
            ctx,
        );
    }

    fn cancel(
        &mut self,
        id: JobId,
        reason: &str,
        ctx: &mut Context<Self>,
    ) -> Result<JobRecord, JobError> {
        // A job offered in its pool's handoff slot is taken back first; if
        // a worker took it already, it is cancelled as a running job. The
        // other offers went back to the queue: offer them again.
        let mut revoked = None;
        if let Some(pool) = self.active.get(&id).map(|j| j.pool)
            && self.pools[pool].offered.iter().any(|o| o.0 == id)
        {
            self.revoke_offers(pool, ctx);
            revoked = Some(pool);
        }
        let result = self.cancel_job(id, reason, ctx);
        if let Some(pool) = revoked {
            self.pump(pool, ctx);
        }
        result
    }

    fn cancel_job(
        &mut self,
        id: JobId,
        reason: &str,
        ctx: &mut Context<Self>,
    ) -> Result<JobRecord, JobError> {
        let Some(job) = self.active.get_mut(&id) else {
            return self
                .finished
                .get(&id)
                .cloned()
                .ok_or_else(|| JobError::NotFound(id.to_string()));
        };
        let pool = job.pool;
        match job.rec.state {
            JobState::Queued => self.pools[pool].queued -= 1,
            JobState::Delayed => self.pools[pool].delayed -= 1,
            JobState::Running => {
                let won = job
                    .attempt
                    .as_ref()
                    .is_some_and(|s| s.claim_interrupt(Interrupt::Cancelled));
                if !won {
                    return Ok(job.rec.clone());
                }
                self.pools[pool].running -= 1;
                if let Some(a) = job.rec.attempts.last_mut() {
                    a.end = Some(now_ms());
                    a.error = Some(reason.to_string());
                }
                if let Some(s) = job.attempt.take() {
                    job.direct.set(s.take_direct());
                }
            }
            _ => return Ok(job.rec.clone()),
        }
        let was_queued = job.rec.state == JobState::Queued;
        job.rec.error = Some(Box::new(ErrorInfo::new("cancelled", reason)));
        self.finish(id, JobState::Cancelled, None, ctx);
        if was_queued {
            self.drop_stale_entries(pool);
        }
        self.record(id)
            .cloned()
            .ok_or_else(|| JobError::Internal("cancelled job vanished".into()))
    }

    /// A cancelled queued job leaves a stale entry in its pool's heap until
    /// it is popped, which never happens while the pool is stuck. Callers
    /// whose `call` times out cancel their job, so without this the heap
    /// would grow without bound behind a stuck pool. Rebuild it once stale
    /// entries outnumber live ones: amortised O(1) per cancel.
    fn drop_stale_entries(&mut self, pool: usize) {
        let p = &mut self.pools[pool];
        if p.queue.len() <= 2 * p.queued + 64 {
            return;
        }
        let active = &self.active;
        p.queue.retain(|e| {
            active
                .get(&e.id)
                .is_some_and(|j| j.rec.state == JobState::Queued && j.seq == e.seq)
        });
    }

    fn retry(&mut self, id: JobId, ctx: &mut Context<Self>) -> Result<JobRecord, JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        if let Some(a) = self.active.get(&id) {
            return Err(JobError::BadRequest(format!(
                "job {id} is {}; only failed and dead jobs can be retried",
                a.rec.state
            )));
        }
        let Some(rec) = self.finished.get(&id) else {
            return Err(JobError::NotFound(id.to_string()));
        };
        if !matches!(rec.state, JobState::Failed | JobState::Dead) {
            return Err(JobError::BadRequest(format!(
                "job {id} is {}; only failed and dead jobs can be retried",
                rec.state
            )));
        }
        let Some(&pool) = self.pool_names.get(&*rec.pool) else {
            return Err(JobError::UnknownPool(rec.pool.to_string()));
        };
        let p = &self.pools[pool];
        if p.queued + p.delayed >= p.cfg.max_queued {
            return Err(JobError::QueueFull {
                pool: p.cfg.name.clone(),
                max_queued: p.cfg.max_queued,
            });
        }
        let Some(mut rec) = self.finished.remove(&id) else {
            return Err(JobError::NotFound(id.to_string()));
        };
        rec.state = JobState::Queued;
        rec.attempt = 0;
        rec.error = None;
        rec.result = None;
        rec.finished_at = None;
        rec.run_at = now_ms();
        if let Some(key) = &rec.unique_key {
            self.unique
                .entry((rec.kind.to_string(), key.to_string()))
                .or_insert(id);
        }
        self.active.insert(id, Active::new(rec, pool));
        self.enqueue(id);
        self.pump(pool, ctx);
        self.persist(id, ctx);
        self.record(id)
            .cloned()
            .ok_or_else(|| JobError::Internal("retried job vanished".into()))
    }

    fn list(&self, q: &ListQuery) -> ListPage {
        list_records(
            self.active
                .values()
                .map(|a| &a.rec)
                .chain(self.finished.values()),
            q,
        )
    }

    fn snapshot(&self) -> StatsSnapshot {
        let pools = self
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (kinds, queue_wait_ms, run_time_ms) = pool_breakdown(i, self.kinds.iter());
                (
                    p.cfg.name.clone(),
                    PoolStats {
                        threads: p.cfg.threads,
                        busy: p.cfg.threads.saturating_sub(p.link.idle()),
                        idle: p.link.idle(),
                        retiring: p.retiring(),
                        queued: p.queued,
                        delayed: p.delayed,
                        running: p.running,
                        max_queued: p.cfg.max_queued,
                        paused: p.paused,
                        counters: p.counters,
                        queue_wait_ms,
                        run_time_ms,
                        kinds,
                    },
                )
            })
            .collect();
        let kinds = self
            .kinds
            .iter()
            .map(|(k, t)| (k.clone(), t.stats()))
            .collect();
        StatsSnapshot {
            pools,
            kinds,
            active_jobs: self.active.len(),
            retained_jobs: self.finished.len(),
            store: self.store.as_ref().map(|s| StoreStats {
                bytes: s.size.load(std::sync::atomic::Ordering::Relaxed),
                pending_changes: s.pending.len(),
                committed_changes: s.committed,
                failing: s.failing.clone(),
            }),
        }
    }

    // ----- live pool changes ------------------------------------------------

    /// Change a pool's admission limit at once and, when `threads` differs,
    /// its size: a new SyncArbiter of `threads` workers with a new link
    /// becomes the pool. The old link's offered jobs are taken back (those
    /// a worker took first are running), so the old workers find nothing
    /// more to take: each finishes the job it has (counted as `retiring`,
    /// its report read from the retired link) and its thread exits once
    /// the old address is dropped and its queue is empty. Queued jobs stay
    /// queued and go to the new workers.
    fn resize(
        &mut self,
        name: &str,
        threads: usize,
        max_queued: usize,
        ctx: &mut Context<Self>,
    ) -> Result<(), JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        check_pool_shape(name, threads, max_queued)?;
        let i = *self
            .pool_names
            .get(name)
            .ok_or_else(|| JobError::UnknownPool(name.to_string()))?;
        if threads != self.pools[i].cfg.threads {
            let cfg = PoolConfig {
                threads,
                ..self.pools[i].cfg.clone()
            };
            let link = Arc::new(PoolLink::new(threads));
            if self.store.is_some() {
                link.set_eager();
            }
            let addr = start_pool(&cfg, i, ctx.address(), self.threads.clone(), link.clone())
                .map_err(JobError::Internal)?;
            self.revoke_offers(i, ctx);
            self.express.set_link(i, link.clone());
            let p = &mut self.pools[i];
            let old = std::mem::replace(&mut p.link, link);
            let old_threads = p.cfg.threads;
            p.starving = false;
            p.express = false;
            p.cfg.threads = threads;
            // Dropping the old address retires the old SyncArbiter.
            p.addr = Some(addr);
            // Reports of the old workers must not wait for an unrelated
            // message.
            old.set_eager();
            // Workers busy now each file one report saying they leave
            // (see `PoolLink::retire`); the link is read until then.
            let busy = old_threads.saturating_sub(old.retire());
            self.pools[i].retired.push((old, busy));
            self.recheck(ctx);
        }
        self.pools[i].cfg.max_queued = max_queued;
        self.pump(i, ctx);
        Ok(())
    }

    /// Start a new pool while running. Jobs reach it through
    /// `JobOptions::pool` (kinds keep the pool they were registered with).
    fn add_pool(&mut self, cfg: PoolConfig, ctx: &mut Context<Self>) -> Result<(), JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        check_pool_shape(&cfg.name, cfg.threads, cfg.max_queued)?;
        if self.pool_names.contains_key(&cfg.name) {
            return Err(JobError::BadRequest(format!(
                "pool '{}' already exists",
                cfg.name
            )));
        }
        let i = self.pools.len();
        let mut state = PoolState::new(cfg);
        if self.store.is_some() {
            state.link.set_eager();
        }
        let addr = start_pool(
            &state.cfg,
            i,
            ctx.address(),
            self.threads.clone(),
            state.link.clone(),
        )
        .map_err(JobError::Internal)?;
        state.addr = Some(addr);
        self.express.set_link(i, state.link.clone());
        self.pool_names.insert(state.cfg.name.clone(), i);
        self.pools.push(state);
        self.update_starving(i, ctx);
        Ok(())
    }

    // ----- shutdown --------------------------------------------------------

    fn all_idle(&self) -> bool {
        self.pools
            .iter()
            .all(|p| p.link.idle() == p.cfg.threads && p.retiring() == 0)
    }

    /// The drain is over (all workers idle, or the deadline passed): answer
    /// everyone still waiting and stop the System.
    fn close_now(&mut self, ctx: &mut Context<Self>) {
        let Some(closing) = self.closing.as_mut() else {
            return;
        };
        let replies = std::mem::take(&mut closing.replies);
        for job in self.active.values_mut() {
            if let Some(s) = job.attempt.take() {
                // Handlers still running past the deadline see is_cancelled().
                if s.claim_interrupt(Interrupt::Abandoned) {
                    job.direct.set(s.take_direct());
                }
            }
            if let Some(d) = job.direct.take() {
                d.send(Err(JobError::ShuttingDown));
            }
            for w in job.waiters.take() {
                w.send(Err(JobError::ShuttingDown), ctx);
            }
        }
        if let Some(c) = &mut self.closing {
            c.replies.extend(replies);
            c.stop_requested = true;
        }
        self.stop_when_flushed(ctx);
    }

    /// Stop once the store has nothing left to write (or cannot write).
    fn stop_when_flushed(&mut self, ctx: &mut Context<Self>) {
        if !self.closing.as_ref().is_some_and(|c| c.stop_requested) {
            return;
        }
        let busy = self.store.as_ref().is_some_and(|s| {
            s.in_flight.is_some() || (!s.pending.is_empty() && s.failing.is_none())
        });
        if busy {
            self.schedule_flush(ctx);
            return;
        }
        if let Some(c) = &mut self.closing {
            for r in std::mem::take(&mut c.replies) {
                r.send(());
            }
        }
        ctx.stop();
        actix::System::current().stop();
    }
}

/// A pool needs a name, a thread and room for one queued job.
fn check_pool_shape(name: &str, threads: usize, max_queued: usize) -> Result<(), JobError> {
    if name.is_empty() {
        return Err(JobError::BadRequest("a pool needs a name".into()));
    }
    if threads == 0 {
        return Err(JobError::BadRequest(format!(
            "pool '{name}' needs at least one thread"
        )));
    }
    if max_queued == 0 {
        return Err(JobError::BadRequest(format!(
            "pool '{name}': max_queued must be at least 1"
        )));
    }
    Ok(())
}

/// One page of `records` matching `q` (filter, order, cursor, limit).
pub(crate) fn list_records<'a>(
    records: impl Iterator<Item = &'a JobRecord>,
    q: &ListQuery,
) -> ListPage {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let mut page: Vec<&JobRecord> = records
        .filter(|r| q.state.is_none_or(|s| r.state == s))
        .filter(|r| q.pool.as_ref().is_none_or(|p| *r.pool == **p))
        .filter(|r| q.kind.as_ref().is_none_or(|k| *r.kind == **k))
        .filter(|r| match q.cursor {
            None => true,
            Some(c) if q.oldest_first => r.id > c,
            Some(c) => r.id < c,
        })
        .collect();
    if q.oldest_first {
        page.sort_unstable_by_key(|r| r.id);
    } else {
        page.sort_unstable_by_key(|r| std::cmp::Reverse(r.id));
    }
    let more = page.len() > limit;
    page.truncate(limit);
    ListPage {
        cursor: if more {
            page.last().map(|r| r.id)
        } else {
            None
        },
        jobs: page.into_iter().cloned().collect(),
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

/// What a `call` waiter gets for a final record.
pub(crate) fn outcome_of(rec: &JobRecord) -> Outcome {
    let message = || {
        rec.error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default()
    };
    match rec.state {
        JobState::Succeeded => Ok(rec.result.as_deref().cloned().unwrap_or(Value::Null)),
        JobState::TimedOut => Err(JobError::TimedOut { id: rec.id }),
        JobState::Cancelled => Err(JobError::Cancelled {
            id: rec.id,
            reason: message(),
            code: if rec
                .error
                .as_ref()
                .is_some_and(|e| e.code == "dependency_failed")
            {
                "dependency_failed"
            } else {
                "cancelled"
            },
        }),
        JobState::Failed | JobState::Dead => {
            let message = message();
            // The worker's direct answer says Panicked; a waiter reading the
            // record must get the same.
            match message.strip_prefix(PANIC_PREFIX) {
                Some(m) if rec.error.as_ref().is_some_and(|e| e.code == "job_failed") => {
                    Err(JobError::Panicked {
                        id: rec.id,
                        message: m.to_string(),
                    })
                }
                _ => Err(JobError::Failed {
                    id: rec.id,
                    message,
                    state: rec.state,
                }),
            }
        }
        JobState::Queued | JobState::Delayed | JobState::Running => {
            Err(JobError::Internal(format!("job {} is not final", rec.id)))
        }
    }
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
