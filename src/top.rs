//! `jobctl top`: a live dashboard of the daemon over the job socket
//! (ratatui on crossterm). Every tick it asks `stats` and lists the newest
//! failed, dead and timed-out jobs, then draws: per pool the threads busy
//! of total, queued, delayed and running jobs, jobs done per second (a
//! sparkline from counter deltas) and queue-wait and run-time percentiles;
//! below, the recent failures. `q`, Esc or Ctrl-C quits; the terminal is
//! restored on every exit path (a panic hook covers panics).
//!
//! The state ([`Dashboard`]) and its drawing ([`Dashboard::render`]) are
//! plain code over JSON answers, tested with ratatui's `TestBackend`; only
//! [`run`] touches the terminal and the socket.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Sparkline, Table};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{Client, ClientError};

/// Throughput samples kept per pool (one per tick).
const HISTORY: usize = 240;

/// Failures shown.
const FAILURES: usize = 5;

/// Why `jobctl top` could not run.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// stdout is not a terminal.
    #[error("jobctl top needs a terminal (stdout is not one); try `jobctl stats` instead")]
    NotATerminal,
    /// The terminal could not be set up or drawn on.
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// Event counters of a pool, as `stats` sends them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CountersView {
    /// Jobs admitted.
    pub submitted: u64,
    /// Attempts started.
    pub started: u64,
    /// Jobs that succeeded.
    pub succeeded: u64,
    /// Jobs that ended failed.
    pub failed: u64,
    /// Jobs that ended dead.
    pub dead: u64,
    /// Jobs cancelled.
    pub cancelled: u64,
    /// Attempts past their deadline.
    pub timed_out: u64,
}

impl CountersView {
    /// Jobs that reached a final state (timed-out attempts are counted
    /// through the state their job ends in, when it is failed or dead).
    fn done(&self) -> u64 {
        self.succeeded + self.failed + self.dead + self.cancelled
    }
}

/// Latency percentiles in ms, as `stats` sends them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PercentilesView {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// One pool, as `stats` sends it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PoolView {
    /// Worker threads.
    pub threads: u64,
    /// Threads running a handler.
    pub busy: u64,
    /// Jobs ready, waiting for a thread.
    pub queued: u64,
    /// Jobs waiting for time or dependencies.
    pub delayed: u64,
    /// Jobs running.
    pub running: u64,
    /// True while paused.
    pub paused: bool,
    /// Event counters.
    pub counters: CountersView,
    /// Time from ready to started.
    pub queue_wait_ms: PercentilesView,
    /// Time handlers ran.
    pub run_time_ms: PercentilesView,
}

/// A failed job for the failures panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Job id.
    pub id: String,
    /// Kind.
    pub kind: String,
    /// Pool.
    pub pool: String,
    /// failed, dead or timed_out.
    pub state: String,
    /// When it finished (ms since the epoch).
    pub finished_at: u64,
    /// Error code and message.
    pub error: String,
}

/// What the dashboard shows, and the history it needs for rates.
#[derive(Debug, Clone, Default)]
pub struct Dashboard {
    /// Where it is connected, for the title.
    pub socket: String,
    /// The pools of the last `stats` answer.
    pub pools: BTreeMap<String, PoolView>,
    /// Jobs done per second, per pool, oldest first.
    pub history: BTreeMap<String, VecDeque<u64>>,
    /// The newest failures, newest first.
    pub failures: Vec<Failure>,
    /// Why the last refresh failed, while it does.
    pub error: Option<String>,
    /// Jobs not final yet (from `stats`).
    pub active_jobs: u64,
    /// When the last counters were taken, and each pool's done total then.
    last: Option<(Instant, BTreeMap<String, u64>)>,
}

impl Dashboard {
    /// An empty dashboard for the daemon at `socket`.
    pub fn new(socket: impl Into<String>) -> Dashboard {
        Dashboard {
            socket: socket.into(),
            ..Dashboard::default()
        }
    }

    /// Take a `stats` answer taken at `now`: new gauges, and one more
    /// throughput sample per pool from the counters' growth since the last.
    pub fn update_stats(&mut self, stats: &Value, now: Instant) {
        let pools: BTreeMap<String, PoolView> = stats
            .get("pools")
            .and_then(|p| serde_json::from_value(p.clone()).ok())
            .unwrap_or_default();
        self.active_jobs = stats["active_jobs"].as_u64().unwrap_or(0);
        let totals: BTreeMap<String, u64> = pools
            .iter()
            .map(|(n, p)| (n.clone(), p.counters.done()))
            .collect();
        if let Some((then, before)) = &self.last {
            let secs = now.saturating_duration_since(*then).as_secs_f64();
            for (name, total) in &totals {
                // A pool new since the last sample, or a daemon restarted
                // (counters went down): no rate this time.
                let grown = before.get(name).map_or(0, |b| total.saturating_sub(*b));
                let rate = if secs > 0.0 {
                    (grown as f64 / secs).round() as u64
                } else {
                    0
                };
                let h = self.history.entry(name.clone()).or_default();
                h.push_back(rate);
                while h.len() > HISTORY {
                    h.pop_front();
                }
            }
        }
        self.history.retain(|n, _| totals.contains_key(n));
        self.last = Some((now, totals));
        self.pools = pools;
        self.error = None;
    }

