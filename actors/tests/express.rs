//! The express lane of `Handle::call`: with an idle worker and nothing
//! queued, the calling thread hands its job to the worker itself, and the
//! Dispatcher adopts the job afterwards. These tests prove the lane is
//! taken (a call completes while the Dispatcher's thread is blocked), that
//! the adopted job is an ordinary job to everything else (status, stats,
//! retries, cancel), and that the lane never lets a call jump over queued
//! jobs or run on a paused pool.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, bounded};
use jobd_actors::{Backoff, Handle, JobError, JobOptions, JobState, KindOptions, Runtime};

use common::{Gate, LONG, held};

/// A short wait: long enough for a job that could start to start.
const SHORT: Duration = Duration::from_millis(150);

/// The runtime's System thread (the Dispatcher's) blocked by a future that
/// waits for `release` (or `LONG`): only what does not need the Dispatcher
/// can happen meanwhile.
struct DispatcherBlock {
    unblock: Sender<()>,
    thread: JoinHandle<Result<(), JobError>>,
}

impl DispatcherBlock {
    /// Block it; returns once the System thread is blocked.
    fn new(h: &Handle) -> Self {
        let (entered_tx, entered_rx) = bounded::<()>(1);
        let (unblock, unblock_rx) = bounded::<()>(1);
        let thread = {
            let h = h.clone();
            std::thread::spawn(move || {
                h.run(
                    move || async move {
                        let _ = entered_tx.send(());
                        // Deliberately blocks the event loop (test only).
                        let _ = unblock_rx.recv_timeout(LONG);
                    },
                    LONG,
                )
            })
        };
        entered_rx.recv_timeout(LONG).unwrap();
        DispatcherBlock { unblock, thread }
    }

    /// Let the System thread go on; returns once the blocking future ended.
    fn release(self) {
        self.unblock.send(()).unwrap();
        self.thread.join().unwrap().unwrap();
    }
}

#[test]
fn a_call_completes_while_the_dispatcher_is_blocked() {
    let rt = Runtime::builder()
        .pool("cpu", 2)
        .handler("double", "cpu", |_ctx, x: u64| Ok::<u64, String>(x * 2))
        .start()
        .unwrap();
    let h = rt.handle();
    // Block the System thread (the Dispatcher's) until told: only a call
    // that does not need the Dispatcher can complete meanwhile.
    let blocked = DispatcherBlock::new(&h);
    // Shorter than the blocker's wait: through the Dispatcher, it would
    // time out.
    let got: Result<u64, JobError> = h.call("double", &21u64, Duration::from_secs(2));
    blocked.release();
    assert_eq!(got.unwrap(), 42);

    // Once the Dispatcher runs again, it knows the job as any other.
    let page = h.list(Default::default()).unwrap();
    assert_eq!(page.jobs.len(), 1);
    let rec = h.status(page.jobs[0].id).unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(&*rec.kind, "double");
    assert_eq!(&*rec.pool, "cpu");
    assert_eq!(rec.attempt, 1);
    assert_eq!(rec.result.as_deref(), Some(&serde_json::json!(42)));
    assert!(rec.started_at.is_some() && rec.finished_at.is_some());
    let stats = h.stats().unwrap();
    let p = &stats.pools["cpu"];
    assert_eq!(p.counters.submitted, 1);
    assert_eq!(p.counters.started, 1);
    assert_eq!(p.counters.succeeded, 1);
    assert_eq!((p.running, p.idle, p.busy), (0, 2, 0));
    rt.shutdown(LONG).unwrap();
}

