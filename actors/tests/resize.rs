//! Live pool changes: `Handle::resize_pool` grows and shrinks a running
//! pool without losing a job (old workers finish what they have, take
//! nothing new, and their threads exit), changes `max_queued` at once, and
//! a shutdown still waits for retiring workers. `Handle::add_pool` starts a
//! new pool that jobs reach through `JobOptions::pool`.
//!
//! Each test uses its own pool names, so thread counts by name do not mix.

mod common;

use std::time::Duration;

use jobd_actors::{Handle, JobError, JobId, JobOptions, JobState, PoolConfig, Runtime};

use common::{Gate, LONG, assert_threads_named, eventually, threads_named};

/// A started runtime with one pool `pool` of `threads` workers,
/// `max_queued` 100, and a kind `hold` on it that blocks on the returned
/// gate, then returns the name of the pool it ran on; and its handle.
fn runtime(pool: &str, threads: usize) -> (Runtime, Handle, Gate) {
    let gate = Gate::new();
    let g = gate.clone();
    let rt = Runtime::builder()
        .pool_config(PoolConfig {
            name: pool.into(),
            threads,
            max_queued: 100,
        })
        .handler("hold", pool, move |ctx, _: ()| {
            g.hold(ctx);
            Ok::<String, String>(ctx.pool().to_string())
        })
        .start()
        .unwrap();
    let h = rt.handle();
    (rt, h, gate)
}

fn hold_job(h: &Handle) -> JobId {
    h.submit("hold", &(), JobOptions::default()).unwrap()
}

#[test]
fn growing_a_pool_starts_queued_jobs_on_the_new_workers() {
    let (rt, h, gate) = runtime("grow", 1);
    assert_threads_named("jobd-grow-", 1);

    let ids: Vec<_> = (0..3).map(|_| hold_job(&h)).collect();
    gate.started();
    let before = &h.stats().unwrap().pools["grow"];
    assert_eq!((before.threads, before.running, before.queued), (1, 1, 2));

    h.resize_pool("grow", 3, 100).unwrap();
    // The two queued jobs start on new workers while the old one still
    // holds the first job.
    gate.started();
    gate.started();
    let during = &h.stats().unwrap().pools["grow"];
    assert_eq!(
        (during.threads, during.busy, during.idle, during.retiring),
        (3, 2, 1, 1),
        "{during:?}"
    );
    assert_eq!((during.running, during.queued), (3, 0));
    assert_threads_named("jobd-grow-", 4);

    gate.release_n(3);
    for id in ids {
        let r = h.wait_record(id, LONG).unwrap();
        assert_eq!(r.state, JobState::Succeeded, "{r:?}");
    }
    // The old worker's thread exits after its job; the new three stay.
    assert_threads_named("jobd-grow-", 3);
    let after = &h.stats().unwrap().pools["grow"];
    assert_eq!((after.threads, after.idle, after.retiring), (3, 3, 0));
    rt.shutdown(LONG).unwrap();
    assert_threads_named("jobd-grow-", 0);
}

#[test]
fn shrinking_a_pool_lets_running_jobs_finish_then_runs_one_at_a_time() {
    let (rt, h, gate) = runtime("shrink", 3);
    let ids: Vec<_> = (0..5).map(|_| hold_job(&h)).collect();
    for _ in 0..3 {
        gate.started();
    }

    h.resize_pool("shrink", 1, 100).unwrap();
    // The single new worker takes a queued job at once; the three old
    // workers keep theirs.
    gate.started();
    let during = &h.stats().unwrap().pools["shrink"];
    assert_eq!(
        (during.threads, during.busy, during.idle, during.retiring),
        (1, 1, 0, 3),
        "{during:?}"
    );
    assert_eq!((during.running, during.queued), (4, 1));

    gate.release_n(5);
    for id in ids {
        let r = h.wait_record(id, LONG).unwrap();
        assert_eq!(r.state, JobState::Succeeded, "{r:?}");
        assert_eq!(r.result.as_deref(), Some(&serde_json::json!("shrink")));
    }
    assert_threads_named("jobd-shrink-", 1);
    let after = &h.stats().unwrap().pools["shrink"];
    assert_eq!((after.threads, after.idle, after.retiring), (1, 1, 0));

    // From now on one job at a time: the others wait in the queue.
    let more: Vec<_> = (0..3).map(|_| hold_job(&h)).collect();
    gate.started();
    let one = &h.stats().unwrap().pools["shrink"];
    assert_eq!((one.running, one.queued), (1, 2), "{one:?}");
    gate.release_n(3);
    for id in more {
        assert_eq!(h.wait_record(id, LONG).unwrap().state, JobState::Succeeded);
    }
    rt.shutdown(LONG).unwrap();
}

#[test]
fn idle_workers_of_the_old_size_exit_at_once() {
    let (rt, h, _) = runtime("idle", 4);
    assert_threads_named("jobd-idle-", 4);
    h.resize_pool("idle", 2, 100).unwrap();
    assert_threads_named("jobd-idle-", 2);
    // Same size again: nothing is restarted.
    h.resize_pool("idle", 2, 100).unwrap();
    assert_threads_named("jobd-idle-", 2);
    rt.shutdown(LONG).unwrap();
}

