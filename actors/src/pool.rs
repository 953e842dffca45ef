//! Pools: named `SyncArbiter`s of `Worker` sync actors. A worker runs one
//! job attempt at a time under `catch_unwind`, reports to the Dispatcher,
//! then answers a direct waiter when it owns the outcome. The Dispatcher
//! hands a pool a job only when one of its workers is idle (credit-based
//! dispatch). Workers never queue work themselves.
//!
//! Each pool shares a `PoolLink` with the Dispatcher (and with `Handle`):
//! - the pool's credit, `free`: how many of its workers are idle. A worker
//!   gives its credit back itself when it finds nothing more to run; the
//!   Dispatcher takes one for each job it hands over. Idle workers wait on
//!   the link's own job channel (SyncArbiter starts and names the threads,
//!   then each one serves that channel), so a job handed over wakes its
//!   worker directly, with no hop through the SyncArbiter's mailbox;
//! - the express gate: while the pool has nothing queued, is not paused,
//!   the runtime has no durable store and is not shutting down, a caller
//!   of `Handle::call` may take a credit itself and hand its job straight
//!   to an idle worker (two thread hops instead of three). It files the
//!   job in the report inbox first (`Report::Adopt`), so the Dispatcher
//!   learns of it before the job's own report and before it answers any
//!   question about it: the Dispatcher still owns every job's state, it
//!   only adopts a job that started without it. Taking a credit and
//!   closing the gate are one atomic word, so a caller never takes a
//!   worker that a queued job was owed;
//! - a handoff slot: while all of the pool's workers are busy the
//!   Dispatcher offers the best queued jobs there (a few, best first), and
//!   a worker that finishes takes the next one at once instead of going
//!   idle and waiting for the Dispatcher to notice and send another. Until
//!   a worker takes it the Dispatcher can take an offered job back (a
//!   higher priority arrived, cancel, pause, shutdown), so it stays queued
//!   in every way a user can see. A worker gives its credit back and the
//!   Dispatcher offers a job under the slot's lock, so a job is never
//!   offered while a worker sits idle;
//! - a report inbox: workers file finished attempts there, and wake the
//!   Dispatcher (a `Wake` message) only when someone waits for the report:
//!   jobs wait for a worker, a waiter or a dependent job waits for this
//!   one, the attempt failed or was interrupted, the job taken next has a
//!   timeout to arm, the runtime is shutting down, or the inbox grew long. Otherwise the Dispatcher
//!   reads the inbox first thing the next time it runs (at the latest
//!   within a second), before it answers anything. A `call` answered
//!   directly by its worker thus wakes the Dispatcher once at most.

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
use crate::job::{JobId, JobOptions, JobState};
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

/// What an idle worker receives on its pool's job channel.
enum Order {
    /// Run this attempt.
    Run(RunJob),
    /// The link was retired (resize, shutdown): leave the pool.
    Exit,
}

/// A job that a `Handle::call` caller started itself on an idle worker
/// (see the module doc), filed for the Dispatcher to adopt.
pub(crate) struct Adopted {
    pub(crate) id: JobId,
    /// The kind's shared name.
    pub(crate) kind: Arc<str>,
    /// Index of the pool in the Dispatcher's table.
    pub(crate) pool: usize,
    pub(crate) payload: Arc<Value>,
    /// The attempt, shared with the worker running it.
    pub(crate) shared: Arc<AttemptShared>,
    /// The submission's options (no delay, timeout, unique key or
    /// dependencies: those jobs take the Dispatcher's path).
    pub(crate) options: JobOptions,
    /// When the caller submitted it (ms since the epoch).
    pub(crate) created_at: u64,
}

/// An entry of a pool's report inbox.
pub(crate) enum Report {
    /// A worker finished an attempt.
    Done(AttemptDone),
    /// A caller started a job itself; always filed before its `Done`.
    Adopt(Box<Adopted>),
}

/// How many queued jobs a pool's handoff slot holds at most: enough that
/// workers running short jobs rarely find it empty while jobs wait.
pub(crate) const OFFER_DEPTH: usize = 16;

/// Reports that may pile up in an inbox before the one filing the next
/// wakes the Dispatcher anyway (bounds the memory held by express calls
/// that nobody asks about).
const INBOX_WAKE: usize = 128;

/// In `PoolLink::free`: callers may not take credits themselves.
const GATE_CLOSED: usize = 1 << (usize::BITS - 1);

