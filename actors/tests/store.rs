//! The durable store through the embedding API: restart keeps queued jobs
//! (order, priorities, delays) and finished results; a job that was running
//! when the process died is retried or ends failed; write failures refuse
//! new submissions with `Unavailable` and recover by themselves.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobd_actors::{
    Change, JobError, JobId, JobOptions, JobState, MemoryStore, PoolConfig, Retention, Runtime,
    SqliteStore, SqliteSync, Store,
};

const T: Duration = Duration::from_secs(10);

fn open(path: &Path) -> Box<dyn Store> {
    Box::new(SqliteStore::open(path, SqliteSync::Os).expect("open store"))
}

/// A runtime whose "work" pool records the order in which jobs ran.
fn runtime(store: Box<dyn Store>, ran: Arc<Mutex<Vec<u64>>>) -> Runtime {
    Runtime::builder()
        .pool_config(PoolConfig {
            name: "work".into(),
            threads: 1,
            max_queued: 1000,
        })
        .handler("record", "work", move |_ctx, n: u64| {
            ran.lock().unwrap().push(n);
            Ok::<u64, String>(n * 10)
        })
        .store(store)
        .start()
        .expect("start")
}

#[test]
fn restart_keeps_queued_order_priorities_delays_and_results() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let ran = Arc::new(Mutex::new(Vec::new()));
    let (done, queued, delayed);
    {
        let rt = runtime(open(&path), ran.clone());
        let h = rt.handle();
        done = h.submit("record", &7u64, JobOptions::default()).unwrap();
        assert_eq!(h.wait::<u64>(done, T).unwrap(), 70);
        h.set_paused("work", true).unwrap();
        queued = [(1u64, 1), (2, 5), (3, 3), (4, 5)].map(|(n, p)| {
            h.submit("record", &n, JobOptions::default().priority(p))
                .unwrap()
        });
        delayed = h
            .submit(
                "record",
                &99u64,
                JobOptions::default().delay(Duration::from_secs(3600)),
            )
            .unwrap();
        rt.shutdown(T).unwrap();
    }
    assert_eq!(*ran.lock().unwrap(), vec![7]);

    let ran2 = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime(open(&path), ran2.clone());
    let h = rt.handle();
    // The finished result and the pause survived.
    let rec = h.status(done).unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(rec.result.as_deref(), Some(&serde_json::json!(70)));
    assert!(h.stats().unwrap().pools["work"].paused);
    let d = h.status(delayed).unwrap();
    assert_eq!(d.state, JobState::Delayed);
    // New ids continue after the old ones.
    let fresh = h
        .submit("record", &0u64, JobOptions::default().priority(-1))
        .unwrap();
    assert!(fresh > delayed);
    h.set_paused("work", false).unwrap();
    for id in queued {
        h.wait_record(id, T).unwrap();
    }
    h.wait_record(fresh, T).unwrap();
    // Priority 5 first (FIFO: 2 before 4), then 3, then 1, then the new one.
    assert_eq!(*ran2.lock().unwrap(), vec![2, 4, 3, 1, 0]);
    assert_eq!(h.status(delayed).unwrap().state, JobState::Delayed);
    rt.shutdown(T).unwrap();
}

/// Write what a crashed process would have left: a job marked running.
fn crashed_store(path: &Path, id: u64, attempt: u32, max_attempts: u32) {
    let mut store = SqliteStore::open(path, SqliteSync::Os).unwrap();
    let now = jobd_actors::now_ms();
    let rec = jobd_actors::JobRecord {
        id: JobId(id),
        kind: "record".into(),
        pool: "work".into(),
        state: JobState::Running,
        priority: 0,
        attempt,
        max_attempts,
        payload: Arc::new(serde_json::json!(5)),
        result: None,
        error: None,
        attempts: vec![jobd_actors::Attempt {
            start: now,
            end: None,
            error: None,
        }],
        timeout_ms: None,
        backoff: Default::default(),
        unique_key: None,
        after: Box::default(),
        created_at: now,
        run_at: now,
        started_at: Some(now),
        finished_at: None,
        submitted_by: None,
    };
    store.commit(&[Change::Put(Box::new(rec))]).unwrap();
}

/// Start a runtime on a store at `path` that a crash left with job `id`
/// running at `attempt` of `max_attempts`; what its "work" pool ran.
fn restart_after_crash(
    path: &Path,
    id: u64,
    attempt: u32,
    max_attempts: u32,
) -> (Runtime, Arc<Mutex<Vec<u64>>>) {
    crashed_store(path, id, attempt, max_attempts);
    let ran = Arc::new(Mutex::new(Vec::new()));
    (runtime(open(path), ran.clone()), ran)
}

#[test]
fn a_job_running_at_a_crash_is_retried_if_it_has_attempts_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let (rt, ran) = restart_after_crash(&path, 41, 1, 3);
    let h = rt.handle();
    let rec = h.wait_record(JobId(41), T).unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(rec.attempt, 2, "the interrupted attempt counts");
    assert_eq!(
        rec.attempts[0].error.as_deref(),
        Some("interrupted: daemon stopped while running")
    );
    assert_eq!(*ran.lock().unwrap(), vec![5]);
    rt.shutdown(T).unwrap();
}