    /// Take `list` answers (any number of them): keep the newest failures.
    pub fn update_failures(&mut self, lists: &[Value]) {
        let mut all: Vec<Failure> = lists
            .iter()
            .filter_map(|l| l["jobs"].as_array())
            .flatten()
            .map(|j| {
                let s = |k: &str| match &j[k] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                let e = &j["error"];
                let error = match (e["code"].as_str(), e["message"].as_str()) {
                    (Some(c), Some(m)) => format!("{c}: {m}"),
                    (Some(c), None) => c.to_string(),
                    _ => String::new(),
                };
                Failure {
                    id: s("id"),
                    kind: s("kind"),
                    pool: s("pool"),
                    state: s("state"),
                    finished_at: j["finished_at"].as_u64().unwrap_or(0),
                    error,
                }
            })
            .collect();
        all.sort_by_key(|f| std::cmp::Reverse(f.finished_at));
        all.truncate(FAILURES);
        self.failures = all;
    }

    /// Draw everything into the frame.
    pub fn render(&self, f: &mut Frame) {
        let area = f.area();
        let pool_rows = self.pools.len().max(1) as u16;
        let spark_rows = self.pools.len().max(1) as u16 * 3;
        let [title, table, sparks, failures] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(pool_rows + 3),
            Constraint::Min(spark_rows.min(12)),
            Constraint::Length(FAILURES as u16 + 3),
        ])
        .areas(area);
        f.render_widget(self.title_line(), title);
        f.render_widget(self.pool_table(), table);
        self.render_sparklines(f, sparks);
        f.render_widget(self.failure_table(), failures);
    }

    fn title_line(&self) -> Paragraph<'_> {
        let mut spans = vec![
            Span::styled("jobd top", Style::default().add_modifier(Modifier::BOLD)),
            Span::raw(format!("  {}  ", self.socket)),
            Span::raw(format!("active jobs: {}  ", self.active_jobs)),
            Span::styled("q quits", Style::default().fg(Color::DarkGray)),
        ];
        if let Some(e) = &self.error {
            spans.push(Span::styled(
                format!("  {e}"),
                Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            ));
        }
        Paragraph::new(Line::from(spans))
    }

    fn pool_table(&self) -> Table<'_> {
        let header = Row::new([
            "POOL",
            "BUSY/THREADS",
            "QUEUED",
            "DELAYED",
            "RUNNING",
            "DONE/S",
            "WAIT p50/p90/p99/max ms",
            "RUN p50/p90/p99/max ms",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD));
        let rows = self.pools.iter().map(|(name, p)| {
            let rate = self
                .history
                .get(name)
                .and_then(|h| h.back())
                .map_or("-".to_string(), u64::to_string);
            let label = if p.paused {
                format!("{name} (paused)")
            } else {
                name.clone()
            };
            Row::new([
                label,
                format!("{}/{}", p.busy, p.threads),
                p.queued.to_string(),
                p.delayed.to_string(),
                p.running.to_string(),
                rate,
                percentiles(&p.queue_wait_ms),
                percentiles(&p.run_time_ms),
            ])
        });
        Table::new(
            rows,
            [
                Constraint::Length(18),
                Constraint::Length(12),
                Constraint::Length(7),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(7),
                Constraint::Length(24),
                Constraint::Min(22),
            ],
        )
        .header(header)
        .block(Block::default().borders(Borders::ALL).title(" pools "))
    }

    fn render_sparklines(&self, f: &mut Frame, area: Rect) {
        let outer = Block::default()
            .borders(Borders::ALL)
            .title(" jobs done per second ");
        let inner = outer.inner(area);
        f.render_widget(outer, area);
        if self.pools.is_empty() || inner.height == 0 {
            return;
        }
        let n = self.pools.len();
        let rows = Layout::vertical(vec![Constraint::Ratio(1, n as u32); n]).split(inner);
        for ((name, _), row) in self.pools.iter().zip(rows.iter()) {
            let [label, spark] =
                Layout::horizontal([Constraint::Length(26), Constraint::Min(1)]).areas(*row);
            let h = self.history.get(name);
            let now = h.and_then(|h| h.back()).copied().unwrap_or(0);
            let peak = h.and_then(|h| h.iter().max()).copied().unwrap_or(0);
            f.render_widget(
                Paragraph::new(vec![
                    Line::from(Span::styled(
                        name.clone(),
                        Style::default().add_modifier(Modifier::BOLD),
                    )),
                    Line::from(format!("{now}/s now, peak {peak}/s")),
                ]),
                label,
            );
            // Newest sample at the right edge, older ones scrolling left.
            let width = usize::from(spark.width);
            let mut data: Vec<u64> = h
                .map(|h| {
                    h.iter()
                        .skip(h.len().saturating_sub(width))
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            data.splice(0..0, std::iter::repeat_n(0, width - data.len()));
            f.render_widget(
                Sparkline::default()
                    .data(data)
                    .style(Style::default().fg(Color::Green)),
                spark,
            );
        }
    }

    fn failure_table(&self) -> Table<'_> {
        let header = Row::new(["ID", "KIND", "POOL", "STATE", "ERROR"])
            .style(Style::default().add_modifier(Modifier::BOLD));
        let rows = self.failures.iter().map(|x| {
            Row::new([
                x.id.clone(),
                x.kind.clone(),
                x.pool.clone(),
                x.state.clone(),
                x.error.replace('\n', " "),
            ])
            .style(Style::default().fg(Color::Red))
        });
        Table::new(
            rows,
            [
                Constraint::Length(10),
                Constraint::Length(14),
                Constraint::Length(12),
                Constraint::Length(10),
                Constraint::Min(10),
            ],
        )
        .header(header)
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(" recent failures (failed, dead, timed_out) "),
        )
    }

    /// One refresh over the connection: `stats`, then the failure lists,
    /// pipelined.
    pub fn refresh(&mut self, c: &mut Client) -> Result<(), ClientError> {
        let stats = c.send("stats", Value::Null)?;
        let lists: Vec<u64> = ["failed", "dead", "timed_out"]
            .iter()
            .map(|s| c.send("list", json!({"state": s, "limit": FAILURES})))
            .collect::<Result<_, _>>()?;
        let stats = c.recv(stats)?;
        let mut answers = Vec::with_capacity(lists.len());
        for l in lists {
            answers.push(c.recv(l)?.0);
        }
        match stats.error() {
            Some(e) => self.error = Some(format!("{}: {}", e.code, e.message)),
            None => self.update_stats(&stats.0, Instant::now()),
        }
        self.update_failures(&answers);
        Ok(())
    }
}

