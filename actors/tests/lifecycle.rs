//! A job's life as callers see it: `wait_any`, `cancel`, `status`, the
//! `stats` counters, retries with backoff (`dead` when retries ran out,
//! `failed` with a single attempt), `retry`, unique keys and dependencies.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use jobd_actors::{Backoff, JobError, JobOptions, JobState, KindOptions, Runtime};

use common::{Gate, LONG};

const BACKOFF: Backoff = Backoff {
    base_ms: 20,
    factor: 2.0,
    max_ms: 1_000,
};

#[test]
fn retries_end_dead_and_a_single_attempt_ends_failed() {
    let tries = Arc::new(AtomicU32::new(0));
    let t = tries.clone();
    let rt = Runtime::builder()
        .pool("p", 1)
        .handler("always_fails", "p", move |ctx, _: ()| {
            t.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(format!("attempt {} failed", ctx.attempt()))
        })
        .handler("third_time_lucky", "p", |ctx, _: ()| {
            if ctx.attempt() < 3 {
                Err(format!("not yet ({})", ctx.attempt()))
            } else {
                Ok(ctx.attempt())
            }
        })
        .start()
        .unwrap();
    let h = rt.handle();

    // Single attempt: failed.
    let single = h
        .submit("always_fails", &(), JobOptions::default())
        .unwrap();
    match h.wait::<()>(single, LONG) {
        Err(JobError::Failed { state, message, .. }) => {
            assert_eq!(state, JobState::Failed);
            assert_eq!(message, "attempt 1 failed");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(h.status(single).unwrap().state, JobState::Failed);

    // Three attempts with backoff: dead, and `call` is answered once, at
    // the end, with the last attempt's error.
    let opts = JobOptions::default().max_attempts(3).backoff(BACKOFF);
    match h.call_with::<_, ()>("always_fails", &(), opts.clone(), LONG) {
        Err(JobError::Failed { state, message, id }) => {
            assert_eq!(state, JobState::Dead);
            assert_eq!(message, "attempt 3 failed");
            let rec = h.status(id).unwrap();
            assert_eq!(rec.state, JobState::Dead);
            assert_eq!((rec.attempt, rec.max_attempts), (3, 3));
            assert_eq!(rec.attempts.len(), 3);
            // Each retry waited for its backoff (minus at most 20% jitter).
            for (i, pair) in rec.attempts.windows(2).enumerate() {
                let gap = pair[1].start - pair[0].end.unwrap();
                let nominal = BACKOFF.nominal_delay(i as u32 + 1).as_millis() as u64;
                assert!(gap + 1 >= nominal * 8 / 10, "retry {i}: {gap} ms");
                assert_eq!(
                    pair[0].error.as_deref(),
                    Some(format!("attempt {} failed", i + 1).as_str())
                );
            }
        }
        other => panic!("expected Failed (dead), got {other:?}"),
    }
    assert_eq!(tries.load(Ordering::SeqCst), 4);

    // Retries that end in success.
    let id = h.submit("third_time_lucky", &(), opts).unwrap();
    assert_eq!(h.wait::<u32>(id, LONG).unwrap(), 3);

    let stats = h.stats().unwrap();
    let fails = &stats.kinds["always_fails"].counters;
    assert_eq!(
        (
            fails.submitted,
            fails.started,
            fails.failed,
            fails.dead,
            fails.retried
        ),
        (2, 4, 1, 1, 2)
    );
    let lucky = &stats.kinds["third_time_lucky"].counters;
    assert_eq!((lucky.started, lucky.retried, lucky.succeeded), (3, 2, 1));
    let pool = &stats.pools["p"].counters;
    assert_eq!(
        (
            pool.submitted,
            pool.started,
            pool.succeeded,
            pool.failed,
            pool.dead
        ),
        (3, 7, 1, 1, 1)
    );
    assert_eq!(stats.active_jobs, 0);
    assert_eq!(stats.retained_jobs, 3);

    // `retry` queues a failed job again with fresh attempts.
    let rec = h.retry(single).unwrap();
    assert!(matches!(rec.state, JobState::Queued | JobState::Running));
    assert!(rec.attempt <= 1, "attempts start again: {}", rec.attempt);
    assert!(matches!(
        h.wait::<()>(single, LONG),
        Err(JobError::Failed { .. })
    ));
    let rec = h.status(single).unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Failed, 1));
    assert_eq!(tries.load(Ordering::SeqCst), 5);
    // Only failed and dead jobs can be retried.
    assert!(matches!(h.retry(id), Err(JobError::BadRequest(_))));
    rt.shutdown(LONG).unwrap();
}