#[test]
fn a_call_waits_behind_queued_jobs_and_for_a_paused_pool() {
    let gate = Gate::new();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let o = order.clone();
    let rt = Runtime::builder()
        .pool("one", 1)
        .handler("hold", "one", held::<()>(&gate))
        .handler("note", "one", move |_ctx, name: String| {
            o.lock().unwrap().push(name);
            Ok::<(), String>(())
        })
        .start()
        .unwrap();
    let h = rt.handle();

    // The only worker is busy; jobs queue behind it: some are offered to
    // it in the handoff slot, the rest wait in the Dispatcher's queue.
    let holder = gate.occupy(&h, "hold");
    const QUEUED: usize = 40;
    let mut last = None;
    for i in 0..QUEUED {
        let id = h
            .submit("note", &format!("q{i}"), JobOptions::default())
            .unwrap();
        last = Some(id);
    }
    // With the Dispatcher blocked, the worker runs the offered jobs and then
    // sits idle while the others still wait in the Dispatcher's queue.
    let blocked = DispatcherBlock::new(&h);
    gate.release_job(holder);
    let mut ran = 0;
    assert!(common::eventually(LONG, || {
        std::thread::sleep(SHORT);
        let now = order.lock().unwrap().len();
        let settled = now > 0 && now == ran;
        ran = now;
        settled
    }));
    assert!(
        ran < QUEUED,
        "every queued job was offered: nothing to jump"
    );
    // A call made now must not take the idle worker before the queued jobs.
    let caller = {
        let h = h.clone();
        std::thread::spawn(move || h.call::<_, ()>("note", &"call".to_string(), LONG))
    };
    std::thread::sleep(SHORT);
    blocked.release();
    caller.join().unwrap().unwrap();
    h.wait_record(last.unwrap(), LONG).unwrap();
    {
        let order = order.lock().unwrap();
        assert_eq!(order.len(), QUEUED + 1);
        assert_eq!(
            order[QUEUED], "call",
            "the call jumped the queue: {order:?}"
        );
    }

    // A paused pool runs nothing, calls included.
    h.set_paused("one", true).unwrap();
    let caller = {
        let h = h.clone();
        std::thread::spawn(move || h.call::<_, ()>("note", &"paused".to_string(), LONG))
    };
    std::thread::sleep(SHORT);
    assert_eq!(
        order.lock().unwrap().len(),
        QUEUED + 1,
        "ran on a paused pool"
    );
    h.set_paused("one", false).unwrap();
    caller.join().unwrap().unwrap();
    assert_eq!(order.lock().unwrap().last().unwrap(), "paused");
    rt.shutdown(LONG).unwrap();
}

#[test]
fn an_express_job_is_retried_cancelled_and_counted_like_any_other() {
    let tries = Arc::new(AtomicU32::new(0));
    let t = tries.clone();
    let gate = Gate::new();
    let g = gate.clone();
    let rt = Runtime::builder()
        .pool("cpu", 2)
        .kind(
            "flaky",
            "cpu",
            KindOptions {
                max_attempts: 2,
                backoff: Backoff {
                    base_ms: 1,
                    factor: 1.0,
                    max_ms: 1,
                },
                timeout: None,
            },
            Arc::new(move |_ctx, _payload| {
                if t.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err("first attempt fails".to_string())
                } else {
                    Ok(serde_json::json!("second"))
                }
            }),
        )
        .handler("hold", "cpu", move |ctx, _: ()| {
            g.hold(ctx);
            if ctx.is_cancelled() {
                Err::<(), String>("saw the cancel".into())
            } else {
                Ok(())
            }
        })
        .start()
        .unwrap();
    let h = rt.handle();

    // The first attempt fails on the express lane; the retry goes through
    // the Dispatcher, and the call gets the second attempt's result.
    let got: String = h.call("flaky", &(), LONG).unwrap();
    assert_eq!(got, "second");
    assert_eq!(tries.load(Ordering::SeqCst), 2);
    let page = h.list(Default::default()).unwrap();
    let rec = h.status(page.jobs[0].id).unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Succeeded, 2));
    assert_eq!(rec.attempts.len(), 2);
    assert_eq!(
        rec.attempts[0].error.as_deref(),
        Some("first attempt fails")
    );

    // A call that gives up cancels its job, which its handler sees.
    let err = h
        .call::<_, ()>("hold", &(), Duration::from_millis(100))
        .unwrap_err();
    let JobError::WaitTimeout { id: Some(id), .. } = err else {
        panic!("expected WaitTimeout with the job id, got {err:?}");
    };
    assert!(common::eventually(LONG, || {
        h.status(id).is_ok_and(|r| r.state == JobState::Cancelled)
    }));
    gate.release_job(id);

    let stats = h.stats().unwrap();
    let p = &stats.pools["cpu"];
    assert_eq!(p.counters.submitted, 2);
    assert_eq!(p.counters.retried, 1);
    assert_eq!(p.counters.succeeded, 1);
    assert_eq!(p.counters.cancelled, 1);
    assert!(common::eventually(LONG, || {
        let p = &h.stats().unwrap().pools["cpu"];
        (p.running, p.idle, p.busy) == (0, 2, 0)
    }));
    rt.shutdown(LONG).unwrap();
}

