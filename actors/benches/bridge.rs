//! Bridge benchmark: what does a round trip from a plain thread into a pool
//! of two worker threads and back cost, through
//!
//! - (a) raw crossbeam: producers → one channel → 2 echo threads → a reply
//!   channel per producer (the floor: two thread hops, nothing else);
//! - (b) raw actix: `futures::executor::block_on(addr.send(msg))` to a
//!   `SyncArbiter` of 2, the System running on its own thread;
//! - (c) jobd: `Handle::call` of a no-op kind on a pool of 2;
//! - (d) tokio: `handle.block_on(spawn_blocking(..))` on a multi-thread
//!   runtime (2 workers, at most 2 blocking threads);
//!
//! at 1, 4 and 16 producer threads. Every cell is measured in several
//! interleaved rounds (a, b, c, d, then b, c, d, a, …) and the table shows
//! the median over rounds, because one thread wake-up on a 2-core machine
//! costs tens of microseconds and single runs are noisy. The ratios c/b and
//! c/d come twice: as ratios of those medians, and as medians of the ratios
//! taken within each round (cells measured back to back, so load from other
//! processes that comes and goes between rounds cancels out); the targets
//! are judged on the latter.
//!
//! `cargo bench -p jobd-actors --bench bridge` (about 40 s), or with
//! `-- --quick` (or `BRIDGE_QUICK=1`) for a few seconds. `--rounds N`,
//! `--ms N` (time per cell), `--only abcd` and `--producers 1,4,16`
//! override either (the last two for profiling one target).

use std::sync::Barrier;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use hdrhistogram::Histogram;
use jobd_actors::{Handle, Runtime};

/// Producer thread counts measured.
const PRODUCERS: [usize; 3] = [1, 4, 16];
/// Round trips each producer makes before the clock starts.
const WARMUP_CALLS: usize = 200;
/// Target letters, in the order of `main`'s list.
const LETTERS: [char; 4] = ['a', 'b', 'c', 'd'];
/// How long a single call may take before the benchmark gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

// ----- the four systems under test -------------------------------------------

/// Something a producer thread can make round trips through.
trait Target: Sync {
    /// Short name for the table.
    fn name(&self) -> &'static str;
    /// A round-trip function for one producer thread (it may hold
    /// per-thread state, such as its own reply channel).
    fn producer(&self) -> Box<dyn FnMut() + '_>;
}

/// (a) Producers send their reply channel to 2 echo threads.
struct Crossbeam {
    requests: Option<Sender<Sender<()>>>,
    echoes: Vec<thread::JoinHandle<()>>,
}

impl Crossbeam {
    fn start() -> Self {
        let (tx, rx) = unbounded::<Sender<()>>();
        let echoes = (0..2)
            .map(|_| {
                let rx = rx.clone();
                thread::spawn(move || {
                    for reply in rx {
                        let _ = reply.send(());
                    }
                })
            })
            .collect();
        Crossbeam {
            requests: Some(tx),
            echoes,
        }
    }
}

impl Target for Crossbeam {
    fn name(&self) -> &'static str {
        "(a) crossbeam"
    }

    fn producer(&self) -> Box<dyn FnMut() + '_> {
        let (tx, rx): (Sender<()>, Receiver<()>) = bounded(1);
        let requests = self.requests.as_ref().expect("open until drop");
        Box::new(move || {
            requests.send(tx.clone()).expect("echo threads alive");
            rx.recv_timeout(CALL_TIMEOUT).expect("echo answers");
        })
    }
}

impl Drop for Crossbeam {
    fn drop(&mut self) {
        self.requests = None;
        for t in self.echoes.drain(..) {
            let _ = t.join();
        }
    }
}

/// (b) The message and the sync actor of the raw actix round trip.
struct Ping;

impl Message for Ping {
    type Result = ();
}

struct Echo;

impl Actor for Echo {
    type Context = SyncContext<Self>;
}

impl Handler<Ping> for Echo {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut SyncContext<Self>) {}
}

/// (b) A System on its own thread with a SyncArbiter of 2.
struct RawActix {
    addr: Addr<Echo>,
    system: actix_rt::System,
    thread: Option<thread::JoinHandle<()>>,
}

impl RawActix {
    fn start() -> Self {
        let (tx, rx) = mpsc::channel();
        let thread = thread::spawn(move || {
            let sys = actix_rt::System::new();
            sys.block_on(async {
                let addr = SyncArbiter::start(2, || Echo);
                let _ = tx.send((addr, actix_rt::System::current()));
            });
            let _ = sys.run();
        });
        let (addr, system) = rx.recv().expect("actix system starts");
        RawActix {
            addr,
            system,
            thread: Some(thread),
        }
    }
}

impl Target for RawActix {
    fn name(&self) -> &'static str {
        "(b) actix"
    }

    fn producer(&self) -> Box<dyn FnMut() + '_> {
        let addr = self.addr.clone();
        Box::new(move || {
            futures::executor::block_on(addr.send(Ping)).expect("sync actor answers");
        })
    }
}

