//! Helpers shared by the jobd-actors integration tests: a `Gate` that holds
//! handlers until the test releases them (so tests order events with
//! channels, not sleeps), ready-made gated and recording handlers, the
//! runtimes most tests start from them (`held_pool`; `held_worker`, whose
//! only worker is held busy), starting an app actor on the runtime's
//! System (`start_actor`), thread counting through `/proc/self/task`, and
//! polling with a deadline.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Context};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use jobd_actors::{Handle, JobContext, JobId, JobOptions, Runtime};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Long enough for anything that should happen "at once" on a loaded
/// 2-core CI machine, short enough to fail a hung test quickly.
pub const LONG: Duration = Duration::from_secs(10);

/// Holds handlers until released. A held handler reports its job id on
/// `started` as soon as it runs, then blocks until `release` (any one held
/// job), `release_job` (that job) or `release_n`.
#[derive(Clone)]
pub struct Gate {
    started_tx: Sender<JobId>,
    started_rx: Receiver<JobId>,
    released: Arc<(Mutex<Released>, Condvar)>,
}

#[derive(Default)]
struct Released {
    /// Releases for whichever held job takes them.
    any: usize,
    /// Releases for particular jobs.
    jobs: HashSet<JobId>,
}

impl Gate {
    /// A gate with nobody held.
    pub fn new() -> Self {
        let (started_tx, started_rx) = unbounded();
        Gate {
            started_tx,
            started_rx,
            released: Arc::default(),
        }
    }

