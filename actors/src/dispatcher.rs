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
use crate::job::{Attempt, ErrorInfo, JobId, JobRecord, JobSpec, JobState, now_ms};
use crate::pool::{
    Failure, OFFER_DEPTH, PANIC_PREFIX, PoolConfig, PoolLink, RunJob, ThreadCount, Worker,
    start_pool,
};
use crate::registry::Registry;
use crate::reply::{DirectReply, Outcome, Reply};
use crate::stats::{KindTotals, PairTotals, PoolStats, StatsSnapshot, StoreStats, pool_breakdown};
use crate::store::{Change, Commit, Recovered, StoreActor, StoreError, StoreRead};

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
    /// Its name, shared by the records of its jobs.
    name: Arc<str>,
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
    /// The handoff slot and report inbox shared with the pool's workers.
    pub(crate) link: Arc<PoolLink>,
    /// The queued jobs offered in the handoff slot (id, priority), in the
    /// order offered, as far as we know: workers may have taken some.
    offered: Vec<(JobId, i32)>,
    /// What we last told the workers through `PoolLink::set_starving`.
    starving: bool,
    /// Links of the pool's earlier sizes (see `resize`), each with how many
    /// of its workers still run a job. Those workers take no new job (their
    /// handoff slot stays empty) and exit after the one they have; a link
    /// is dropped once none of its workers is busy.
    retired: Vec<(Arc<PoolLink>, usize)>,
}

impl PoolState {
    pub(crate) fn new(cfg: PoolConfig) -> Self {
        PoolState {
            idle: cfg.threads,
            name: Arc::from(cfg.name.as_str()),
            cfg,
            addr: None,
            queue: BinaryHeap::new(),
            queued: 0,
            delayed: 0,
            running: 0,
            paused: false,
            counters: Default::default(),
            link: Arc::default(),
            offered: Vec::new(),
            starving: false,
            retired: Vec::new(),
        }
    }

