//! Pools: named `SyncArbiter`s of `Worker` sync actors. A worker runs one
//! job attempt at a time under `catch_unwind`, reports to the Dispatcher,
//! then answers a direct waiter when it owns the outcome. The Dispatcher
//! hands a pool a job only when one of its workers is idle (credit-based
//! dispatch). Workers never queue work themselves.
//!
//! Each pool shares a `PoolLink` with the Dispatcher:
//! - a handoff slot: while all of the pool's workers are busy the
//!   Dispatcher offers the best queued jobs there (a few, best first), and
//!   a worker that finishes takes the next one at once instead of going
//!   idle and waiting for the Dispatcher to notice and send another. Until
//!   a worker takes it the Dispatcher can take an offered job back (a
//!   higher priority arrived, cancel, pause, shutdown), so it stays queued
//!   in every way a user can see;
//! - a report inbox: workers file finished attempts there, and wake the
//!   Dispatcher (a `Wake` message) only when someone waits for the report:
//!   jobs wait for a worker, a waiter or a dependent job waits for this
//!   one, the attempt failed or was interrupted, the job taken next has a
//!   timeout to arm, a store wants the result committed soon, or the
//!   runtime is shutting down. Otherwise the Dispatcher reads the inbox
//!   first thing the next time it runs, before it answers anything. A
//!   `call` answered directly by its worker thus wakes the Dispatcher once
//!   (its submission), not twice.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use crossbeam_channel::{Receiver, Sender, unbounded};
use serde_json::Value;

use crate::context::{AttemptShared, JobContext};
use crate::dispatcher::{AttemptDone, Dispatcher, Wake};
use crate::error::JobError;
use crate::job::JobState;
use crate::registry::RawHandler;

/// Declared shape of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Pool name; threads are called `jobd-<name>-<n>`.
    pub name: String,
    /// Worker threads.
    pub threads: usize,
    /// Jobs that may wait (queued or delayed) in this pool before submits
    /// fail with `QueueFull`.
    pub max_queued: usize,
}

impl PoolConfig {
    /// A pool with `threads` workers and the default `max_queued` (10,000).
    pub fn new(name: impl Into<String>, threads: usize) -> Self {
        PoolConfig {
            name: name.into(),
            threads,
            max_queued: 10_000,
        }
    }
}

/// Why an attempt did not produce a result.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The handler returned an error.
    Error(String),
    /// The handler panicked.
    Panic(String),
}

/// How a panic's message starts in a job's record, so that a record read
/// back later still tells a panic from an error (`outcome_of`).
pub(crate) const PANIC_PREFIX: &str = "panicked: ";

impl Failure {
    pub(crate) fn message(&self) -> String {
        match self {
            Failure::Error(m) => m.clone(),
            Failure::Panic(m) => format!("{PANIC_PREFIX}{m}"),
        }
    }
}

/// One attempt for a worker to run.
pub(crate) struct RunJob {
    pub(crate) shared: Arc<AttemptShared>,
    pub(crate) handler: RawHandler,
    pub(crate) payload: Arc<Value>,
}

impl Message for RunJob {
    type Result = ();
}

/// How many queued jobs a pool's handoff slot holds at most: enough that
/// workers running short jobs rarely find it empty while jobs wait.
pub(crate) const OFFER_DEPTH: usize = 16;

/// What a pool's workers share with the Dispatcher (see the module doc).
pub(crate) struct PoolLink {
    /// Jobs offered to whichever worker finishes first, best first. The
    /// Dispatcher fills it only while none of the pool's workers is idle.
    slot: Mutex<VecDeque<RunJob>>,
    /// Finished attempts, in the order each worker finished them.
    reports: (Sender<AttemptDone>, Receiver<AttemptDone>),
    /// Jobs of this pool wait in the Dispatcher's queue: a worker that goes
    /// idle must wake the Dispatcher at once.
    starving: AtomicBool,
    /// Every report wakes the Dispatcher: the runtime is shutting down, or
    /// a store wants finished jobs committed soon.
    eager: AtomicBool,
}

impl Default for PoolLink {
    fn default() -> Self {
        PoolLink {
            slot: Mutex::new(VecDeque::new()),
            reports: unbounded(),
            starving: AtomicBool::new(false),
            eager: AtomicBool::new(false),
        }
    }
}

