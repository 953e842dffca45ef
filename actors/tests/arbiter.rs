//! Blocking `Handle` methods called on an actix arbiter thread (inside an
//! actor, or inside a future the bridge runs) return `OnArbiterThread`
//! instead of hanging the event loop that would have to answer them.

mod common;

use actix::{Actor, Context, Handler, Message};
use jobd_actors::{Handle, JobError, JobId, JobOptions, Runtime};

use common::LONG;

fn runtime() -> Runtime {
    Runtime::builder()
        .pool("cpu", 1)
        .handler("add_one", "cpu", |_ctx, x: u64| Ok::<u64, String>(x + 1))
        .start()
        .unwrap()
}

/// Every blocking operation, tried from the current thread.
fn try_all_blocking(h: &Handle) -> Vec<(&'static str, Result<(), JobError>)> {
    let addr = Probe { h: h.clone() }.start();
    vec![
        ("call", h.call::<_, u64>("add_one", &1u64, LONG).map(drop)),
        (
            "submit",
            h.submit("add_one", &1u64, JobOptions::default()).map(drop),
        ),
        ("wait", h.wait::<u64>(JobId(1), LONG).map(drop)),
        ("wait_any", h.wait_any(&[JobId(1)], LONG).map(drop)),
        ("status", h.status(JobId(1)).map(drop)),
        ("cancel", h.cancel(JobId(1)).map(drop)),
        ("stats", h.stats().map(drop)),
        ("send", h.send(&addr, Ping, LONG).map(drop)),
        ("run", h.run(|| async {}, LONG)),
    ]
}

struct Probe {
    h: Handle,
}

impl Actor for Probe {
    type Context = Context<Self>;
}

struct TryBlocking;

impl Message for TryBlocking {
    type Result = Vec<(&'static str, Result<(), JobError>)>;
}

impl Handler<TryBlocking> for Probe {
    type Result = Vec<(&'static str, Result<(), JobError>)>;
    fn handle(&mut self, _: TryBlocking, _: &mut Context<Self>) -> Self::Result {
        try_all_blocking(&self.h)
    }
}

struct Ping;

impl Message for Ping {
    type Result = ();
}

impl Handler<Ping> for Probe {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

fn assert_all_refused(results: Vec<(&'static str, Result<(), JobError>)>) {
    assert_eq!(results.len(), 9);
    for (op, r) in results {
        assert_eq!(r, Err(JobError::OnArbiterThread), "{op}");
    }
}

#[test]
fn blocking_calls_inside_an_actor_are_refused_not_hung() {
    let rt = runtime();
    let h = rt.handle();
    let addr = common::start_actor(&h, |h| Probe { h });
    assert_all_refused(h.send(&addr, TryBlocking, LONG).unwrap());

    // Directly inside a bridged future, too.
    let h2 = h.clone();
    assert_all_refused(
        h.run(move || async move { try_all_blocking(&h2) }, LONG)
            .unwrap(),
    );
    assert_eq!(
        JobError::OnArbiterThread.code(),
        "internal",
        "not a client's fault, not a job's outcome"
    );

    // The runtime is unharmed and the same calls work from a plain thread.
    assert_eq!(h.call::<_, u64>("add_one", &1u64, LONG), Ok(2));
    rt.shutdown(LONG).unwrap();
}

#[test]
fn blocking_calls_on_an_apps_own_actix_system_are_refused_too() {
    let rt = runtime();
    let h = rt.handle();
    // The app runs its own System on this thread; jobd's lives elsewhere.
    let sys = actix::System::new();
    let (refused, async_ok) = sys.block_on(async {
        let refused = h.call::<_, u64>("add_one", &1u64, LONG);
        let async_ok = h
            .call_async::<_, u64>("add_one", &41u64, JobOptions::default())
            .await;
        (refused, async_ok)
    });
    assert_eq!(refused, Err(JobError::OnArbiterThread));
    assert_eq!(async_ok, Ok(42));
    drop(sys);
    rt.shutdown(LONG).unwrap();
}
