//! Progress for the long `jobctl` commands: `submit --batch FILE.jsonl
//! [--wait]` and `wait ID...`. The work is pipelined over one connection
//! (up to [`WINDOW`] requests in flight, answers taken as they arrive) and
//! reported on stderr: an indicatif bar with rate and ETA when stderr is a
//! terminal, otherwise plain lines (at most one a second, and a summary).
//!
//! What to print on stdout (ids, tables, JSON) stays with `jobctl`; this
//! module returns the answers in input order.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

use crate::client::{Client, ClientError, Response};

/// Requests kept in flight on the connection: the daemon reads at least
/// this many before it stops reading (DESIGN.md), so a window this size
/// never stalls on its side.
pub const WINDOW: usize = 64;

/// How long one `wait` request may take when the user set no limit; it is
/// simply asked again after a `timeout` answer.
pub const WAIT_CHUNK: Duration = Duration::from_secs(60);

/// Least time between two plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// Where progress goes.
pub enum Progress {
    /// An indicatif bar on the terminal.
    Bar {
        /// The bar.
        bar: ProgressBar,
        /// When the work started.
        start: Instant,
        /// The verb for the summary line.
        verb: &'static str,
    },
    /// Plain lines on stderr.
    Lines {
        /// The verb: `submitted`, `final`.
        verb: &'static str,
        /// Units of work in all.
        total: u64,
        /// Units done.
        done: u64,
        /// When the work started.
        start: Instant,
        /// When the last line was printed.
        last: Instant,
    },
    /// Nothing at all (tests, `--json` callers that want silence).
    Quiet,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn auto(verb: &'static str, total: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            Progress::bar(verb, total)
        } else {
            Progress::lines(verb, total)
        }
    }

    /// An indicatif bar on stderr, with rate and ETA.
    pub fn bar(verb: &'static str, total: u64) -> Progress {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} jobs  {rate}  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "rate",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", s.per_sec());
            },
        )
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(verb);
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress::Bar {
            bar,
            start: Instant::now(),
            verb,
        }
    }

    /// Plain lines on stderr.
    pub fn lines(verb: &'static str, total: u64) -> Progress {
        let now = Instant::now();
        Progress::Lines {
            verb,
            total,
            done: 0,
            start: now,
            last: now,
        }
    }

    /// `n` more units are done.
    pub fn inc(&mut self, n: u64) {
        match self {
            Progress::Bar { bar, .. } => bar.inc(n),
            Progress::Lines {
                verb,
                total,
                done,
                start,
                last,
            } => {
                *done += n;
                if last.elapsed() >= LINE_EVERY && *done < *total {
                    *last = Instant::now();
                    eprintln!("jobctl: {}", line(verb, *done, *total, start.elapsed()));
                }
            }
            Progress::Quiet => {}
        }
    }

    /// The work is over: clear the bar and print the summary line, with
    /// `extra` after it when not empty.
    pub fn finish(self, done: u64, total: u64, extra: &str) {
        let (verb, took) = match &self {
            Progress::Bar { bar, start, verb } => {
                bar.finish_and_clear();
                (*verb, start.elapsed())
            }
            Progress::Lines { verb, start, .. } => (*verb, start.elapsed()),
            Progress::Quiet => return,
        };
        let sep = if extra.is_empty() { "" } else { ": " };
        eprintln!("jobctl: {}{sep}{extra}", line(verb, done, total, took));
    }
}

/// `submitted 250/1000 jobs in 2.0s (125/s)`.
fn line(verb: &str, done: u64, total: u64, took: Duration) -> String {
    let secs = took.as_secs_f64();
    let rate = if secs > 0.0 {
        format!("{:.0}/s", done as f64 / secs)
    } else {
        "-".to_string()
    };
    format!("{verb} {done}/{total} jobs in {secs:.1}s ({rate})")
}

/// One job of a batch file.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchJob {
    /// Its line number in the file (from 1), for messages.
    pub line: usize,
    /// The job object, as sent in `submit`'s `job`.
    pub job: Value,
}

/// Why a batch file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The file cannot be read.
    #[error("cannot read the batch file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not a JSON object.
    #[error("{path}, line {line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// Line number, from 1.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No jobs at all.
    #[error("{0} has no jobs (one JSON object per line)")]
    Empty(String),
}

/// Read a batch: one job object per line (blank lines are skipped); `-`
/// reads stdin. Each job gets the fields of `defaults` it does not set
/// itself (the command line's `--pool`, `--priority`, …).
pub fn read_batch(path: &Path, defaults: &Map<String, Value>) -> Result<Vec<BatchJob>, BatchError> {
    let shown = path.display().to_string();
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(path).map_err(|source| BatchError::Read {
            path: shown.clone(),
            source,
        })?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut jobs = Vec::new();
    for (i, text) in reader.lines().enumerate() {
        let text = text.map_err(|source| BatchError::Read {
            path: shown.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let bad = |message: String| BatchError::Line {
            path: shown.clone(),
            line: i + 1,
            message,
        };
        let mut job = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad("a job must be a JSON object".into())),
            Err(e) => return Err(bad(format!("not valid JSON: {e}"))),
        };
        if !job.contains_key("kind") {
            return Err(bad("the job has no \"kind\"".into()));
        }
        for (k, v) in defaults {
            job.entry(k.clone()).or_insert_with(|| v.clone());
        }
        jobs.push(BatchJob {
            line: i + 1,
            job: Value::Object(job),
        });
    }
    if jobs.is_empty() {
        return Err(BatchError::Empty(shown));
    }
    Ok(jobs)
}

