//! Pools: named `SyncArbiter`s of `Worker` sync actors. A worker runs one
//! job attempt at a time under `catch_unwind`, answers a direct waiter when
//! it owns the outcome, then reports to the Dispatcher (which hands it the
//! next job: credit-based dispatch). Workers never queue work themselves.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use serde_json::Value;

use crate::context::{AttemptShared, JobContext};
use crate::dispatcher::{AttemptDone, Dispatcher};
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
    /// Which SyncArbiter of the pool this worker belongs to: a resize starts
    /// a new one, and the Dispatcher gives no credit back for reports from
    /// an older one (those workers exit after their job).
    generation: u64,
    /// Keeps the live-thread count up while this worker exists.
    _guard: ThreadGuard,
}

impl Actor for Worker {
    type Context = SyncContext<Self>;
}

impl Handler<RunJob> for Worker {
    type Result = ();

    fn handle(&mut self, job: RunJob, _: &mut SyncContext<Self>) {
        let started = Instant::now();
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
        // Tell the Dispatcher first, answer the waiter second: whatever the
        // caller asks next (status, stats, wait) is then queued behind this
        // report and sees the job final. The reply still goes straight to
        // the caller, without a hop through the Dispatcher.
        self.dispatcher.do_send(AttemptDone {
            id: shared.id,
            attempt: shared.attempt,
            pool: self.pool_index,
            generation: self.generation,
            outcome,
            claimed,
            run_time,
        });
        if let Some((reply, answer)) = direct {
            reply.send(answer);
        }
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

/// Start a pool's SyncArbiter (generation `generation` of pool
/// `pool_index`). Must run inside the actix System.
///
/// Each thread is counted right before it is spawned, so a shutdown right
/// after start still waits for it. actix panics when the OS refuses a
/// thread; that panic is caught here: the threads already started exit
/// (their queue's sender is gone), the one that failed is uncounted, and
/// the error is returned instead of taking the Dispatcher down.
pub(crate) fn start_pool(
    cfg: &PoolConfig,
    pool_index: usize,
    generation: u64,
    dispatcher: Addr<Dispatcher>,
    threads: ThreadCount,
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
                generation,
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
