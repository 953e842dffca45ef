//! `jobctl`, the command-line client of jobd: submit jobs, watch them, and
//! look at the daemon. A thin layer over `jobd::client`: it builds one
//! request per command, prints the answer as a table (or the raw JSON with
//! `--json`), and turns the outcome into an exit code.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use jobd::client::{Client, Response};
use jobd::progress::{self, Progress};
use serde_json::{Map, Value, json};

// Beside this file, not in src/bin/ (where cargo would take it for a binary).
#[path = "jobctl/lifecycle.rs"]
mod lifecycle;

const AFTER_HELP: &str = "\
Socket: --socket, else $JOBD_SOCKET, else $XDG_RUNTIME_DIR/jobd/jobd.sock,
else /run/jobd/jobd.sock (root) or the default state dir's jobd.sock.

Exit codes:
  0  success (for submit --wait and wait: every job succeeded)
  1  the daemon answered, but a job failed, was cancelled, timed out, is
     dead, or was not final in time (wait --timeout); or the request was
     refused (not_found, unknown_kind, queue_full, forbidden, ...)
  2  usage error, unreadable payload, or no usable connection to jobd

Program jobs (the exec kind and [kinds.NAME] command kinds): a program that
exits with a non-zero code fails its job (job_failed, exit code and the end
of stderr in the message), so jobctl exits 1 for it.

Durations: 500ms, 5s, 2m, 1h, 1d, or combined like 1m30s.
Payload: inline JSON, @FILE to read it from a file, or @- for stdin.";