/// The handoff slot, and whether the link was retired.
#[derive(Default)]
struct Slot {
    offers: VecDeque<RunJob>,
    retired: bool,
}

/// What a worker does after an attempt.
enum After {
    /// Run this offered job next (the worker stays busy).
    Next(RunJob),
    /// Nothing offered: the worker's credit is back, it waits for a job.
    Idle,
    /// Nothing offered and the link is retired: the worker leaves.
    Exit,
}

/// What a pool's workers share with the Dispatcher (see the module doc).
pub(crate) struct PoolLink {
    /// Idle workers, with `GATE_CLOSED` set while express starts are off.
    free: AtomicUsize,
    /// Jobs (and exit orders) for idle workers.
    jobs: (Sender<Order>, Receiver<Order>),
    /// Jobs offered to whichever worker finishes first, best first. The
    /// Dispatcher fills it only while none of the pool's workers is idle.
    slot: Mutex<Slot>,
    /// Finished attempts and adopted jobs, in the order they were filed.
    reports: (Sender<Report>, Receiver<Report>),
    /// Jobs of this pool wait in the Dispatcher's queue: a worker that goes
    /// idle must wake the Dispatcher at once.
    starving: AtomicBool,
    /// Every report wakes the Dispatcher: the runtime is shutting down (or
    /// the link was retired).
    eager: AtomicBool,
}