#[test]
fn kind_defaults_apply_and_submissions_override_them() {
    let rt = Runtime::builder()
        .pool("p", 1)
        .raw_handler(
            "flaky",
            "p",
            KindOptions {
                max_attempts: 2,
                backoff: BACKOFF,
                timeout: None,
            },
            |ctx, _| Err(format!("nope {}", ctx.attempt())),
        )
        .start()
        .unwrap();
    let h = rt.handle();
    let a = h.submit("flaky", &(), JobOptions::default()).unwrap();
    let b = h
        .submit("flaky", &(), JobOptions::default().max_attempts(1))
        .unwrap();
    let (ra, rb) = (
        h.wait_record(a, LONG).unwrap(),
        h.wait_record(b, LONG).unwrap(),
    );
    assert_eq!((ra.state, ra.attempt), (JobState::Dead, 2));
    assert_eq!((rb.state, rb.attempt), (JobState::Failed, 1));
    rt.shutdown(LONG).unwrap();
}

#[test]
fn wait_any_cancel_and_status() {
    let (rt, h, gate) = common::held_pool::<u32>("p", 2);
    let a = h.submit("hold", &1u32, JobOptions::default()).unwrap();
    let b = h.submit("hold", &2u32, JobOptions::default()).unwrap();
    gate.started();
    gate.started();
    let c = h.submit("hold", &3u32, JobOptions::default()).unwrap();

    let rec = h.status(a).unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Running, 1));
    assert!(rec.started_at.is_some() && rec.finished_at.is_none());
    assert_eq!(h.status(c).unwrap().state, JobState::Queued);

    // Nothing final yet: wait_any times out.
    assert!(matches!(
        h.wait_any(&[a, b, c], Duration::from_millis(50)),
        Err(JobError::WaitTimeout { .. })
    ));
    // A waiter blocked on all three is answered by the first to end.
    let any = {
        let h = h.clone();
        std::thread::spawn(move || h.wait_any(&[a, b, c], LONG))
    };
    assert_eq!(h.cancel(c).unwrap().state, JobState::Cancelled);
    let first = any.join().unwrap().unwrap();
    assert_eq!((first.id, first.state), (c, JobState::Cancelled));
    // With one already final, wait_any answers at once.
    assert_eq!(h.wait_any(&[a, c], LONG).unwrap().id, c);

    gate.release_n(2);
    assert_eq!(h.wait::<u32>(a, LONG).unwrap(), 1);
    assert_eq!(h.wait::<u32>(b, LONG).unwrap(), 2);
    let rec = h.status(a).unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    assert!(rec.finished_at.is_some());

    assert!(matches!(
        h.wait_any(&[a, jobd_actors::JobId(4242)], LONG),
        Err(JobError::NotFound(_))
    ));
    assert!(matches!(
        h.wait_any(&[], LONG),
        Err(JobError::BadRequest(_))
    ));
    assert!(matches!(
        h.cancel(jobd_actors::JobId(4242)),
        Err(JobError::NotFound(_))
    ));

    let stats = h.stats().unwrap();
    let k = &stats.kinds["hold"];
    assert_eq!(
        (
            k.counters.submitted,
            k.counters.started,
            k.counters.succeeded
        ),
        (3, 2, 2)
    );
    assert_eq!(k.counters.cancelled, 1);
    assert_eq!(k.run_time_ms.count, 2);
    assert_eq!(k.queue_wait_ms.count, 2);
    rt.shutdown(LONG).unwrap();
}

#[test]
fn unique_keys_and_dependencies() {
    let gate = Gate::new();
    let g = gate.clone();
    let rt = Runtime::builder()
        .pool("p", 2)
        .handler("hold", "p", move |ctx, x: i32| {
            g.hold(ctx);
            if x < 0 {
                Err("negative".to_string())
            } else {
                Ok(x)
            }
        })
        .start()
        .unwrap();
    let h = rt.handle();
    let key = JobOptions::default().unique_key("k");
    let first = h.submit("hold", &1, key.clone()).unwrap();
    gate.started();
    // Same kind and key while the first is active: the first's id.
    assert_eq!(h.submit("hold", &2, key.clone()).unwrap(), first);
    gate.release();
    assert_eq!(h.wait::<i32>(first, LONG).unwrap(), 1);
    // Once it is final, the key is free again.
    let second = h.submit("hold", &3, key).unwrap();
    assert_ne!(second, first);
    gate.started();
    gate.release();
    assert_eq!(h.wait::<i32>(second, LONG).unwrap(), 3);

    // A dependency that fails cancels its dependents.
    let parent = h.submit("hold", &-1, JobOptions::default()).unwrap();
    gate.started();
    let child = h
        .submit("hold", &5, JobOptions::default().after([parent]))
        .unwrap();
    assert_eq!(h.status(child).unwrap().state, JobState::Delayed);
    gate.release();
    match h.wait::<i32>(child, LONG) {
        Err(e @ JobError::Cancelled { .. }) => assert_eq!(e.code(), "dependency_failed"),
        other => panic!("expected dependency_failed, got {other:?}"),
    }
    rt.shutdown(LONG).unwrap();
}