/// The jobd client.
#[derive(Parser, Debug)]
#[command(name = "jobctl", version, about = "Control jobd: submit and watch jobs", after_help = AFTER_HELP)]
struct Cli {
    /// The daemon's socket (default: $JOBD_SOCKET, else the standard path; see `jobctl --help`).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the daemon's answers as raw JSON (one object per line).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Submit a job; print its id (or, with --wait, its outcome).
    Submit(SubmitArgs),
    /// Show everything about a job.
    Status {
        /// Job id.
        id: String,
    },
    /// Wait until jobs are final and show how they ended.
    Wait {
        /// Job ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Give up after this long (default: wait as long as it takes).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Cancel a job (a running one is told to stop).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Queue a failed or dead job again with fresh attempts; or, with
    /// --all-dead, every dead job (of a pool or kind).
    Retry {
        /// Job id.
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        id: Option<String>,
        /// Retry every dead job, newest first (pages through `list --state dead`).
        #[arg(long)]
        all_dead: bool,
        /// With --all-dead: only jobs of this pool.
        #[arg(long, requires = "all_dead", conflicts_with = "id")]
        pool: Option<String>,
        /// With --all-dead: only jobs of this kind.
        #[arg(long, requires = "all_dead", conflicts_with = "id")]
        kind: Option<String>,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state.
        #[arg(long, value_parser = [
            "queued", "delayed", "running", "succeeded", "failed", "cancelled", "timed_out", "dead",
        ])]
        state: Option<String>,
        /// Only jobs of this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Only jobs of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many jobs.
        #[arg(long)]
        limit: Option<u64>,
        /// Continue a previous listing (the cursor it printed).
        #[arg(long)]
        cursor: Option<String>,
        /// Oldest first instead of newest first.
        #[arg(long)]
        oldest: bool,
    },
    /// Counters, queue sizes and latencies per pool and kind.
    Stats,
    /// Stop starting jobs of a pool (running ones finish).
    Pause {
        /// Pool name.
        pool: String,
    },
    /// Start jobs of a paused pool again.
    Resume {
        /// Pool name.
        pool: String,
    },
    /// Check that the daemon answers; show its version.
    Hello,
    /// Live dashboard: threads, queues, throughput, latencies, recent
    /// failures (q quits).
    Top {
        /// How often to refresh.
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        interval: Duration,
    },
    /// Print a shell completion script, e.g.
    /// `jobctl completions bash > /etc/bash_completion.d/jobctl`.
    Completions {
        /// bash, zsh, fish (also elvish, powershell).
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
struct SubmitArgs {
    /// Job kind (echo, sleep, exec, or a kind from the daemon's config).
    #[arg(required_unless_present = "batch")]
    kind: Option<String>,
    /// Payload: JSON text, @FILE, or @- for stdin (default: null).
    payload: Option<String>,
    /// Submit every job in FILE (one JSON job object per line, - for
    /// stdin), pipelined, with a progress bar; the options below fill in
    /// fields a line leaves out. With --wait, then wait for all of them.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["kind", "payload"])]
    batch: Option<PathBuf>,
    /// Wait for the outcome and print it.
    #[arg(long)]
    wait: bool,
    /// Higher runs first (may be negative).
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i32>,
    /// Start no earlier than this from now.
    #[arg(long, value_parser = parse_duration)]
    delay: Option<Duration>,
    /// Per-attempt timeout.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Run on this pool instead of the kind's.
    #[arg(long)]
    pool: Option<String>,
    /// Attempts in all (1 = no retries).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Do not queue a second job with this key while one is not final.
    #[arg(long)]
    unique_key: Option<String>,
    /// Run only after this job succeeded (repeatable).
    #[arg(long = "after", value_name = "ID")]
    after: Vec<String>,
    /// Retry backoff: delay before the first retry (default 1s). Without any
    /// --backoff-* flag the kind's backoff applies.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    backoff_base: Option<Duration>,
    /// Retry backoff: growth per further retry, 1 to 100 (default 2).
    #[arg(long, value_name = "FACTOR")]
    backoff_factor: Option<f64>,
    /// Retry backoff: longest delay (default 5m).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    backoff_max: Option<Duration>,
}

/// Parse a duration such as `500ms`, `5s`, `2m`, `1h`, `1d` or `1m30s`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".to_string());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a duration (try 500ms, 5s, 2m, 1h)"))?;
        let secs = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => return Err(format!("'{s}' needs a unit: ms, s, m, h or d")),
            u => return Err(format!("'{s}': unknown unit '{u}' (use ms, s, m, h or d)")),
        };
        total = total
            .checked_add(
                Duration::try_from_secs_f64(n * secs)
                    .map_err(|_| format!("'{s}' is out of range"))?,
            )
            .ok_or_else(|| format!("'{s}' is out of range"))?;
        rest = tail;
    }
    Ok(total)
}

/// Milliseconds for the wire, saturating (no real duration overflows).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Read the payload argument: JSON text, `@file` or `@-`.
fn read_payload(arg: &str) -> anyhow::Result<Value> {
    let (text, from) = match arg.strip_prefix('@') {
        Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the payload from stdin")?;
            (s, "stdin".to_string())
        }
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the payload file {path}"))?,
            path.to_string(),
        ),
        None => (arg.to_string(), "the command line".to_string()),
    };
    serde_json::from_str(&text)
        .with_context(|| format!("the payload from {from} is not valid JSON"))
}

