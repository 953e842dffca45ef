//! The Dispatcher actor: the single owner of all job state. It admits jobs
//! (limits, unique keys, dependencies), keeps per-pool priority queues and
//! delay timers, hands a job to a pool only when one of its workers is idle
//! (credit-based dispatch), enforces timeouts, schedules retries, answers
//! waiters, keeps stats and finished records, and runs the shutdown drain.
//!
//! Nothing here blocks: the actor lives on the System arbiter.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message, SpawnHandle};
use serde_json::Value;

use crate::context::{AttemptShared, Interrupt};
use crate::error::JobError;
use crate::job::{Attempt, ErrorInfo, JobId, JobRecord, JobSpec, JobState, now_ms};
use crate::pool::{Failure, PANIC_PREFIX, PoolConfig, RunJob, Worker};
use crate::registry::Registry;
use crate::reply::{DirectReply, Outcome, Reply};
use crate::stats::{KindStats, KindTotals, PoolStats, StatsSnapshot};

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

/// A pool as the Dispatcher tracks it.
pub(crate) struct PoolState {
    /// Declared shape.
    pub(crate) cfg: PoolConfig,
    /// The SyncArbiter's address; set once the pool is started.
    pub(crate) addr: Option<Addr<Worker>>,
    /// Workers free for a job: the pool's credit.
    idle: usize,
    /// Ready jobs, highest priority first, FIFO within a priority. May hold
    /// stale entries (cancelled jobs); `seq` tells them apart.
    queue: BinaryHeap<QueueEntry>,
    /// Jobs in the queue that are really queued (not stale).
    queued: usize,
    /// Jobs waiting for time or dependencies.
    delayed: usize,
    /// Jobs in state running.
    running: usize,
    /// Paused pools start nothing.
    paused: bool,
    /// Event counters.
    counters: crate::stats::Counters,
}

impl PoolState {
    pub(crate) fn new(cfg: PoolConfig) -> Self {
        PoolState {
            idle: cfg.threads,
            cfg,
            addr: None,
            queue: BinaryHeap::new(),
            queued: 0,
            delayed: 0,
            running: 0,
            paused: false,
            counters: Default::default(),
        }
    }
}

#[derive(PartialEq, Eq)]
struct QueueEntry {
    priority: i32,
    seq: u64,
    id: JobId,
}

impl Ord for QueueEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher priority first, then lower (older) sequence.
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for QueueEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

type RecordWaiter = Reply<Result<JobRecord, JobError>>;

/// A job that is not final yet.
struct Active {
    rec: JobRecord,
    /// Index into `pools`.
    pool: usize,
    /// Stamp of its current queue entry.
    seq: u64,
    /// When it became ready (for the queue-wait histogram).
    ready_at: Instant,
    /// Its delay, retry or timeout timer.
    timer: Option<SpawnHandle>,
    /// The running attempt, shared with the worker.
    attempt: Option<Arc<AttemptShared>>,
    /// A `call` waiter while the job is not running (moves into the
    /// attempt while it runs).
    direct: Option<DirectReply>,
    /// `wait` callers.
    waiters: Vec<RecordWaiter>,
    /// Dependencies not yet succeeded.
    deps_left: usize,
}

/// The Dispatcher actor.
pub struct Dispatcher {
    /// Kinds and their handlers.
    registry: Arc<Registry>,
    /// Pools by index; `pool_names` maps names to indexes.
    pools: Vec<PoolState>,
    pool_names: HashMap<String, usize>,
    /// Jobs that are not final.
    active: HashMap<JobId, Active>,
    /// Finished jobs kept for `status`, `wait` and `list`.
    finished: HashMap<JobId, JobRecord>,
    /// Finished ids in finishing order, for pruning.
    finished_order: VecDeque<(u64, JobId)>,
    retention: Retention,
    /// (kind, unique_key) → the active job holding the key.
    unique: HashMap<(String, String), JobId>,
    /// job → jobs waiting for it to succeed.
    dependents: HashMap<JobId, Vec<JobId>>,
    /// Queue sequence numbers, for FIFO within a priority.
    seq: u64,
    /// Per-kind totals.
    kinds: HashMap<String, KindTotals>,
    /// Set once shutdown started.
    closing: Option<Closing>,
    heartbeat: Option<(Duration, HeartbeatFn)>,
}

