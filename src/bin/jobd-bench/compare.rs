//! `compare`: jobd and beanstalkd side by side, in one run on one machine.
//!
//! It starts every server itself: jobd with each durability mode (`memory`,
//! `os`, `fsync`), beanstalkd without a binlog, with `-b DIR` (its default
//! fsync policy) and with `-b DIR -f 0` (fsync every write), and the bare
//! NDJSON echo server. Then it runs the same no-op job cycle on each, for
//! the same time with the same connections and depth, in interleaved rounds
//! (each round starts with another cell, so that bursts of load from other
//! processes spread over all of them). The table shows medians over the
//! rounds; each target ratio is the median over rounds of the ratio of two
//! cells measured in the same round. Last, on a fresh memory daemon: idle
//! resident memory, and memory per queued job with a million jobs queued.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::Args;
use crate::beanstalk::{self, Setup};
use crate::fill;
use crate::load::{self, Expect};
use crate::measure::{Limit, Stats, median};
use crate::procs::{self, Server};

/// A temporary directory, removed on drop (after the servers using it:
/// declare it first).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("jobd-compare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a cell sends its load.
enum Target {
    /// A jobd (or the echo server) on a Unix socket.
    Socket(PathBuf, Expect),
    /// beanstalkd on a TCP address.
    Beanstalkd(String),
}

/// One column of the comparison: a server and how to load it.
struct Cell {
    /// Short name (`--only` takes these).
    name: &'static str,
    /// What it is, for the table.
    label: String,
    /// Where the load goes.
    target: Target,
    /// Keeps the server running.
    _server: Server,
}

/// The targets: (numerator cell, denominator cell, at least, what).
const TARGETS: [(&str, &str, f64, &str); 4] = [
    (
        "jobd-memory",
        "bs",
        3.0,
        "memory store vs beanstalkd, no binlog",
    ),
    ("jobd-os", "bs-b", 2.0, "os durability vs beanstalkd -b"),
    (
        "jobd-fsync",
        "bs-b-f0",
        3.0,
        "fsync durability vs beanstalkd -b -f 0",
    ),
    (
        "jobd-memory",
        "echo",
        0.25,
        "pipelined cycle vs bare NDJSON echo",
    ),
];

/// Idle daemon resident memory target, MiB.
const IDLE_MIB: f64 = 16.0;

/// Resident memory per queued job target, bytes.
const PER_JOB_BYTES: f64 = 512.0;

fn first_line(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_string())
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What machine this is.
fn machine(beanstalkd: &Path) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = first_line("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let vm = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.contains(" hypervisor"))
        .unwrap_or(false);
    let bs = Command::new(beanstalkd)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}{}), Linux {kernel}, {bs}, load average {}",
        if vm { ", virtual machine" } else { "" },
        load_avg()
    )
}

/// Start every server the cells need.
fn start_cells(args: &Args, dir: &Path, jobd: &Path) -> Result<Vec<Cell>> {
    let wanted = |name: &str| {
        args.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|w| w.trim() == name))
    };
    let mut cells = Vec::new();
    for (name, durability) in [
        ("jobd-memory", "memory"),
        ("jobd-os", "os"),
        ("jobd-fsync", "fsync"),
    ] {
        if wanted(name) {
            let (server, socket) = procs::jobd(jobd, dir, name, durability, "")?;
            cells.push(Cell {
                name,
                label: format!("jobd --durability {durability}"),
                target: Target::Socket(socket, Expect::Jobd),
                _server: server,
            });
        }
    }
    let binlog = dir.join("binlog");
    let binlog_f0 = dir.join("binlog-f0");
    std::fs::create_dir_all(&binlog)?;
    std::fs::create_dir_all(&binlog_f0)?;
    let b = binlog.to_string_lossy().to_string();
    let b0 = binlog_f0.to_string_lossy().to_string();
    for (name, flags) in [
        ("bs", vec![]),
        ("bs-b", vec!["-b", b.as_str()]),
        ("bs-b-f0", vec!["-b", b0.as_str(), "-f", "0"]),
    ] {
        if wanted(name) {
            let (server, addr) = procs::beanstalkd(&args.beanstalkd, &flags)?;
            let shown: Vec<&str> = flags
                .iter()
                .map(|f| if f.starts_with('/') { "DIR" } else { f })
                .collect();
            cells.push(Cell {
                name,
                label: format!("beanstalkd {}", shown.join(" ")).trim().to_string(),
                target: Target::Beanstalkd(addr),
                _server: server,
            });
        }
    }
    if wanted("echo") {
        let socket = dir.join("echo.sock");
        let server = procs::echo_server(&socket)?;
        cells.push(Cell {
            name: "echo",
            label: "bare NDJSON echo".into(),
            target: Target::Socket(socket, Expect::Echo),
            _server: server,
        });
    }
    Ok(cells)
}