/// What a command decided: its exit code.
type Code = u8;
const OK: Code = 0;
const JOB_FAILED: Code = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("jobctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<Code> {
    // Check the arguments before connecting, so a usage mistake is
    // reported as such even when the daemon is down.
    if let Cmd::Completions { shell } = &cli.cmd {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut cmd, "jobctl", &mut std::io::stdout());
        return Ok(OK);
    }
    let submit = match &cli.cmd {
        Cmd::Submit(a) => Some(submit_request(a)?),
        _ => None,
    };
    let batch = match (&cli.cmd, &submit) {
        (Cmd::Submit(a), Some(req)) => match &a.batch {
            Some(file) => Some(progress::read_batch(file, &batch_defaults(req))?),
            None => None,
        },
        _ => None,
    };
    let path = cli
        .socket
        .clone()
        .unwrap_or_else(jobd::paths::client_socket_path);
    let mut c = Client::connect(&path)?;
    let json = cli.json;
    match &cli.cmd {
        Cmd::Submit(a) if batch.is_some() => {
            let jobs = batch.unwrap_or_default();
            submit_batch(&mut c, &jobs, a.wait, json)
        }
        Cmd::Submit(a) => {
            let req = submit.unwrap_or(Value::Null);
            let r = c.call("submit", req)?;
            show_submit(&r, a.wait, json)
        }
        Cmd::Status { id } => {
            let r = c.call("status", json!({ "job": id }))?;
            if json {
                print_json(&r);
            } else if r.is_ok() {
                print_record(r.get("job"));
            }
            refused(&r)
        }
        Cmd::Wait { ids, timeout } => wait(&mut c, ids, *timeout, json),
        Cmd::Cancel { id } => {
            let r = c.call("cancel", json!({ "job": id }))?;
            record_line(&r, id, json)
        }
        Cmd::Retry { id: Some(id), .. } => {
            let r = c.call("retry", json!({ "job": id }))?;
            record_line(&r, id, json)
        }
        Cmd::Retry {
            id: None,
            pool,
            kind,
            ..
        } => lifecycle::retry_all_dead(&mut c, pool.as_deref(), kind.as_deref(), json),
        Cmd::List {
            state,
            pool,
            kind,
            limit,
            cursor,
            oldest,
        } => {
            let mut q = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    q.insert(k.to_string(), v);
                }
            };
            put("state", state.clone().map(Value::from));
            put("pool", pool.clone().map(Value::from));
            put("kind", kind.clone().map(Value::from));
            put("limit", limit.map(Value::from));
            put("cursor", cursor.clone().map(Value::from));
            put("order", oldest.then(|| Value::from("oldest")));
            let r = c.call("list", Value::Object(q))?;
            if json {
                print_json(&r);
            } else if r.is_ok() {
                print_list(&r, *oldest);
            }
            refused(&r)
        }
        Cmd::Stats => {
            let r = c.call("stats", Value::Null)?;
            if json {
                print_json(&r);
            } else if r.is_ok() {
                print_stats(&r);
            }
            refused(&r)
        }
        Cmd::Pause { pool } | Cmd::Resume { pool } => {
            let (op, done) = match &cli.cmd {
                Cmd::Pause { .. } => ("pause", "paused"),
                _ => ("resume", "resumed"),
            };
            let r = c.call(op, json!({ "pool": pool }))?;
            if json {
                print_json(&r);
            } else if r.is_ok() {
                println!("pool {pool} {done}");
            }
            refused(&r)
        }
        Cmd::Hello => {
            let r = c.call("hello", Value::Null)?;
            if json {
                print_json(&r);
            } else if r.is_ok() {
                println!(
                    "{} {} (protocol {}) at {}",
                    text(r.get("server")),
                    text(r.get("version")),
                    text(r.get("protocol")),
                    path.display()
                );
            }
            refused(&r)
        }
        Cmd::Top { interval } => {
            jobd::top::run(c, *interval)?;
            Ok(OK)
        }
        // Answered before connecting.
        Cmd::Completions { .. } => Ok(OK),
    }
}

/// The fields of `submit --batch`'s options that fill in each line's job.
fn batch_defaults(req: &Value) -> Map<String, Value> {
    req["job"].as_object().cloned().unwrap_or_default()
}