struct Closing {
    replies: Vec<Reply<()>>,
}

impl Dispatcher {
    pub(crate) fn new(
        registry: Arc<Registry>,
        pools: Vec<PoolState>,
        retention: Retention,
        heartbeat: Option<(Duration, HeartbeatFn)>,
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
        Dispatcher {
            registry,
            pools,
            pool_names,
            active: HashMap::new(),
            finished: HashMap::new(),
            finished_order: VecDeque::new(),
            retention,
            unique: HashMap::new(),
            dependents: HashMap::new(),
            seq: 0,
            kinds,
            closing: None,
            heartbeat,
        }
    }

    /// Give each pool its SyncArbiter address (done right after start, in
    /// the same System tick, before any job can arrive).
    pub(crate) fn set_pool_addrs(&mut self, addrs: Vec<Addr<Worker>>) {
        for (p, a) in self.pools.iter_mut().zip(addrs) {
            p.addr = Some(a);
        }
    }

    fn kind_totals(&mut self, kind: &str) -> &mut KindTotals {
        self.kinds
            .entry(kind.to_string())
            .or_insert_with(KindTotals::new)
    }

    fn record(&self, id: JobId) -> Option<&JobRecord> {
        self.active
            .get(&id)
            .map(|a| &a.rec)
            .or_else(|| self.finished.get(&id))
    }

    // ----- admission -------------------------------------------------------

