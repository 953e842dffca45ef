//! The fast path between the Dispatcher and a busy pool: queued jobs
//! offered in the pool's handoff slot stay queued in every way a user can
//! see (priority order, cancel, pause, shutdown, timeouts counted from the
//! real start), and reports filed without waking the Dispatcher are still
//! seen by every later question (status, stats) and by waiters.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use futures::FutureExt;
use jobd_actors::{Handle, JobError, JobId, JobOptions, JobState, Runtime};

const T: Duration = Duration::from_secs(10);

/// A runtime with a one-thread pool "one" and three kinds:
/// - `hold`: says it started, then blocks until the test sends on `release`;
/// - `note`: appends its string payload to `log`;
/// - `nap`: sleeps the given milliseconds, fails if told it was cancelled.
struct Rig {
    rt: Option<Runtime>,
    h: Handle,
    started: Receiver<()>,
    release: Sender<()>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Rig {
    fn new() -> Self {
        let (started_tx, started) = unbounded::<()>();
        let (release, release_rx) = unbounded::<()>();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let rt = Runtime::builder()
            .pool("one", 1)
            .handler("hold", "one", move |_ctx, _: ()| {
                started_tx.send(()).map_err(|e| e.to_string())?;
                release_rx.recv().map_err(|e| e.to_string())
            })
            .handler("note", "one", move |_ctx, s: String| {
                log2.lock().unwrap().push(s);
                Ok::<(), String>(())
            })
            .handler("nap", "one", |ctx, ms: u64| {
                if ctx.is_cancelled() {
                    return Err("cancelled before it started".to_string());
                }
                std::thread::sleep(Duration::from_millis(ms));
                Ok(ms)
            })
            .start()
            .unwrap();
        let h = rt.handle();
        Rig {
            rt: Some(rt),
            h,
            started,
            release,
            log,
        }
    }

    /// Occupy the pool's only worker; returns once the job runs.
    fn hold(&self) -> JobId {
        let id = self.h.submit("hold", &(), JobOptions::default()).unwrap();
        self.started.recv_timeout(T).unwrap();
        id
    }

    fn note(&self, s: &str, priority: i32) -> JobId {
        self.h
            .submit("note", &s, JobOptions::default().priority(priority))
            .unwrap()
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.release.send(());
        if let Some(rt) = self.rt.take() {
            let _ = rt.shutdown(T);
        }
    }
}

#[test]
fn jobs_queued_behind_a_busy_worker_run_by_priority_then_age() {
    let rig = Rig::new();
    let hold = rig.hold();
    let ids = [
        rig.note("p1", 1),
        rig.note("p5", 5),
        rig.note("p3", 3),
        rig.note("p2a", 2),
        rig.note("p2b", 2),
    ];
    rig.release.send(()).unwrap();
    rig.h.wait_record(hold, T).unwrap();
    for id in ids {
        assert_eq!(rig.h.wait_record(id, T).unwrap().state, JobState::Succeeded);
    }
    assert_eq!(rig.log(), ["p5", "p3", "p2a", "p2b", "p1"]);
}

#[test]
fn a_cancelled_queued_job_never_runs_and_the_others_still_do() {
    let rig = Rig::new();
    let hold = rig.hold();
    let a = rig.note("a", 0);
    let b = rig.note("b", 0);
    let c = rig.note("c", 0);
    let rec = rig.h.cancel(b).unwrap();
    assert_eq!(rec.state, JobState::Cancelled);
    rig.release.send(()).unwrap();
    rig.h.wait_record(hold, T).unwrap();
    assert_eq!(rig.h.wait_record(a, T).unwrap().state, JobState::Succeeded);
    assert_eq!(rig.h.wait_record(c, T).unwrap().state, JobState::Succeeded);
    assert_eq!(rig.h.status(b).unwrap().state, JobState::Cancelled);
    assert_eq!(rig.log(), ["a", "c"]);
    let stats = rig.h.stats().unwrap();
    let one = &stats.pools["one"];
    assert_eq!((one.queued, one.running, one.busy), (0, 0, 0));
    assert_eq!(one.counters.cancelled, 1);
    assert_eq!(one.counters.succeeded, 3);
}

#[test]
fn a_paused_pool_starts_nothing_queued_until_resumed() {
    let rig = Rig::new();
    let hold = rig.hold();
    let a = rig.note("a", 0);
    rig.h.set_paused("one", true).unwrap();
    rig.release.send(()).unwrap();
    rig.h.wait_record(hold, T).unwrap();
    // The worker is free now; the queued job must still wait.
    assert_eq!(rig.h.status(a).unwrap().state, JobState::Queued);
    assert_eq!(rig.h.stats().unwrap().pools["one"].idle, 1);
    assert!(rig.log().is_empty());
    rig.h.set_paused("one", false).unwrap();
    assert_eq!(rig.h.wait_record(a, T).unwrap().state, JobState::Succeeded);
    assert_eq!(rig.log(), ["a"]);
}

#[test]
fn a_timeout_counts_from_the_start_of_the_job_not_from_its_queueing() {
    let rig = Rig::new();
    let hold = rig.hold();
    let opts = JobOptions::default().timeout(Duration::from_millis(300));
    let nap = rig.h.submit("nap", &20u64, opts).unwrap();
    // Longer than the timeout: a deadline counted from the queueing would
    // have passed before the job starts.
    std::thread::sleep(Duration::from_millis(450));
    rig.release.send(()).unwrap();
    rig.h.wait_record(hold, T).unwrap();
    let rec = rig.h.wait_record(nap, T).unwrap();
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.attempts.len(), 1);
}