#[test]
fn a_job_running_at_a_crash_without_attempts_left_ends_failed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let (rt, ran) = restart_after_crash(&path, 8, 1, 1);
    let h = rt.handle();
    let rec = h.wait_record(JobId(8), T).unwrap();
    assert_eq!(rec.state, JobState::Failed);
    let err = rec.error.unwrap();
    assert_eq!(err.message, "interrupted: daemon stopped while running");
    assert!(ran.lock().unwrap().is_empty());
    rt.shutdown(T).unwrap();
    // And that outcome was written back.
    let mut store = SqliteStore::open(&path, SqliteSync::Os).unwrap();
    let again = store.get(JobId(8)).unwrap().unwrap();
    assert_eq!(again.state, JobState::Failed);
}

#[test]
fn write_failures_refuse_submissions_and_recover_by_themselves() {
    let store = MemoryStore::new();
    let fail = store.fail_switch();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime(Box::new(store), ran.clone());
    let h = rt.handle();
    let before = h.submit("record", &1u64, JobOptions::default()).unwrap();
    assert_eq!(h.wait::<u64>(before, T).unwrap(), 10);

    fail.store(true, Ordering::SeqCst);
    let e = h
        .submit("record", &2u64, JobOptions::default())
        .unwrap_err();
    assert!(matches!(e, JobError::Unavailable(_)), "{e:?}");
    assert_eq!(e.code(), "unavailable");
    let e = h.call::<_, u64>("record", &3u64, T).unwrap_err();
    assert!(matches!(e, JobError::Unavailable(_)), "{e:?}");
    // Committed jobs are intact.
    assert_eq!(h.status(before).unwrap().state, JobState::Succeeded);
    assert!(h.stats().unwrap().store.unwrap().failing.is_some());

    fail.store(false, Ordering::SeqCst);
    // The store is retried in the background; poll until it takes writes.
    let deadline = std::time::Instant::now() + T;
    let after = loop {
        match h.submit("record", &4u64, JobOptions::default()) {
            Ok(id) => break id,
            Err(JobError::Unavailable(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("store did not recover: {e}"),
        }
    };
    assert_eq!(h.wait::<u64>(after, T).unwrap(), 40);
    // The refused jobs never ran.
    assert_eq!(*ran.lock().unwrap(), vec![1, 4]);
    rt.shutdown(T).unwrap();
}

#[test]
fn finished_jobs_pruned_from_memory_are_read_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let rt = Runtime::builder()
        .pool("work", 1)
        .handler("double", "work", |_ctx, n: u64| Ok::<u64, String>(n * 2))
        .retention(Retention {
            ttl: Duration::from_secs(3600),
            max_jobs: 2,
        })
        .store(open(&path))
        .start()
        .unwrap();
    let h = rt.handle();
    let ids: Vec<JobId> = (0..10u64)
        .map(|n| h.submit("double", &n, JobOptions::default()).unwrap())
        .collect();
    for id in &ids {
        h.wait_record(*id, T).unwrap();
    }
    let first = h.status(ids[0]).unwrap();
    assert_eq!(first.result.as_deref(), Some(&serde_json::json!(0)));
    assert_eq!(h.wait::<u64>(ids[1], T).unwrap(), 2);
    assert_eq!(h.stats().unwrap().retained_jobs, 2);
    let page = h
        .list(jobd_actors::ListQuery {
            limit: Some(4),
            ..Default::default()
        })
        .unwrap();
    let listed: Vec<JobId> = page.jobs.iter().map(|r| r.id).collect();
    assert_eq!(
        listed,
        ids.iter().rev().take(4).copied().collect::<Vec<_>>()
    );
    assert!(page.cursor.is_some());
    rt.shutdown(T).unwrap();
}

#[test]
fn a_dead_job_known_only_to_the_store_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let flaky = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = flaky.clone();
    let rt = Runtime::builder()
        .pool("work", 1)
        .handler("flaky", "work", move |_ctx, n: u64| {
            if f.load(Ordering::SeqCst) {
                Err(format!("flaky {n}"))
            } else {
                Ok(n)
            }
        })
        .handler("noop", "work", |_ctx, n: u64| Ok::<u64, String>(n))
        .retention(Retention {
            ttl: Duration::from_secs(3600),
            max_jobs: 1,
        })
        .store(open(&path))
        .start()
        .unwrap();
    let h = rt.handle();
    let opts = JobOptions::default()
        .max_attempts(2)
        .backoff(jobd_actors::Backoff {
            base_ms: 1,
            factor: 1.0,
            max_ms: 1,
        });
    let id = h.submit("flaky", &3u64, opts).unwrap();
    let rec = h.wait_record(id, T).unwrap();
    assert_eq!(rec.state, JobState::Dead);
    assert_eq!(rec.attempts.len(), 2);
    // Push it out of memory.
    let other = h.submit("noop", &1u64, JobOptions::default()).unwrap();
    h.wait_record(other, T).unwrap();
    flaky.store(false, Ordering::SeqCst);
    let again = h.retry(id).unwrap();
    assert!(!again.state.is_final(), "{:?}", again.state);
    assert!(again.attempt <= 1, "fresh attempts");
    assert_eq!(h.wait::<u64>(id, T).unwrap(), 3);
    rt.shutdown(T).unwrap();
}