    /// Workers of earlier sizes still running a job.
    fn retiring(&self) -> usize {
        self.retired.iter().map(|(_, busy)| busy).sum()
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

/// A map keyed by job id. Ids come from a counter, never from a client, so
/// a multiplication hashes them well enough; SipHash cost more than the
/// rest of a map lookup on the hot path.
type IdMap<V> = HashMap<JobId, V, BuildHasherDefault<FastHasher>>;

/// Per-kind totals, keyed by registered kind names (admission rejects any
/// other name before a lookup here), so the same cheap hash is safe.
type KindMap = HashMap<String, KindTotals, BuildHasherDefault<FastHasher>>;

/// Fibonacci hashing: fold each word in, multiply by 2^64 / golden ratio.
/// High and low bits both change with every input, as hashbrown needs.
/// Not for keys an attacker chooses.
#[derive(Default)]
struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.write_u64(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One `wait` caller of a job that is not final yet.
struct Waiter {
    /// Names the wait so that its expiry finds it (0: it never expires).
    token: u64,
    /// Answered with the final record (or why there is none).
    reply: RecordWaiter,
    /// The expiry timer, cancelled when the job ends first.
    timer: Option<SpawnHandle>,
}

impl Waiter {
    /// Answer the waiter and stop its expiry timer.
    fn send(self, r: Result<JobRecord, JobError>, ctx: &mut Context<Dispatcher>) {
        if let Some(t) = self.timer {
            ctx.cancel_future(t);
        }
        self.reply.send(r);
    }
}

/// A job's `wait` callers: nothing (one pointer) for the many jobs nobody
/// waits for, a vector once someone does.
/// (A boxed `Vec` on purpose: one word instead of three in every job.)
#[derive(Default)]
#[allow(clippy::box_collection)]
struct Waiters(Option<Box<Vec<Waiter>>>);

impl Waiters {
    fn push(&mut self, w: Waiter) {
        self.0.get_or_insert_with(Default::default).push(w);
    }

    /// All of them, leaving none.
    fn take(&mut self) -> Vec<Waiter> {
        self.0.take().map(|b| *b).unwrap_or_default()
    }

    fn swap_remove(&mut self, i: usize) -> Option<Waiter> {
        let v = self.0.as_mut()?;
        (i < v.len()).then(|| v.swap_remove(i))
    }
}

impl std::ops::Deref for Waiters {
    type Target = [Waiter];
    fn deref(&self) -> &[Waiter] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl IntoIterator for Waiters {
    type Item = Waiter;
    type IntoIter = std::vec::IntoIter<Waiter>;
    fn into_iter(mut self) -> Self::IntoIter {
        self.take().into_iter()
    }
}

/// A job's `call` waiter, boxed: a reply slot is five words, and most
/// queued jobs have none (or hand theirs to the attempt when they start).
#[derive(Default)]
struct Direct(Option<Box<DirectReply>>);

impl Direct {
    fn set(&mut self, d: Option<DirectReply>) {
        self.0 = d.map(Box::new);
    }

    fn take(&mut self) -> Option<DirectReply> {
        self.0.take().map(|b| *b)
    }

    fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

/// When a job became ready, in nanoseconds since the first job did: half
/// the size of an `Instant`, in a struct there is one of per queued job.
#[derive(Clone, Copy)]
struct Stamp(u64);

/// The origin of every `Stamp`.
static STAMP_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

impl Stamp {
    fn now() -> Stamp {
        let epoch = *STAMP_EPOCH.get_or_init(Instant::now);
        Stamp(epoch.elapsed().as_nanos() as u64)
    }

    /// Time from this stamp to `t` (zero if `t` is earlier).
    fn until(self, t: Instant) -> Duration {
        let epoch = *STAMP_EPOCH.get_or_init(Instant::now);
        t.saturating_duration_since(epoch)
            .saturating_sub(Duration::from_nanos(self.0))
    }
}

/// A job that is not final yet. One per queued job: keep it small.
struct Active {
    rec: JobRecord,
    /// Index into `pools`.
    pool: usize,
    /// Stamp of its current queue entry.
    seq: u64,
    /// When it became ready (for the queue-wait histogram).
    ready_at: Stamp,
    /// Its delay, retry or timeout timer.
    timer: Option<SpawnHandle>,
    /// The running attempt, shared with the worker.
    attempt: Option<Arc<AttemptShared>>,
    /// A `call` waiter while the job is not running (moves into the
    /// attempt while it runs).
    direct: Direct,
    /// `wait` callers.
    waiters: Waiters,
    /// Dependencies not yet succeeded.
    deps_left: u32,
    /// Admitted but not yet committed to the store: it may not run yet.
    held: bool,
}

impl Active {
    /// A job that comes back into memory with its record (a retry, or
    /// recovery from the store): no timer, attempt or waiter yet, committed.
    fn resumed(rec: JobRecord, pool: usize) -> Box<Self> {
        Box::new(Active {
            rec,
            pool,
            seq: 0,
            ready_at: Stamp::now(),
            timer: None,
            attempt: None,
            direct: Direct::default(),
            waiters: Waiters::default(),
            deps_left: 0,
            held: false,
        })
    }
}

/// The Dispatcher's side of the store: changes waiting to be committed,
/// the batch in flight, and what to do once a batch is committed.
pub(crate) struct StoreLink {
    /// The store's thread.
    pub(crate) addr: Addr<StoreActor>,
    /// Changes not sent yet, in order.
    pending: Vec<Change>,
    /// job → index of its `Put` in `pending`: a newer record of the same job
    /// replaces the older one, so a job that is submitted, started and
    /// finished within one batch is written once.
    slot: IdMap<usize>,
    /// Admissions waiting for `pending` to commit.
    admissions: Vec<Admission>,
    /// The batch in flight: its number, and the admissions it carries.
    in_flight: Option<(u64, Vec<Admission>)>,
    /// Last batch number used.
    seq: u64,
    /// Why the last commit failed, until one succeeds again.
    failing: Option<String>,
    /// Store size in bytes, kept up to date by the store thread.
    pub(crate) size: Arc<std::sync::atomic::AtomicU64>,
    /// Changes committed so far.
    committed: u64,
    /// A `Flush` is on its way to the Dispatcher.
    flush_scheduled: bool,
}

impl StoreLink {
    pub(crate) fn new(addr: Addr<StoreActor>, size: Arc<std::sync::atomic::AtomicU64>) -> Self {
        StoreLink {
            addr,
            pending: Vec::new(),
            slot: IdMap::default(),
            admissions: Vec::new(),
            in_flight: None,
            seq: 0,
            failing: None,
            size,
            committed: 0,
            flush_scheduled: false,
        }
    }
}

/// Submissions acknowledged once their batch commits.
enum Admission {
    /// One job (`Submit`).
    One {
        id: JobId,
        ack: Option<Reply<Result<SubmitAck, JobError>>>,
        answer: SubmitAck,
    },
    /// A `submit_batch`: all of its new jobs, and the answer for all.
    Batch {
        ids: Vec<JobId>,
        reply: Reply<Result<Vec<SubmitAck>, JobError>>,
        answer: Vec<SubmitAck>,
    },
}

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
        }
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

    // ----- admission -------------------------------------------------------

    /// Check a submission and build its record; nothing is changed yet.
    fn check(&self, id: JobId, spec: JobSpec) -> Result<(Box<Active>, bool), JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        if let Some(why) = self.store.as_ref().and_then(|s| s.failing.as_ref()) {
            return Err(JobError::Unavailable(format!(
                "cannot persist new jobs: {why}"
            )));
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
            kind: kind.name.clone(),
            pool: p.name.clone(),
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
            unique_key: opts.unique_key.map(String::into_boxed_str),
            after: opts.after.into_boxed_slice(),
            created_at: now,
            run_at: now + delay.as_millis() as u64,
            started_at: None,
            finished_at: None,
            submitted_by: opts.submitted_by,
        };
        let active = Box::new(Active {
            rec,
            pool,
            seq: 0,
            ready_at: Stamp::now(),
            timer: None,
            attempt: None,
            direct: Direct::default(),
            waiters: Waiters::default(),
            deps_left,
            held: false,
        });
        Ok((active, !delay.is_zero()))
    }

    /// The active job holding this submission's unique key, if any.
    fn duplicate_of(&self, spec: &JobSpec) -> Option<JobId> {
        let key = spec.options.unique_key.as_ref()?;
        self.unique.get(&(spec.kind.clone(), key.clone())).copied()
    }

    /// Insert a checked job and start its life.
    fn admit(&mut self, mut job: Box<Active>, delayed: bool, ctx: &mut Context<Self>) -> SubmitAck {
        let id = job.rec.id;
        let pool = job.pool;
        if let Some(key) = &job.rec.unique_key {
            self.unique
                .insert((job.rec.kind.to_string(), key.to_string()), id);
        }
        let mut notified = false;
        for dep in &job.rec.after {
            if let Some(d) = self.active.get(dep) {
                self.dependents.entry(*dep).or_default().push(id);
                // A started dependency must report at once when it ends.
                if let Some(s) = &d.attempt {
                    s.request_notify();
                    notified = true;
                }
            }
        }
        if notified {
            self.recheck(ctx);
        }
        self.pools[pool].counters.submitted += 1;
        self.kind_totals(&job.rec.kind, pool).counters.submitted += 1;
        // With a store, the job waits for its commit before it may run.
        job.held = self.store.is_some();
        let held = job.held;
        if job.deps_left > 0 || delayed {
            self.pools[pool].delayed += 1;
            if job.deps_left == 0 && !held {
                job.timer = Some(self.ready_timer(id, job.rec.run_at, ctx));
            }
            self.active.insert(id, job);
        } else {
            self.active.insert(id, job);
            self.pools[pool].queued += 1;
            if !held {
                self.push_entry(id);
                self.pump(pool, ctx);
            }
        }
        self.persist(id, ctx);
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
        ctx.run_later(wait, move |act, ctx| {
            act.drain(ctx);
            act.make_ready(id, ctx)
        })
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

    /// Count a job (already in state queued) as queued in its pool and put
    /// it into the pool's queue.
    fn enqueue(&mut self, id: JobId) {
        if let Some(job) = self.active.get(&id) {
            self.pools[job.pool].queued += 1;
            self.push_entry(id);
        }
    }

    /// Put a job (already counted as queued) into its pool's queue.
    fn push_entry(&mut self, id: JobId) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        self.seq += 1;
        job.seq = self.seq;
        job.ready_at = Stamp::now();
        let p = &mut self.pools[job.pool];
        p.queue.push(QueueEntry {
            priority: job.rec.priority,
            seq: self.seq,
            id,
        });
    }

    /// Hand queued jobs to the pool while it has idle workers; while it has
    /// none, offer the best queued ones in its handoff slot, where a worker
    /// that finishes takes the next without waiting for us. Nothing new
    /// starts once a shutdown began: those jobs' waiters were already told.
    fn pump(&mut self, pool: usize, ctx: &mut Context<Self>) {
        self.pump_jobs(pool, ctx);
        self.update_starving(pool, ctx);
    }

    fn pump_jobs(&mut self, pool: usize, ctx: &mut Context<Self>) {
        if self.closing.is_some() {
            return;
        }
        let p = &self.pools[pool];
        if let Some(&(_, worst)) = p.offered.last() {
            // Offers must stay the best queued jobs, and an idle worker gets
            // its job the ordinary way.
            let outranked = p.queue.peek().is_some_and(|top| top.priority > worst);
            if p.idle > 0 || p.paused || outranked {
                self.revoke_offers(pool, ctx);
            }
        }
        loop {
            let p = &self.pools[pool];
            if p.idle == 0 || p.paused {
                break;
            }
            let Some(id) = self.pop_ready(pool) else {
                return;
            };
            let Some(run) = self.prepare(id) else {
                continue;
            };
            self.pools[pool].idle -= 1;
            let started = run.shared.start();
            self.mark_started(id, started, ctx);
            // Invariant: pools get their address before any job.
            if let Some(addr) = &self.pools[pool].addr {
                addr.do_send(run);
            }
        }
        while self.pools[pool].offered.len() < OFFER_DEPTH && !self.pools[pool].paused {
            let Some(id) = self.pop_ready(pool) else {
                return;
            };
            let Some(run) = self.prepare(id) else {
                continue;
            };
            let priority = self.active.get(&id).map_or(0, |j| j.rec.priority);
            let p = &mut self.pools[pool];
            p.offered.push((id, priority));
            p.link.offer(run);
        }
    }

    /// Tell the pool's workers whether jobs wait for one of them.
    fn update_starving(&mut self, pool: usize, ctx: &mut Context<Self>) {
        let p = &mut self.pools[pool];
        let starving = p.queued > p.offered.len() && !p.paused && self.closing.is_none();
        if starving != p.starving {
            p.starving = starving;
            p.link.set_starving(starving);
            if starving {
                self.recheck(ctx);
            }
        }
    }

    /// Read the report inboxes once more soon, after raising a flag that
    /// workers read after filing a report: a worker that read it before it
    /// was raised did not wake us, but its report is in the inbox by now.
    fn recheck(&mut self, ctx: &mut Context<Self>) {
        if !self.recheck_queued {
            self.recheck_queued = true;
            ctx.notify(Wake);
        }
    }

    /// Handle every report the workers filed. Called first thing on every
    /// message and timer, so nothing is answered from stale state.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        for i in 0..self.pools.len() {
            while let Some(report) = self.pools[i].link.next_report() {
                self.on_report(report, ctx);
            }
            let mut k = 0;
            while k < self.pools[i].retired.len() {
                while let Some(report) = self.pools[i].retired[k].0.next_report() {
                    self.on_retired_report(i, k, report, ctx);
                }
                if self.pools[i].retired[k].1 == 0 {
                    self.pools[i].retired.swap_remove(k);
                } else {
                    k += 1;
                }
            }
        }
    }

