//! Pools are isolated: a blocking job holding the only thread of one pool
//! does not delay the jobs of another. Also: thread names, the pool override
//! of `JobOptions`, and credit-based dispatch (a busy pool keeps its jobs
//! queued in the Dispatcher, visible in `stats`).

mod common;

use jobd_actors::{JobOptions, JobState, Runtime};

use common::{Gate, LONG, assert_threads_named, held};

#[test]
fn a_held_slow_pool_does_not_delay_the_fast_pool() {
    let gate = Gate::new();
    let rt = Runtime::builder()
        .pool("slow", 1)
        .pool("fast", 2)
        .handler("block", "slow", held::<()>(&gate))
        .handler("quick", "fast", |ctx, x: u32| {
            Ok::<(u32, String), String>((x, ctx.pool().to_string()))
        })
        .start()
        .unwrap();
    let h = rt.handle();
    assert_threads_named("jobd-slow-", 1);
    assert_threads_named("jobd-fast-", 2);

    let blocked = gate.occupy(&h, "block");
    // A second slow job has to wait for the held one.
    let queued = h.submit("block", &(), JobOptions::default()).unwrap();

    for x in 0..200u32 {
        let (y, pool): (u32, String) = h.call("quick", &x, LONG).unwrap();
        assert_eq!((y, pool.as_str()), (x, "fast"));
    }

    // All of that happened while "slow" was still held.
    assert_eq!(h.status(blocked).unwrap().state, JobState::Running);
    assert_eq!(h.status(queued).unwrap().state, JobState::Queued);
    let stats = h.stats().unwrap();
    let slow = &stats.pools["slow"];
    assert_eq!(
        (slow.busy, slow.idle, slow.queued, slow.running),
        (1, 0, 1, 1)
    );
    assert_eq!(stats.pools["fast"].counters.succeeded, 200);

    gate.release_n(2);
    h.wait::<()>(blocked, LONG).unwrap();
    h.wait::<()>(queued, LONG).unwrap();
    rt.shutdown(LONG).unwrap();
}

#[test]
fn pool_option_overrides_the_kinds_pool() {
    let rt = Runtime::builder()
        .pool("here", 1)
        .pool("there", 1)
        .handler("where", "here", |ctx, _: ()| {
            Ok::<String, String>(ctx.pool().to_string())
        })
        .start()
        .unwrap();
    let h = rt.handle();
    let a: String = h.call("where", &(), LONG).unwrap();
    let b: String = h
        .call_with("where", &(), JobOptions::default().pool("there"), LONG)
        .unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("here", "there"));
    let stats = h.stats().unwrap();
    assert_eq!(stats.pools["here"].counters.succeeded, 1);
    assert_eq!(stats.pools["there"].counters.succeeded, 1);
    rt.shutdown(LONG).unwrap();
}

#[test]
fn undeclared_pool_or_zero_threads_is_a_start_error() {
    let err = Runtime::builder()
        .handler("k", "missing", |_ctx, _: ()| Ok::<(), String>(()))
        .start()
        .err()
        .expect("a kind on an undeclared pool is refused");
    assert!(err.to_string().contains("missing"), "{err}");
    let err = Runtime::builder()
        .pool("empty", 0)
        .start()
        .err()
        .expect("a pool without threads is refused");
    assert!(err.to_string().contains("empty"), "{err}");
}
