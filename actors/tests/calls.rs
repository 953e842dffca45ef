//! Round trips through the sync `Handle`: `call`, `submit` + `wait`, typed
//! payloads, errors a caller can match, and many producer threads at once.

mod common;

use std::sync::{Arc, Barrier};

use jobd_actors::{Handle, JobError, JobOptions, JobSpec, JobState, Runtime};
use serde::{Deserialize, Serialize};

use common::LONG;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Pair {
    a: i64,
    b: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sum {
    sum: i64,
    by: String,
}

fn runtime() -> Runtime {
    Runtime::builder()
        .pool("cpu", 2)
        .handler("add_one", "cpu", |_ctx, x: u64| Ok::<u64, String>(x + 1))
        .handler("sum", "cpu", |ctx, p: Pair| {
            Ok::<Sum, String>(Sum {
                sum: p.a + p.b,
                by: ctx.pool().to_string(),
            })
        })
        .handler("fail", "cpu", |_ctx, why: String| {
            Err::<(), String>(format!("refused: {why}"))
        })
        .start()
        .expect("runtime starts")
}

#[test]
fn handle_is_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<Handle>();
}

#[test]
fn call_submit_and_wait_round_trip() {
    let rt = runtime();
    let h = rt.handle();

    let y: u64 = h.call("add_one", &41u64, LONG).unwrap();
    assert_eq!(y, 42);

    let id = h.submit("add_one", &1u64, JobOptions::default()).unwrap();
    let v: u64 = h.wait(id, LONG).unwrap();
    assert_eq!(v, 2);
    // Waiting again on a finished job answers from its record.
    let again: u64 = h.wait(id, LONG).unwrap();
    assert_eq!(again, 2);

    let s: Sum = h.call("sum", &Pair { a: 40, b: 2 }, LONG).unwrap();
    assert_eq!(
        s,
        Sum {
            sum: 42,
            by: "cpu".into()
        }
    );

    let rec = h.status(id).unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(&*rec.kind, "add_one");
    assert_eq!(&*rec.pool, "cpu");
    assert_eq!(rec.attempt, 1);
    assert_eq!(rec.result.as_deref(), Some(&serde_json::json!(2)));

    rt.shutdown(LONG).unwrap();
}

#[test]
fn errors_are_distinct_variants() {
    let rt = runtime();
    let h = rt.handle();

    match h.call::<_, ()>("fail", "no", LONG) {
        Err(JobError::Failed { message, state, .. }) => {
            assert_eq!(message, "refused: no");
            assert_eq!(state, JobState::Failed);
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let id = h.submit("fail", "later", JobOptions::default()).unwrap();
    match h.wait::<()>(id, LONG) {
        Err(e @ JobError::Failed { .. }) => {
            assert_eq!(e.code(), "job_failed");
            assert!(e.to_string().contains("refused: later"), "{e}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }

    assert_eq!(
        h.call::<_, u64>("nope", &1u64, LONG),
        Err(JobError::UnknownKind("nope".into()))
    );
    assert_eq!(
        h.submit("add_one", &1u64, JobOptions::default().pool("nowhere")),
        Err(JobError::UnknownPool("nowhere".into()))
    );
    // The handler cannot decode this input: the job fails saying why.
    match h.call::<_, u64>("add_one", "not a number", LONG) {
        Err(JobError::Failed { message, .. }) => {
            assert!(message.contains("invalid payload"), "{message}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // The result cannot be decoded as the caller's type.
    assert!(matches!(
        h.call::<_, String>("add_one", &1u64, LONG),
        Err(JobError::Payload(_))
    ));
    assert!(matches!(
        h.status(jobd_actors::JobId(999_999)),
        Err(JobError::NotFound(_))
    ));

    rt.shutdown(LONG).unwrap();
}

#[test]
fn batches_are_all_or_nothing() {
    let rt = runtime();
    let h = rt.handle();
    let spec = |kind: &str, x: u64| JobSpec {
        kind: kind.into(),
        payload: serde_json::json!(x),
        options: JobOptions::default(),
    };
    let acks = h
        .submit_batch(vec![
            spec("add_one", 1),
            spec("add_one", 2),
            spec("add_one", 3),
        ])
        .unwrap();
    let got: Vec<u64> = acks.iter().map(|a| h.wait(a.id, LONG).unwrap()).collect();
    assert_eq!(got, [2, 3, 4]);

    match h.submit_batch(vec![spec("add_one", 1), spec("nope", 2)]) {
        Err(e @ JobError::BadRequest(_)) => {
            assert!(e.to_string().contains("job 1"), "{e}");
            assert_eq!(e.code(), "bad_request");
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
    // Nothing of the refused batch was admitted.
    assert_eq!(h.stats().unwrap().kinds["add_one"].counters.submitted, 3);
    rt.shutdown(LONG).unwrap();
}

#[test]
fn sixteen_producer_threads_two_thousand_calls_each() {
    const THREADS: u64 = 16;
    const CALLS: u64 = 2_000;
    let rt = runtime();
    let start = Arc::new(Barrier::new(THREADS as usize));
    let producers: Vec<_> = (0..THREADS)
        .map(|t| {
            let h = rt.handle();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut wrong = 0;
                for i in 0..CALLS {
                    let x = t * 1_000_000 + i;
                    let y: u64 = h.call("add_one", &x, LONG).unwrap();
                    if y != x + 1 {
                        wrong += 1;
                    }
                }
                wrong
            })
        })
        .collect();
    let wrong: u64 = producers.into_iter().map(|p| p.join().unwrap()).sum();
    assert_eq!(wrong, 0, "every answer must be the caller's own");

    let stats = rt.handle().stats().unwrap();
    let k = &stats.kinds["add_one"];
    assert_eq!(k.counters.submitted, THREADS * CALLS);
    assert_eq!(k.counters.succeeded, THREADS * CALLS);
    assert_eq!(k.run_time_ms.count, THREADS * CALLS);
    assert_eq!(stats.pools["cpu"].counters.succeeded, THREADS * CALLS);
    assert_eq!(stats.active_jobs, 0);

    rt.shutdown(LONG).unwrap();
}
