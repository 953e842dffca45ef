//! Delays, cancellation and timeouts: a delayed job does not start early, a
//! cancelled queued (or delayed) job never runs, and a timeout answers the
//! waiter at once while the handler still runs and sees `is_cancelled()`.

mod common;

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, unbounded};
use jobd_actors::{JobError, JobOptions, JobState, Runtime};

use common::{Gate, HeldWorker, LONG, held_then_report_cancel, held_worker};

#[test]
fn a_delayed_job_does_not_start_early() {
    let (ran_tx, ran_rx) = unbounded::<Instant>();
    let rt = Runtime::builder()
        .pool("p", 1)
        .handler("stamp", "p", move |_ctx, _: ()| {
            ran_tx.send(Instant::now()).map_err(|e| e.to_string())
        })
        .start()
        .unwrap();
    let h = rt.handle();
    let delay = Duration::from_millis(300);
    let submitted = Instant::now();
    let id = h
        .submit("stamp", &(), JobOptions::default().delay(delay))
        .unwrap();
    let rec = h.status(id).unwrap();
    assert_eq!(rec.state, JobState::Delayed);
    assert!(rec.run_at >= rec.created_at + 300, "{rec:?}");
    assert_eq!(h.stats().unwrap().pools["p"].delayed, 1);

    h.wait::<()>(id, LONG).unwrap();
    let ran = ran_rx.recv_timeout(LONG).unwrap();
    assert!(
        ran.duration_since(submitted) >= delay,
        "started {:?} after submit, delay was {delay:?}",
        ran.duration_since(submitted)
    );
    rt.shutdown(LONG).unwrap();
}

#[test]
fn a_cancelled_queued_or_delayed_job_never_runs() {
    let HeldWorker(rt, h, gate, holder, ran_rx) = held_worker::<String>("p", "tag");

    let queued = h.submit("tag", "queued", JobOptions::default()).unwrap();
    let delayed = h
        .submit(
            "tag",
            "delayed",
            JobOptions::default().delay(Duration::from_millis(50)),
        )
        .unwrap();
    let kept = h.submit("tag", "kept", JobOptions::default()).unwrap();
    assert_eq!(h.status(queued).unwrap().state, JobState::Queued);

    let rec = h.cancel(queued).unwrap();
    assert_eq!(rec.state, JobState::Cancelled);
    assert_eq!(rec.attempt, 0);
    assert_eq!(h.cancel(delayed).unwrap().state, JobState::Cancelled);
    // Cancelling a final job changes nothing and says what it is.
    assert_eq!(h.cancel(queued).unwrap().state, JobState::Cancelled);
    match h.wait::<()>(queued, LONG) {
        Err(e @ JobError::Cancelled { .. }) => assert_eq!(e.code(), "cancelled"),
        other => panic!("expected Cancelled, got {other:?}"),
    }
    let stats = h.stats().unwrap();
    assert_eq!((stats.pools["p"].queued, stats.pools["p"].delayed), (1, 0));

    gate.release();
    h.wait::<()>(holder, LONG).unwrap();
    h.wait::<()>(kept, LONG).unwrap();
    // Had the cancelled delayed job's timer survived, it would be queued by
    // now, ahead of a job submitted after its due time.
    let due = h.status(delayed).unwrap().run_at;
    assert!(common::eventually(LONG, || jobd_actors::now_ms() > due + 50));
    let after = h.submit("tag", "after", JobOptions::default()).unwrap();
    h.wait::<()>(after, LONG).unwrap();
    let ran: Vec<String> = ran_rx.try_iter().collect();
    assert_eq!(ran, ["kept", "after"]);
    assert_eq!(h.stats().unwrap().kinds["tag"].counters.cancelled, 2);
    rt.shutdown(LONG).unwrap();
}