/// Send one request per item with up to [`WINDOW`] in flight, taking the
/// answers as they arrive; `done(index, answer)` says whether the item is
/// finished (else it is sent again, with fresh fields from `request`).
fn pipeline(
    c: &mut Client,
    count: usize,
    op: &str,
    mut request: impl FnMut(usize) -> Value,
    mut done: impl FnMut(usize, &Response) -> bool,
) -> Result<Vec<Response>, ClientError> {
    let mut answers: Vec<Option<Response>> = vec![None; count];
    let mut in_flight: HashMap<u64, usize> = HashMap::new();
    let mut todo: std::collections::VecDeque<usize> = (0..count).collect();
    while !todo.is_empty() || !in_flight.is_empty() {
        while in_flight.len() < WINDOW
            && let Some(i) = todo.pop_front()
        {
            let req = c.send(op, request(i))?;
            in_flight.insert(req, i);
        }
        let r = c.recv_any()?;
        let Some(i) = r.get("id").as_u64().and_then(|id| in_flight.remove(&id)) else {
            // An answer for no request of ours: the daemon could not read
            // one (it would be a bug in this client); stop rather than hang.
            return Err(ClientError::BadResponse(r.0.to_string()));
        };
        if done(i, &r) {
            answers[i] = Some(r);
        } else {
            todo.push_back(i);
        }
    }
    // Every index was answered exactly once to leave the loop.
    Ok(answers.into_iter().flatten().collect())
}

/// Submit every job of a batch (pipelined); the answers in file order.
pub fn submit_batch(
    c: &mut Client,
    jobs: &[BatchJob],
    progress: &mut Progress,
) -> Result<Vec<Response>, ClientError> {
    pipeline(
        c,
        jobs.len(),
        "submit",
        |i| json!({ "job": jobs[i].job }),
        |_, _| {
            progress.inc(1);
            true
        },
    )
}

/// Wait until every job is final (pipelined), or until `timeout` has
/// passed: the `wait` answers in the order of `ids`. Without a timeout, a
/// `timeout` answer is asked again; with one, the answers after the
/// deadline are `timeout` errors for jobs still not final.
pub fn wait_all(
    c: &mut Client,
    ids: &[String],
    timeout: Option<Duration>,
    progress: &mut Progress,
) -> Result<Vec<Response>, ClientError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let chunk_ms = |_: usize| -> u64 {
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => WAIT_CHUNK,
        };
        u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
    };
    pipeline(
        c,
        ids.len(),
        "wait",
        |i| json!({ "job": ids[i], "timeout_ms": chunk_ms(i) }),
        |_, r| {
            let expired = r.error().is_some_and(|e| e.code == "timeout");
            let finished = !expired || deadline.is_some();
            if finished && !expired {
                progress.inc(1);
            }
            finished
        },
    )
}

/// How many of these `wait` answers are final jobs that succeeded.
pub fn succeeded(answers: &[Response]) -> usize {
    answers
        .iter()
        .filter(|r| r.is_ok() && r.get("job").get("state") == Some(&json!("succeeded")))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_get_defaults_and_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("jobs.jsonl");
        std::fs::write(
            &f,
            "{\"kind\":\"echo\",\"payload\":1}\n\n{\"kind\":\"sleep\",\"pool\":\"io\"}\n",
        )
        .unwrap();
        let mut defaults = Map::new();
        defaults.insert("pool".into(), json!("cpu"));
        defaults.insert("priority".into(), json!(3));
        let jobs = read_batch(&f, &defaults).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].line, 1);
        assert_eq!(
            jobs[0].job,
            json!({"kind": "echo", "payload": 1, "pool": "cpu", "priority": 3})
        );
        assert_eq!(jobs[1].line, 3);
        assert_eq!(jobs[1].job["pool"], json!("io"), "a job's own field wins");
    }

    #[test]
    fn bad_batch_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("jobs.jsonl");
        for (text, want) in [
            ("{\"kind\":\"echo\"}\n{nope\n", "line 2: not valid JSON"),
            ("[1]\n", "line 1: a job must be a JSON object"),
            ("{\"payload\":1}\n", "line 1: the job has no \"kind\""),
            ("\n\n", "has no jobs"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = read_batch(&f, &Map::new()).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = read_batch(Path::new("/no/such.jsonl"), &Map::new()).unwrap_err();
        assert!(e.to_string().contains("/no/such.jsonl"));
    }

    #[test]
    fn summary_line_has_count_time_and_rate() {
        assert_eq!(
            line("submitted", 250, 1000, Duration::from_secs(2)),
            "submitted 250/1000 jobs in 2.0s (125/s)"
        );
        assert_eq!(
            line("final", 0, 3, Duration::ZERO),
            "final 0/3 jobs in 0.0s (-)"
        );
    }
}