    /// Check a submission and build its record; nothing is changed yet.
    fn check(&self, id: JobId, spec: JobSpec) -> Result<(Active, bool), JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        let kind = self
            .registry
            .kinds
            .get(&spec.kind)
            .ok_or_else(|| JobError::UnknownKind(spec.kind.clone()))?;
        let opts = spec.options;
        let pool_name = opts.pool.as_deref().unwrap_or(&kind.pool);
        let pool = *self
            .pool_names
            .get(pool_name)
            .ok_or_else(|| JobError::UnknownPool(pool_name.to_string()))?;
        let max_attempts = opts.max_attempts.unwrap_or(kind.options.max_attempts);
        if max_attempts == 0 {
            return Err(JobError::BadRequest(
                "max_attempts must be at least 1".into(),
            ));
        }
        let mut deps_left = 0;
        for dep in &opts.after {
            match self.record(*dep) {
                None => return Err(JobError::NotFound(dep.to_string())),
                Some(r) if r.state == JobState::Succeeded => {}
                Some(r) if r.state.is_final() => {
                    return Err(JobError::Cancelled {
                        id,
                        reason: format!("dependency {dep} ended {}", r.state),
                        code: "dependency_failed",
                    });
                }
                Some(_) => deps_left += 1,
            }
        }
        let delay = opts.delay.unwrap_or_default();
        let waits = deps_left > 0 || !delay.is_zero();
        let p = &self.pools[pool];
        let starts_now = !waits && !p.paused && p.idle > 0 && p.queued == 0;
        if !starts_now && p.queued + p.delayed >= p.cfg.max_queued {
            return Err(JobError::QueueFull {
                pool: p.cfg.name.clone(),
                max_queued: p.cfg.max_queued,
            });
        }
        let now = now_ms();
        let rec = JobRecord {
            id,
            kind: spec.kind,
            pool: p.cfg.name.clone(),
            state: if waits {
                JobState::Delayed
            } else {
                JobState::Queued
            },
            priority: opts.priority,
            attempt: 0,
            max_attempts,
            payload: Arc::new(spec.payload),
            result: None,
            error: None,
            attempts: Vec::new(),
            timeout_ms: opts
                .timeout
                .or(kind.options.timeout)
                .map(|d| d.as_millis() as u64),
            backoff: opts.backoff.unwrap_or(kind.options.backoff),
            unique_key: opts.unique_key,
            after: opts.after,
            created_at: now,
            run_at: now + delay.as_millis() as u64,
            started_at: None,
            finished_at: None,
            submitted_by: opts.submitted_by,
        };
        let active = Active {
            rec,
            pool,
            seq: 0,
            ready_at: Instant::now(),
            timer: None,
            attempt: None,
            direct: None,
            waiters: Vec::new(),
            deps_left,
        };
        Ok((active, !delay.is_zero()))
    }

    /// The active job holding this submission's unique key, if any.
    fn duplicate_of(&self, spec: &JobSpec) -> Option<JobId> {
        let key = spec.options.unique_key.as_ref()?;
        self.unique.get(&(spec.kind.clone(), key.clone())).copied()
    }

    /// Insert a checked job and start its life.
    fn admit(&mut self, mut job: Active, delayed: bool, ctx: &mut Context<Self>) -> SubmitAck {
        let id = job.rec.id;
        let pool = job.pool;
        if let Some(key) = &job.rec.unique_key {
            self.unique.insert((job.rec.kind.clone(), key.clone()), id);
        }
        for dep in &job.rec.after {
            if self.active.contains_key(dep) {
                self.dependents.entry(*dep).or_default().push(id);
            }
        }
        self.pools[pool].counters.submitted += 1;
        self.kind_totals(&job.rec.kind).counters.submitted += 1;
        if job.deps_left > 0 || delayed {
            self.pools[pool].delayed += 1;
            if job.deps_left == 0 {
                job.timer = Some(self.ready_timer(id, job.rec.run_at, ctx));
            }
            self.active.insert(id, job);
        } else {
            self.active.insert(id, job);
            self.enqueue(id);
            self.pump(pool, ctx);
        }
        let state = self
            .active
            .get(&id)
            .map_or(JobState::Queued, |a| a.rec.state);
        SubmitAck {
            id,
            state,
            deduplicated: false,
        }
    }

    fn ready_timer(&mut self, id: JobId, run_at: u64, ctx: &mut Context<Self>) -> SpawnHandle {
        let wait = Duration::from_millis(run_at.saturating_sub(now_ms()));
        ctx.run_later(wait, move |act, ctx| act.make_ready(id, ctx))
    }

    /// A delayed job's time came, or its last dependency succeeded.
    fn make_ready(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        if job.rec.state != JobState::Delayed {
            return;
        }
        job.timer = None;
        job.rec.state = JobState::Queued;
        let pool = job.pool;
        self.pools[pool].delayed -= 1;
        self.enqueue(id);
        self.pump(pool, ctx);
    }

    /// Put a job (already in state queued) into its pool's queue.
    fn enqueue(&mut self, id: JobId) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        self.seq += 1;
        job.seq = self.seq;
        job.ready_at = Instant::now();
        let p = &mut self.pools[job.pool];
        p.queued += 1;
        p.queue.push(QueueEntry {
            priority: job.rec.priority,
            seq: self.seq,
            id,
        });
    }

    /// Hand queued jobs to the pool while it has idle workers. Nothing new
    /// starts once a shutdown began: those jobs' waiters were already told.
    fn pump(&mut self, pool: usize, ctx: &mut Context<Self>) {
        if self.closing.is_some() {
            return;
        }
        loop {
            let p = &mut self.pools[pool];
            if p.idle == 0 || p.paused {
                return;
            }
            let Some(entry) = p.queue.pop() else {
                return;
            };
            let Some(job) = self.active.get_mut(&entry.id) else {
                continue;
            };
            if job.rec.state != JobState::Queued || job.seq != entry.seq {
                continue;
            }
            p.queued -= 1;
            p.idle -= 1;
            p.running += 1;
            p.counters.started += 1;
            let Some(addr) = p.addr.clone() else {
                // Invariant: pools get their address before any job.
                return;
            };
            let id = entry.id;
            job.rec.state = JobState::Running;
            job.rec.attempt += 1;
            let now = now_ms();
            job.rec.started_at = Some(now);
            job.rec.attempts.push(Attempt {
                start: now,
                end: None,
                error: None,
            });
            let attempt = job.rec.attempt;
            let timeout = job.rec.timeout_ms.map(Duration::from_millis);
            let shared = Arc::new(AttemptShared::new(
                id,
                attempt,
                attempt >= job.rec.max_attempts,
                timeout.map(|t| Instant::now() + t),
                job.direct.take(),
            ));
            job.attempt = Some(shared.clone());
            if let Some(t) = timeout {
                job.timer =
                    Some(ctx.run_later(t, move |act, ctx| act.on_timeout(id, attempt, ctx)));
            }
            let queue_wait = job.ready_at.elapsed();
            let Some(kind) = self.registry.kinds.get(&job.rec.kind) else {
                // Invariant: admission checked the kind exists.
                return;
            };
            let handler = kind.handler.clone();
            let payload = job.rec.payload.clone();
            let totals = self
                .kinds
                .entry(job.rec.kind.clone())
                .or_insert_with(KindTotals::new);
            totals.counters.started += 1;
            totals.queue_wait.record(queue_wait);
            addr.do_send(RunJob {
                shared,
                handler,
                payload,
            });
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
        job.rec.error = Some(ErrorInfo::new(code, message.clone()));
        if let Some(t) = job.timer.take() {
            ctx.cancel_future(t);
        }
        let shared = job.attempt.take();
        if job.rec.attempt < job.rec.max_attempts {
            // Retry: back to delayed with backoff; the direct waiter (if the
            // worker did not answer it) comes back with the job.
            if let Some(s) = shared {
                job.direct = s.take_direct();
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
            self.kind_totals(&kind).counters.retried += 1;
            let timer = self.ready_timer(id, run_at, ctx);
            if let Some(job) = self.active.get_mut(&id) {
                job.timer = Some(timer);
            }
        } else {
            let state = if job.rec.max_attempts > 1 {
                JobState::Dead
            } else {
                final_state
            };
            if let Some(s) = shared
                && job.direct.is_none()
            {
                job.direct = s.take_direct();
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
        let mut cascade = vec![(id, state, result)];
        while let Some((id, state, result)) = cascade.pop() {
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
                job.rec.result = result;
                job.rec.error = None;
            }
            if let Some(a) = job.rec.attempts.last_mut() {
                a.end.get_or_insert(now);
            }
            let pool = &mut self.pools[job.pool];
            let c = &mut pool.counters;
            let totals = self
                .kinds
                .entry(job.rec.kind.clone())
                .or_insert_with(KindTotals::new);
            let k = &mut totals.counters;
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
                let k = (job.rec.kind.clone(), key.clone());
                if self.unique.get(&k) == Some(&id) {
                    self.unique.remove(&k);
                }
            }
            if let Some(d) = job.direct.take() {
                d.send(outcome_of(&job.rec));
            }
            for w in job.waiters.drain(..) {
                w.send(Ok(job.rec.clone()));
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
                    d.rec.error = Some(ErrorInfo::new(
                        "dependency_failed",
                        format!("dependency {id} ended {state}"),
                    ));
                    cascade.push((dep, JobState::Cancelled, None));
                }
            }
            self.retain(job.rec);
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

    fn prune_expired(&mut self) {
        let cutoff = now_ms().saturating_sub(self.retention.ttl.as_millis() as u64);
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
        let kind = job.rec.kind.clone();
        match msg.outcome {
            Ok(v) => {
                job.attempt = None;
                if let Some(a) = job.rec.attempts.last_mut() {
                    a.end = Some(now_ms());
                }
                self.pools[job.pool].running -= 1;
                self.kind_totals(&kind).run_time.record(msg.run_time);
                self.finish(msg.id, JobState::Succeeded, Some(v), ctx);
            }
            Err(f) => {
                self.kind_totals(&kind).run_time.record(msg.run_time);
                self.attempt_failed(msg.id, f.message(), JobState::Failed, "job_failed", ctx)
            }
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
        let (pool, kind) = (job.pool, job.rec.kind.clone());
        self.pools[pool].counters.timed_out += 1;
        self.kind_totals(&kind).counters.timed_out += 1;
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
                    job.direct = s.take_direct();
                }
            }
            _ => return Ok(job.rec.clone()),
        }
        let was_queued = job.rec.state == JobState::Queued;
        job.rec.error = Some(ErrorInfo::new("cancelled", reason));
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
        let Some(&pool) = self.pool_names.get(&rec.pool) else {
            return Err(JobError::UnknownPool(rec.pool.clone()));
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
                .entry((rec.kind.clone(), key.clone()))
                .or_insert(id);
        }
        self.active.insert(
            id,
            Active {
                rec,
                pool,
                seq: 0,
                ready_at: Instant::now(),
                timer: None,
                attempt: None,
                direct: None,
                waiters: Vec::new(),
                deps_left: 0,
            },
        );
        self.enqueue(id);
        self.pump(pool, ctx);
        self.record(id)
            .cloned()
            .ok_or_else(|| JobError::Internal("retried job vanished".into()))
    }

    fn list(&self, q: &ListQuery) -> ListPage {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let mut ids: Vec<JobId> = self
            .active
            .values()
            .map(|a| &a.rec)
            .chain(self.finished.values())
            .filter(|r| q.state.is_none_or(|s| r.state == s))
            .filter(|r| q.pool.as_ref().is_none_or(|p| &r.pool == p))
            .filter(|r| q.kind.as_ref().is_none_or(|k| &r.kind == k))
            .map(|r| r.id)
            .filter(|id| match q.cursor {
                None => true,
                Some(c) if q.oldest_first => *id > c,
                Some(c) => *id < c,
            })
            .collect();
        if q.oldest_first {
            ids.sort_unstable();
        } else {
            ids.sort_unstable_by(|a, b| b.cmp(a));
        }
        let more = ids.len() > limit;
        ids.truncate(limit);
        let jobs: Vec<JobRecord> = ids
            .iter()
            .filter_map(|id| self.record(*id).cloned())
            .collect();
        ListPage {
            cursor: if more { ids.last().copied() } else { None },
            jobs,
        }
    }

    fn snapshot(&self) -> StatsSnapshot {
        let pools = self
            .pools
            .iter()
            .map(|p| {
                (
                    p.cfg.name.clone(),
                    PoolStats {
                        threads: p.cfg.threads,
                        busy: p.cfg.threads - p.idle,
                        idle: p.idle,
                        queued: p.queued,
                        delayed: p.delayed,
                        running: p.running,
                        max_queued: p.cfg.max_queued,
                        paused: p.paused,
                        counters: p.counters,
                    },
                )
            })
            .collect();
        let kinds = self
            .kinds
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    KindStats {
                        counters: t.counters,
                        queue_wait_ms: t.queue_wait.percentiles(),
                        run_time_ms: t.run_time.percentiles(),
                    },
                )
            })
            .collect();
        StatsSnapshot {
            pools,
            kinds,
            active_jobs: self.active.len(),
            retained_jobs: self.finished.len(),
        }
    }

    // ----- shutdown --------------------------------------------------------

    fn all_idle(&self) -> bool {
        self.pools.iter().all(|p| p.idle == p.cfg.threads)
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
                    job.direct = s.take_direct();
                }
            }
            if let Some(d) = job.direct.take() {
                d.send(Err(JobError::ShuttingDown));
            }
            for w in job.waiters.drain(..) {
                w.send(Err(JobError::ShuttingDown));
            }
        }
        for r in replies {
            r.send(());
        }
        ctx.stop();
        actix::System::current().stop();
    }
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
        JobState::Succeeded => Ok(rec.result.clone().unwrap_or(Value::Null)),
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

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The Dispatcher's mailbox is unbounded for do_send; callers are
        // bounded by max_queued and by their own waiting.
        ctx.run_interval(Duration::from_secs(1), |act, _| act.prune_expired());
        if let Some((every, _)) = &self.heartbeat {
            ctx.run_interval(*every, |act, _| {
                let waiting = act.pools.iter().map(|p| p.queued + p.delayed).sum();
                let running = act.pools.iter().map(|p| p.running).sum();
                if let Some((_, f)) = &mut act.heartbeat {
                    f(Heartbeat { waiting, running });
                }
            });
        }
    }
}

