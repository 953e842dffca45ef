//! What the Dispatcher keeps about pools and jobs: a pool's queue, counts
//! and links (`PoolState`), a job that is not final yet (`Active`) with its
//! queue entry, ready stamp and waiters, the maps keyed by job id, and the
//! store link with the admissions waiting for a commit. Only small helpers
//! on these types live here; what the Dispatcher does with them lives in
//! the sibling modules.

use super::*;

/// A pool as the Dispatcher tracks it.
pub(crate) struct PoolState {
    /// Declared shape.
    pub(crate) cfg: PoolConfig,
    /// Its name, shared by the records of its jobs.
    pub(super) name: Arc<str>,
    /// The SyncArbiter's address; set once the pool is started.
    pub(crate) addr: Option<Addr<Worker>>,
    /// Ready jobs, highest priority first, FIFO within a priority. May hold
    /// stale entries (cancelled jobs); `seq` tells them apart.
    pub(super) queue: BinaryHeap<QueueEntry>,
    /// Jobs in the queue that are really queued (not stale).
    pub(super) queued: usize,
    /// Jobs waiting for time or dependencies.
    pub(super) delayed: usize,
    /// Jobs in state running.
    pub(super) running: usize,
    /// Paused pools start nothing.
    pub(super) paused: bool,
    /// Event counters.
    pub(super) counters: crate::stats::Counters,
    /// The handoff slot and report inbox shared with the pool's workers.
    pub(crate) link: Arc<PoolLink>,
    /// The queued jobs offered in the handoff slot (id, priority), in the
    /// order offered, as far as we know: workers may have taken some.
    pub(super) offered: Vec<(JobId, i32)>,
    /// What we last told the workers through `PoolLink::set_starving`.
    pub(super) starving: bool,
    /// Whether the express gate is open (`PoolLink::set_express`).
    pub(super) express: bool,
    /// Links of the pool's earlier sizes (see `resize`), each with how many
    /// of its workers still run a job. Those workers take no new job (their
    /// handoff slot stays empty) and exit after the one they have; a link
    /// is dropped once none of its workers is busy.
    pub(super) retired: Vec<(Arc<PoolLink>, usize)>,
}

impl PoolState {
    pub(crate) fn new(cfg: PoolConfig) -> Self {
        PoolState {
            link: Arc::new(PoolLink::new(cfg.threads)),
            name: Arc::from(cfg.name.as_str()),
            cfg,
            addr: None,
            queue: BinaryHeap::new(),
            queued: 0,
            delayed: 0,
            running: 0,
            paused: false,
            counters: Default::default(),
            offered: Vec::new(),
            starving: false,
            express: false,
            retired: Vec::new(),
        }
    }

    /// Workers of earlier sizes still running a job.
    pub(super) fn retiring(&self) -> usize {
        self.retired.iter().map(|(_, busy)| busy).sum()
    }
}

