//! `jobd-bench`: a load generator for a running jobd. N connections, each
//! keeping `depth` requests in flight (pipelining), submit `count` jobs in
//! all, and report throughput and latency percentiles.
//!
//! Modes: `submit` (admission only: the answer comes once the job is
//! accepted, and committed with a durable store) and `cycle` (submit with
//! `wait`: submitted, run, result back).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Submit without waiting for the job to run.
    Submit,
    /// Submit and wait for the result (full cycle).
    Cycle,
}

/// Load generator for jobd.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The daemon's socket.
    #[arg(long, env = "JOBD_SOCKET")]
    socket: PathBuf,
    /// What each request does.
    #[arg(long, value_enum, default_value = "cycle")]
    mode: Mode,
    /// Connections, each on its own thread.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Jobs in all.
    #[arg(long, default_value_t = 100_000)]
    count: usize,
    /// Job kind.
    #[arg(long, default_value = "echo")]
    kind: String,
    /// Payload size in bytes (a JSON string of that length).
    #[arg(long, default_value_t = 16)]
    payload_bytes: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// What one connection measured.
struct Run {
    latencies: Histogram<u64>,
    failures: u64,
}

fn connection(args: &Args, count: usize, line_base: &str) -> Result<Run> {
    let stream = UnixStream::connect(&args.socket)
        .with_context(|| format!("cannot connect to {}", args.socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = std::io::BufWriter::new(stream.try_clone()?);
    let mut reader = BufReader::new(stream);
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut sent_at = vec![Instant::now(); count];
    let mut failures = 0;
    let mut sent = 0;
    let mut received = 0;
    let mut line = String::new();
    while received < count {
        // Fill the window, then flush once: coalesced writes.
        while sent < count && sent - received < args.depth {
            sent_at[sent] = Instant::now();
            writeln!(writer, "{{\"id\":{sent},{line_base}")?;
            sent += 1;
        }
        writer.flush()?;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("daemon closed the connection after {received} answers");
        }
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let Some(id) = v["id"].as_u64().map(|i| i as usize).filter(|i| *i < count) else {
            bail!("answer without a known id: {line}");
        };
        if v["ok"] != serde_json::Value::Bool(true) {
            failures += 1;
        }
        latencies.saturating_record(sent_at[id].elapsed().as_micros() as u64);
        received += 1;
    }
    Ok(Run {
        latencies,
        failures,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.connections == 0 || args.depth == 0 {
        bail!("--connections and --depth must be at least 1");
    }
    let payload = "x".repeat(args.payload_bytes);
    let wait = matches!(args.mode, Mode::Cycle);
    let line_base = format!(
        "\"op\":\"submit\",\"wait\":{wait},\"job\":{{\"kind\":{},\"payload\":{}}}}}",
        serde_json::Value::from(args.kind.clone()),
        serde_json::Value::from(payload)
    );
    let per = args.count / args.connections;
    let started = Instant::now();
    let runs: Vec<Result<Run>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.connections)
            .map(|i| {
                let n = if i == 0 {
                    args.count - per * (args.connections - 1)
                } else {
                    per
                };
                let args = &args;
                let line_base = &line_base;
                s.spawn(move || connection(args, n, line_base))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a connection thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut failures = 0;
    for r in runs {
        let r = r?;
        all.add(&r.latencies)?;
        failures += r.failures;
    }
    let rate = args.count as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "mode": format!("{:?}", args.mode).to_lowercase(),
                "jobs": args.count, "connections": args.connections, "depth": args.depth,
                "seconds": elapsed.as_secs_f64(), "jobs_per_sec": rate,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": all.max() as f64 / 1000.0,
                "failures": failures,
            })
        );
    } else {
        println!(
            "{:?}: {} jobs, {} conns x depth {}: {:.0} jobs/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {} failed",
            args.mode,
            args.count,
            args.connections,
            args.depth,
            rate,
            ms(0.5),
            ms(0.99),
            all.max() as f64 / 1000.0,
            failures
        );
    }
    if failures > 0 {
        bail!("{failures} requests failed");
    }
    Ok(())
}