/// `submit --batch`: submit every job (pipelined, with progress), print
/// the ids in file order (or, with --wait, wait and show the outcomes).
fn submit_batch(
    c: &mut Client,
    jobs: &[progress::BatchJob],
    then_wait: bool,
    json: bool,
) -> anyhow::Result<Code> {
    let total = jobs.len() as u64;
    let mut p = Progress::auto("submitted", total);
    let answers = progress::submit_batch(c, jobs, &mut p)?;
    let mut code = OK;
    let mut ids = Vec::new();
    let mut lines = Vec::new();
    for (job, r) in jobs.iter().zip(&answers) {
        if json {
            print_json(r);
        }
        match r.error() {
            Some(e) => {
                lines.push(format!(
                    "jobctl: line {}: {}: {}",
                    job.line, e.code, e.message
                ));
                code = JOB_FAILED;
            }
            None => ids.push(text(r.get("job"))),
        }
    }
    let refused = jobs.len() - ids.len();
    let extra = if refused > 0 {
        format!("{refused} refused")
    } else {
        String::new()
    };
    p.finish(total, total, &extra);
    for l in lines {
        eprintln!("{l}");
    }
    if then_wait && !ids.is_empty() {
        code = code.max(wait(c, &ids, None, json)?);
    } else if !json {
        for id in &ids {
            println!("{id}");
        }
    }
    Ok(code)
}

/// Exit code of an answer that is not about a job's outcome: 0 when ok,
/// else the error on stderr and 1.
fn refused(r: &Response) -> anyhow::Result<Code> {
    match r.error() {
        None => Ok(OK),
        Some(e) => {
            eprintln!("jobctl: {}: {}", e.code, e.message);
            Ok(JOB_FAILED)
        }
    }
}

fn submit_request(a: &SubmitArgs) -> anyhow::Result<Value> {
    let mut job = Map::new();
    if let Some(k) = &a.kind {
        job.insert("kind".into(), Value::from(k.clone()));
    }
    if let Some(p) = &a.payload {
        job.insert("payload".into(), read_payload(p)?);
    }
    if let Some(p) = a.priority {
        job.insert("priority".into(), Value::from(p));
    }
    if let Some(d) = a.delay {
        job.insert("delay_ms".into(), Value::from(ms(d)));
    }
    if let Some(t) = a.timeout {
        if t.is_zero() {
            bail!("--timeout must be longer than 0");
        }
        job.insert("timeout_ms".into(), Value::from(ms(t)));
    }
    if let Some(p) = &a.pool {
        job.insert("pool".into(), Value::from(p.clone()));
    }
    if let Some(n) = a.max_attempts {
        if n == 0 {
            bail!("--max-attempts must be at least 1");
        }
        job.insert("max_attempts".into(), Value::from(n));
    }
    if let Some(k) = &a.unique_key {
        job.insert("unique_key".into(), Value::from(k.clone()));
    }
    if !a.after.is_empty() {
        job.insert("after".into(), Value::from(a.after.clone()));
    }
    if let Some(b) = lifecycle::backoff(a.backoff_base, a.backoff_factor, a.backoff_max)? {
        job.insert("backoff".into(), b);
    }
    let mut req = json!({ "job": job });
    if a.wait {
        req["wait"] = Value::Bool(true);
    }
    Ok(req)
}

fn show_submit(r: &Response, wait: bool, json: bool) -> anyhow::Result<Code> {
    if json {
        print_json(r);
    }
    let id = text(r.get("job"));
    let state = r.get("state").as_str().unwrap_or("");
    if let Some(e) = r.error() {
        // A job that ran and did not succeed, or a refused submission.
        if !json {
            if r.get("job").is_null() {
                eprintln!("jobctl: {}: {}", e.code, e.message);
            } else {
                eprintln!("job {id} {state}: {}: {}", e.code, e.message);
            }
        }
        return Ok(JOB_FAILED);
    }
    if !json {
        if r.get("deduplicated") == &Value::Bool(true) {
            eprintln!("jobctl: an unfinished job with this unique key exists: {id}");
        }
        if wait {
            println!("job {id} {state}");
            let result = r.get("result");
            if !result.is_null() {
                println!("{}", pretty(result));
            }
        } else {
            println!("{id}");
        }
    }
    Ok(if wait { state_code(state) } else { OK })
}

/// 0 for a succeeded (or not yet final) job, 1 for any other final state.
fn state_code(state: &str) -> Code {
    match state {
        "failed" | "cancelled" | "timed_out" | "dead" => JOB_FAILED,
        _ => OK,
    }
}

