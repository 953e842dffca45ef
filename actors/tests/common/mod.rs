//! Helpers shared by the jobd-actors integration tests: a `Gate` that holds
//! handlers until the test releases them (so tests order events with
//! channels, not sleeps), `TestKinds` to register gated and recording kinds
//! on a runtime in one line each, thread counting through
//! `/proc/self/task`, and polling with a deadline.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use jobd_actors::{Handle, JobContext, JobId, JobOptions, RuntimeBuilder};
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

/// The kinds most tests build their runtime from, registered on a
/// `RuntimeBuilder` beside the test's own handlers:
///
/// ```ignore
/// let rt = Runtime::builder()
///     .pool("p", 1)
///     .held::<()>("hold", "p", &gate) // keeps the worker busy
///     .recorded::<String>("tag", "p", ran_tx) // logs the order jobs ran in
///     .start()
///     .unwrap();
/// ```
pub trait TestKinds: Sized {
    /// Kind `kind` on `pool`: holds on `gate` (its worker stays busy until
    /// the test releases it), then returns its payload.
    fn held<T>(self, kind: &str, pool: &str, gate: &Gate) -> Self
    where
        T: Serialize + DeserializeOwned + 'static;

    /// Kind `kind` on `pool` that ignores cancellation: holds on `gate`,
    /// then sends on `seen` whether it was told to stop by then
    /// (`ctx.is_cancelled()`), and returns `()`.
    fn held_then_report_cancel(
        self,
        kind: &str,
        pool: &str,
        gate: &Gate,
        seen: Sender<bool>,
    ) -> Self;

    /// Kind `kind` on `pool`: sends its payload on `ran` (so the test sees
    /// which jobs ran, in order) and returns `()`.
    fn recorded<T>(self, kind: &str, pool: &str, ran: Sender<T>) -> Self
    where
        T: DeserializeOwned + Send + 'static;
}

impl TestKinds for RuntimeBuilder {
    fn held<T>(self, kind: &str, pool: &str, gate: &Gate) -> Self
    where
        T: Serialize + DeserializeOwned + 'static,
    {
        let gate = gate.clone();
        self.handler(kind, pool, move |ctx, x: T| {
            gate.hold(ctx);
            Ok::<T, String>(x)
        })
    }

    fn held_then_report_cancel(
        self,
        kind: &str,
        pool: &str,
        gate: &Gate,
        seen: Sender<bool>,
    ) -> Self {
        let gate = gate.clone();
        self.handler(kind, pool, move |ctx, _: ()| {
            gate.hold(ctx);
            let _ = seen.send(ctx.is_cancelled());
            Ok::<(), String>(())
        })
    }

    fn recorded<T>(self, kind: &str, pool: &str, ran: Sender<T>) -> Self
    where
        T: DeserializeOwned + Send + 'static,
    {
        self.handler(kind, pool, move |_ctx, x: T| {
            ran.send(x).map_err(|e| e.to_string())
        })
    }
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