impl PoolLink {
    fn slot(&self) -> MutexGuard<'_, VecDeque<RunJob>> {
        // Nothing panics while holding this lock (it only moves jobs in and
        // out), so a poisoned lock still holds a consistent queue.
        match self.slot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Offer a job behind those offered already (the Dispatcher, in
    /// priority order).
    pub(crate) fn offer(&self, job: RunJob) {
        self.slot().push_back(job);
    }

    /// Take back every offered job no worker took yet (the Dispatcher).
    pub(crate) fn revoke(&self) -> VecDeque<RunJob> {
        std::mem::take(&mut *self.slot())
    }

    /// Take the best offered job, if any (a worker that just finished one).
    fn take(&self) -> Option<RunJob> {
        self.slot().pop_front()
    }

    /// The next report, if any (the Dispatcher).
    pub(crate) fn next_report(&self) -> Option<AttemptDone> {
        self.reports.1.try_recv().ok()
    }

    /// Say whether jobs wait for a worker (the Dispatcher). After raising
    /// it, the Dispatcher must read the inbox once more: a worker that read
    /// the old value may have gone idle without waking it.
    pub(crate) fn set_starving(&self, on: bool) {
        self.starving.store(on, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Make every later report wake the Dispatcher (the Dispatcher; it must
    /// read the inbox once more afterwards).
    pub(crate) fn set_eager(&self) {
        self.eager.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }
}

/// Counts live worker threads so shutdown can wait for them: actix detaches
/// SyncArbiter threads, so nothing else can.
#[derive(Clone, Default)]
pub(crate) struct ThreadCount(Arc<(Mutex<usize>, Condvar)>);

impl ThreadCount {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        // Only this module touches the counter and never panics holding it.
        match self.0.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Count `n` threads about to be spawned. Counting before the spawn
    /// (not in the thread) means a shutdown right after start still waits.
    pub(crate) fn add(&self, n: usize) {
        *self.lock() += n;
    }

    /// Take back `n` counted threads that were never spawned.
    fn sub(&self, n: usize) {
        let mut c = self.lock();
        *c = c.saturating_sub(n);
        self.0.1.notify_all();
    }

    /// A guard for a thread counted by `add`.
    pub(crate) fn guard(&self) -> ThreadGuard {
        ThreadGuard(self.clone())
    }

    /// Wait until no worker is alive or the deadline passes; the number
    /// still alive.
    pub(crate) fn wait_zero(&self, deadline: Instant) -> usize {
        let mut n = self.lock();
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = match self.0.1.wait_timeout(n, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        *n
    }
}

/// Held by each worker for the life of its thread.
pub(crate) struct ThreadGuard(ThreadCount);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        let mut n = self.0.lock();
        *n -= 1;
        self.0.0.1.notify_all();
    }
}

/// A pool thread's actor.
pub(crate) struct Worker {
    /// Name of the pool, shown to handlers.
    pool: Arc<str>,
    /// Where finished attempts are reported.
    dispatcher: Addr<Dispatcher>,
    /// Index of the pool in the Dispatcher's table.
    pool_index: usize,
    /// The handoff slot and report inbox shared with the Dispatcher.
    link: Arc<PoolLink>,
    /// Keeps the live-thread count up while this worker exists.
    _guard: ThreadGuard,
}

impl Actor for Worker {
    type Context = SyncContext<Self>;
}

impl Handler<RunJob> for Worker {
    type Result = ();

    fn handle(&mut self, job: RunJob, _: &mut SyncContext<Self>) {
        let mut next = Some(job);
        while let Some(job) = next {
            next = self.run(job);
        }
    }
}

impl Worker {
    /// Run one attempt, report it, answer its direct waiter; then the job
    /// this worker took from the handoff slot meanwhile, if any.
    fn run(&mut self, job: RunJob) -> Option<RunJob> {
        let started = job.shared.start();
        let ctx = JobContext {
            shared: &job.shared,
            pool: &self.pool,
        };
        let outcome = match catch_unwind(AssertUnwindSafe(|| (job.handler)(&ctx, &job.payload))) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(m)) => Err(Failure::Error(m)),
            Err(panic) => Err(Failure::Panic(panic_message(panic.as_ref()))),
        };
        let run_time = started.elapsed();
        let shared = &job.shared;
        // Past its deadline the attempt is the timeout's to end, even when
        // the handler noticed first (`claim_finished` refuses then).
        let claimed = shared.claim_finished();
        let direct = if claimed && (outcome.is_ok() || shared.last_attempt) {
            shared
                .take_direct()
                .map(|reply| (reply, outcome.clone().map_err(|f| final_error(shared, &f))))
        } else {
            None
        };
        // Take the next offered job before reporting, so that the report
        // says so: the Dispatcher then counts this worker busy with it.
        let next = self.link.take();
        let took = next.as_ref().map(|n| {
            n.shared.start();
            (n.shared.id, n.shared.attempt)
        });
        // Whether someone waits for this report (see the module doc).
        let mut urgent =
            !claimed || outcome.is_err() || next.as_ref().is_some_and(|n| n.shared.has_timeout());
        // Report first, answer the waiter second: whatever the caller asks
        // next (status, stats, wait) is handled after the Dispatcher read
        // this report, and sees the job final. The reply still goes straight
        // to the caller, without a hop through the Dispatcher.
        let _ = self.link.reports.0.send(AttemptDone {
            id: shared.id,
            attempt: shared.attempt,
            pool: self.pool_index,
            outcome,
            claimed,
            run_time,
            took,
        });
        // Read the flags only now that the report is in (pairs with the
        // fence in `set_starving` and friends): either we see a flag raised,
        // or the Dispatcher finds this report when it reads the inbox after
        // raising it.
        fence(Ordering::SeqCst);
        urgent = urgent
            || shared.must_notify()
            || (next.is_none() && self.link.starving.load(Ordering::SeqCst))
            || self.link.eager.load(Ordering::SeqCst);
        if urgent {
            self.dispatcher.do_send(Wake);
        }
        if let Some((reply, answer)) = direct {
            reply.send(answer);
        }
        next
    }
}

/// The error a waiter gets when the last attempt failed this way.
pub(crate) fn final_error(shared: &AttemptShared, f: &Failure) -> JobError {
    match f {
        Failure::Panic(m) => JobError::Panicked {
            id: shared.id,
            message: m.clone(),
        },
        Failure::Error(m) => JobError::Failed {
            id: shared.id,
            message: m.clone(),
            state: if shared.attempt > 1 {
                JobState::Dead
            } else {
                JobState::Failed
            },
        },
    }
}

/// The message of a caught panic (`&str` and `String` payloads).
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Start a pool's SyncArbiter, its workers sharing `link` with the
/// Dispatcher. Must run inside the actix System.
///
/// Each thread is counted right before it is spawned, so a shutdown right
/// after start still waits for it. actix panics when the OS refuses a
/// thread; that panic is caught here: the threads already started exit
/// (their queue's sender is gone), the one that failed is uncounted, and
/// the error is returned instead of taking the Dispatcher down.
pub(crate) fn start_pool(
    cfg: &PoolConfig,
    pool_index: usize,
    dispatcher: Addr<Dispatcher>,
    threads: ThreadCount,
    link: Arc<PoolLink>,
) -> Result<Addr<Worker>, String> {
    let name: Arc<str> = Arc::from(cfg.name.as_str());
    let counter = AtomicUsize::new(0);
    let thread_name = name.clone();
    let counted = threads.clone();
    let spawned = catch_unwind(AssertUnwindSafe(|| {
        SyncArbiter::start_with_thread_builder(
            cfg.threads,
            || {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                counted.add(1);
                std::thread::Builder::new().name(format!("jobd-{thread_name}-{n}"))
            },
            move || Worker {
                pool: name.clone(),
                dispatcher: dispatcher.clone(),
                pool_index,
                link: link.clone(),
                // Workers are never stopped (panics are caught), so actix
                // calls this factory exactly once per thread: one guard per
                // thread counted above.
                _guard: ThreadGuard(threads.clone()),
            },
        )
    }));
    spawned.map_err(|panic| {
        // The thread whose spawn failed was counted but never started.
        counted.sub(1);
        format!(
            "cannot start the threads of pool '{}': {}",
            cfg.name,
            panic_message(panic.as_ref())
        )
    })
}

/// How long a shutdown waits for threads that already left their loop.
pub(crate) const THREAD_EXIT_GRACE: Duration = Duration::from_secs(2);
