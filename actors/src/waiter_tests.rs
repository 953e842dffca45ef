//! Tests of waiter bookkeeping that need to look inside the Dispatcher (how
//! many waiters a job holds): waits that time out or are dropped leave
//! nothing behind, `wait_any` tells unknown ids apart with a store, and a
//! submit that waits takes one trip.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{
    Handle, JobError, JobId, JobOptions, JobSpec, JobState, MemoryStore, Runtime, RuntimeBuilder,
};

/// Long enough for "at once" on a loaded machine.
const LONG: Duration = Duration::from_secs(10);

/// A runtime with `forever` (runs until cancelled) and `echo`.
fn builder() -> RuntimeBuilder {
    Runtime::builder()
        .pool("p", 2)
        .handler("forever", "p", |ctx, _: ()| {
            while !ctx.is_cancelled() {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok::<(), String>(())
        })
        .handler("echo", "p", |_ctx, v: serde_json::Value| Ok::<_, String>(v))
}

fn spec(kind: &str, payload: serde_json::Value) -> JobSpec {
    JobSpec {
        kind: kind.into(),
        payload,
        options: JobOptions::default(),
    }
}

/// Poll `f` until it is true (at most `LONG`).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + LONG;
    while !f() {
        assert!(Instant::now() < until, "never: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap()
}

#[test]
fn sync_waits_that_time_out_leave_no_waiter_behind() {
    let rt = builder().start().unwrap();
    let h = rt.handle();
    let id = h.submit("forever", &(), JobOptions::default()).unwrap();
    for _ in 0..50 {
        let e = h.wait_record(id, Duration::from_millis(1)).unwrap_err();
        assert!(
            matches!(e, JobError::WaitTimeout { id: Some(j), .. } if j == id),
            "{e:?}"
        );
    }
    // Each wait's expiry removes its waiter, whichever side gave up first.
    eventually("all 50 waiters are gone", || h.waiter_count(id) == 0);
    let e = h.wait_any(&[id, id], Duration::from_millis(1)).unwrap_err();
    assert!(matches!(e, JobError::WaitTimeout { .. }), "{e:?}");
    eventually("the wait_any waiters are gone", || h.waiter_count(id) == 0);
    h.cancel(id).unwrap();
    rt.shutdown(LONG).unwrap();
}

#[test]
fn async_waits_given_up_are_pruned_and_live_ones_kept() {
    let rt = builder().start().unwrap();
    let h = rt.handle();
    let id = h.submit("forever", &(), JobOptions::default()).unwrap();
    let tokio = tokio_rt();
    // One waiter that stays, then many that give up (their futures are
    // dropped by the timeout), as a polling client does.
    let keeper = {
        let h = h.clone();
        tokio.spawn(async move { h.wait_async(id).await })
    };
    eventually("the keeper waits", || h.waiter_count(id) == 1);
    tokio.block_on(async {
        for _ in 0..200 {
            let r = tokio::time::timeout(Duration::from_millis(1), h.wait_async(id)).await;
            assert!(r.is_err(), "the job cannot be final");
        }
    });
    let n = h.waiter_count(id);
    assert!(n <= 16, "{n} waiters kept for 1 live wait and 200 given up");
    // The Dispatcher-enforced timeout leaves nothing at all.
    tokio.block_on(async {
        for _ in 0..20 {
            let e = h
                .wait_timeout_async(id, Duration::from_millis(1))
                .await
                .unwrap_err();
            assert!(matches!(e, JobError::WaitTimeout { .. }), "{e:?}");
        }
    });
    assert!(h.waiter_count(id) <= 16);
    h.cancel(id).unwrap();
    let rec = tokio.block_on(keeper).unwrap().unwrap();
    assert_eq!(rec.state, JobState::Cancelled, "the live waiter was kept");
    rt.shutdown(LONG).unwrap();
}

#[test]
fn a_zero_timeout_answers_final_jobs_and_times_out_others() {
    let rt = builder().start().unwrap();
    let h = rt.handle();
    let done = h.submit("echo", &1, JobOptions::default()).unwrap();
    h.wait_record(done, LONG).unwrap();
    let busy = h.submit("forever", &(), JobOptions::default()).unwrap();
    let tokio = tokio_rt();
    tokio.block_on(async {
        let rec = h.wait_timeout_async(done, Duration::ZERO).await.unwrap();
        assert_eq!(rec.result, Some(json!(1)));
        let e = h
            .wait_timeout_async(busy, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, JobError::WaitTimeout { .. }), "{e:?}");
        let e = h
            .wait_timeout_async(JobId(999_999), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, JobError::NotFound(_)), "{e:?}");
    });
    assert_eq!(h.waiter_count(busy), 0);
    h.cancel(busy).unwrap();
    rt.shutdown(LONG).unwrap();
}

#[test]
fn wait_any_with_a_store_still_refuses_unknown_ids() {
    for store in [false, true] {
        let mut b = builder();
        if store {
            b = b.store(Box::new(MemoryStore::default()));
        }
        let rt = b.start().unwrap();
        let h: Handle = rt.handle();
        let done = h.submit("echo", &7, JobOptions::default()).unwrap();
        h.wait_record(done, LONG).unwrap();
        let e = h.wait_any(&[done, JobId(999_999)], LONG).unwrap_err();
        assert!(
            matches!(&e, JobError::NotFound(s) if s == "999999"),
            "store {store}: {e:?}"
        );
        let e = h.wait_any(&[JobId(999_998), done], LONG).unwrap_err();
        assert!(matches!(e, JobError::NotFound(_)), "store {store}: {e:?}");
        // Known ids: the finished one answers.
        let busy = h.submit("forever", &(), JobOptions::default()).unwrap();
        let rec = h.wait_any(&[busy, done], LONG).unwrap();
        assert_eq!(rec.id, done);
        h.cancel(busy).unwrap();
        rt.shutdown(LONG).unwrap();
    }
}

#[test]
fn submit_and_wait_answers_the_id_then_the_record() {
    for store in [false, true] {
        let mut b = builder();
        if store {
            b = b.store(Box::new(MemoryStore::default()));
        }
        let rt = b.start().unwrap();
        let h = rt.handle();
        let tokio = tokio_rt();
        tokio.block_on(async {
            let (ack, done) = h
                .submit_and_wait_async(spec("echo", json!({"x": 1})))
                .await
                .unwrap();
            assert!(!ack.deduplicated);
            let rec = done.await.unwrap();
            assert_eq!(rec.id, ack.id);
            assert_eq!(rec.state, JobState::Succeeded);
            assert_eq!(rec.result, Some(json!({"x": 1})));

            // A duplicate waits for the job that holds the key.
            let mut first = spec("forever", json!(null));
            first.options.unique_key = Some("k".into());
            let (a1, w1) = h.submit_and_wait_async(first.clone()).await.unwrap();
            let (a2, w2) = h.submit_and_wait_async(first).await.unwrap();
            assert_eq!(a2.id, a1.id);
            assert!(a2.deduplicated);
            h.cancel_async(a1.id).await.unwrap();
            for w in [w1, w2] {
                let rec = w.await.unwrap();
                assert_eq!((rec.id, rec.state), (a1.id, JobState::Cancelled));
            }

            // Refused: the error, no waiter.
            let e = h
                .submit_and_wait_async(spec("nope", json!(null)))
                .await
                .err()
                .unwrap();
            assert!(matches!(e, JobError::UnknownKind(_)), "{e:?}");
        });
        rt.shutdown(LONG).unwrap();
    }
}