    /// The best queued job of a pool, off its heap (stale entries skipped).
    fn pop_ready(&mut self, pool: usize) -> Option<JobId> {
        let p = &mut self.pools[pool];
        while let Some(entry) = p.queue.pop() {
            if self
                .active
                .get(&entry.id)
                .is_some_and(|j| j.rec.state == JobState::Queued && j.seq == entry.seq)
            {
                return Some(entry.id);
            }
        }
        None
    }

    /// The next attempt of a queued job, ready for a worker. The job stays
    /// queued until `mark_started`.
    fn prepare(&mut self, id: JobId) -> Option<RunJob> {
        let job = self.active.get_mut(&id)?;
        // Invariant: admission checked the kind exists.
        let kind = self.registry.kinds.get(&*job.rec.kind)?;
        let attempt = job.rec.attempt + 1;
        let shared = Arc::new(AttemptShared::new(
            id,
            attempt,
            attempt >= job.rec.max_attempts,
            job.rec.timeout_ms.map(Duration::from_millis),
            job.direct.take(),
        ));
        if !job.waiters.is_empty() || self.dependents.contains_key(&id) {
            shared.request_notify();
        }
        job.attempt = Some(shared.clone());
        Some(RunJob {
            shared,
            handler: kind.handler.clone(),
            payload: job.rec.payload.clone(),
        })
    }

    /// A worker started the prepared attempt of a queued job at `started`:
    /// the job is running. The caller settles the pool's idle count.
    fn mark_started(&mut self, id: JobId, started: Instant, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        let p = &mut self.pools[job.pool];
        p.queued -= 1;
        p.running += 1;
        p.counters.started += 1;
        job.rec.state = JobState::Running;
        job.rec.attempt += 1;
        let ago = started.elapsed();
        let start_ms = now_ms().saturating_sub(ago.as_millis() as u64);
        job.rec.started_at = Some(start_ms);
        job.rec.attempts.push(Attempt {
            start: start_ms,
            end: None,
            error: None,
        });
        let attempt = job.rec.attempt;
        if let Some(t) = job.rec.timeout_ms.map(Duration::from_millis) {
            job.timer = Some(ctx.run_later(t.saturating_sub(ago), move |act, ctx| {
                act.drain(ctx);
                act.on_timeout(id, attempt, ctx)
            }));
        }
        let queue_wait = job.ready_at.until(started);
        let totals = kind_totals(&mut self.kinds, &job.rec.kind).pool(job.pool);
        totals.counters.started += 1;
        totals.queue_wait.record(queue_wait);
        self.persist(id, ctx);
    }

    /// Take back the jobs offered in a pool's handoff slot: they go back to
    /// the queue at their old places. Those a worker took first are running
    /// (the workers' reports will say so).
    fn revoke_offers(&mut self, pool: usize, ctx: &mut Context<Self>) {
        let p = &mut self.pools[pool];
        if p.offered.is_empty() {
            return;
        }
        let offered = std::mem::take(&mut p.offered);
        let back = p.link.revoke();
        let mut returned = Vec::with_capacity(back.len());
        for run in back {
            let id = run.shared.id;
            returned.push(id);
            let Some(job) = self.active.get_mut(&id) else {
                continue;
            };
            job.attempt = None;
            job.direct.set(run.shared.take_direct());
            p.queue.push(QueueEntry {
                priority: job.rec.priority,
                seq: job.seq,
                id,
            });
        }
        for (id, _) in offered {
            if !returned.contains(&id) {
                let started = self
                    .active
                    .get(&id)
                    .and_then(|j| j.attempt.as_ref())
                    .map_or_else(Instant::now, |s| s.start());
                self.mark_started(id, started, ctx);
            }
        }
    }

    /// A worker's report says it took an offered job: it stays busy.
    fn offer_taken(&mut self, pool: usize, took: (JobId, u32), ctx: &mut Context<Self>) {
        let p = &mut self.pools[pool];
        p.idle -= 1;
        if let Some(i) = p.offered.iter().position(|o| o.0 == took.0) {
            p.offered.remove(i);
            let started = self
                .active
                .get(&took.0)
                .and_then(|j| j.attempt.as_ref())
                .map_or_else(Instant::now, |s| s.start());
            self.mark_started(took.0, started, ctx);
        }
        // Otherwise a revoke found it taken already and marked it started.
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
        self.active.insert(id, Active::resumed(rec, pool));
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
                        busy: p.cfg.threads - p.idle,
                        idle: p.idle,
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
            let link: Arc<PoolLink> = Arc::default();
            if self.store.is_some() {
                link.set_eager();
            }
            let addr = start_pool(&cfg, i, ctx.address(), self.threads.clone(), link.clone())
                .map_err(JobError::Internal)?;
            self.revoke_offers(i, ctx);
            let p = &mut self.pools[i];
            let old = std::mem::replace(&mut p.link, link);
            let busy = p.cfg.threads - p.idle;
            if busy > 0 {
                // Their reports must not wait for an unrelated message.
                old.set_eager();
                p.retired.push((old, busy));
                self.recheck(ctx);
            }
            let p = &mut self.pools[i];
            p.starving = false;
            p.idle = threads;
            p.cfg.threads = threads;
            // Dropping the old address retires the old SyncArbiter.
            p.addr = Some(addr);
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
        self.pool_names.insert(state.cfg.name.clone(), i);
        self.pools.push(state);
        Ok(())
    }

