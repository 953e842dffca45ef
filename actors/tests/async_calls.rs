//! The async variants (`call_async`, `submit_async`, `wait_async`, …) used
//! from inside an actix actor on the runtime's System and from a tokio
//! runtime: they complete, and while one is pending the event loop goes on
//! serving others (nothing blocks a thread).

mod common;

use actix::{Actor, Context, Handler, Message, ResponseFuture};
use jobd_actors::{Handle, JobError, JobOptions, JobSpec, JobState, Runtime};

use common::{Gate, LONG, held};

fn runtime(gate: &Gate) -> Runtime {
    Runtime::builder()
        .pool("slow", 1)
        .pool("fast", 2)
        .handler("hold", "slow", held::<u64>(gate))
        .handler("double", "fast", |_ctx, x: u64| Ok::<u64, String>(x * 2))
        .handler("fail", "fast", |_ctx, _: ()| Err::<(), _>("no"))
        .start()
        .unwrap()
}

fn spec(kind: &str, x: u64) -> JobSpec {
    JobSpec {
        kind: kind.into(),
        payload: serde_json::json!(x),
        options: JobOptions::default(),
    }
}

/// An app actor that orchestrates jobs with the async API.
struct Orchestrator {
    h: Handle,
}

impl Actor for Orchestrator {
    type Context = Context<Self>;
}

/// `call_async` a job that is held until the test releases it.
struct CallHeld(u64);

impl Message for CallHeld {
    type Result = Result<u64, JobError>;
}

impl Handler<CallHeld> for Orchestrator {
    type Result = ResponseFuture<Result<u64, JobError>>;
    fn handle(&mut self, m: CallHeld, _: &mut Context<Self>) -> Self::Result {
        let h = self.h.clone();
        Box::pin(async move { h.call_async("hold", &m.0, JobOptions::default()).await })
    }
}

/// `submit_async` then `wait_async`, `status_async` and `stats_async`.
struct SubmitAndWait(u64);

impl Message for SubmitAndWait {
    type Result = Result<(u64, JobState, u64), JobError>;
}

impl Handler<SubmitAndWait> for Orchestrator {
    type Result = ResponseFuture<Result<(u64, JobState, u64), JobError>>;
    fn handle(&mut self, m: SubmitAndWait, _: &mut Context<Self>) -> Self::Result {
        let h = self.h.clone();
        Box::pin(async move {
            let ack = h.submit_async(spec("double", m.0)).await?;
            let rec = h.wait_async(ack.id).await?;
            let v: u64 = rec.outcome()?;
            let state = h.status_async(ack.id).await?.state;
            let done = h.stats_async().await?.pools["fast"].counters.succeeded;
            Ok((v, state, done))
        })
    }
}

#[test]
fn async_calls_inside_an_actor_do_not_block_its_arbiter() {
    let gate = Gate::new();
    let rt = runtime(&gate);
    let h = rt.handle();
    let addr = common::start_actor(&h, |h| Orchestrator { h });

    // The actor awaits a job that is held...
    let held = {
        let (h, addr) = (h.clone(), addr.clone());
        std::thread::spawn(move || h.send(&addr, CallHeld(7), LONG))
    };
    gate.started();
    // ...and meanwhile it (and the System arbiter it shares with the
    // Dispatcher) serves other work.
    for x in 1..=20u64 {
        let (v, state, done) = h.send(&addr, SubmitAndWait(x), LONG).unwrap().unwrap();
        assert_eq!((v, state, done), (x * 2, JobState::Succeeded, x));
    }
    assert!(!held.is_finished());

    gate.release();
    assert_eq!(held.join().unwrap(), Ok(Ok(7)));
    rt.shutdown(LONG).unwrap();
}

#[test]
fn async_calls_from_a_single_threaded_tokio_runtime() {
    let gate = Gate::new();
    let rt = runtime(&gate);
    let h = rt.handle();
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio_rt.block_on(async {
        // One task waits on a held job; the only tokio thread stays free.
        let held = tokio::spawn({
            let h = h.clone();
            async move {
                h.call_async::<_, u64>("hold", &3u64, JobOptions::default())
                    .await
            }
        });
        let held_id = tokio::task::spawn_blocking({
            let gate = gate.clone();
            move || gate.started()
        })
        .await
        .unwrap();

        let v: u64 = h
            .call_async("double", &21u64, JobOptions::default())
            .await
            .unwrap();
        assert_eq!(v, 42);
        let a = h.submit_async(spec("double", 5)).await.unwrap();
        assert!(matches!(a.state, JobState::Queued | JobState::Running));
        let b = h.submit_async(spec("fail", 0)).await.unwrap();
        let first = h.wait_any_async(vec![held_id, b.id]).await.unwrap();
        assert_eq!(first.id, b.id);
        assert_eq!(first.state, JobState::Failed);
        assert!(matches!(
            first.outcome::<()>(),
            Err(JobError::Failed { .. })
        ));
        let rec = h.wait_async(a.id).await.unwrap();
        assert_eq!(rec.outcome::<u64>(), Ok(10));
        assert_eq!(
            h.status_async(held_id).await.unwrap().state,
            JobState::Running
        );
        assert!(!held.is_finished());

        gate.release();
        assert_eq!(held.await.unwrap(), Ok(3));

        // Cancel through the async API.
        let c = h.submit_async(spec("hold", 1)).await.unwrap();
        let rec = h.cancel_async(c.id).await.unwrap();
        assert_eq!(rec.state, JobState::Cancelled);
        gate.release();
        assert!(matches!(
            h.wait_async(c.id).await.unwrap().outcome::<u64>(),
            Err(JobError::Cancelled { .. })
        ));
    });
    rt.shutdown(LONG).unwrap();
}