/// One measurement of one cell.
fn measure(cell: &Cell, args: &Args, limit: Limit) -> Result<Stats> {
    let st = match &cell.target {
        Target::Socket(socket, expect) => {
            let line = load::submit_line("echo", args.payload_bytes, true);
            load::run(socket, args.connections, args.depth, limit, &line, *expect)?
        }
        Target::Beanstalkd(addr) => beanstalk::run(&Setup {
            addr: addr.clone(),
            producers: args.connections,
            workers: args.workers,
            depth: args.depth,
            limit,
            payload_bytes: args.payload_bytes,
        })?,
    };
    if st.failures > 0 {
        bail!("{}: {} jobs failed", cell.name, st.failures);
    }
    Ok(st)
}

/// Run the comparison and print the table.
pub fn run(args: &Args) -> Result<()> {
    let jobd = match &args.jobd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .join("jobd"),
    };
    let seconds = args.seconds.unwrap_or(2.0);
    let warmup = if args.warmup > 0.0 { args.warmup } else { 0.5 };
    let limit = Limit::Time {
        run: Duration::from_secs_f64(seconds),
        warmup: Duration::from_secs_f64(warmup),
    };
    println!("machine: {}", machine(&args.beanstalkd));
    println!(
        "cycle: no-op job (kind echo, {} byte payload); {} connections (beanstalkd: producers) \
         x {} jobs in flight; beanstalkd workers: {}; {} rounds of {seconds} s per cell \
         after {warmup} s warm-up",
        args.payload_bytes, args.connections, args.depth, args.workers, args.rounds
    );
    let dir = TempDir::new()?;
    let cells = start_cells(args, &dir.0, &jobd)?;
    let mut results: Vec<Vec<Stats>> = vec![Vec::new(); cells.len()];
    for round in 0..args.rounds {
        for k in 0..cells.len() {
            let i = (round + k) % cells.len();
            let st = measure(&cells[i], args, limit)?;
            println!(
                "round {} {:<12} {:>9.0} jobs/s  p50 {:>7.3} ms  p99 {:>7.3} ms",
                round + 1,
                cells[i].name,
                st.rate(),
                st.p50_ms(),
                st.p99_ms()
            );
            results[i].push(st);
        }
    }
    println!();
    println!("load average after: {}", load_avg());
    println!();
    println!("| cell | server | jobs/s (median) | p50 ms | p99 ms | jobs/s, every round |");
    println!("|---|---|---|---|---|---|");
    for (c, rs) in cells.iter().zip(&results) {
        let all: Vec<String> = rs.iter().map(|s| format!("{:.0}", s.rate())).collect();
        println!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {} |",
            c.name,
            c.label,
            median(rs.iter().map(Stats::rate).collect()),
            median(rs.iter().map(Stats::p50_ms).collect()),
            median(rs.iter().map(Stats::p99_ms).collect()),
            all.join(", ")
        );
    }
    println!();
    println!("| target | ratio (median of per-round ratios) | every round | at least | |");
    println!("|---|---|---|---|---|");
    let index = |n: &str| cells.iter().position(|c| c.name == n);
    for (num, den, min, what) in TARGETS {
        let (Some(a), Some(b)) = (index(num), index(den)) else {
            continue;
        };
        let ratios: Vec<f64> = results[a]
            .iter()
            .zip(&results[b])
            .map(|(x, y)| x.rate() / y.rate().max(1e-9))
            .collect();
        let m = median(ratios.clone());
        let all: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {what} ({num} / {den}) | **{m:.2}** | {} | {min} | {} |",
            all.join(", "),
            if m >= min { "met" } else { "MISSED" }
        );
    }
    drop(cells);
    if args.fill_count > 0 && args.only.is_none() {
        println!();
        let config = format!(
            "[pools.default]\nmax_queued = {}\n",
            args.fill_count.max(10_000)
        );
        let (_server, socket) = procs::jobd(&jobd, &dir.0, "fill", "memory", &config)?;
        let f = fill::fill(&socket, args.fill_count, args.payload_bytes, true)?;
        let idle = f.idle_kib as f64 / 1024.0;
        println!(
            "idle daemon RSS: **{idle:.1} MiB** (at most {IDLE_MIB}: {})",
            if idle <= IDLE_MIB { "met" } else { "MISSED" }
        );
        println!(
            "{} queued jobs (paused pool, memory store): RSS {:.1} MiB, **{:.0} bytes per job** \
             (at most {PER_JOB_BYTES}: {})",
            f.count,
            f.full_kib as f64 / 1024.0,
            f.bytes_per_job(),
            if f.bytes_per_job() <= PER_JOB_BYTES {
                "met"
            } else {
                "MISSED"
            }
        );
        let rates: Vec<String> = f.step_rates.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "submits/s in each tenth of the way: {}; end / start (median of the last three \
             tenths over the first three): **{:.2}**",
            rates.join(", "),
            f.flatness()
        );
    }
    Ok(())
}