// ----- messages ------------------------------------------------------------

/// A worker finished an attempt (sent by the pool).
pub(crate) struct AttemptDone {
    pub(crate) id: JobId,
    pub(crate) attempt: u32,
    pub(crate) pool: usize,
    pub(crate) outcome: Result<Value, Failure>,
    /// False when the Dispatcher had already ended the attempt (timeout,
    /// cancel): then only the worker's credit comes back.
    pub(crate) claimed: bool,
    pub(crate) run_time: Duration,
}

impl Message for AttemptDone {
    type Result = ();
}

impl Handler<AttemptDone> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: AttemptDone, ctx: &mut Context<Self>) {
        let pool = msg.pool;
        self.pools[pool].idle += 1;
        let current = self
            .active
            .get(&msg.id)
            .is_some_and(|j| j.rec.state == JobState::Running && j.rec.attempt == msg.attempt);
        if msg.claimed && current {
            self.attempt_done(msg, ctx);
        }
        if self.closing.is_some() {
            if self.all_idle() {
                self.close_now(ctx);
            }
            return;
        }
        self.pump(pool, ctx);
    }
}

/// Submit one job. `direct` is answered with the outcome (the `call` path);
/// `ack` with the admission.
pub(crate) struct Submit {
    pub(crate) id: JobId,
    pub(crate) spec: JobSpec,
    pub(crate) ack: Option<Reply<Result<SubmitAck, JobError>>>,
    pub(crate) direct: Option<DirectReply>,
}