impl Drop for RawActix {
    fn drop(&mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (c) A jobd runtime with a pool of 2 and a no-op kind.
struct Jobd {
    handle: Handle,
    runtime: Option<Runtime>,
}

impl Jobd {
    fn start() -> Self {
        let runtime = Runtime::builder()
            .pool("bench", 2)
            .handler("noop", "bench", |_ctx, _: ()| Ok::<(), String>(()))
            .start()
            .expect("jobd runtime starts");
        Jobd {
            handle: runtime.handle(),
            runtime: Some(runtime),
        }
    }
}

impl Target for Jobd {
    fn name(&self) -> &'static str {
        "(c) jobd call"
    }

    fn producer(&self) -> Box<dyn FnMut() + '_> {
        let h = self.handle.clone();
        Box::new(move || {
            h.call::<_, ()>("noop", &(), CALL_TIMEOUT)
                .expect("no-op job succeeds");
        })
    }
}

impl Drop for Jobd {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            let _ = rt.shutdown(Duration::from_secs(5));
        }
    }
}

/// (d) A multi-thread tokio runtime; blocking work on its blocking pool.
struct Tokio {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Tokio {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .build()
            .expect("tokio runtime starts");
        Tokio {
            runtime: Some(runtime),
        }
    }
}

impl Target for Tokio {
    fn name(&self) -> &'static str {
        "(d) tokio"
    }

    fn producer(&self) -> Box<dyn FnMut() + '_> {
        let h = self
            .runtime
            .as_ref()
            .expect("open until drop")
            .handle()
            .clone();
        Box::new(move || {
            // `Handle::spawn_blocking` is `tokio::task::spawn_blocking` on
            // this runtime, callable outside of its context.
            h.block_on(h.spawn_blocking(|| ()))
                .expect("blocking task runs");
        })
    }
}