#[test]
fn shutdown_waits_for_express_jobs_and_joins_every_worker() {
    let (rt, h, gate) = common::held_pool::<u64>("xp", 2);
    let callers: Vec<_> = (0..2u64)
        .map(|n| {
            let h = h.clone();
            std::thread::spawn(move || h.call::<_, u64>("hold", &n, LONG))
        })
        .collect();
    gate.started();
    gate.started();
    let releaser = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(SHORT);
            gate.release_n(2);
        })
    };
    // Both running jobs finish within the drain; every worker thread ends.
    rt.shutdown(LONG).unwrap();
    releaser.join().unwrap();
    let mut got: Vec<u64> = callers
        .into_iter()
        .map(|c| c.join().unwrap().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, [0, 1]);
    common::assert_threads_named("jobd-xp-", 0);
}

#[test]
fn calls_racing_pauses_and_queued_jobs_all_get_their_own_answers() {
    // Express calls, calls through the Dispatcher, queued priority jobs and
    // pause/resume all at once: every call gets its own answer, and once
    // all is done the books balance (no job lost, none counted twice, every
    // credit back).
    let rt = Runtime::builder()
        .pool("mix", 2)
        .handler("inc", "mix", |_ctx, n: u64| {
            if n.is_multiple_of(5) {
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok::<u64, String>(n + 1)
        })
        .start()
        .unwrap();
    let h = rt.handle();
    const CALLERS: u64 = 6;
    const CALLS: u64 = 300;
    let callers: Vec<_> = (0..CALLERS)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..CALLS {
                    let n = t * 10_000 + i;
                    let got: u64 = h.call("inc", &n, LONG).unwrap();
                    assert_eq!(got, n + 1);
                }
            })
        })
        .collect();
    let mut submitted = Vec::new();
    let mut paused = false;
    while !callers.iter().all(|c| c.is_finished()) {
        paused = !paused;
        h.set_paused("mix", paused).unwrap();
        let id = h
            .submit("inc", &7u64, JobOptions::default().priority(3))
            .unwrap();
        submitted.push(id);
        std::thread::sleep(Duration::from_millis(1));
    }
    h.set_paused("mix", false).unwrap();
    for c in callers {
        c.join().unwrap();
    }
    for id in &submitted {
        let v: u64 = h.wait(*id, LONG).unwrap();
        assert_eq!(v, 8);
    }
    let total = CALLERS * CALLS + submitted.len() as u64;
    assert!(common::eventually(LONG, || {
        let p = &h.stats().unwrap().pools["mix"];
        (p.running, p.queued, p.idle, p.busy) == (0, 0, 2, 0)
    }));
    let p = &h.stats().unwrap().pools["mix"];
    assert_eq!(p.counters.submitted, total);
    assert_eq!(p.counters.started, total);
    assert_eq!(p.counters.succeeded, total);
    rt.shutdown(LONG).unwrap();
}