#[test]
fn a_timeout_answers_the_waiter_while_the_handler_still_runs() {
    let gate = Gate::new();
    let g = gate.clone();
    let (seen_tx, seen_rx) = unbounded::<(bool, bool)>();
    let rt = Runtime::builder()
        .pool("p", 1)
        .handler("stubborn", "p", move |ctx, _: ()| {
            let before = ctx.is_cancelled();
            assert!(ctx.deadline().is_some());
            g.hold(ctx);
            let _ = seen_tx.send((before, ctx.is_cancelled()));
            Ok::<u32, String>(1)
        })
        .start()
        .unwrap();
    let h = rt.handle();

    let timeout = Duration::from_millis(200);
    let t0 = Instant::now();
    let out = h.call_with::<_, u32>(
        "stubborn",
        &(),
        JobOptions::default().timeout(timeout),
        LONG,
    );
    let waited = t0.elapsed();
    let id = match out {
        Err(e @ JobError::TimedOut { .. }) => {
            assert_eq!(e.code(), "timed_out");
            let JobError::TimedOut { id } = e else {
                unreachable!()
            };
            id
        }
        other => panic!("expected TimedOut, got {other:?}"),
    };
    assert!(waited >= timeout, "answered after {waited:?}");
    // The handler has started and is still held: the answer did not wait
    // for it.
    assert_eq!(gate.started(), id);
    let rec = h.status(id).unwrap();
    assert_eq!(rec.state, JobState::TimedOut);
    assert_eq!(
        rec.error.as_ref().map(|e| e.code.as_str()),
        Some("timed_out")
    );
    // The worker is still busy: stats say so honestly.
    let pool = &h.stats().unwrap().pools["p"];
    assert_eq!((pool.busy, pool.idle, pool.running), (1, 0, 0));
    assert_eq!(pool.counters.timed_out, 1);

    gate.release();
    let (before, after) = seen_rx.recv_timeout(LONG).unwrap();
    assert!(!before, "not cancelled when it started");
    assert!(after, "the handler sees is_cancelled() after its deadline");
    // Its late result is thrown away; the thread comes back.
    assert!(common::eventually(LONG, || {
        h.stats().unwrap().pools["p"].idle == 1
    }));
    assert_eq!(h.status(id).unwrap().state, JobState::TimedOut);
    rt.shutdown(LONG).unwrap();
}

/// A runtime with `threads` workers in pool `p` and a kind `hold` that
/// holds on the gate, then says on the receiver whether it was told to stop.
fn stubborn_runtime(threads: usize) -> (Runtime, Gate, Receiver<bool>) {
    let gate = Gate::new();
    let (seen_tx, seen_rx) = unbounded::<bool>();
    let rt = Runtime::builder()
        .pool("p", threads)
        .handler("hold", "p", held_then_report_cancel(&gate, seen_tx))
        .start()
        .unwrap();
    (rt, gate, seen_rx)
}

#[test]
fn a_call_that_stops_waiting_cancels_its_job_and_wait_does_not() {
    let (rt, gate, seen_rx) = stubborn_runtime(2);
    let h = rt.handle();

    match h.call::<_, ()>("hold", &(), Duration::from_millis(100)) {
        Err(JobError::WaitTimeout { id: Some(id), .. }) => {
            assert_eq!(gate.started(), id);
            assert!(common::eventually(LONG, || {
                h.status(id).unwrap().state == JobState::Cancelled
            }));
            gate.release();
            assert!(seen_rx.recv_timeout(LONG).unwrap(), "told to stop");
        }
        other => panic!("expected WaitTimeout, got {other:?}"),
    }

    let id = gate.occupy(&h, "hold");
    match h.wait::<()>(id, Duration::from_millis(50)) {
        Err(e @ JobError::WaitTimeout { .. }) => assert_eq!(e.code(), "timeout"),
        other => panic!("expected WaitTimeout, got {other:?}"),
    }
    assert_eq!(h.status(id).unwrap().state, JobState::Running);
    gate.release();
    h.wait::<()>(id, LONG).unwrap();
    assert!(!seen_rx.recv_timeout(LONG).unwrap());
    rt.shutdown(LONG).unwrap();
}

#[test]
fn cancelling_a_running_job_answers_its_waiters_at_once() {
    let (rt, gate, seen_rx) = stubborn_runtime(1);
    let h = rt.handle();
    let id = gate.occupy(&h, "hold");
    let waiter = {
        let h = h.clone();
        std::thread::spawn(move || h.wait::<()>(id, LONG))
    };
    assert_eq!(h.cancel(id).unwrap().state, JobState::Cancelled);
    // Answered while the handler is still held.
    assert!(matches!(
        waiter.join().unwrap(),
        Err(JobError::Cancelled { .. })
    ));
    gate.release();
    assert!(seen_rx.recv_timeout(LONG).unwrap());
    rt.shutdown(LONG).unwrap();
}