#[derive(PartialEq, Eq)]
pub(super) struct QueueEntry {
    pub(super) priority: i32,
    pub(super) seq: u64,
    pub(super) id: JobId,
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

pub(super) type RecordWaiter = Reply<Result<JobRecord, JobError>>;

/// A map keyed by job id. Ids come from a counter, never from a client, so
/// a multiplication hashes them well enough; SipHash cost more than the
/// rest of a map lookup on the hot path.
pub(super) type IdMap<V> = HashMap<JobId, V, BuildHasherDefault<FastHasher>>;

/// Per-kind totals, keyed by registered kind names (admission rejects any
/// other name before a lookup here), so the same cheap hash is safe.
pub(super) type KindMap = HashMap<String, KindTotals, BuildHasherDefault<FastHasher>>;

/// Fibonacci hashing: fold each word in, multiply by 2^64 / golden ratio.
/// High and low bits both change with every input, as hashbrown needs.
/// Not for keys an attacker chooses.
#[derive(Default)]
pub(super) struct FastHasher(u64);

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
pub(super) struct Waiter {
    /// Names the wait so that its expiry finds it (0: it never expires).
    pub(super) token: u64,
    /// Answered with the final record (or why there is none).
    pub(super) reply: RecordWaiter,
    /// The expiry timer, cancelled when the job ends first.
    pub(super) timer: Option<SpawnHandle>,
}

impl Waiter {
    /// Answer the waiter and stop its expiry timer.
    pub(super) fn send(self, r: Result<JobRecord, JobError>, ctx: &mut Context<Dispatcher>) {
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
pub(super) struct Waiters(Option<Box<Vec<Waiter>>>);

impl Waiters {
    pub(super) fn push(&mut self, w: Waiter) {
        self.0.get_or_insert_with(Default::default).push(w);
    }

    /// All of them, leaving none.
    pub(super) fn take(&mut self) -> Vec<Waiter> {
        self.0.take().map(|b| *b).unwrap_or_default()
    }

    pub(super) fn swap_remove(&mut self, i: usize) -> Option<Waiter> {
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
pub(super) struct Direct(Option<Box<DirectReply>>);

impl Direct {
    /// Keep `d` when there is one (an attempt gives back a reply it held;
    /// one it never held leaves the job's own in place).
    pub(super) fn set(&mut self, d: Option<DirectReply>) {
        if let Some(d) = d {
            self.0 = Some(Box::new(d));
        }
    }

    pub(super) fn take(&mut self) -> Option<DirectReply> {
        self.0.take().map(|b| *b)
    }

    pub(super) fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

/// When a job became ready, in nanoseconds since the first job did: half
/// the size of an `Instant`, in a struct there is one of per queued job.
#[derive(Clone, Copy)]
pub(super) struct Stamp(u64);

/// The origin of every `Stamp`.
static STAMP_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

impl Stamp {
    pub(super) fn now() -> Stamp {
        let epoch = *STAMP_EPOCH.get_or_init(Instant::now);
        Stamp(epoch.elapsed().as_nanos() as u64)
    }

    /// Time from this stamp to `t` (zero if `t` is earlier).
    pub(super) fn until(self, t: Instant) -> Duration {
        let epoch = *STAMP_EPOCH.get_or_init(Instant::now);
        t.saturating_duration_since(epoch)
            .saturating_sub(Duration::from_nanos(self.0))
    }
}

/// A job that is not final yet. One per queued job: keep it small.
pub(super) struct Active {
    pub(super) rec: JobRecord,
    /// Index into `pools`.
    pub(super) pool: usize,
    /// Stamp of its current queue entry.
    pub(super) seq: u64,
    /// When it became ready (for the queue-wait histogram).
    pub(super) ready_at: Stamp,
    /// Its delay, retry or timeout timer.
    pub(super) timer: Option<SpawnHandle>,
    /// The running attempt, shared with the worker.
    pub(super) attempt: Option<Arc<AttemptShared>>,
    /// A `call` waiter while the job is not running (moves into the
    /// attempt while it runs).
    pub(super) direct: Direct,
    /// `wait` callers.
    pub(super) waiters: Waiters,
    /// Dependencies not yet succeeded.
    pub(super) deps_left: u32,
    /// Admitted but not yet committed to the store: it may not run yet.
    pub(super) held: bool,
    /// Its submitter waits for the outcome, which is also its only
    /// acknowledgement: with a store the job runs at once, without waiting
    /// for its insert to commit, and the outcome is sent once the job's
    /// final record has committed (see `Dispatcher::submit`).
    pub(super) answer_on_commit: bool,
}

impl Active {
    /// A job in memory with its record (new, retried, or recovered from
    /// the store): no timer, attempt, waiter or dependency yet, not held.
    pub(super) fn new(rec: JobRecord, pool: usize) -> Box<Self> {
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
            answer_on_commit: false,
        })
    }
}

/// The Dispatcher's side of the store: changes waiting to be committed,
/// the batch in flight, and what to do once a batch is committed.
pub(crate) struct StoreLink {
    /// The store's thread.
    pub(crate) addr: Addr<StoreActor>,
    /// Changes not sent yet, in order.
    pub(super) pending: Vec<Change>,
    /// job → index of its `Put` in `pending`: a newer record of the same job
    /// replaces the older one, so a job that is submitted, started and
    /// finished within one batch is written once.
    pub(super) slot: IdMap<usize>,
    /// Admissions waiting for `pending` to commit.
    pub(super) admissions: Vec<Admission>,
    /// The batch in flight: its number, and the admissions it carries.
    pub(super) in_flight: Option<(u64, Vec<Admission>)>,
    /// Last batch number used.
    pub(super) seq: u64,
    /// Why the last commit failed, until one succeeds again.
    pub(super) failing: Option<String>,
    /// Store size in bytes, kept up to date by the store thread.
    pub(crate) size: Arc<std::sync::atomic::AtomicU64>,
    /// Changes committed so far.
    pub(super) committed: u64,
    /// A `Flush` is on its way to the Dispatcher.
    pub(super) flush_scheduled: bool,
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
pub(super) enum Admission {
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
    /// The outcome of a job that answers on commit, sent once its final
    /// record is committed.
    Outcome {
        reply: DirectReply,
        outcome: Outcome,
    },
}