    // ----- shutdown --------------------------------------------------------

    fn all_idle(&self) -> bool {
        self.pools
            .iter()
            .all(|p| p.idle == p.cfg.threads && p.retiring() == 0)
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

// ----- messages ------------------------------------------------------------

/// A worker finished an attempt (filed in its pool's report inbox).
pub(crate) struct AttemptDone {
    pub(crate) id: JobId,
    pub(crate) attempt: u32,
    pub(crate) pool: usize,
    pub(crate) outcome: Result<Value, Failure>,
    /// False when the Dispatcher had already ended the attempt (timeout,
    /// cancel): then only the worker's credit comes back.
    pub(crate) claimed: bool,
    pub(crate) run_time: Duration,
    /// The job (and attempt) the worker took from the handoff slot to run
    /// next, if any: the worker stays busy.
    pub(crate) took: Option<(JobId, u32)>,
}

/// A worker filed a report that someone waits for (see `pool`): read the
/// report inboxes. Also sent to ourselves by `recheck`.
pub(crate) struct Wake;

impl Message for Wake {
    type Result = ();
}

impl Handler<Wake> for Dispatcher {
    type Result = ();

    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.recheck_queued = false;
        self.drain(ctx);
    }
}

impl Dispatcher {
    /// A worker's report of a finished attempt, read from its pool's inbox.
    fn on_report(&mut self, msg: AttemptDone, ctx: &mut Context<Self>) {
        let pool = msg.pool;
        self.pools[pool].idle += 1;
        if let Some(took) = msg.took {
            self.offer_taken(pool, took, ctx);
        }
        self.settle(msg, ctx);
    }

    /// A report from a worker of an earlier size of `pool` (through the
    /// retired link number `k`): no credit comes back, the worker's thread
    /// exits, unless it took a job from its slot just before the resize
    /// emptied it (that job was marked started then) and is busy with it.
    fn on_retired_report(
        &mut self,
        pool: usize,
        k: usize,
        msg: AttemptDone,
        ctx: &mut Context<Self>,
    ) {
        if msg.took.is_none() {
            let busy = &mut self.pools[pool].retired[k].1;
            *busy = busy.saturating_sub(1);
        }
        self.settle(msg, ctx);
    }

    /// What a report means for its job, then for the pool and a shutdown.
    fn settle(&mut self, msg: AttemptDone, ctx: &mut Context<Self>) {
        let pool = msg.pool;
        let current = self
            .active
            .get(&msg.id)
            .is_some_and(|j| j.rec.state == JobState::Running && j.rec.attempt == msg.attempt);
        if msg.claimed && current {
            self.attempt_done(msg, ctx);
        } else if current {
            // The handler returned past its deadline (see `claim_finished`):
            // time the attempt out now instead of when the timer fires.
            self.on_timeout(msg.id, msg.attempt, ctx);
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
    /// Answered with the final record of the job (of the existing job when
    /// deduplicated): a submit that also waits, in one trip.
    pub(crate) waiter: Option<RecordWaiter>,
}

impl Message for Submit {
    type Result = ();
}

impl Handler<Submit> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let Submit {
            id,
            spec,
            ack,
            direct,
            waiter,
        } = msg;
        if let Some(existing) = self.duplicate_of(&spec) {
            if let Some(d) = direct {
                self.add_waiter(
                    existing,
                    Reply::with(move |r: Result<JobRecord, JobError>| {
                        d.send(r.and_then(|rec| outcome_of(&rec)))
                    }),
                    None,
                    ctx,
                );
            }
            if let Some(w) = waiter {
                self.add_waiter(existing, w, None, ctx);
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
                job.direct.set(direct);
                if let Some(w) = waiter {
                    job.waiters.push(Waiter {
                        token: 0,
                        reply: w,
                        timer: None,
                    });
                }
                let answer = self.admit(job, delayed, ctx);
                if self.store.is_some() {
                    let id = answer.id;
                    self.after_commit(Admission::One { id, ack, answer }, ctx);
                } else if let Some(a) = ack {
                    a.send(Ok(answer));
                }
            }
            Err(e) => {
                if let Some(d) = direct {
                    d.send(Err(e.clone()));
                }
                if let Some(w) = waiter {
                    w.send(Err(e.clone()));
                }
                if let Some(a) = ack {
                    a.send(Err(e));
                }
            }
        }
    }
}

impl Dispatcher {
    /// Answer `w` once job `id` is final. A final (or unknown) job is
    /// answered at once, from memory or the store. With a `timeout`, the
    /// waiter is answered `WaitTimeout` and dropped when the job is not
    /// final by then, so a client polling a job that never ends does not
    /// pile up waiters.
    fn add_waiter(
        &mut self,
        id: JobId,
        w: RecordWaiter,
        timeout: Option<Duration>,
        ctx: &mut Context<Self>,
    ) {
        if !self.active.contains_key(&id) {
            // Final (in memory or only in the store), or unknown.
            self.lookup(id, w);
            return;
        }
        let (token, timer) = match timeout {
            None => (0, None),
            Some(t) if t.is_zero() => {
                w.send(Err(JobError::WaitTimeout {
                    id: Some(id),
                    waited_ms: 0,
                }));
                return;
            }
            Some(t) => {
                let token = self.next_wait_token();
                let err = JobError::WaitTimeout {
                    id: Some(id),
                    waited_ms: t.as_millis() as u64,
                };
                let timer = ctx.run_later(t, move |act, _| act.expire_wait(token, &[id], err));
                (token, Some(timer))
            }
        };
        self.push_waiter(id, w, token, timer, ctx);
    }

    fn next_wait_token(&mut self) -> u64 {
        self.wait_tokens += 1;
        self.wait_tokens
    }

    /// Add a waiter to an active job (or answer it from `lookup` when the
    /// job is not active).
    fn push_waiter(
        &mut self,
        id: JobId,
        reply: RecordWaiter,
        token: u64,
        timer: Option<SpawnHandle>,
        ctx: &mut Context<Self>,
    ) {
        let Some(job) = self.active.get_mut(&id) else {
            if let Some(t) = timer {
                ctx.cancel_future(t);
            }
            self.lookup(id, reply);
            return;
        };
        // Throw away waiters nobody listens to any more (dropped futures),
        // each time the list reaches a power of two: amortised O(1) per
        // wait, and bounded however often a client gives up and waits again.
        let n = job.waiters.len();
        if n >= 8 && n.is_power_of_two() {
            for w in std::mem::take(&mut job.waiters) {
                if w.reply.is_gone() {
                    if let Some(t) = w.timer {
                        ctx.cancel_future(t);
                    }
                } else {
                    job.waiters.push(w);
                }
            }
        }
        job.waiters.push(Waiter {
            token,
            reply,
            timer,
        });
        // A started attempt must now report at once when it ends.
        if let Some(a) = &job.attempt {
            a.request_notify();
            self.recheck(ctx);
        }
    }