/// cancel / retry: one line with the job's new state.
fn record_line(r: &Response, id: &str, json: bool) -> anyhow::Result<Code> {
    if json {
        print_json(r);
    } else if r.is_ok() {
        let rec = r.get("job");
        let state = rec.get("state").map(text).unwrap_or_default();
        println!("job {id} {state}");
    }
    refused(r)
}

/// Wait for every id (pipelined), print one row per job, exit 1 unless all
/// succeeded.
fn wait(
    c: &mut Client,
    ids: &[String],
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<Code> {
    let per_request = ms(timeout.unwrap_or(progress::WAIT_CHUNK));
    let mut p = if ids.len() > 1 {
        Progress::auto("final", ids.len() as u64)
    } else {
        Progress::Quiet
    };
    let answers = progress::wait_all(c, ids, timeout, &mut p)?;
    let finals = answers.iter().filter(|r| r.is_ok()).count() as u64;
    let ok_count = progress::succeeded(&answers);
    p.finish(finals, ids.len() as u64, &format!("{ok_count} succeeded"));
    let done: HashMap<&String, Response> = ids.iter().zip(answers).collect();
    let mut code = OK;
    let mut rows = Vec::new();
    for id in ids {
        let Some(r) = done.get(id) else { continue };
        if json {
            print_json(r);
        }
        let (state, detail) = match r.error() {
            Some(e) if e.code == "timeout" => (
                "not final".to_string(),
                format!("still not final after {}", human_ms(per_request)),
            ),
            Some(e) => ("-".to_string(), format!("{}: {}", e.code, e.message)),
            None => {
                let rec = r.get("job");
                let state = rec.get("state").map(text).unwrap_or_default();
                let detail = match rec.get("error") {
                    Some(e) if !e.is_null() => {
                        format!("{}: {}", text(&e["code"]), text(&e["message"]))
                    }
                    _ => rec.get("result").map(compact).unwrap_or_default(),
                };
                (state, detail)
            }
        };
        if r.error().is_some() || state_code(&state) != OK {
            code = JOB_FAILED;
        }
        rows.push(vec![id.clone(), state, detail]);
    }
    if !json {
        print_table(&["ID", "STATE", "RESULT / ERROR"], &rows);
    }
    Ok(code)
}

fn print_json(r: &Response) {
    println!("{}", r.0);
}

/// A JSON value as plain text: strings without quotes, null as empty.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn compact(v: &Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        v.to_string()
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// Milliseconds as a short human duration (`850ms`, `4.2s`, `3m10s`).
fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// A timestamp (ms since the epoch) as its age: `4.2s ago`.
fn age(v: &Value) -> String {
    match v.as_u64() {
        Some(t) => {
            let now = jobd_actors::now_ms();
            if t > now {
                format!("in {}", human_ms(t - now))
            } else {
                format!("{} ago", human_ms(now - t))
            }
        }
        None => "-".to_string(),
    }
}

/// Print rows under headers, columns padded to their widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (cell, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_record(rec: &Value) {
    let f = |k: &str| rec.get(k).map(text).unwrap_or_default();
    let mut rows: Vec<(&str, String)> = vec![
        ("id", f("id")),
        ("kind", f("kind")),
        ("pool", f("pool")),
        ("state", f("state")),
        ("priority", f("priority")),
        (
            "attempt",
            format!("{} of {}", f("attempt"), f("max_attempts")),
        ),
        ("created", age(&rec["created_at"])),
    ];
    let run_at = &rec["run_at"];
    if run_at.as_u64() > rec["created_at"].as_u64() {
        rows.push(("run at", age(run_at)));
    }
    if !rec["started_at"].is_null() {
        rows.push(("started", age(&rec["started_at"])));
    }
    if !rec["finished_at"].is_null() {
        rows.push(("finished", age(&rec["finished_at"])));
    }
    if let Some(t) = rec["timeout_ms"].as_u64() {
        rows.push(("timeout", human_ms(t)));
    }
    if !rec["unique_key"].is_null() {
        rows.push(("unique key", f("unique_key")));
    }
    if let Some(after) = rec["after"].as_array()
        && !after.is_empty()
    {
        let ids: Vec<String> = after.iter().map(text).collect();
        rows.push(("after", ids.join(", ")));
    }
    if let Some(p) = rec["submitted_by"].as_object() {
        let g = |k: &str| p.get(k).map(text).unwrap_or_default();
        rows.push((
            "submitted by",
            format!("uid {}, gid {}, pid {}", g("uid"), g("gid"), g("pid")),
        ));
    }
    rows.push(("payload", compact(&rec["payload"])));
    if !rec["result"].is_null() {
        rows.push(("result", pretty(&rec["result"])));
    }
    if !rec["error"].is_null() {
        rows.push((
            "error",
            format!(
                "{}: {}",
                text(&rec["error"]["code"]),
                text(&rec["error"]["message"])
            ),
        ));
    }
    for (k, v) in rows {
        // Indent continuation lines of multi-line values under the value.
        let v = v.replace('\n', "\n               ");
        println!("{:<14} {v}", format!("{k}:"));
    }
    if let Some(attempts) = rec["attempts"].as_array()
        && !attempts.is_empty()
    {
        println!("attempts:");
        for (i, a) in attempts.iter().enumerate() {
            let took = match (a["start"].as_u64(), a["end"].as_u64()) {
                (Some(s), Some(e)) => human_ms(e.saturating_sub(s)),
                _ => "running".to_string(),
            };
            let err = match &a["error"] {
                Value::Null => String::new(),
                e => format!("  {}", text(e)),
            };
            println!("  {}: {took}{err}", i + 1);
        }
    }
}

