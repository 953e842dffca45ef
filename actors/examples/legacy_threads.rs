//! A threaded "legacy" program that embeds the jobd runtime.
//!
//! Four plain std threads produce orders, as thread-per-request code does.
//! They hand each order to an async actor (`Orchestrator`) living on the
//! runtime's actix System, through the general bridge (`Handle::send`), and
//! block for its receipt. The actor never blocks: it hands the blocking
//! work (a CPU-bound checksum, a stand-in for a blocking database driver) to
//! the `cpu` and `io` pools with `call_async`, and answers when both are
//! done. One producer also uses the job API directly (`submit`,
//! `wait_any`, `call` with a per-job timeout).
//!
//! Run it with `cargo run -p jobd-actors --example legacy_threads`; it takes
//! a second or two and prints what happened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorFutureExt, Context, Handler, Message, MessageResult, ResponseActFuture, WrapFuture,
};
use jobd_actors::{Handle, JobError, JobOptions, PoolConfig, Runtime};
use serde::{Deserialize, Serialize};

const PRODUCERS: usize = 4;
const ORDERS_EACH: u64 = 25;
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a producer sends to the orchestrator.
struct Order {
    producer: usize,
    n: u64,
}

/// What the orchestrator answers.
#[derive(Debug)]
struct Receipt {
    stored_as: String,
}

impl Message for Order {
    type Result = Result<Receipt, JobError>;
}

/// Ask the orchestrator for its tallies.
struct Report;

impl Message for Report {
    type Result = BTreeMap<usize, u64>;
}

/// Input of the `store` job.
#[derive(Serialize, Deserialize)]
struct Row {
    key: String,
    checksum: u64,
}

/// An async actor on the runtime's System: it orchestrates, the pools work.
struct Orchestrator {
    h: Handle,
    /// Orders done per producer.
    done: BTreeMap<usize, u64>,
}

impl Actor for Orchestrator {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        // A blocking Handle call here would wait for this very event loop:
        // the Handle refuses instead of deadlocking.
        let refused = self.h.stats();
        println!("orchestrator: a blocking call inside the actor gives {refused:?}");
    }
}

impl Handler<Order> for Orchestrator {
    type Result = ResponseActFuture<Self, Result<Receipt, JobError>>;

    fn handle(&mut self, order: Order, _: &mut Context<Self>) -> Self::Result {
        let h = self.h.clone();
        let work = async move {
            // CPU-bound work on the cpu pool; the actor keeps serving other
            // orders while it runs.
            let checksum: u64 = h
                .call_async("checksum", &order.n, JobOptions::default())
                .await?;
            let row = Row {
                key: format!("order-{}-{}", order.producer, order.n),
                checksum,
            };
            // A blocking "driver" call on the io pool.
            let stored_as: String = h.call_async("store", &row, JobOptions::default()).await?;
            Ok((order.producer, Receipt { stored_as }))
        };
        Box::pin(work.into_actor(self).map(|out, act, _| {
            let (producer, receipt) = out?;
            *act.done.entry(producer).or_default() += 1;
            Ok(receipt)
        }))
    }
}

impl Handler<Report> for Orchestrator {
    type Result = MessageResult<Report>;
    fn handle(&mut self, _: Report, _: &mut Context<Self>) -> MessageResult<Report> {
        MessageResult(self.done.clone())
    }
}