    /// A timed wait ran out: answer and remove its waiter from each job
    /// that still has it.
    fn expire_wait(&mut self, token: u64, ids: &[JobId], err: JobError) {
        for id in ids {
            let Some(job) = self.active.get_mut(id) else {
                continue;
            };
            if let Some(i) = job.waiters.iter().position(|w| w.token == token)
                && let Some(w) = job.waiters.swap_remove(i)
            {
                w.reply.send(Err(err.clone()));
            }
        }
    }

    /// `WaitAny` once every id is known to exist: a final one answers at
    /// once, else one shared reply waits on all of them.
    fn wait_any(
        &mut self,
        ids: Vec<JobId>,
        reply: RecordWaiter,
        timeout: Option<Duration>,
        ctx: &mut Context<Self>,
    ) {
        if let Some(rec) = ids.iter().find_map(|id| self.finished.get(id)) {
            reply.send(Ok(rec.clone()));
            return;
        }
        if timeout.is_some_and(|t| t.is_zero()) {
            reply.send(Err(JobError::WaitTimeout {
                id: None,
                waited_ms: 0,
            }));
            return;
        }
        let token = if timeout.is_some() {
            self.next_wait_token()
        } else {
            0
        };
        // One reply shared by all: the first job to finish takes it; the
        // other waiters then count as gone and are pruned.
        let slot = Arc::new(std::sync::Mutex::new(Some(reply)));
        for &id in &ids {
            let (take, probe) = (slot.clone(), slot.clone());
            let w = Reply::with_probe(
                move |r| {
                    let taken = take.lock().ok().and_then(|mut s| s.take());
                    if let Some(reply) = taken {
                        reply.send(r);
                    }
                },
                move || {
                    probe
                        .lock()
                        .map(|s| s.as_ref().is_none_or(|r| r.is_gone()))
                        .unwrap_or(false)
                },
            );
            self.push_waiter(id, w, token, None, ctx);
        }
        if let Some(t) = timeout {
            let err = JobError::WaitTimeout {
                id: None,
                waited_ms: t.as_millis() as u64,
            };
            ctx.run_later(t, move |act, _| act.expire_wait(token, &ids, err));
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
        self.drain(ctx);
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
        let mut new_ids = Vec::new();
        let acks = checked
            .into_iter()
            .map(|c| match c {
                Ok((job, delayed)) => {
                    let ack = self.admit(job, delayed, ctx);
                    new_ids.push(ack.id);
                    ack
                }
                Err(existing) => SubmitAck {
                    id: existing,
                    state: self.record(existing).map_or(JobState::Queued, |r| r.state),
                    deduplicated: true,
                },
            })
            .collect();
        if self.store.is_some() {
            self.after_commit(
                Admission::Batch {
                    ids: new_ids,
                    reply: msg.reply,
                    answer: acks,
                },
                ctx,
            );
        } else {
            msg.reply.send(Ok(acks));
        }
    }
}

/// Wait until a job is final; answered with its record.
pub(crate) struct Wait {
    pub(crate) id: JobId,
    pub(crate) reply: RecordWaiter,
    /// Answer `WaitTimeout` (and forget the waiter) if the job is not final
    /// by then.
    pub(crate) timeout: Option<Duration>,
}

impl Message for Wait {
    type Result = ();
}

impl Handler<Wait> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Wait, ctx: &mut Context<Self>) {
        self.drain(ctx);
        self.add_waiter(msg.id, msg.reply, msg.timeout, ctx);
    }
}

/// Wait until any of several jobs is final.
pub(crate) struct WaitAny {
    pub(crate) ids: Vec<JobId>,
    pub(crate) reply: RecordWaiter,
    /// As for `Wait`.
    pub(crate) timeout: Option<Duration>,
}

impl Message for WaitAny {
    type Result = ();
}

impl Handler<WaitAny> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: WaitAny, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let missing: Vec<JobId> = msg
            .ids
            .iter()
            .copied()
            .filter(|id| self.record(*id).is_none())
            .collect();
        let Some(&first_missing) = missing.first() else {
            self.wait_any(msg.ids, msg.reply, msg.timeout, ctx);
            return;
        };
        let Some(s) = &self.store else {
            msg.reply
                .send(Err(JobError::NotFound(first_missing.to_string())));
            return;
        };
        // Not in memory: every one of them must be in the store (then it
        // is final: the store's unfinished jobs are all in memory).
        let me = ctx.address();
        let WaitAny {
            ids,
            reply,
            timeout,
        } = msg;
        s.addr.do_send(StoreRead::GetMany(
            missing.clone(),
            Reply::with(move |found| {
                me.do_send(WaitAnyLoaded {
                    ids,
                    missing,
                    found,
                    reply,
                    timeout,
                })
            }),
        ));
    }
}

/// The ids of a `WaitAny` that only the store may know, read back.
struct WaitAnyLoaded {
    /// Every id of the `WaitAny`.
    ids: Vec<JobId>,
    /// The ids that were not in memory, in the order read.
    missing: Vec<JobId>,
    /// What the store holds for each of `missing`.
    found: Result<Vec<Option<JobRecord>>, StoreError>,
    /// The waiter.
    reply: RecordWaiter,
    /// The wait's timeout, started once the ids are known to exist.
    timeout: Option<Duration>,
}

impl Message for WaitAnyLoaded {
    type Result = ();
}

impl Handler<WaitAnyLoaded> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: WaitAnyLoaded, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let found = match msg.found {
            Ok(f) => f,
            Err(e) => return msg.reply.send(Err(JobError::Unavailable(e.0))),
        };
        let mut done = None;
        for (id, rec) in msg.missing.iter().zip(found) {
            match rec {
                // Known in memory by now (retried meanwhile): fine.
                None if self.record(*id).is_some() => {}
                None => return msg.reply.send(Err(JobError::NotFound(id.to_string()))),
                Some(r) if r.state.is_final() && self.record(*id).is_none() => {
                    done.get_or_insert(r);
                }
                Some(_) => {}
            }
        }
        match done {
            Some(rec) => msg.reply.send(Ok(rec)),
            None => self.wait_any(msg.ids, msg.reply, msg.timeout, ctx),
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
    Resize(String, usize, usize, Reply<Result<(), JobError>>),
    AddPool(PoolConfig, Reply<Result<(), JobError>>),
    Shutdown(Instant, Reply<()>),
    /// How many waiters an active job has (tests of waiter clean-up).
    #[cfg(test)]
    Waiters(JobId, Reply<usize>),
}