impl Message for Submit {
    type Result = ();
}

impl Handler<Submit> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        let Submit {
            id,
            spec,
            ack,
            direct,
        } = msg;
        if let Some(existing) = self.duplicate_of(&spec) {
            if let Some(d) = direct {
                self.add_waiter(
                    existing,
                    Reply::with(move |r: Result<JobRecord, JobError>| {
                        d.send(r.and_then(|rec| outcome_of(&rec)))
                    }),
                );
            }
            if let Some(a) = ack {
                let state = self.record(existing).map_or(JobState::Queued, |r| r.state);
                a.send(Ok(SubmitAck {
                    id: existing,
                    state,
                    deduplicated: true,
                }));
            }
            return;
        }
        match self.check(id, spec) {
            Ok((mut job, delayed)) => {
                job.direct = direct;
                let result = self.admit(job, delayed, ctx);
                if let Some(a) = ack {
                    a.send(Ok(result));
                }
            }
            Err(e) => {
                if let Some(d) = direct {
                    d.send(Err(e.clone()));
                }
                if let Some(a) = ack {
                    a.send(Err(e));
                }
            }
        }
    }
}

impl Dispatcher {
    fn add_waiter(&mut self, id: JobId, w: RecordWaiter) {
        if let Some(job) = self.active.get_mut(&id) {
            job.waiters.push(w);
        } else if let Some(rec) = self.finished.get(&id) {
            w.send(Ok(rec.clone()));
        } else {
            w.send(Err(JobError::NotFound(id.to_string())));
        }
    }
}

