//! Shutdown: stop admitting, let running jobs finish, answer every waiter,
//! start nothing new during the drain, and join every thread (counted in
//! `/proc/self/task`). Submits afterwards get `ShuttingDown`.
//!
//! These scenarios count the process's threads, so nothing else may run
//! beside them: this file holds one `#[test]` that runs them in turn.

mod common;

use std::time::Duration;

use crossbeam_channel::unbounded;
use jobd_actors::{JobError, JobOptions, JobSpec, JobState, Runtime, ShutdownError};

use common::{Gate, LONG, eventually, held, held_then_report_cancel, recorded, thread_count};

#[test]
fn shutdown() {
    drains_answers_everyone_and_joins_every_thread();
    dropping_the_runtime_shuts_it_down_too();
    at_the_deadline_running_handlers_are_told_to_stop();
}

/// A thread leaves /proc a moment after it signalled its exit: poll.
fn assert_threads_back_to(baseline: usize) {
    assert!(
        eventually(LONG, || thread_count() == baseline),
        "{} threads, expected {baseline}: {:?}",
        thread_count(),
        common::thread_names()
    );
}

fn drains_answers_everyone_and_joins_every_thread() {
    let baseline = thread_count();
    let gate = Gate::new();
    let (ran_tx, ran_rx) = unbounded::<String>();
    let rt = Runtime::builder()
        .pool("work", 2)
        .pool("io", 3)
        .handler("hold", "work", held::<u32>(&gate))
        .handler("tag", "work", recorded(ran_tx))
        .start()
        .unwrap();
    // System thread + 2 + 3 + the default pool's threads.
    assert!(thread_count() >= baseline + 6);
    let names = common::thread_names();
    assert!(names.iter().any(|n| n == "jobd-system"), "{names:?}");
    common::assert_threads_named("jobd-work-", 2);
    common::assert_threads_named("jobd-io-", 3);
    let h = rt.handle();

    // Two running jobs hold both workers; one of them has a `call` waiter
    // and a `wait` waiter.
    let caller = {
        let h = h.clone();
        std::thread::spawn(move || h.call::<_, u32>("hold", &1u32, LONG))
    };
    let a = gate.started();
    let b = h.submit("hold", &2u32, JobOptions::default()).unwrap();
    assert_eq!(gate.started(), b);
    let a_waiter = {
        let h = h.clone();
        std::thread::spawn(move || h.wait::<u32>(a, LONG))
    };
    // A queued job with a `call` waiter and a `wait` waiter, and a job that
    // waits for `a` to succeed.
    let queued_caller = {
        let h = h.clone();
        std::thread::spawn(move || h.call::<_, ()>("tag", "queued-call", LONG))
    };
    let queued = h.submit("tag", "queued", JobOptions::default()).unwrap();
    let queued_waiter = {
        let h = h.clone();
        std::thread::spawn(move || h.wait::<()>(queued, LONG))
    };
    let dependent = h
        .submit("tag", "dependent", JobOptions::default().after([a]))
        .unwrap();
    assert!(eventually(LONG, || h.stats().unwrap().pools["work"].queued == 2));
    assert_eq!(h.status(dependent).unwrap().state, JobState::Delayed);

    let stopper = std::thread::spawn(move || rt.shutdown(LONG));
    // Admission stops first.
    assert!(eventually(LONG, || {
        h.submit("tag", "late", JobOptions::default()) == Err(JobError::ShuttingDown)
    }));
    let spec = JobSpec {
        kind: "tag".into(),
        payload: serde_json::json!("batch"),
        options: JobOptions::default(),
    };
    assert_eq!(h.submit_batch(vec![spec]), Err(JobError::ShuttingDown));
    // Waiters of jobs that will not start are answered at once.
    assert_eq!(queued_caller.join().unwrap(), Err(JobError::ShuttingDown));
    assert_eq!(queued_waiter.join().unwrap(), Err(JobError::ShuttingDown));

    // Running jobs finish and their waiters get the result.
    gate.release_job(a);
    assert_eq!(caller.join().unwrap(), Ok(1));
    assert_eq!(a_waiter.join().unwrap(), Ok(1));
    // `a` succeeded, so `dependent` became ready, and a worker is idle: but
    // nothing new starts during the drain.
    assert!(eventually(LONG, || {
        h.status(dependent).unwrap().state != JobState::Delayed
    }));
    assert_eq!(h.status(dependent).unwrap().state, JobState::Queued);
    assert_eq!(h.status(b).unwrap().state, JobState::Running);

    gate.release_job(b);
    assert!(matches!(stopper.join().unwrap(), Ok(())));
    assert!(
        ran_rx.is_empty(),
        "{:?}",
        ran_rx.try_iter().collect::<Vec<_>>()
    );

    // Every thread the runtime started is gone.
    assert_threads_back_to(baseline);

    // A handle that outlived the runtime says it is shut down.
    assert_eq!(
        h.submit("tag", "after", JobOptions::default()),
        Err(JobError::ShuttingDown)
    );
    assert_eq!(
        h.call::<_, ()>("tag", "after", LONG),
        Err(JobError::ShuttingDown)
    );
    assert!(matches!(h.status(a), Err(JobError::ShuttingDown)));
    assert!(matches!(
        h.run(|| async { 1 }, LONG),
        Err(JobError::ShuttingDown)
    ));
}

fn dropping_the_runtime_shuts_it_down_too() {
    let baseline = thread_count();
    let rt = Runtime::builder()
        .pool("p", 2)
        .handler("id", "p", |_ctx, x: u32| Ok::<u32, String>(x))
        .start()
        .unwrap();
    let h = rt.handle();
    assert_eq!(h.call::<_, u32>("id", &5u32, LONG), Ok(5));
    drop(rt);
    assert_threads_back_to(baseline);
    assert_eq!(
        h.submit("id", &1u32, JobOptions::default()),
        Err(JobError::ShuttingDown)
    );
}

fn at_the_deadline_running_handlers_are_told_to_stop() {
    let baseline = thread_count();
    let gate = Gate::new();
    let (seen_tx, seen_rx) = unbounded::<bool>();
    let rt = Runtime::builder()
        .pool("p", 2)
        // Stops when told to.
        .handler("polite", "p", move |ctx, _: ()| {
            while !ctx.is_cancelled() {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok::<(), String>(())
        })
        // Ignores it until released.
        .handler("stubborn", "p", held_then_report_cancel(&gate, seen_tx))
        .start()
        .unwrap();
    let h = rt.handle();
    let polite = {
        let h = h.clone();
        std::thread::spawn(move || h.call::<_, ()>("polite", &(), LONG))
    };
    let stubborn = gate.occupy(&h, "stubborn");
    assert!(eventually(LONG, || h.stats().unwrap().pools["p"].running == 2));
    let waiter = {
        let h = h.clone();
        std::thread::spawn(move || h.wait::<()>(stubborn, LONG))
    };

    // The stubborn handler outlives the deadline: shutdown says so.
    let out = rt.shutdown(Duration::from_millis(200));
    assert!(matches!(out, Err(ShutdownError::WorkersBusy(1))), "{out:?}");
    // Both waiters were answered at the deadline.
    assert_eq!(polite.join().unwrap(), Err(JobError::ShuttingDown));
    assert_eq!(waiter.join().unwrap(), Err(JobError::ShuttingDown));
    gate.release();
    assert!(seen_rx.recv_timeout(LONG).unwrap(), "told to stop");
    assert_threads_back_to(baseline);
}