impl Message for Query {
    type Result = ();
}

impl Handler<Query> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Query, ctx: &mut Context<Self>) {
        self.drain(ctx);
        match msg {
            Query::Status(id, r) => self.lookup(id, r),
            Query::Cancel(id, r) if !self.active.contains_key(&id) => self.lookup(id, r),
            Query::Cancel(id, r) => r.send(self.cancel(id, "cancelled by request", ctx)),
            Query::Retry(id, r) if self.record(id).is_none() && self.store.is_some() => {
                // Finished long ago: fetch it from the store, then retry.
                let me = ctx.address();
                if let Some(s) = &self.store {
                    s.addr.do_send(StoreRead::Get(
                        id,
                        Reply::with(move |found| {
                            me.do_send(RetryLoaded {
                                id,
                                found,
                                reply: r,
                            })
                        }),
                    ));
                }
            }
            Query::Retry(id, r) => r.send(self.retry(id, ctx)),
            Query::List(q, r) => match &self.store {
                None => r.send(self.list(&q)),
                Some(s) => {
                    let me = ctx.address();
                    let query = q.clone();
                    s.addr.do_send(StoreRead::List(
                        q,
                        Reply::with(move |page| {
                            me.do_send(ListLoaded {
                                q: query,
                                page,
                                reply: r,
                            })
                        }),
                    ));
                }
            },
            Query::Stats(r) => r.send(self.snapshot()),
            #[cfg(test)]
            Query::Waiters(id, r) => r.send(self.active.get(&id).map_or(0, |j| j.waiters.len())),
            Query::Pause(pool, paused, r) => match self.pool_names.get(&pool).copied() {
                None => r.send(Err(JobError::UnknownPool(pool))),
                Some(i) => {
                    self.pools[i].paused = paused;
                    self.persist_change(Change::Paused(pool.clone(), paused), ctx);
                    if paused {
                        self.revoke_offers(i, ctx);
                        self.update_starving(i, ctx);
                    } else if self.closing.is_none() {
                        self.pump(i, ctx);
                    }
                    r.send(Ok(()));
                }
            },
            Query::Resize(pool, threads, max_queued, r) => {
                r.send(self.resize(&pool, threads, max_queued, ctx))
            }
            Query::AddPool(cfg, r) => r.send(self.add_pool(cfg, ctx)),
            Query::Shutdown(deadline, r) => {
                if let Some(c) = &mut self.closing {
                    c.replies.push(r);
                    return;
                }
                self.closing = Some(Closing {
                    replies: vec![r],
                    stop_requested: false,
                });
                // Offered jobs go back to the queue, and from now on every
                // report wakes us: the drain ends when the last worker is
                // idle.
                for i in 0..self.pools.len() {
                    self.revoke_offers(i, ctx);
                    self.pools[i].link.set_eager();
                }
                self.recheck(ctx);
                // Jobs that have not started will not start: answer their
                // waiters now. Running ones finish up to the deadline.
                for job in self.active.values_mut() {
                    if job.rec.state != JobState::Running {
                        if let Some(d) = job.direct.take() {
                            d.send(Err(JobError::ShuttingDown));
                        }
                        for w in job.waiters.take() {
                            w.send(Err(JobError::ShuttingDown), ctx);
                        }
                    }
                }
                if self.all_idle() {
                    self.close_now(ctx);
                } else {
                    let left = deadline.saturating_duration_since(Instant::now());
                    ctx.run_later(left, |act, ctx| {
                        act.drain(ctx);
                        act.close_now(ctx)
                    });
                }
            }
        }
    }
}

// ----- persistence -----------------------------------------------------------

/// Finished jobs deleted from the store per retention tick.
const PRUNE_BATCH: usize = 1000;

/// How long to wait before writing again after a failed commit.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// The error attached to a job that was running when the process died.
pub(crate) const INTERRUPTED: &str = "interrupted: daemon stopped while running";

impl Dispatcher {
    /// Queue the current record of `id` for the next commit.
    fn persist(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let Some(store) = &mut self.store else {
            return;
        };
        let Some(rec) = self
            .active
            .get(&id)
            .map(|a| &a.rec)
            .or_else(|| self.finished.get(&id))
        else {
            return;
        };
        let change = Change::Put(Box::new(rec.clone()));
        match store.slot.get(&id) {
            Some(&i) => store.pending[i] = change,
            None => {
                store.slot.insert(id, store.pending.len());
                store.pending.push(change);
            }
        }
        self.schedule_flush(ctx);
    }

    /// Queue a change that is not a job record.
    fn persist_change(&mut self, change: Change, ctx: &mut Context<Self>) {
        if let Some(store) = &mut self.store {
            store.pending.push(change);
            self.schedule_flush(ctx);
        }
    }

    /// Register submissions to acknowledge once their records commit.
    fn after_commit(&mut self, a: Admission, ctx: &mut Context<Self>) {
        if let Some(store) = &mut self.store {
            store.admissions.push(a);
            self.schedule_flush(ctx);
        }
    }