/// Submit several jobs, all or nothing.
pub(crate) struct SubmitBatch {
    pub(crate) jobs: Vec<(JobId, JobSpec)>,
    pub(crate) reply: Reply<Result<Vec<SubmitAck>, JobError>>,
}

impl Message for SubmitBatch {
    type Result = ();
}

impl Handler<SubmitBatch> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: SubmitBatch, ctx: &mut Context<Self>) {
        // Check everything first, counting what the batch itself adds to
        // each pool, so a batch cannot overflow max_queued half-way.
        let mut checked = Vec::with_capacity(msg.jobs.len());
        let mut extra: HashMap<usize, usize> = HashMap::new();
        for (i, (id, spec)) in msg.jobs.into_iter().enumerate() {
            if let Some(existing) = self.duplicate_of(&spec) {
                checked.push(Err(existing));
                continue;
            }
            match self.check(id, spec) {
                Ok((job, delayed)) => {
                    let n = extra.entry(job.pool).or_default();
                    *n += 1;
                    let p = &self.pools[job.pool];
                    if p.queued + p.delayed + *n > p.cfg.max_queued + p.idle {
                        msg.reply.send(Err(JobError::QueueFull {
                            pool: p.cfg.name.clone(),
                            max_queued: p.cfg.max_queued,
                        }));
                        return;
                    }
                    checked.push(Ok((job, delayed)));
                }
                // Not the job's fault: the same answer a single submit gets,
                // so the client knows to retry later.
                Err(e @ (JobError::QueueFull { .. } | JobError::ShuttingDown)) => {
                    msg.reply.send(Err(e));
                    return;
                }
                Err(e) => {
                    msg.reply
                        .send(Err(JobError::BadRequest(format!("job {i}: {e}"))));
                    return;
                }
            }
        }
        let acks = checked
            .into_iter()
            .map(|c| match c {
                Ok((job, delayed)) => self.admit(job, delayed, ctx),
                Err(existing) => SubmitAck {
                    id: existing,
                    state: self.record(existing).map_or(JobState::Queued, |r| r.state),
                    deduplicated: true,
                },
            })
            .collect();
        msg.reply.send(Ok(acks));
    }
}