/// A deliberately slow, CPU-bound checksum (FNV-1a over a generated buffer).
fn checksum(n: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..200_000u64 {
        hash ^= (n.wrapping_mul(31) ^ i) & 0xff;
        hash = hash.wrapping_mul(0x100_0000_01b3);
    }
    hash
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let rt = Runtime::builder()
        .pool("cpu", 2)
        .pool_config(PoolConfig {
            max_queued: 100,
            ..PoolConfig::new("io", 2)
        })
        .handler("checksum", "cpu", |_ctx, n: u64| {
            Ok::<u64, String>(checksum(n))
        })
        .handler("store", "io", |ctx, row: Row| {
            // Stands in for a blocking database driver.
            std::thread::sleep(Duration::from_millis(4));
            if ctx.is_cancelled() {
                return Err("gave up: past the deadline".to_string());
            }
            Ok::<String, String>(format!("{} (checksum {:x})", row.key, row.checksum))
        })
        .handler("slow_report", "io", |ctx, ms: u64| {
            // Polls is_cancelled(): a sync handler cannot be preempted.
            let until = Instant::now() + Duration::from_millis(ms);
            while Instant::now() < until {
                if ctx.is_cancelled() {
                    return Err("stopped early: cancelled".to_string());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok::<&str, String>("report ready")
        })
        .start()?;
    let h = rt.handle();
    println!("runtime started in {:?}", t0.elapsed());

    // Start the app's actor on the runtime's System. The closure is Send;
    // the future it builds (actix is not Send) runs on the System thread.
    let orchestrator = h.run(
        {
            let h = h.clone();
            move || async move {
                Orchestrator {
                    h,
                    done: BTreeMap::new(),
                }
                .start()
            }
        },
        TIMEOUT,
    )?;

    // Legacy producers: plain threads that block for their answers.
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (h, orchestrator) = (h.clone(), orchestrator.clone());
            std::thread::Builder::new()
                .name(format!("legacy-{p}"))
                .spawn(move || {
                    let started = Instant::now();
                    let mut last = None;
                    for n in 0..ORDERS_EACH {
                        let order = Order {
                            producer: p,
                            n: p as u64 * 1000 + n,
                        };
                        match h.send(&orchestrator, order, TIMEOUT) {
                            Ok(Ok(receipt)) => last = Some(receipt),
                            Ok(Err(e)) => println!("legacy-{p}: order {n} failed: {e}"),
                            Err(e) => println!("legacy-{p}: no answer for order {n}: {e}"),
                        }
                    }
                    println!(
                        "legacy-{p}: {ORDERS_EACH} orders in {:?}, last receipt: {}",
                        started.elapsed(),
                        last.map_or_else(|| "none".into(), |r| r.stored_as)
                    );
                })
        })
        .collect::<Result<_, _>>()?;

    // Meanwhile this thread uses the job API directly.
    let ids = (0..4u64)
        .map(|n| h.submit("checksum", &n, JobOptions::default().priority(5)))
        .collect::<Result<Vec<_>, _>>()?;
    let first = h.wait_any(&ids, TIMEOUT)?;
    println!(
        "main: first of {} submitted checksums done: job {} ({})",
        ids.len(),
        first.id,
        first.state
    );
    for (n, id) in ids.iter().enumerate() {
        let v: u64 = h.wait(*id, TIMEOUT)?;
        assert_eq!(v, checksum(n as u64));
    }
    let direct: u64 = h.call("checksum", &7u64, TIMEOUT)?;
    println!("main: call(checksum, 7) = {direct:x}");

    // A job that runs past its own timeout: the caller is answered at the
    // deadline; the handler is told and stops at its next check.
    let t = Instant::now();
    match h.call_with::<_, String>(
        "slow_report",
        &2_000u64,
        JobOptions::default().timeout(Duration::from_millis(100)),
        TIMEOUT,
    ) {
        Err(e @ JobError::TimedOut { .. }) => {
            println!("main: slow_report answered after {:?}: {e}", t.elapsed())
        }
        other => println!("main: slow_report: unexpected {other:?}"),
    }

    for p in producers {
        p.join().map_err(|_| "a producer thread panicked")?;
    }
    let tallies = h.send(&orchestrator, Report, TIMEOUT)?;
    println!("orchestrator: orders done per producer: {tallies:?}");

    let stats = h.stats()?;
    for (name, pool) in &stats.pools {
        let c = &pool.counters;
        println!(
            "pool {name:<8} threads {} | started {:>3} succeeded {:>3} timed out {}",
            pool.threads, c.started, c.succeeded, c.timed_out
        );
    }
    for (kind, k) in &stats.kinds {
        println!(
            "kind {kind:<12} run time p50 {:>7.3} ms  p99 {:>7.3} ms  (n = {})",
            k.run_time_ms.p50, k.run_time_ms.p99, k.run_time_ms.count
        );
    }

    rt.shutdown(Duration::from_secs(5))?;
    // The Handle outlived the runtime: it says so instead of hanging.
    println!(
        "after shutdown, a submit gives: {:?}",
        h.submit("checksum", &1u64, JobOptions::default())
    );
    println!("all threads joined; total {:?}", t0.elapsed());
    Ok(())
}