    /// Send the pending changes as one batch, after the messages already in
    /// the mailbox (so that they join the batch: group commit).
    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        if let Some(s) = &mut self.store
            && !s.flush_scheduled
        {
            s.flush_scheduled = true;
            ctx.notify(Flush);
        }
    }

    fn flush(&mut self) {
        let Some(store) = &mut self.store else {
            return;
        };
        if store.in_flight.is_some() || (store.pending.is_empty() && store.admissions.is_empty()) {
            return;
        }
        store.seq += 1;
        let batch = std::mem::take(&mut store.pending);
        store.slot.clear();
        let admissions = std::mem::take(&mut store.admissions);
        store.in_flight = Some((store.seq, admissions));
        store.addr.do_send(Commit {
            seq: store.seq,
            batch,
        });
    }

    /// A held job's record is committed: let it run.
    fn release(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        if !job.held {
            return;
        }
        job.held = false;
        let pool = job.pool;
        match job.rec.state {
            JobState::Queued => {
                self.push_entry(id);
                if self.closing.is_none() {
                    self.pump(pool, ctx);
                }
            }
            JobState::Delayed if job.deps_left == 0 => {
                let run_at = job.rec.run_at;
                let t = self.ready_timer(id, run_at, ctx);
                if let Some(job) = self.active.get_mut(&id) {
                    job.timer = Some(t);
                }
            }
            _ => {}
        }
    }

    /// A held job's record could not be committed: forget the job, as if it
    /// had never been submitted, and tell whoever waits.
    fn unadmit(&mut self, id: JobId, why: &str, ctx: &mut Context<Self>) {
        let held = self.active.get(&id).is_some_and(|j| j.held);
        if !held {
            return;
        }
        let Some(mut job) = self.active.remove(&id) else {
            return;
        };
        if let Some(t) = job.timer.take() {
            ctx.cancel_future(t);
        }
        let p = &mut self.pools[job.pool];
        match job.rec.state {
            JobState::Queued => p.queued -= 1,
            JobState::Delayed => p.delayed -= 1,
            _ => {}
        }
        p.counters.submitted = p.counters.submitted.saturating_sub(1);
        let k = self.kind_totals(&job.rec.kind, job.pool);
        k.counters.submitted = k.counters.submitted.saturating_sub(1);
        if let Some(key) = &job.rec.unique_key {
            let k = (job.rec.kind.to_string(), key.to_string());
            if self.unique.get(&k) == Some(&id) {
                self.unique.remove(&k);
            }
        }
        let err = JobError::Unavailable(format!("job not stored: {why}"));
        if let Some(d) = job.direct.take() {
            d.send(Err(err.clone()));
        }
        for w in job.waiters.take() {
            w.send(Err(err.clone()), ctx);
        }
        // Jobs that were admitted after it and wait for it stay waiting for
        // a job that never comes: cancel them the same way a failed
        // dependency would.
        for dep in self.dependents.remove(&id).unwrap_or_default() {
            if self.active.get(&dep).is_some_and(|d| !d.held) {
                if let Some(d) = self.active.get_mut(&dep) {
                    d.rec.error = Some(Box::new(ErrorInfo::new(
                        "dependency_failed",
                        format!("dependency {id} could not be stored"),
                    )));
                    let pool = d.pool;
                    self.pools[pool].delayed -= 1;
                }
                self.finish(dep, JobState::Cancelled, None, ctx);
            } else {
                self.unadmit(dep, why, ctx);
            }
        }
    }

    /// Resume from what the store held: requeue queued jobs in their order,
    /// re-arm delay timers, and settle jobs that were running when the
    /// process died (the attempt counts; retry if attempts remain).
    fn restore(&mut self, r: Recovered, ctx: &mut Context<Self>) {
        for name in &r.paused {
            if let Some(&i) = self.pool_names.get(name) {
                self.pools[i].paused = true;
            }
        }
        let mut finished = r.finished;
        finished.sort_by_key(|rec| rec.finished_at.unwrap_or(0));
        for rec in finished {
            self.retain(rec);
        }
        let now = now_ms();
        let mut settle = Vec::new();
        for mut rec in r.active {
            let id = rec.id;
            let problem = if !self.registry.kinds.contains_key(&*rec.kind) {
                Some(Box::new(ErrorInfo::new(
                    "unknown_kind",
                    format!("no job kind named '{}' after restart", rec.kind),
                )))
            } else if !self.pool_names.contains_key(&*rec.pool) {
                Some(Box::new(ErrorInfo::new(
                    "unknown_pool",
                    format!("no pool named '{}' after restart", rec.pool),
                )))
            } else {
                None
            };
            if rec.state == JobState::Running {
                if let Some(a) = rec.attempts.last_mut() {
                    a.end.get_or_insert(now);
                    a.error = Some(INTERRUPTED.to_string());
                }
                rec.error = Some(Box::new(ErrorInfo::new("job_failed", INTERRUPTED)));
                if rec.attempt < rec.max_attempts {
                    rec.state = JobState::Queued;
                    rec.run_at = now;
                } else {
                    settle.push((id, None));
                    rec.state = JobState::Queued;
                }
            }
            if let Some(p) = problem {
                rec.error = Some(p.clone());
                settle.push((id, Some(p)));
            }
            let Some(&pool) = self
                .pool_names
                .get(&*rec.pool)
                .or(self.pool_names.get(crate::runtime::DEFAULT_POOL))
            else {
                continue;
            };
            // Share the names, as for jobs submitted now.
            if let Some(k) = self.registry.kinds.get(&*rec.kind) {
                rec.kind = k.name.clone();
            }
            if *rec.pool == *self.pools[pool].name {
                rec.pool = self.pools[pool].name.clone();
            }
            if let Some(key) = &rec.unique_key {
                self.unique
                    .insert((rec.kind.to_string(), key.to_string()), id);
            }
            let state = rec.state;
            self.active.insert(id, Active::resumed(rec, pool));
            match state {
                JobState::Queued => self.pools[pool].queued += 1,
                _ => self.pools[pool].delayed += 1,
            }
        }
        // Jobs that cannot run any more end now, as a failed last attempt.
        for (id, problem) in settle {
            let Some(job) = self.active.get_mut(&id) else {
                continue;
            };
            self.pools[job.pool].queued -= usize::from(job.rec.state == JobState::Queued);
            self.pools[job.pool].delayed -= usize::from(job.rec.state == JobState::Delayed);
            let state = match (&problem, job.rec.max_attempts) {
                (Some(_), _) | (None, 1) => JobState::Failed,
                (None, _) => JobState::Dead,
            };
            self.finish(id, state, None, ctx);
        }
        // Dependencies, then queues and timers, in id (= submission) order.
        let mut ids: Vec<JobId> = self.active.keys().copied().collect();
        ids.sort_unstable();
        for &id in &ids {
            let after = self
                .active
                .get(&id)
                .map(|j| j.rec.after.clone())
                .unwrap_or_default();
            let mut left = 0;
            let mut failed = None;
            for dep in after {
                if self.active.contains_key(&dep) {
                    left += 1;
                    self.dependents.entry(dep).or_default().push(id);
                } else if let Some(r) = self.finished.get(&dep)
                    && r.state != JobState::Succeeded
                {
                    failed = Some((dep, r.state));
                }
                // Not in memory: pruned long ago, so it had finished; the
                // store only keeps ids, so treat it as satisfied.
            }
            if let Some((dep, st)) = failed {
                if let Some(j) = self.active.get_mut(&id) {
                    j.rec.error = Some(Box::new(ErrorInfo::new(
                        "dependency_failed",
                        format!("dependency {dep} ended {st}"),
                    )));
                    let pool = j.pool;
                    match j.rec.state {
                        JobState::Queued => self.pools[pool].queued -= 1,
                        _ => self.pools[pool].delayed -= 1,
                    }
                }
                self.finish(id, JobState::Cancelled, None, ctx);
                continue;
            }
            if let Some(j) = self.active.get_mut(&id) {
                j.deps_left = left;
                if left > 0 && j.rec.state == JobState::Queued {
                    // Waiting for dependencies counts as delayed.
                    j.rec.state = JobState::Delayed;
                    let pool = j.pool;
                    self.pools[pool].queued -= 1;
                    self.pools[pool].delayed += 1;
                }
            }
        }
        for &id in &ids {
            let Some(j) = self.active.get(&id) else {
                continue;
            };
            match j.rec.state {
                JobState::Queued => self.push_entry(id),
                JobState::Delayed if j.deps_left == 0 => {
                    let run_at = j.rec.run_at;
                    let t = self.ready_timer(id, run_at, ctx);
                    if let Some(j) = self.active.get_mut(&id) {
                        j.timer = Some(t);
                    }
                }
                _ => {}
            }
            self.persist(id, ctx);
        }
        for pool in 0..self.pools.len() {
            self.pump(pool, ctx);
        }
    }

    /// Answer with a job's record from memory, else from the store.
    fn lookup(&mut self, id: JobId, reply: RecordWaiter) {
        if let Some(rec) = self.record(id) {
            reply.send(Ok(rec.clone()));
            return;
        }
        match &self.store {
            None => reply.send(Err(JobError::NotFound(id.to_string()))),
            Some(s) => s.addr.do_send(StoreRead::Get(
                id,
                Reply::with(move |r: Result<Option<JobRecord>, StoreError>| {
                    reply.send(match r {
                        Ok(Some(rec)) => Ok(rec),
                        Ok(None) => Err(JobError::NotFound(id.to_string())),
                        Err(e) => Err(JobError::Unavailable(e.0)),
                    })
                }),
            )),
        }
    }
}