/// Wait until a job is final; answered with its record.
pub(crate) struct Wait {
    pub(crate) id: JobId,
    pub(crate) reply: RecordWaiter,
}

impl Message for Wait {
    type Result = ();
}

impl Handler<Wait> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Wait, _: &mut Context<Self>) {
        self.add_waiter(msg.id, msg.reply);
    }
}

/// Wait until any of several jobs is final.
pub(crate) struct WaitAny {
    pub(crate) ids: Vec<JobId>,
    pub(crate) reply: RecordWaiter,
}

impl Message for WaitAny {
    type Result = ();
}

impl Handler<WaitAny> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: WaitAny, _: &mut Context<Self>) {
        for id in &msg.ids {
            if self.record(*id).is_none() {
                msg.reply.send(Err(JobError::NotFound(id.to_string())));
                return;
            }
        }
        if let Some(rec) = msg.ids.iter().find_map(|id| self.finished.get(id)) {
            msg.reply.send(Ok(rec.clone()));
            return;
        }
        // One reply shared by all: the first job to finish takes it.
        let slot = Arc::new(std::sync::Mutex::new(Some(msg.reply)));
        for id in msg.ids {
            let slot = slot.clone();
            self.add_waiter(
                id,
                Reply::with(move |r| {
                    let taken = slot.lock().ok().and_then(|mut s| s.take());
                    if let Some(reply) = taken {
                        reply.send(r);
                    }
                }),
            );
        }
    }
}

/// Simple request/response operations on one job or on the whole state.
pub(crate) enum Query {
    Status(JobId, Reply<Result<JobRecord, JobError>>),
    Cancel(JobId, Reply<Result<JobRecord, JobError>>),
    Retry(JobId, Reply<Result<JobRecord, JobError>>),
    List(ListQuery, Reply<ListPage>),
    Stats(Reply<StatsSnapshot>),
    Pause(String, bool, Reply<Result<(), JobError>>),
    Shutdown(Instant, Reply<()>),
}

impl Message for Query {
    type Result = ();
}

impl Handler<Query> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Query, ctx: &mut Context<Self>) {
        match msg {
            Query::Status(id, r) => r.send(
                self.record(id)
                    .cloned()
                    .ok_or_else(|| JobError::NotFound(id.to_string())),
            ),
            Query::Cancel(id, r) => r.send(self.cancel(id, "cancelled by request", ctx)),
            Query::Retry(id, r) => r.send(self.retry(id, ctx)),
            Query::List(q, r) => r.send(self.list(&q)),
            Query::Stats(r) => r.send(self.snapshot()),
            Query::Pause(pool, paused, r) => match self.pool_names.get(&pool).copied() {
                None => r.send(Err(JobError::UnknownPool(pool))),
                Some(i) => {
                    self.pools[i].paused = paused;
                    if !paused && self.closing.is_none() {
                        self.pump(i, ctx);
                    }
                    r.send(Ok(()));
                }
            },
            Query::Shutdown(deadline, r) => {
                if let Some(c) = &mut self.closing {
                    c.replies.push(r);
                    return;
                }
                self.closing = Some(Closing { replies: vec![r] });
                // Jobs that have not started will not start: answer their
                // waiters now. Running ones finish up to the deadline.
                for job in self.active.values_mut() {
                    if job.rec.state != JobState::Running {
                        if let Some(d) = job.direct.take() {
                            d.send(Err(JobError::ShuttingDown));
                        }
                        for w in job.waiters.drain(..) {
                            w.send(Err(JobError::ShuttingDown));
                        }
                    }
                }
                if self.all_idle() {
                    self.close_now(ctx);
                } else {
                    let left = deadline.saturating_duration_since(Instant::now());
                    ctx.run_later(left, |act, ctx| act.close_now(ctx));
                }
            }
        }
    }
}