    /// Called from a handler: say "I started", then block until released.
    /// Gives up after `LONG` so a failing test cannot hang the suite.
    pub fn hold(&self, ctx: &JobContext<'_>) {
        let _ = self.started_tx.send(ctx.id());
        let (lock, cv) = &*self.released;
        let until = Instant::now() + LONG;
        let mut r = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if r.jobs.remove(&ctx.id()) {
                return;
            }
            if r.any > 0 {
                r.any -= 1;
                return;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            r = cv
                .wait_timeout(r, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Submit a `kind` job (payload `()`) whose handler holds on this gate,
    /// and wait until it runs: its worker is now busy. Its id.
    pub fn occupy(&self, h: &Handle, kind: &str) -> JobId {
        let id = h.submit(kind, &(), JobOptions::default()).unwrap();
        assert_eq!(self.started(), id, "the submitted job is the one held");
        id
    }

    /// Wait until some held handler started; its job id.
    pub fn started(&self) -> JobId {
        self.started_rx
            .recv_timeout(LONG)
            .expect("a held handler should have started")
    }

    /// True if no held handler started within `d`.
    pub fn none_started_within(&self, d: Duration) -> bool {
        matches!(
            self.started_rx.recv_timeout(d),
            Err(RecvTimeoutError::Timeout)
        )
    }

    fn update(&self, f: impl FnOnce(&mut Released)) {
        let (lock, cv) = &*self.released;
        f(&mut lock.lock().unwrap_or_else(|p| p.into_inner()));
        cv.notify_all();
    }

    /// Let one held handler (any) return.
    pub fn release(&self) {
        self.release_n(1);
    }

    /// Let `n` held handlers (any) return.
    pub fn release_n(&self, n: usize) {
        self.update(|r| r.any += n);
    }

    /// Let the handler of job `id` return.
    pub fn release_job(&self, id: JobId) {
        self.update(|r| {
            r.jobs.insert(id);
        });
    }
}

/// A handler that holds on `gate` (its worker stays busy until the test
/// releases it), then returns its payload. Register it like any other:
/// `.handler("hold", "p", held::<u32>(&gate))`.
pub fn held<T>(
    gate: &Gate,
) -> impl Fn(&JobContext<'_>, T) -> Result<T, String> + Send + Sync + use<T>
where
    T: Serialize + DeserializeOwned,
{
    let gate = gate.clone();
    move |ctx, x| {
        gate.hold(ctx);
        Ok(x)
    }
}

/// A handler that ignores cancellation: it holds on `gate`, then sends on
/// `seen` whether it was told to stop by then (`ctx.is_cancelled()`).
pub fn held_then_report_cancel(
    gate: &Gate,
    seen: Sender<bool>,
) -> impl Fn(&JobContext<'_>, ()) -> Result<(), String> + Send + Sync + use<> {
    let gate = gate.clone();
    move |ctx, ()| {
        gate.hold(ctx);
        let _ = seen.send(ctx.is_cancelled());
        Ok(())
    }
}

/// A handler that sends its payload on `ran`, so the test sees which jobs
/// ran and in what order.
pub fn recorded<T>(
    ran: Sender<T>,
) -> impl Fn(&JobContext<'_>, T) -> Result<(), String> + Send + Sync + use<T>
where
    T: DeserializeOwned + Send,
{
    move |_ctx, x| ran.send(x).map_err(|e| e.to_string())
}

/// A started runtime with one pool `pool` of `threads` workers and a kind
/// `hold` on it that holds on the returned gate, then returns its payload
/// `T` (see [`held`]); and its handle.
pub fn held_pool<T>(pool: &str, threads: usize) -> (Runtime, Handle, Gate)
where
    T: Serialize + DeserializeOwned + 'static,
{
    let gate = Gate::new();
    let rt = Runtime::builder()
        .pool(pool, threads)
        .handler("hold", pool, held::<T>(&gate))
        .start()
        .unwrap();
    let h = rt.handle();
    (rt, h, gate)
}

/// A started runtime whose one-worker pool is held busy by a `hold` job,
/// with a kind on the same pool that records its payloads on `ran`: jobs
/// of that kind submitted now queue up until the test releases the gate,
/// then run in the order the runtime picks. Its fields are all of
/// different types, so a destructuring in the wrong order does not compile.
pub struct HeldWorker<T>(
    /// The runtime; shut it down at the end of the test.
    pub Runtime,
    /// Its handle.
    pub Handle,
    /// The gate the `hold` job waits on.
    pub Gate,
    /// The running `hold` job.
    pub JobId,
    /// The payloads of the recording kind's jobs that ran, in order.
    pub Receiver<T>,
);

/// Start a [`HeldWorker`] with a one-worker pool `pool` and the recording
/// kind `kind`.
pub fn held_worker<T>(pool: &str, kind: &str) -> HeldWorker<T>
where
    T: DeserializeOwned + Send + 'static,
{
    let gate = Gate::new();
    let (ran_tx, ran) = unbounded();
    let rt = Runtime::builder()
        .pool(pool, 1)
        .handler("hold", pool, held::<()>(&gate))
        .handler(kind, pool, recorded::<T>(ran_tx))
        .start()
        .unwrap();
    let h = rt.handle();
    let holder = gate.occupy(&h, "hold");
    HeldWorker(rt, h, gate, holder, ran)
}

/// Start the actor `make` builds (from a clone of `h`) on the runtime's
/// System, where its futures run; its address.
pub fn start_actor<A>(h: &Handle, make: impl FnOnce(Handle) -> A + Send + 'static) -> Addr<A>
where
    A: Actor<Context = Context<A>>,
{
    let h2 = h.clone();
    h.run(move || async move { make(h2).start() }, LONG)
        .expect("the runtime's System is running")
}

/// The names (`comm`, at most 15 bytes) of this process's threads.
pub fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task is readable") {
        let Ok(entry) = entry else { continue };
        // A thread may exit between read_dir and the read: skip it.
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            names.push(comm.trim_end().to_string());
        }
    }
    names
}

/// Number of threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task is readable")
        .count()
}

/// Number of threads whose name starts with `prefix`.
pub fn threads_named(prefix: &str) -> usize {
    thread_names()
        .iter()
        .filter(|n| n.starts_with(prefix))
        .count()
}

/// Poll `f` every few milliseconds until it is true or `within` passed;
/// whether it became true.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Assert that exactly `n` threads are named `prefix…`. A new thread names
/// itself once it runs, a moment after it was spawned: poll for that.
pub fn assert_threads_named(prefix: &str, n: usize) {
    assert!(
        eventually(LONG, || threads_named(prefix) == n),
        "expected {n} threads named {prefix}*: {:?}",
        thread_names()
    );
}
