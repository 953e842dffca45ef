//! A panicking handler fails its job with `JobError::Panicked` carrying the
//! panic message, and its pool keeps every thread and goes on serving.

mod common;

use jobd_actors::{JobError, JobOptions, JobState, PoolConfig, Runtime};

use common::{LONG, assert_threads_named};

const THREADS: usize = 3;

fn runtime() -> Runtime {
    Runtime::builder()
        .pool_config(PoolConfig::new("panicky", THREADS))
        .handler("maybe_panic", "panicky", |_ctx, x: u64| {
            if x % 1000 == 7 {
                panic!("boom at {x}");
            }
            if x == 9 {
                // A non-`&str` payload goes through the String branch.
                std::panic::panic_any(format!("formatted boom {x}"));
            }
            Ok::<u64, String>(x * 2)
        })
        .start()
        .expect("runtime starts")
}

#[test]
fn panic_becomes_job_error_and_pool_keeps_its_threads() {
    let rt = runtime();
    let h = rt.handle();
    // Thread names are `jobd-<pool>-<n>`; comm holds 15 bytes, enough here.
    assert_threads_named("jobd-panicky-", THREADS);

    match h.call::<_, u64>("maybe_panic", &7u64, LONG) {
        Err(JobError::Panicked { message, .. }) => assert_eq!(message, "boom at 7"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    match h.call::<_, u64>("maybe_panic", &9u64, LONG) {
        Err(e @ JobError::Panicked { .. }) => {
            assert_eq!(e.code(), "job_failed");
            assert!(e.to_string().contains("formatted boom 9"), "{e}");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }

    // More panics than the pool has threads: if a panic killed its worker,
    // the pool would be empty afterwards.
    let ids: Vec<_> = (0..THREADS as u64 * 3)
        .map(|i| {
            h.submit("maybe_panic", &(i * 1000 + 7), JobOptions::default())
                .unwrap()
        })
        .collect();
    for id in &ids {
        // `wait` reports the same error as `call` does.
        match h.wait::<u64>(*id, LONG) {
            Err(JobError::Panicked { id: pid, message }) => {
                assert_eq!(pid, *id);
                assert!(message.starts_with("boom at "), "{message}");
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
        let rec = h.status(*id).unwrap();
        assert_eq!(rec.state, JobState::Failed);
        let err = rec.error.expect("a failed job records its error");
        assert_eq!(err.code, "job_failed");
        assert!(err.message.contains("boom at"), "{}", err.message);
    }

    assert_threads_named("jobd-panicky-", THREADS);
    let stats = h.stats().unwrap();
    let pool = &stats.pools["panicky"];
    assert_eq!((pool.threads, pool.idle, pool.busy), (THREADS, THREADS, 0));
    assert_eq!(pool.counters.failed, 2 + THREADS as u64 * 3);

    for x in 0..1_000u64 {
        let x = x * 1000 + 1;
        let y: u64 = h.call("maybe_panic", &x, LONG).unwrap();
        assert_eq!(y, x * 2);
    }
    assert_threads_named("jobd-panicky-", THREADS);
    assert_eq!(
        h.stats().unwrap().pools["panicky"].counters.succeeded,
        1_000
    );

    rt.shutdown(LONG).unwrap();
}
