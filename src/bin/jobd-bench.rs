//! `jobd-bench`: load generator for jobd, and the side-by-side comparison
//! with beanstalkd that `bench/compare.sh` runs (docs/benchmarks.md).
//!
//! Modes (`--mode`):
//! - `submit`, `cycle`: N connections to a running jobd, each keeping
//!   `depth` requests in flight (pipelining). `submit` is admission only
//!   (answered once the job is accepted, and committed with a durable
//!   store); `cycle` submits with `wait` (submitted, run, result back).
//! - `serve-echo`: a bare NDJSON echo server on `--socket`: every line
//!   comes straight back. No protocol can do less per request over the
//!   same socket, so it is the ceiling for jobd's pipelined cycle.
//! - `echo`: the `cycle` client against such an echo server.
//! - `beanstalkd`: the same job cycle against beanstalkd on `--addr`,
//!   speaking its text protocol: producer connections `put` (with `depth`
//!   jobs in flight each, counted until the job is deleted), worker
//!   connections `reserve` and `delete`.
//! - `fill`: queue `--count` jobs on a paused pool of a running memory
//!   daemon; submit rate per tenth of the way and resident memory per
//!   queued job.
//! - `compare`: start everything itself (jobd in each durability mode,
//!   beanstalkd in three modes, the echo server), run the same no-op cycle
//!   on each in interleaved rounds, then the memory measurements, and print
//!   the table with the target ratios.
//!
//! Everything stays on this machine: Unix sockets, and TCP to 127.0.0.1.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

#[path = "jobd-bench/beanstalk.rs"]
mod beanstalk;
#[path = "jobd-bench/compare.rs"]
mod compare;
#[path = "jobd-bench/echo.rs"]
mod echo;
#[path = "jobd-bench/fill.rs"]
mod fill;
#[path = "jobd-bench/load.rs"]
mod load;
#[path = "jobd-bench/measure.rs"]
mod measure;
#[path = "jobd-bench/procs.rs"]
mod procs;

use measure::{Limit, Stats};

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// jobd: submit without waiting for the job to run.
    Submit,
    /// jobd: submit and wait for the result (full cycle).
    Cycle,
    /// Serve a bare NDJSON echo on --socket until killed.
    ServeEcho,
    /// The cycle client against an NDJSON echo server on --socket.
    Echo,
    /// beanstalkd on --addr: put, reserve, delete.
    Beanstalkd,
    /// jobd: queue --count jobs on a paused pool; memory per job.
    Fill,
    /// Everything, side by side (see bench/compare.sh).
    Compare,
}

/// Load generator for jobd, and the comparison with beanstalkd.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// What to run.
    #[arg(long, value_enum, default_value = "cycle")]
    mode: Mode,
    /// jobd's socket (or the echo server's).
    #[arg(long, env = "JOBD_SOCKET")]
    socket: Option<PathBuf>,
    /// beanstalkd's address (`beanstalkd` mode); loopback only.
    #[arg(long, default_value = "127.0.0.1:11300")]
    addr: String,
    /// Connections (producers for beanstalkd), each on its own thread.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests (jobs) in flight per connection.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// beanstalkd worker connections (reserve + delete).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Jobs in all (ignored with --seconds).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Run for this long instead of a count.
    #[arg(long)]
    seconds: Option<f64>,
    /// With --seconds: run this long first without measuring.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Job kind (jobd modes).
    #[arg(long, default_value = "echo")]
    kind: String,
    /// Payload size in bytes (a JSON string of that length).
    #[arg(long, default_value_t = 16)]
    payload_bytes: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// compare: rounds of every cell.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// compare: the jobd binary (default: next to this one).
    #[arg(long)]
    jobd: Option<PathBuf>,
    /// compare: the beanstalkd binary.
    #[arg(long, default_value = "beanstalkd")]
    beanstalkd: PathBuf,
    /// compare: jobs queued for the memory measurement (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    fill_count: u64,
    /// compare: only these cells (comma-separated names), for profiling.
    #[arg(long)]
    only: Option<String>,
}

impl Args {
    fn limit(&self) -> Limit {
        match self.seconds {
            Some(s) => Limit::Time {
                run: Duration::from_secs_f64(s),
                warmup: Duration::from_secs_f64(self.warmup),
            },
            None => Limit::Count(self.count),
        }
    }

    fn socket(&self) -> Result<PathBuf> {
        match &self.socket {
            Some(s) => Ok(s.clone()),
            None => bail!("--socket (or JOBD_SOCKET) is needed for this mode"),
        }
    }
}

/// Print one measured cell.
fn report(name: &str, args: &Args, s: &Stats) {
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "mode": name, "jobs": s.completed, "connections": args.connections,
                "depth": args.depth, "seconds": s.elapsed.as_secs_f64(),
                "jobs_per_sec": s.rate(), "p50_ms": s.p50_ms(), "p99_ms": s.p99_ms(),
                "max_ms": s.max_ms(), "failures": s.failures,
            })
        );
    } else {
        println!(
            "{name}: {} jobs, {} conns x depth {}: {:.0} jobs/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {} failed",
            s.completed,
            args.connections,
            args.depth,
            s.rate(),
            s.p50_ms(),
            s.p99_ms(),
            s.max_ms(),
            s.failures
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.connections == 0 || args.depth == 0 || args.workers == 0 {
        bail!("--connections, --depth and --workers must be at least 1");
    }
    let stats = match args.mode {
        Mode::ServeEcho => return echo::serve(&args.socket()?),
        Mode::Compare => return compare::run(&args),
        Mode::Fill => {
            let f = fill::fill(&args.socket()?, args.count, args.payload_bytes, true)?;
            f.print(args.json);
            return Ok(());
        }
        Mode::Submit | Mode::Cycle | Mode::Echo => {
            // The echo client sends the cycle's lines to the echo server.
            let wait = args.mode != Mode::Submit;
            let expect = if args.mode == Mode::Echo {
                load::Expect::Echo
            } else {
                load::Expect::Jobd
            };
            let line = load::submit_line(&args.kind, args.payload_bytes, wait);
            load::run(
                &args.socket()?,
                args.connections,
                args.depth,
                args.limit(),
                &line,
                expect,
            )?
        }
        Mode::Beanstalkd => beanstalk::run(&beanstalk::Setup {
            addr: args.addr.clone(),
            producers: args.connections,
            workers: args.workers,
            depth: args.depth,
            limit: args.limit(),
            payload_bytes: args.payload_bytes,
        })?,
    };
    let name = format!("{:?}", args.mode).to_lowercase();
    report(&name, &args, &stats);
    if stats.failures > 0 {
        bail!("{} requests failed", stats.failures);
    }
    Ok(())
}