impl Drop for Tokio {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

// ----- measuring ---------------------------------------------------------------

/// One cell of one round.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Median round trip, µs.
    p50: f64,
    /// 99th percentile round trip, µs.
    p99: f64,
    /// Completed round trips per second, all producers together.
    rate: f64,
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Run `producers` threads making round trips through `target` for `span`.
fn measure(target: &dyn Target, producers: usize, span: Duration) -> Sample {
    let barrier = Barrier::new(producers);
    let results: Vec<(Histogram<u64>, Instant, Instant)> = thread::scope(|s| {
        let threads: Vec<_> = (0..producers)
            .map(|_| {
                s.spawn(|| {
                    let mut call = target.producer();
                    for _ in 0..WARMUP_CALLS {
                        call();
                    }
                    let mut hist = histogram();
                    barrier.wait();
                    let start = Instant::now();
                    let end = start + span;
                    let mut t0 = start;
                    loop {
                        call();
                        let t1 = Instant::now();
                        hist.saturating_record((t1 - t0).as_nanos() as u64);
                        t0 = t1;
                        if t1 >= end {
                            break;
                        }
                    }
                    (hist, start, t0)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("producer thread"))
            .collect()
    });
    let mut all = histogram();
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    for (h, start, end) in &results {
        all.add(h).expect("same histogram bounds");
        first = Some(first.map_or(*start, |f| f.min(*start)));
        last = Some(last.map_or(*end, |l| l.max(*end)));
    }
    let wall = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => f64::NAN,
    };
    Sample {
        p50: all.value_at_quantile(0.50) as f64 / 1000.0,
        p99: all.value_at_quantile(0.99) as f64 / 1000.0,
        rate: all.len() as f64 / wall,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

// ----- settings and report -----------------------------------------------------

struct Settings {
    rounds: usize,
    span: Duration,
    quick: bool,
    /// Letters of the targets to run (`--only c` for profiling jobd alone).
    only: String,
    /// Producer counts to run (`--producers 16`), a subset of `PRODUCERS`.
    producers: Vec<usize>,
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("BRIDGE_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut s = if quick {
        Settings {
            rounds: 3,
            span: Duration::from_millis(100),
            quick,
            only: "abcd".into(),
            producers: PRODUCERS.to_vec(),
        }
    } else {
        Settings {
            rounds: 11,
            span: Duration::from_millis(250),
            quick,
            only: "abcd".into(),
            producers: PRODUCERS.to_vec(),
        }
    };
    // `cargo bench` adds `--bench`; anything else unknown is ignored too.
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(r) = value("--rounds") {
        s.rounds = r.max(1) as usize;
    }
    if let Some(ms) = value("--ms") {
        s.span = Duration::from_millis(ms.max(10));
    }
    if let Some(i) = args.iter().position(|a| a == "--only")
        && let Some(v) = args.get(i + 1)
    {
        s.only = v.clone();
    }
    if let Some(i) = args.iter().position(|a| a == "--producers")
        && let Some(v) = args.get(i + 1)
    {
        s.producers = v.split(',').filter_map(|n| n.trim().parse().ok()).collect();
    }
    s
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    let s = settings();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "bridge benchmark: {} rounds x {} ms per cell{}, medians over rounds; {} CPUs, {}",
        s.rounds,
        s.span.as_millis(),
        if s.quick { " (quick)" } else { "" },
        cpus,
        cpu_model()
    );

    let targets: Vec<Box<dyn Target>> = vec![
        Box::new(Crossbeam::start()),
        Box::new(RawActix::start()),
        Box::new(Jobd::start()),
        Box::new(Tokio::start()),
    ];
    // samples[target][producer index] = one Sample per round.
    let mut samples = vec![vec![Vec::<Sample>::new(); PRODUCERS.len()]; targets.len()];
    let started = Instant::now();
    for round in 0..s.rounds {
        for (pi, &p) in PRODUCERS.iter().enumerate() {
            if !s.producers.contains(&p) {
                continue;
            }
            // Rotate the order each round so no target always runs first.
            for k in 0..targets.len() {
                let ti = (k + round) % targets.len();
                if !s.only.contains(LETTERS[ti]) {
                    continue;
                }
                samples[ti][pi].push(measure(targets[ti].as_ref(), p, s.span));
            }
        }
        eprint!(".");
    }
    eprintln!(" {:.1} s", started.elapsed().as_secs_f64());
    let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
    drop(targets);

    // med[target][producer] = (p50, p99, rate)
    let med: Vec<Vec<Sample>> = samples
        .iter()
        .map(|per_p| {
            per_p
                .iter()
                .map(|rs| Sample {
                    p50: median(rs.iter().map(|r| r.p50).collect()),
                    p99: median(rs.iter().map(|r| r.p99).collect()),
                    rate: median(rs.iter().map(|r| r.rate).collect()),
                })
                .collect()
        })
        .collect();

    println!();
    println!(
        "{:<15} {:>9} {:>10} {:>10} {:>12}",
        "target", "producers", "p50 us", "p99 us", "calls/s"
    );
    for (ti, name) in names.iter().enumerate() {
        for (pi, p) in PRODUCERS.iter().enumerate() {
            let m = med[ti][pi];
            println!(
                "{:<15} {:>9} {:>10.1} {:>10.1} {:>12.0}",
                name, p, m.p50, m.p99, m.rate
            );
        }
    }

    let (b, c, d) = (1, 2, 3);
    println!();
    println!(
        "{:<34} {:>8} {:>8} {:>8}",
        "ratio of the medians above", "1 prod", "4 prod", "16 prod"
    );
    let row = |label: &str, f: &dyn Fn(usize) -> f64| {
        println!("{:<34} {:>8.2} {:>8.2} {:>8.2}", label, f(0), f(1), f(2));
    };
    row("p50 latency c/b", &|pi| med[c][pi].p50 / med[b][pi].p50);
    row("throughput  c/b", &|pi| med[c][pi].rate / med[b][pi].rate);
    row("p50 latency c/d", &|pi| med[c][pi].p50 / med[d][pi].p50);
    row("throughput  c/d", &|pi| med[c][pi].rate / med[d][pi].rate);

    // The same ratios taken within each round (the two cells were measured
    // back to back), then the median over rounds: load from other processes
    // that comes and goes between rounds cancels out.
    let paired = |x: usize, y: usize, pi: usize, f: fn(&Sample, &Sample) -> f64| {
        let rs: Vec<f64> = samples[x][pi]
            .iter()
            .zip(&samples[y][pi])
            .map(|(s, t)| f(s, t))
            .collect();
        let mut sorted = rs.clone();
        sorted.sort_by(f64::total_cmp);
        let lo = sorted.first().copied().unwrap_or(f64::NAN);
        let hi = sorted.last().copied().unwrap_or(f64::NAN);
        (median(rs), lo, hi)
    };
    let lat: fn(&Sample, &Sample) -> f64 = |s, t| s.p50 / t.p50;
    let thr: fn(&Sample, &Sample) -> f64 = |s, t| s.rate / t.rate;
    println!(
        "{:<34} {:>8} {:>8} {:>8}",
        "median of per-round ratios", "1 prod", "4 prod", "16 prod"
    );
    let prow = |label: &str, x: usize, y: usize, f: fn(&Sample, &Sample) -> f64| {
        let m: Vec<f64> = (0..PRODUCERS.len())
            .map(|pi| paired(x, y, pi, f).0)
            .collect();
        println!("{:<34} {:>8.2} {:>8.2} {:>8.2}", label, m[0], m[1], m[2]);
    };
    prow("p50 latency c/b", c, b, lat);
    prow("throughput  c/b", c, b, thr);
    prow("p50 latency c/d", c, d, lat);
    prow("throughput  c/d", c, d, thr);

    let (lat1, lo, hi) = paired(c, b, 0, lat);
    let (thr16, lo16, hi16) = paired(c, b, 2, thr);
    println!();
    println!(
        "target p50 latency c/b <= 1.0 at 1 producer: {lat1:.2} (rounds {lo:.2} .. {hi:.2}) {}",
        if lat1 <= 1.0 { "MET" } else { "MISSED" }
    );
    println!(
        "target throughput c/b >= 1.0 at 16 producers: {thr16:.2} (rounds {lo16:.2} .. {hi16:.2}) {}",
        if thr16 >= 1.0 { "MET" } else { "MISSED" }
    );
}