impl PoolLink {
    /// The link of a pool of `threads` workers, all idle, express gate
    /// closed (the Dispatcher opens it).
    pub(crate) fn new(threads: usize) -> Self {
        PoolLink {
            free: AtomicUsize::new(threads | GATE_CLOSED),
            jobs: unbounded(),
            slot: Mutex::new(Slot::default()),
            reports: unbounded(),
            starving: AtomicBool::new(false),
            eager: AtomicBool::new(false),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        // Nothing panics while holding this lock (it only moves jobs in and
        // out), so a poisoned lock still holds a consistent queue.
        match self.slot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Idle workers right now.
    pub(crate) fn idle(&self) -> usize {
        self.free.load(Ordering::SeqCst) & !GATE_CLOSED
    }

    /// Take the credit of an idle worker, if any. `express`: only while
    /// the gate is open (a caller); otherwise whatever the gate (the
    /// Dispatcher, which then must hand the worker a job).
    pub(crate) fn claim(&self, express: bool) -> bool {
        self.free
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| {
                let idle = f & !GATE_CLOSED;
                let shut = express && f & GATE_CLOSED != 0;
                (idle > 0 && !shut).then(|| f - 1)
            })
            .is_ok()
    }

    /// Open or close the express gate (the Dispatcher).
    pub(crate) fn set_express(&self, open: bool) {
        if open {
            self.free.fetch_and(!GATE_CLOSED, Ordering::SeqCst);
        } else {
            self.free.fetch_or(GATE_CLOSED, Ordering::SeqCst);
        }
    }

    /// Hand a job to an idle worker whose credit the sender took.
    pub(crate) fn send(&self, job: RunJob) {
        // The receiver lives in this link, so sending cannot fail.
        let _ = self.jobs.0.send(Order::Run(job));
    }

    /// Offer a job behind those offered already (the Dispatcher, in
    /// priority order), unless a worker is idle or the link retired: then
    /// the job comes back, to be handed over the ordinary way.
    pub(crate) fn offer(&self, job: RunJob) -> Result<(), RunJob> {
        let mut slot = self.slot();
        if slot.retired || self.idle() > 0 {
            return Err(job);
        }
        slot.offers.push_back(job);
        Ok(())
    }

    /// Take back every offered job no worker took yet (the Dispatcher).
    pub(crate) fn revoke(&self) -> VecDeque<RunJob> {
        std::mem::take(&mut self.slot().offers)
    }

    /// A worker finished an attempt: take the best offered job, or else
    /// give its credit back (or leave, once the link is retired), and file
    /// the attempt's report, which says which job it took (`report` makes
    /// it). All under the slot's lock: when `retire` runs, the report of
    /// every worker whose credit was back is in the inbox already, and
    /// every report filed after it comes from a worker counted busy. True
    /// when the inbox grew long (see `file`).
    fn after_attempt(
        &self,
        report: impl FnOnce(Option<&RunJob>, bool) -> AttemptDone,
    ) -> (After, bool) {
        let mut slot = self.slot();
        let after = if let Some(job) = slot.offers.pop_front() {
            After::Next(job)
        } else if slot.retired {
            After::Exit
        } else {
            self.free.fetch_add(1, Ordering::SeqCst);
            After::Idle
        };
        let next = match &after {
            After::Next(n) => Some(n),
            _ => None,
        };
        let leaving = matches!(after, After::Exit);
        let long = self.file(Report::Done(report(next, leaving)));
        drop(slot);
        (after, long)
    }

    /// Retire the link (resize, shutdown): no new job comes through it,
    /// its idle workers exit now and its busy ones after their job. Returns
    /// how many workers were idle. Offers must have been revoked. Idempotent.
    pub(crate) fn retire(&self) -> usize {
        let idle = {
            let mut slot = self.slot();
            slot.retired = true;
            self.free.swap(GATE_CLOSED, Ordering::SeqCst) & !GATE_CLOSED
        };
        // A credit a caller took before the swap comes with a job: its
        // worker runs it, then finds the link retired and exits.
        for _ in 0..idle {
            let _ = self.jobs.0.send(Order::Exit);
        }
        idle
    }

    /// File a report; true when the inbox grew long enough that the
    /// Dispatcher should be woken to read it.
    pub(crate) fn file(&self, report: Report) -> bool {
        let _ = self.reports.0.send(report);
        self.reports.1.len() >= INBOX_WAKE
    }

    /// The next report, if any (the Dispatcher).
    pub(crate) fn next_report(&self) -> Option<Report> {
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

/// Sent once to each worker when its pool starts: serve the pool's job
/// channel until the link is retired.
pub(crate) struct Serve;

impl Message for Serve {
    type Result = ();
}

impl Handler<Serve> for Worker {
    type Result = ();

    fn handle(&mut self, _: Serve, _: &mut SyncContext<Self>) {
        let link = self.link.clone();
        while let Ok(Order::Run(job)) = link.jobs.1.recv() {
            let mut job = job;
            loop {
                match self.run(job) {
                    After::Next(next) => job = next,
                    After::Idle => break,
                    After::Exit => return,
                }
            }
        }
    }
}

impl Worker {
    /// Run one attempt, report it, answer its direct waiter; then say what
    /// comes next: the job this worker took from the handoff slot, waiting
    /// idle, or leaving a retired pool.
    fn run(&mut self, job: RunJob) -> After {
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
        // Whether someone waits for this report (see the module doc).
        let mut urgent = !claimed || outcome.is_err();
        // Take the next offered job (or give the credit back) as the report
        // is filed, so that the report says so: the Dispatcher then counts
        // this worker busy with it. Report first, answer the waiter second:
        // whatever the caller asks next (status, stats, wait) is handled
        // after the Dispatcher read this report, and sees the job final.
        // The reply still goes straight to the caller, without a hop
        // through the Dispatcher.
        let pool = self.pool_index;
        let (after, long) = self.link.after_attempt(|next, leaving| {
            let took = next.map(|n| {
                n.shared.start();
                urgent |= n.shared.has_timeout();
                (n.shared.id, n.shared.attempt)
            });
            AttemptDone {
                id: shared.id,
                attempt: shared.attempt,
                pool,
                outcome,
                claimed,
                run_time,
                took,
                leaving,
            }
        });
        urgent |= long;
        let took_next = matches!(after, After::Next(_));
        // Read the flags only now that the report is in (pairs with the
        // fence in `set_starving` and friends): either we see a flag raised,
        // or the Dispatcher finds this report when it reads the inbox after
        // raising it.
        fence(Ordering::SeqCst);
        urgent = urgent
            || shared.must_notify()
            || (!took_next && self.link.starving.load(Ordering::SeqCst))
            || self.link.eager.load(Ordering::SeqCst);
        if urgent {
            self.dispatcher.do_send(Wake);
        }
        if let Some((reply, answer)) = direct {
            reply.send(answer);
        }
        after
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
    let addr = spawned.map_err(|panic| {
        // The thread whose spawn failed was counted but never started.
        counted.sub(1);
        format!(
            "cannot start the threads of pool '{}': {}",
            cfg.name,
            panic_message(panic.as_ref())
        )
    })?;
    // One `Serve` per thread: a worker serving the job channel takes no
    // other message, so each thread gets exactly one.
    for _ in 0..cfg.threads {
        addr.do_send(Serve);
    }
    Ok(addr)
}

/// How long a shutdown waits for threads that already left their loop.
pub(crate) const THREAD_EXIT_GRACE: Duration = Duration::from_secs(2);