#[test]
fn a_job_that_runs_past_its_timeout_is_timed_out_at_its_deadline() {
    let rig = Rig::new();
    let hold = rig.hold();
    let opts = JobOptions::default().timeout(Duration::from_millis(100));
    let nap = rig.h.submit("nap", &2000u64, opts).unwrap();
    rig.release.send(()).unwrap();
    rig.h.wait_record(hold, T).unwrap();
    let t0 = Instant::now();
    let err = rig.h.wait::<u64>(nap, T).unwrap_err();
    assert!(matches!(err, JobError::TimedOut { .. }), "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn status_and_stats_right_after_a_call_see_the_job_finished() {
    let rig = Rig::new();
    for i in 0..200 {
        let ms: u64 = rig
            .h
            .call_with("nap", &0u64, JobOptions::default(), T)
            .unwrap();
        assert_eq!(ms, 0);
        let stats = rig.h.stats().unwrap();
        let one = &stats.pools["one"];
        assert_eq!((one.running, one.busy, one.idle), (0, 0, 1), "call {i}");
        assert_eq!(one.counters.succeeded, i + 1);
    }
    // And by id: submit + wait, then status.
    let id = rig.h.submit("nap", &0u64, JobOptions::default()).unwrap();
    let _: u64 = rig.h.wait(id, T).unwrap();
    assert_eq!(rig.h.status(id).unwrap().state, JobState::Succeeded);
}

// Without a prompt report, each round below would wait for the Dispatcher's
// one-second tick (nothing else asks it anything meanwhile): 10 rounds would
// take about 5 s instead of a few milliseconds.
const TEN_ROUNDS_AT_MOST: Duration = Duration::from_millis(2500);

#[test]
fn a_waiter_of_a_running_job_hears_at_once_when_it_ends() {
    let rig = Rig::new();
    let mut total = Duration::ZERO;
    for _ in 0..10 {
        let hold = rig.hold();
        let mut wait = Box::pin(rig.h.wait_async(hold));
        // Polling once sends the wait; a status answered after it proves
        // the Dispatcher registered it (one mailbox, first come first
        // served). Only then does the job end.
        assert!((&mut wait).now_or_never().is_none());
        assert_eq!(rig.h.status(hold).unwrap().state, JobState::Running);
        let t0 = Instant::now();
        rig.release.send(()).unwrap();
        let rec = futures::executor::block_on(wait).unwrap();
        total += t0.elapsed();
        assert_eq!(rec.state, JobState::Succeeded);
    }
    assert!(
        total < TEN_ROUNDS_AT_MOST,
        "waiters answered late: {total:?}"
    );
}

#[test]
fn a_job_waiting_for_a_running_job_starts_at_once_when_it_ends() {
    let rig = Rig::new();
    let mut total = Duration::ZERO;
    for round in 0..10 {
        let hold = rig.hold();
        let note = format!("after {round}");
        rig.h
            .submit("note", &note, JobOptions::default().after([hold]))
            .unwrap();
        let t0 = Instant::now();
        rig.release.send(()).unwrap();
        // Watch the handler's log, not the Dispatcher: asking it anything
        // would make it read the report.
        while !rig.log().contains(&note) {
            assert!(t0.elapsed() < T, "the dependent never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        total += t0.elapsed();
    }
    assert!(
        total < TEN_ROUNDS_AT_MOST,
        "dependents started late: {total:?}"
    );
}

#[test]
fn a_shutdown_lets_the_running_job_finish_and_starts_no_queued_one() {
    let mut rig = Rig::new();
    let hold = rig.hold();
    // Each wait is registered (its request sent) before the shutdown is:
    // a waiter thread starved until the runtime closed would hear
    // ShuttingDown instead.
    let waiter = |id: JobId| {
        let h = rig.h.clone();
        let (tx, rx) = bounded(1);
        let (sent_tx, sent_rx) = bounded(1);
        std::thread::spawn(move || {
            let mut wait = Box::pin(h.wait_async(id));
            assert!((&mut wait).now_or_never().is_none(), "final already");
            let _ = sent_tx.send(());
            let _ = tx.send(futures::executor::block_on(wait));
        });
        sent_rx.recv_timeout(T).unwrap();
        rx
    };
    let queued: Vec<_> = (0..5)
        .map(|i| waiter(rig.note(&format!("q{i}"), 0)))
        .collect();
    let running = waiter(hold);
    let rt = rig.rt.take().unwrap();
    let shutdown = std::thread::spawn(move || rt.shutdown(T));
    // Once submits are refused the drain has begun; only then may the
    // running job end.
    let t0 = Instant::now();
    loop {
        match rig.h.submit("no such kind", &(), JobOptions::default()) {
            Err(JobError::ShuttingDown) => break,
            Err(JobError::UnknownKind(_)) => {}
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() < T, "shutdown never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    rig.release.send(()).unwrap();
    shutdown.join().unwrap().unwrap();
    assert!(rig.log().is_empty(), "queued jobs ran: {:?}", rig.log());
    for rx in queued {
        let answer = rx.recv_timeout(T).unwrap();
        assert!(matches!(answer, Err(JobError::ShuttingDown)), "{answer:?}");
    }
    let answer = running.recv_timeout(T).unwrap();
    assert_eq!(answer.unwrap().state, JobState::Succeeded);
}

#[test]
fn many_threads_calling_at_once_each_get_their_own_answers() {
    let rt = Runtime::builder()
        .pool("p", 2)
        .handler("inc", "p", |_ctx, x: u64| Ok::<u64, String>(x + 1))
        .start()
        .unwrap();
    let h = rt.handle();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    let x = t * 1_000_000 + i;
                    let y: u64 = h.call("inc", &x, T).unwrap();
                    assert_eq!(y, x + 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = h.stats().unwrap();
    assert_eq!(stats.pools["p"].counters.succeeded, 4000);
    assert_eq!(stats.pools["p"].busy, 0);
    rt.shutdown(T).unwrap();
}