/// `p50/p90/p99/max` in ms, or `-` before any sample.
fn percentiles(p: &PercentilesView) -> String {
    if p.count == 0 {
        return "-".to_string();
    }
    let f = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    format!("{}/{}/{}/{}", f(p.p50), f(p.p90), f(p.p99), f(p.max))
}

/// Leaves raw mode and the alternate screen when dropped: on return, on
/// error and while unwinding.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// True for the keys that quit: q, Esc, Ctrl-C.
fn quits(code: KeyCode, mods: KeyModifiers) -> bool {
    matches!(code, KeyCode::Char('q') | KeyCode::Esc)
        || (code == KeyCode::Char('c') && mods.contains(KeyModifiers::CONTROL))
}

/// Run the dashboard until the user quits. The connection is opened again
/// when it drops (the daemon restarted); meanwhile the title says why the
/// numbers are stale.
pub fn run(client: Client, interval: Duration) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let path: PathBuf = client.path().to_path_buf();
    let mut client = Some(client);
    let mut dash = Dashboard::new(path.display().to_string());
    let _restore = Restore;
    let mut terminal = ratatui::try_init()?;
    loop {
        if client.is_none() {
            match Client::connect(&path) {
                Ok(c) => client = Some(c),
                Err(e) => dash.error = Some(e.to_string()),
            }
        }
        if let Some(c) = &mut client {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            if let Err(e) = dash.refresh(c) {
                dash.error = Some(e.to_string());
                client = None;
            }
        }
        terminal.draw(|f| dash.render(f))?;
        let next = Instant::now() + interval;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if event::poll(left)? {
                match event::read()? {
                    Event::Key(k)
                        if k.kind == KeyEventKind::Press && quits(k.code, k.modifiers) =>
                    {
                        return Ok(());
                    }
                    Event::Resize(..) => {
                        terminal.draw(|f| dash.render(f))?;
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn stats(done: u64, busy: u64) -> Value {
        json!({
            "ok": true,
            "active_jobs": 7,
            "pools": {
                "default": {"threads": 4, "busy": busy, "idle": 4 - busy, "queued": 12, "delayed": 3,
                    "running": busy, "paused": false,
                    "counters": {"submitted": 100, "succeeded": done, "failed": 0, "dead": 0, "cancelled": 0},
                    "queue_wait_ms": {"count": 10, "p50": 1.5, "p90": 2.0, "p99": 9.25, "max": 12.0},
                    "run_time_ms": {"count": 10, "p50": 20.0, "p90": 40.0, "p99": 180.0, "max": 250.0}},
                "io": {"threads": 2, "busy": 0, "idle": 2, "queued": 0, "delayed": 0, "running": 0,
                    "paused": true, "counters": {}}
            }
        })
    }

    fn screen(d: &Dashboard, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| d.render(f)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| (0..w).map(|x| buf[(x, y)].symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn rates_come_from_counter_growth_per_second() {
        let mut d = Dashboard::new("/s");
        let t0 = Instant::now();
        d.update_stats(&stats(10, 1), t0);
        assert!(d.history.get("default").is_none_or(|h| h.is_empty()));
        d.update_stats(&stats(30, 1), t0 + Duration::from_secs(2));
        d.update_stats(&stats(30, 1), t0 + Duration::from_secs(3));
        d.update_stats(&stats(130, 1), t0 + Duration::from_millis(3500));
        let h: Vec<u64> = d.history["default"].iter().copied().collect();
        assert_eq!(h, vec![10, 0, 200]);
        // A restarted daemon's counters start again: no negative rate.
        d.update_stats(&stats(5, 1), t0 + Duration::from_secs(4));
        assert_eq!(d.history["default"].back(), Some(&0));
    }

    #[test]
    fn the_screen_shows_pools_rates_latencies_and_failures() {
        let mut d = Dashboard::new("/run/jobd/jobd.sock");
        let t0 = Instant::now();
        d.update_stats(&stats(10, 3), t0);
        d.update_stats(&stats(52, 3), t0 + Duration::from_secs(1));
        d.update_failures(&[
            json!({"ok": true, "jobs": [{"id": "41", "kind": "sleep", "pool": "default",
                "state": "failed", "finished_at": 1000,
                "error": {"code": "job_failed", "message": "bad payload: ms"}}]}),
            json!({"ok": true, "jobs": [{"id": "77", "kind": "thumb", "pool": "io",
                "state": "dead", "finished_at": 2000,
                "error": {"code": "job_failed", "message": "exit 1"}}]}),
        ]);
        let s = screen(&d, 120, 32);
        assert!(s.contains("jobd top"), "{s}");
        assert!(s.contains("/run/jobd/jobd.sock"), "{s}");
        assert!(s.contains("active jobs: 7"), "{s}");
        let default_row = s.lines().find(|l| l.contains("│default ")).expect(&s);
        assert!(default_row.contains("3/4"), "{default_row}");
        assert!(default_row.contains(" 12 "), "{default_row}");
        assert!(default_row.contains(" 42 "), "done/s: {default_row}");
        assert!(default_row.contains("1.5/2.0/9.2/12.0"), "{default_row}");
        assert!(default_row.contains("20.0/40.0/180/250"), "{default_row}");
        let io_row = s.lines().find(|l| l.contains("io (paused)")).expect(&s);
        assert!(io_row.contains("0/2"), "{io_row}");
        assert!(s.contains("42/s now, peak 42/s"), "{s}");
        // Newest failure first.
        let dead = s.find("thumb").expect(&s);
        let failed = s.find("bad payload: ms").expect(&s);
        assert!(dead < failed, "{s}");
        // The sparkline drew a bar for the one sample.
        assert!(s.contains('█'), "{s}");
    }

    #[test]
    fn a_refresh_error_shows_in_the_title_and_small_screens_do_not_panic() {
        let mut d = Dashboard::new("/s");
        d.error = Some("connection to jobd failed".into());
        let s = screen(&d, 100, 20);
        assert!(s.contains("connection to jobd failed"), "{s}");
        for (w, h) in [(10, 3), (1, 1), (40, 8)] {
            d.update_stats(&stats(1, 1), Instant::now());
            screen(&d, w, h);
        }
    }

    #[test]
    fn q_escape_and_ctrl_c_quit() {
        assert!(quits(KeyCode::Char('q'), KeyModifiers::NONE));
        assert!(quits(KeyCode::Esc, KeyModifiers::NONE));
        assert!(quits(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(!quits(KeyCode::Char('c'), KeyModifiers::NONE));
        assert!(!quits(KeyCode::Char('x'), KeyModifiers::NONE));
    }
}