/// Send the pending store changes (sent to itself, see `schedule_flush`).
struct Flush;

impl Message for Flush {
    type Result = ();
}

impl Handler<Flush> for Dispatcher {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        // Finished jobs not read yet join this batch.
        self.drain(ctx);
        if let Some(s) = &mut self.store {
            s.flush_scheduled = false;
        }
        self.flush();
    }
}

/// The store committed a batch (or failed to).
pub(crate) struct Committed {
    pub(crate) seq: u64,
    pub(crate) batch: Vec<Change>,
    pub(crate) result: Result<(), StoreError>,
}

impl Message for Committed {
    type Result = ();
}

impl Handler<Committed> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let Some(store) = &mut self.store else {
            return;
        };
        let admissions = match store.in_flight.take() {
            Some((seq, a)) if seq == msg.seq => a,
            other => {
                store.in_flight = other;
                return;
            }
        };
        match msg.result {
            Ok(()) => {
                if store.failing.take().is_some() {
                    tracing::warn!("store writes succeed again");
                }
                store.committed += msg.batch.len() as u64;
                for a in admissions {
                    match a {
                        Admission::One { id, ack, answer } => {
                            self.release(id, ctx);
                            if let Some(ack) = ack {
                                ack.send(Ok(answer));
                            }
                        }
                        Admission::Batch { ids, reply, answer } => {
                            for id in ids {
                                self.release(id, ctx);
                            }
                            reply.send(Ok(answer));
                        }
                    }
                }
                if self
                    .store
                    .as_ref()
                    .is_some_and(|s| !s.pending.is_empty() || !s.admissions.is_empty())
                {
                    self.flush();
                }
            }
            Err(e) => {
                if store.failing.is_none() {
                    tracing::error!(
                        "store write failed, new submissions are refused until it works again: {e}"
                    );
                }
                store.failing = Some(e.0.clone());
                // Submissions of this batch are refused; every other change
                // is written again later (a newer pending record of the same
                // job supersedes it).
                let mut refused = std::collections::HashSet::new();
                for a in admissions {
                    match a {
                        Admission::One { id, ack, .. } => {
                            refused.insert(id);
                            if let Some(ack) = ack {
                                ack.send(Err(JobError::Unavailable(e.0.clone())));
                            }
                        }
                        Admission::Batch { ids, reply, .. } => {
                            refused.extend(ids.iter().copied());
                            reply.send(Err(JobError::Unavailable(e.0.clone())));
                        }
                    }
                }
                let store = self.store.as_mut().expect("checked above: store is set");
                let newer = std::mem::take(&mut store.pending);
                let mut kept: Vec<Change> = msg
                    .batch
                    .into_iter()
                    .filter(|c| match c {
                        Change::Put(r) => {
                            !refused.contains(&r.id) && !store.slot.contains_key(&r.id)
                        }
                        Change::Paused(..) => true,
                        Change::Prune { .. } => false,
                    })
                    .collect();
                kept.extend(newer);
                store.slot = kept
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| match c {
                        Change::Put(r) => Some((r.id, i)),
                        _ => None,
                    })
                    .collect();
                store.pending = kept;
                let first_pool = self.pools.first().map(|p| (p.cfg.name.clone(), p.paused));
                for id in refused {
                    self.unadmit(id, &e.0, ctx);
                }
                // Try again in a while; with nothing to write, write a tiny
                // row so that recovery is noticed.
                ctx.run_later(STORE_RETRY, move |act, ctx| {
                    act.drain(ctx);
                    if let Some(s) = &mut act.store
                        && s.pending.is_empty()
                        && let Some((name, paused)) = first_pool.clone()
                    {
                        s.pending.push(Change::Paused(name, paused));
                    }
                    act.flush();
                    act.stop_when_flushed(ctx);
                });
            }
        }
        self.stop_when_flushed(ctx);
    }
}

/// A page read from the store, to be merged with what only memory knows.
struct ListLoaded {
    q: ListQuery,
    page: Result<ListPage, StoreError>,
    reply: Reply<ListPage>,
}

impl Message for ListLoaded {
    type Result = ();
}

impl Handler<ListLoaded> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: ListLoaded, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let mem = self.list(&msg.q);
        let Ok(stored) = msg.page else {
            msg.reply.send(mem);
            return;
        };
        let limit = msg.q.limit.unwrap_or(100).clamp(1, 10_000);
        let more = stored.cursor.is_some() || mem.cursor.is_some();
        let mut jobs: Vec<JobRecord> = stored
            .jobs
            .into_iter()
            .filter(|r| self.record(r.id).is_none())
            .chain(mem.jobs)
            .collect();
        if msg.q.oldest_first {
            jobs.sort_unstable_by_key(|r| r.id);
        } else {
            jobs.sort_unstable_by_key(|r| std::cmp::Reverse(r.id));
        }
        jobs.dedup_by_key(|r| r.id);
        let more = more || jobs.len() > limit;
        jobs.truncate(limit);
        msg.reply.send(ListPage {
            cursor: if more {
                jobs.last().map(|r| r.id)
            } else {
                None
            },
            jobs,
        });
    }
}

/// A job to retry, read back from the store.
struct RetryLoaded {
    id: JobId,
    found: Result<Option<JobRecord>, StoreError>,
    reply: Reply<Result<JobRecord, JobError>>,
}

impl Message for RetryLoaded {
    type Result = ();
}

impl Handler<RetryLoaded> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: RetryLoaded, ctx: &mut Context<Self>) {
        self.drain(ctx);
        match msg.found {
            Err(e) => msg.reply.send(Err(JobError::Unavailable(e.0))),
            Ok(None) => msg.reply.send(Err(JobError::NotFound(msg.id.to_string()))),
            Ok(Some(rec)) => {
                if self.record(msg.id).is_none() && rec.state.is_final() {
                    self.retain(rec);
                }
                msg.reply.send(self.retry(msg.id, ctx));
            }
        }
    }
}