#[test]
fn max_queued_changes_at_once_sync_and_async() {
    let (rt, h, gate) = runtime("limit", 1);
    let running = hold_job(&h);
    gate.started();
    let queued: Vec<_> = (0..2).map(|_| hold_job(&h)).collect();

    h.resize_pool("limit", 1, 2).unwrap();
    match h.submit("hold", &(), JobOptions::default()) {
        Err(JobError::QueueFull { pool, max_queued }) => {
            assert_eq!((pool.as_str(), max_queued), ("limit", 2));
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }

    // The async variant, from the System itself.
    let h2 = h.clone();
    h.run(
        move || async move { h2.resize_pool_async("limit", 1, 3).await },
        LONG,
    )
    .unwrap()
    .unwrap();
    let third = hold_job(&h);
    assert_eq!(h.stats().unwrap().pools["limit"].max_queued, 3);

    gate.release_n(4);
    for id in [running, third].into_iter().chain(queued) {
        assert_eq!(h.wait_record(id, LONG).unwrap().state, JobState::Succeeded);
    }
    rt.shutdown(LONG).unwrap();
}

#[test]
fn resizing_refuses_unknown_pools_and_empty_sizes() {
    let (rt, h, _) = runtime("refuse", 1);
    assert!(matches!(
        h.resize_pool("nope", 2, 10),
        Err(JobError::UnknownPool(p)) if p == "nope"
    ));
    assert!(matches!(
        h.resize_pool("refuse", 0, 10),
        Err(JobError::BadRequest(_))
    ));
    assert!(matches!(
        h.resize_pool("refuse", 1, 0),
        Err(JobError::BadRequest(_))
    ));
    assert_eq!(h.stats().unwrap().pools["refuse"].threads, 1);
    rt.shutdown(LONG).unwrap();
}

#[test]
fn shutdown_waits_for_retiring_workers() {
    let (rt, h, gate) = runtime("drain", 2);
    let ids: Vec<_> = (0..2).map(|_| hold_job(&h)).collect();
    gate.started();
    gate.started();
    h.resize_pool("drain", 1, 100).unwrap();
    assert_eq!(h.stats().unwrap().pools["drain"].retiring, 2);
    // Waiters for the two jobs, answered once the jobs are final.
    let waiters: Vec<_> = ids
        .iter()
        .map(|&id| {
            let h = h.clone();
            std::thread::spawn(move || h.wait_record(id, LONG))
        })
        .collect();

    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let shutdown = std::thread::spawn(move || {
        let r = rt.shutdown(LONG);
        let _ = done_tx.send(());
        r
    });
    // The drain waits for both old workers: nothing returns while they hold.
    assert!(
        done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "shutdown returned while retiring workers were still running"
    );
    gate.release_n(2);
    shutdown.join().unwrap().unwrap();
    // The drain counted the retiring workers: both jobs ended succeeded
    // before the runtime stopped (not `ShuttingDown`).
    for w in waiters {
        assert_eq!(w.join().unwrap().unwrap().state, JobState::Succeeded);
    }
    // Every pool thread, old and new, has exited.
    assert!(
        eventually(LONG, || threads_named("jobd-drain-") == 0),
        "{:?}",
        common::thread_names()
    );
}

#[test]
fn a_pool_added_live_runs_jobs_sent_to_it() {
    let (rt, h, gate) = runtime("base", 1);
    h.add_pool(PoolConfig {
        name: "extra".into(),
        threads: 2,
        max_queued: 10,
    })
    .unwrap();
    assert_threads_named("jobd-extra-", 2);
    let stats = h.stats().unwrap();
    assert_eq!(stats.pools["extra"].threads, 2);
    assert_eq!(stats.pools["extra"].max_queued, 10);

    let id = h
        .submit(
            "hold",
            &(),
            JobOptions {
                pool: Some("extra".into()),
                ..Default::default()
            },
        )
        .unwrap();
    gate.started();
    gate.release();
    let r = h.wait_record(id, LONG).unwrap();
    assert_eq!(r.result.as_deref(), Some(&serde_json::json!("extra")));
    assert_eq!(&*r.pool, "extra");

    assert!(matches!(
        h.add_pool(PoolConfig::new("extra", 1)),
        Err(JobError::BadRequest(_))
    ));
    // A pool added live can be resized like any other.
    h.resize_pool("extra", 1, 10).unwrap();
    assert_threads_named("jobd-extra-", 1);
    rt.shutdown(LONG).unwrap();
    assert_threads_named("jobd-extra-", 0);
}

#[test]
fn resizing_over_and_over_while_jobs_flow_loses_nothing() {
    // Workers finishing at the very moment of a resize (and taking the next
    // job from the handoff slot) are the racy case: hammer it.
    let rt = Runtime::builder()
        .pool("churn", 2)
        .handler("spin", "churn", |_ctx, n: u64| {
            if n.is_multiple_of(7) {
                std::thread::sleep(Duration::from_micros(300));
            }
            Ok::<u64, String>(n * 2)
        })
        .start()
        .unwrap();
    let h = rt.handle();
    let callers: Vec<_> = (0..4u64)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    let n = t * 1000 + i;
                    let got: u64 = h.call("spin", &n, LONG).unwrap();
                    assert_eq!(got, n * 2);
                }
            })
        })
        .collect();
    let mut sizes = [1usize, 3, 2, 4].into_iter().cycle();
    while !callers.iter().all(|c| c.is_finished()) {
        h.resize_pool("churn", sizes.next().unwrap(), 1000).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    for c in callers {
        c.join().unwrap();
    }
    h.resize_pool("churn", 3, 1000).unwrap();
    // Settled: every credit is back, no worker of an old size is left.
    assert!(
        eventually(LONG, || {
            let p = &h.stats().unwrap().pools["churn"];
            (p.threads, p.idle, p.busy, p.retiring, p.running) == (3, 3, 0, 0, 0)
        }),
        "{:?}",
        h.stats().unwrap().pools["churn"]
    );
    assert_eq!(h.stats().unwrap().pools["churn"].counters.succeeded, 1200);
    assert_threads_named("jobd-churn-", 3);
    rt.shutdown(LONG).unwrap();
    assert_threads_named("jobd-churn-", 0);
}
