//! The general bridge for apps with actors of their own: plain threads
//! `send` messages to an app-defined actor started on the runtime's System
//! and block for the replies; `run` runs a future there and blocks for its
//! output, and drops it at the deadline.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Context, Handler, Message, MessageResult, ResponseFuture};
use crossbeam_channel::{Sender, unbounded};
use jobd_actors::{Handle, JobError, Runtime};

use common::LONG;

/// An app-defined actor: counts what it was sent.
#[derive(Default)]
struct Tally {
    seen: u64,
    sum: u64,
}

impl Actor for Tally {
    type Context = Context<Self>;
}

/// Add a number; the reply echoes it with the thread that sent it.
struct Add {
    from: usize,
    x: u64,
}

impl Message for Add {
    type Result = (usize, u64);
}

impl Handler<Add> for Tally {
    type Result = MessageResult<Add>;
    fn handle(&mut self, m: Add, _: &mut Context<Self>) -> MessageResult<Add> {
        self.seen += 1;
        self.sum += m.x;
        MessageResult((m.from, m.x * 3))
    }
}

/// How many messages and what sum.
struct Totals;

impl Message for Totals {
    type Result = (u64, u64);
}

impl Handler<Totals> for Tally {
    type Result = MessageResult<Totals>;
    fn handle(&mut self, _: Totals, _: &mut Context<Self>) -> MessageResult<Totals> {
        MessageResult((self.seen, self.sum))
    }
}

/// Never answered.
struct Ignore;

impl Message for Ignore {
    type Result = ();
}

impl Handler<Ignore> for Tally {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Ignore, _: &mut Context<Self>) -> ResponseFuture<()> {
        Box::pin(futures::future::pending())
    }
}

fn runtime() -> Runtime {
    Runtime::builder().pool("default", 1).start().unwrap()
}

fn start_tally(h: &Handle) -> Addr<Tally> {
    // Actix futures are not Send: the closure builds one on the System.
    h.run(|| async { Tally::default().start() }, LONG).unwrap()
}

#[test]
fn eight_threads_send_to_an_app_actor_and_get_every_reply() {
    const THREADS: usize = 8;
    const EACH: u64 = 500;
    let rt = runtime();
    let h = rt.handle();
    let addr = start_tally(&h);
    let go = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (h, addr, go) = (h.clone(), addr.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                (0..EACH)
                    .filter(|&i| {
                        let x = t as u64 * 10_000 + i;
                        h.send(&addr, Add { from: t, x }, LONG).unwrap() != (t, x * 3)
                    })
                    .count()
            })
        })
        .collect();
    let wrong: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(wrong, 0);
    let expected_sum: u64 = (0..THREADS as u64)
        .flat_map(|t| (0..EACH).map(move |i| t * 10_000 + i))
        .sum();
    assert_eq!(
        h.send(&addr, Totals, LONG).unwrap(),
        (THREADS as u64 * EACH, expected_sum)
    );
    rt.shutdown(LONG).unwrap();
}

#[test]
fn run_returns_a_futures_output_and_can_use_actix() {
    let rt = runtime();
    let h = rt.handle();
    let v = h
        .run(
            || async {
                actix_rt::time::sleep(Duration::from_millis(1)).await;
                40 + 2
            },
            LONG,
        )
        .unwrap();
    assert_eq!(v, 42);

    // The future may talk to actors on the System and use non-Send state.
    let addr = start_tally(&h);
    let out = h
        .run(
            move || async move {
                let local = std::rc::Rc::new(7u64);
                let a = addr.send(Add { from: 0, x: *local }).await.unwrap();
                let b = addr.send(Totals).await.unwrap();
                (a, b)
            },
            LONG,
        )
        .unwrap();
    assert_eq!(out, ((0, 21), (1, 7)));
    rt.shutdown(LONG).unwrap();
}

/// Signals when the future holding it is dropped.
struct DropSignal(Sender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[test]
fn a_future_that_never_completes_times_out_and_is_dropped() {
    let rt = runtime();
    let h = rt.handle();
    let (dropped_tx, dropped_rx) = unbounded();
    let (polled_tx, polled_rx) = unbounded();
    let deadline = Duration::from_millis(200);
    let t0 = Instant::now();
    let out = h.run(
        move || async move {
            let _signal = DropSignal(dropped_tx);
            let _ = polled_tx.send(());
            futures::future::pending::<u32>().await
        },
        deadline,
    );
    let waited = t0.elapsed();
    match out {
        Err(e @ JobError::WaitTimeout { id: None, .. }) => assert_eq!(e.code(), "timeout"),
        other => panic!("expected WaitTimeout, got {other:?}"),
    }
    assert!(
        waited >= deadline && waited < LONG,
        "answered after {waited:?}"
    );
    // It did run, and it is dropped soon after the deadline: no leak.
    polled_rx.try_recv().expect("the future was polled");
    dropped_rx
        .recv_timeout(LONG)
        .expect("the timed-out future was dropped");

    // The System is fine afterwards.
    assert_eq!(h.run(|| async { 5 }, LONG), Ok(5));
    rt.shutdown(LONG).unwrap();
}

#[test]
fn send_gives_up_at_its_timeout() {
    let rt = runtime();
    let h = rt.handle();
    let addr = start_tally(&h);
    let deadline = Duration::from_millis(100);
    let t0 = Instant::now();
    assert!(matches!(
        h.send(&addr, Ignore, deadline),
        Err(JobError::WaitTimeout { .. })
    ));
    assert!(t0.elapsed() >= deadline);
    // The actor still answers others.
    assert_eq!(h.send(&addr, Totals, LONG).unwrap(), (0, 0));
    rt.shutdown(LONG).unwrap();
}

#[test]
fn a_panicking_future_is_reported_and_the_system_goes_on() {
    let rt = runtime();
    let h = rt.handle();
    let out = h.run(
        || async {
            if h_is_true() {
                panic!("future boom");
            }
            1
        },
        LONG,
    );
    match out {
        Err(e @ JobError::Internal(_)) => assert!(e.to_string().contains("future boom"), "{e}"),
        other => panic!("expected Internal with the panic message, got {other:?}"),
    }
    // A panic while building the future, too.
    let out = h.run::<_, std::future::Ready<u32>, u32>(|| panic!("make boom"), LONG);
    assert!(
        matches!(&out, Err(JobError::Internal(m)) if m.contains("make boom")),
        "{out:?}"
    );
    assert_eq!(h.run(|| async { 5 }, LONG), Ok(5));
    rt.shutdown(LONG).unwrap();
}

/// Keeps the compiler from seeing that the panic always happens.
fn h_is_true() -> bool {
    std::hint::black_box(true)
}
