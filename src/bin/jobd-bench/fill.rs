//! Memory per queued job: pause the `default` pool of a (fresh, memory
//! store) daemon so that jobs stay queued, read its resident memory, submit
//! `count` small jobs in ten equal steps (timing each: the submit rate must
//! not fall as the queue grows), and read its resident memory again.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::load::{self, Expect};
use crate::measure::{Limit, median};
use crate::procs::{peer_pid, rss_kib};

/// Steps the submissions are timed in.
const STEPS: u64 = 10;

/// What `fill` measured.
pub struct Fill {
    /// Resident memory before anything was submitted, KiB.
    pub idle_kib: u64,
    /// Resident memory once `count` jobs are queued, KiB.
    pub full_kib: u64,
    /// Jobs queued.
    pub count: u64,
    /// Submissions per second in each tenth of the way.
    pub step_rates: Vec<f64>,
}

impl Fill {
    /// Resident bytes per queued job.
    pub fn bytes_per_job(&self) -> f64 {
        (self.full_kib.saturating_sub(self.idle_kib) * 1024) as f64 / self.count.max(1) as f64
    }

    /// Submit rate near the end over the rate near the start (1.0: flat):
    /// the median of the last three steps over that of the first three, so
    /// that one step slowed by another process does not decide it.
    pub fn flatness(&self) -> f64 {
        let n = self.step_rates.len();
        if n < 3 {
            return f64::NAN;
        }
        let first = median(self.step_rates[..3].to_vec());
        let last = median(self.step_rates[n - 3..].to_vec());
        if first > 0.0 { last / first } else { f64::NAN }
    }

    /// Print it.
    pub fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "idle_rss_kib": self.idle_kib, "full_rss_kib": self.full_kib,
                    "jobs": self.count, "bytes_per_job": self.bytes_per_job(),
                    "step_rates": self.step_rates, "end_over_start": self.flatness(),
                })
            );
        } else {
            let rates: Vec<String> = self
                .step_rates
                .iter()
                .map(|r| format!("{:.0}", r))
                .collect();
            println!(
                "idle RSS {:.1} MiB; {} queued jobs: RSS {:.1} MiB, {:.0} bytes per job; \
                 submits/s per tenth: {} (end/start {:.2})",
                self.idle_kib as f64 / 1024.0,
                self.count,
                self.full_kib as f64 / 1024.0,
                self.bytes_per_job(),
                rates.join(" "),
                self.flatness()
            );
        }
    }
}

/// One request on `s`, its answer as JSON.
fn ask(s: &mut BufReader<UnixStream>, line: &str) -> Result<serde_json::Value> {
    s.get_mut().write_all(line.as_bytes())?;
    let mut answer = String::new();
    if s.read_line(&mut answer)? == 0 {
        bail!("jobd closed the connection");
    }
    Ok(serde_json::from_str(&answer)?)
}

/// Queue `count` jobs on the paused default pool of the daemon on `socket`.
pub fn fill(socket: &Path, count: u64, payload_bytes: usize, pause: bool) -> Result<Fill> {
    let s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let pid = peer_pid(&s)?;
    let mut s = BufReader::new(s);
    ask(&mut s, "{\"id\":0,\"op\":\"hello\"}\n")?;
    let idle_kib = rss_kib(pid)?;
    if pause {
        let r = ask(&mut s, "{\"id\":1,\"op\":\"pause\",\"pool\":\"default\"}\n")?;
        if r["ok"] != serde_json::Value::Bool(true) {
            bail!("cannot pause the default pool: {r}");
        }
    }
    let line = load::submit_line("echo", payload_bytes, false);
    let mut step_rates = Vec::new();
    for i in 0..STEPS {
        let n = count / STEPS + u64::from(i < count % STEPS);
        let st = load::run(socket, 1, 256, Limit::Count(n), &line, Expect::Jobd)?;
        if st.failures > 0 {
            bail!(
                "{} submissions failed (is max_queued of the default pool at least {count}?)",
                st.failures
            );
        }
        step_rates.push(st.rate());
    }
    let full_kib = rss_kib(pid)?;
    Ok(Fill {
        idle_kib,
        full_kib,
        count,
        step_rates,
    })
}