fn print_list(r: &Response, oldest: bool) {
    let empty = Vec::new();
    let jobs = r.get("jobs").as_array().unwrap_or(&empty);
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let f = |k: &str| j.get(k).map(text).unwrap_or_default();
            let err = match &j["error"] {
                Value::Null => String::new(),
                e => text(&e["code"]),
            };
            vec![
                f("id"),
                f("kind"),
                f("pool"),
                f("state"),
                f("priority"),
                format!("{}/{}", f("attempt"), f("max_attempts")),
                age(&j["created_at"]),
                err,
            ]
        })
        .collect();
    print_table(
        &[
            "ID", "KIND", "POOL", "STATE", "PRIO", "ATTEMPT", "CREATED", "ERROR",
        ],
        &rows,
    );
    let cursor = r.get("cursor");
    if !cursor.is_null() {
        let order = if oldest { " --oldest" } else { "" };
        eprintln!("more: jobctl list --cursor {}{order}", text(cursor));
    }
}

fn print_stats(r: &Response) {
    // The snapshot may sit under "stats" or at the top level.
    let s = match r.get("stats") {
        Value::Object(_) => r.get("stats"),
        _ => &r.0,
    };
    let n = |v: &Value, k: &str| v.get(k).map(text).unwrap_or_default();
    let pct = |v: &Value, p: &str| match v.get(p).and_then(Value::as_f64) {
        Some(x) => format!("{x:.1}"),
        None => "-".to_string(),
    };
    if let Some(pools) = s["pools"].as_object() {
        let rows: Vec<Vec<String>> = pools
            .iter()
            .map(|(name, p)| {
                let c = &p["counters"];
                vec![
                    name.clone(),
                    n(p, "threads"),
                    n(p, "busy"),
                    n(p, "queued"),
                    n(p, "delayed"),
                    n(p, "running"),
                    if p["paused"] == Value::Bool(true) {
                        "yes".into()
                    } else {
                        "no".into()
                    },
                    n(c, "submitted"),
                    n(c, "succeeded"),
                    n(c, "failed"),
                ]
            })
            .collect();
        print_table(
            &[
                "POOL",
                "THREADS",
                "BUSY",
                "QUEUED",
                "DELAYED",
                "RUNNING",
                "PAUSED",
                "SUBMITTED",
                "SUCCEEDED",
                "FAILED",
            ],
            &rows,
        );
    }
    if let Some(kinds) = s["kinds"].as_object() {
        println!();
        let rows: Vec<Vec<String>> = kinds
            .iter()
            .map(|(name, k)| {
                let c = &k["counters"];
                let w = &k["queue_wait_ms"];
                let t = &k["run_time_ms"];
                vec![
                    name.clone(),
                    n(c, "submitted"),
                    n(c, "succeeded"),
                    n(c, "failed"),
                    n(c, "dead"),
                    n(c, "cancelled"),
                    n(c, "timed_out"),
                    format!("{}/{}", pct(w, "p50"), pct(w, "p99")),
                    format!("{}/{}", pct(t, "p50"), pct(t, "p99")),
                ]
            })
            .collect();
        print_table(
            &[
                "KIND",
                "SUBMITTED",
                "SUCCEEDED",
                "FAILED",
                "DEAD",
                "CANCELLED",
                "TIMED_OUT",
                "WAIT P50/P99 MS",
                "RUN P50/P99 MS",
            ],
            &rows,
        );
    }
    for k in ["active_jobs", "retained_jobs"] {
        if !s[k].is_null() {
            println!("{}: {}", k.replace('_', " "), text(&s[k]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_combinations() {
        let d = |s| parse_duration(s).unwrap();
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("5s"), Duration::from_secs(5));
        assert_eq!(d("2m"), Duration::from_secs(120));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d("1d"), Duration::from_secs(86400));
        assert_eq!(d("1m30s"), Duration::from_secs(90));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("0s"), Duration::ZERO);
        for bad in ["", "5", "s", "5x", "-1s", "1.2.3s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad} parsed");
        }
        assert!(parse_duration("5").unwrap_err().contains("unit"));
    }

    #[test]
    fn submit_request_carries_every_option() {
        let cli = Cli::try_parse_from([
            "jobctl",
            "submit",
            "echo",
            "{\"x\":1}",
            "--wait",
            "--priority",
            "-3",
            "--delay",
            "2s",
            "--timeout",
            "500ms",
            "--pool",
            "io",
            "--max-attempts",
            "4",
            "--unique-key",
            "k",
            "--after",
            "1",
            "--after",
            "2",
        ])
        .unwrap();
        let Cmd::Submit(a) = &cli.cmd else {
            panic!("not a submit")
        };
        let r = submit_request(a).unwrap();
        assert_eq!(
            r,
            json!({"wait": true, "job": {"kind": "echo", "payload": {"x": 1}, "priority": -3,
                "delay_ms": 2000, "timeout_ms": 500, "pool": "io", "max_attempts": 4,
                "unique_key": "k", "after": ["1", "2"]}})
        );
        let cli = Cli::try_parse_from(["jobctl", "submit", "echo"]).unwrap();
        let Cmd::Submit(a) = &cli.cmd else {
            panic!("not a submit")
        };
        assert_eq!(submit_request(a).unwrap(), json!({"job": {"kind": "echo"}}));
    }

    #[test]
    fn bad_payloads_and_files_are_usage_errors() {
        assert!(read_payload("{nope").is_err());
        let e = read_payload("@/no/such/file.json").unwrap_err();
        assert!(format!("{e:#}").contains("/no/such/file.json"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        std::fs::write(&f, "[1, 2]").unwrap();
        assert_eq!(
            read_payload(&format!("@{}", f.display())).unwrap(),
            json!([1, 2])
        );
    }

    #[test]
    fn final_states_other_than_succeeded_exit_1() {
        assert_eq!(state_code("succeeded"), 0);
        for s in ["failed", "cancelled", "timed_out", "dead"] {
            assert_eq!(state_code(s), 1);
        }
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(4200), "4.2s");
        assert_eq!(human_ms(190_000), "3m10s");
    }
}
