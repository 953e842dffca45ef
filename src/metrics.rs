//! Prometheus metrics: the text exposition (format 0.0.4) of a
//! [`StatsSnapshot`], built with the `prometheus-client` crate, and the
//! optional HTTP endpoint (`[metrics] listen`) that serves it as
//! `GET /metrics` on a loopback address or a Unix socket.
//!
//! Nothing here keeps state of its own: every scrape asks the Dispatcher
//! for a fresh snapshot, so the numbers are exactly those `stats` shows.
//! The `metrics` op (in `ops`) answers the same text over the job socket.
//!
//! Families (every series of one family has the same labels, so sums over
//! a label are meaningful):
//! - per pool: `jobd_threads{pool,state="busy"|"idle"}`,
//!   `jobd_queue_depth{pool}`, `jobd_delayed_jobs{pool}`,
//!   `jobd_running_jobs{pool}`, `jobd_queue_limit{pool}`,
//!   `jobd_pool_paused{pool}`;
//! - per pool and kind: `jobd_jobs_submitted_total`,
//!   `jobd_jobs_total{outcome="succeeded"|"failed"|"dead"|"cancelled"}`,
//!   `jobd_attempts_started_total`, `jobd_attempts_retried_total`,
//!   `jobd_attempts_timed_out_total`, and the histograms
//!   `jobd_queue_wait_seconds` and `jobd_run_time_seconds`;
//! - the daemon: `jobd_active_jobs`, `jobd_retained_jobs`,
//!   `jobd_store_size_bytes`, `jobd_store_pending_changes`,
//!   `jobd_store_committed_changes_total`, `jobd_store_failing`,
//!   `jobd_build_info{version}`.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jobd_actors::{Counters, Distribution, Handle, StatsSnapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::config::MetricsListen;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Longest HTTP request head the endpoint reads.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long a scraper may take to send its request and read the answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Scrapes served at once; more wait for a turn.
const MAX_SCRAPES: usize = 16;

/// Why metrics could not be produced or served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `[metrics] listen` is not acceptable.
    #[error("{0}")]
    Config(String),
    /// The exposition could not be written (a bug).
    #[error("cannot encode the metrics")]
    Encode,
    /// The endpoint could not be set up.
    #[error("metrics endpoint {what} {addr}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Where.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process serves the Unix socket path already.
    #[error("metrics endpoint: another process is listening on {0}")]
    Live(PathBuf),
    /// Something that is not a socket is at the Unix path.
    #[error("metrics endpoint: {0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
}

/// The Prometheus text exposition of a snapshot.
pub fn exposition(snapshot: &StatsSnapshot) -> Result<String, MetricsError> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .map_err(|_| MetricsError::Encode)?;
    Ok(text)
}

/// A snapshot, written out as metric families on each encode.
#[derive(Debug)]
struct SnapshotCollector(StatsSnapshot);

/// The label set of one series: `(name, value)` pairs.
type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Write one family: its descriptor, then each `(labels, value)` sample
/// through `sample`.
fn family<'a, T>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, T)>,
    mut sample: impl FnMut(&mut MetricEncoder, &T) -> fmt::Result,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let mut series = m.encode_family(&labels)?;
        sample(&mut series, &value)?;
    }
    Ok(())
}

fn gauge(m: &mut MetricEncoder, v: &i64) -> fmt::Result {
    m.encode_gauge(v)
}

fn counter(m: &mut MetricEncoder, v: &u64) -> fmt::Result {
    m.encode_counter::<NoLabelSet, _, u64>(v, None)
}

fn histogram(m: &mut MetricEncoder, d: &&Distribution) -> fmt::Result {
    m.encode_histogram::<NoLabelSet>(d.sum_seconds, d.count, &d.buckets, None)
}

/// A count as a gauge value (saturating; no real count reaches i64::MAX).
fn int(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let pools = || s.pools.iter().map(|(name, p)| (name.as_str(), p));
        let per_pool = |f: fn(&jobd_actors::PoolStats) -> i64| {
            pools().map(move |(name, p)| (vec![("pool", name)], f(p)))
        };
        family(
            &mut enc,
            "jobd_threads",
            "Worker threads of a pool, busy (running a handler) or idle.",
            MetricType::Gauge,
            pools().flat_map(|(name, p)| {
                [
                    (vec![("pool", name), ("state", "busy")], int(p.busy)),
                    (vec![("pool", name), ("state", "idle")], int(p.idle)),
                ]
            }),
            gauge,
        )?;
        family(
            &mut enc,
            "jobd_queue_depth",
            "Jobs ready to run, waiting for a worker thread.",
            MetricType::Gauge,
            per_pool(|p| int(p.queued)),
            gauge,
        )?;
        family(
            &mut enc,
            "jobd_delayed_jobs",
            "Jobs waiting for their run time, a retry backoff or dependencies.",
            MetricType::Gauge,
            per_pool(|p| int(p.delayed)),
            gauge,
        )?;
        family(
            &mut enc,
            "jobd_running_jobs",
            "Jobs in state running.",
            MetricType::Gauge,
            per_pool(|p| int(p.running)),
            gauge,
        )?;
        family(
            &mut enc,
            "jobd_queue_limit",
            "Admission limit on queued plus delayed jobs (max_queued).",
            MetricType::Gauge,
            per_pool(|p| int(p.max_queued)),
            gauge,
        )?;
        family(
            &mut enc,
            "jobd_pool_paused",
            "1 while the pool is paused.",
            MetricType::Gauge,
            per_pool(|p| i64::from(p.paused)),
            gauge,
        )?;

        // Per pool and kind.
        let pairs = || {
            pools().flat_map(|(pool, p)| {
                p.kinds
                    .iter()
                    .map(move |(kind, k)| (pool, kind.as_str(), k))
            })
        };
        let per_pair = |f: fn(&Counters) -> u64| {
            pairs()
                .map(move |(pool, kind, k)| (vec![("pool", pool), ("kind", kind)], f(&k.counters)))
        };
        family(
            &mut enc,
            "jobd_jobs_submitted",
            "Jobs admitted.",
            MetricType::Counter,
            per_pair(|c| c.submitted),
            counter,
        )?;
        family(
            &mut enc,
            "jobd_jobs",
            "Jobs that reached a final state, by outcome (jobs that end timed_out \
             after a single attempt are counted by jobd_attempts_timed_out_total).",
            MetricType::Counter,
            pairs().flat_map(|(pool, kind, k)| {
                let c = k.counters;
                [
                    ("succeeded", c.succeeded),
                    ("failed", c.failed),
                    ("dead", c.dead),
                    ("cancelled", c.cancelled),
                ]
                .map(|(outcome, n)| {
                    (
                        vec![("pool", pool), ("kind", kind), ("outcome", outcome)],
                        n,
                    )
                })
            }),
            counter,
        )?;
        family(
            &mut enc,
            "jobd_attempts_started",
            "Attempts handed to a worker thread.",
            MetricType::Counter,
            per_pair(|c| c.started),
            counter,
        )?;
        family(
            &mut enc,
            "jobd_attempts_retried",
            "Failed attempts that were retried after a backoff.",
            MetricType::Counter,
            per_pair(|c| c.retried),
            counter,
        )?;
        family(
            &mut enc,
            "jobd_attempts_timed_out",
            "Attempts that ran past their job's timeout.",
            MetricType::Counter,
            per_pair(|c| c.timed_out),
            counter,
        )?;
        family(
            &mut enc,
            "jobd_queue_wait_seconds",
            "Time from ready to started, per attempt.",
            MetricType::Histogram,
            pairs().map(|(pool, kind, k)| (vec![("pool", pool), ("kind", kind)], &k.queue_wait)),
            histogram,
        )?;
        family(
            &mut enc,
            "jobd_run_time_seconds",
            "Time a handler ran, per attempt.",
            MetricType::Histogram,
            pairs().map(|(pool, kind, k)| (vec![("pool", pool), ("kind", kind)], &k.run_time)),
            histogram,
        )?;

        // The daemon as a whole.
        let one = |v: i64| [(Labels::new(), v)];
        family(
            &mut enc,
            "jobd_active_jobs",
            "Jobs not final yet.",
            MetricType::Gauge,
            one(int(s.active_jobs)),
            gauge,
        )?;
        family(
            &mut enc,
            "jobd_retained_jobs",
            "Finished jobs kept in memory for status, wait and list.",
            MetricType::Gauge,
            one(int(s.retained_jobs)),
            gauge,
        )?;
        if let Some(store) = &s.store {
            family(
                &mut enc,
                "jobd_store_size_bytes",
                "Bytes the SQLite store takes on disk (database and write-ahead log).",
                MetricType::Gauge,
                one(i64::try_from(store.bytes).unwrap_or(i64::MAX)),
                gauge,
            )?;
            family(
                &mut enc,
                "jobd_store_pending_changes",
                "Changes waiting for the next commit.",
                MetricType::Gauge,
                one(int(store.pending_changes)),
                gauge,
            )?;
            family(
                &mut enc,
                "jobd_store_committed_changes",
                "Changes committed since start.",
                MetricType::Counter,
                [(Labels::new(), store.committed_changes)],
                counter,
            )?;
            family(
                &mut enc,
                "jobd_store_failing",
                "1 while writes to the store fail (new jobs are refused).",
                MetricType::Gauge,
                one(i64::from(store.failing.is_some())),
                gauge,
            )?;
        }
        family(
            &mut enc,
            "jobd_build_info",
            "The running jobd's version (value always 1).",
            MetricType::Gauge,
            [(vec![("version", crate::protocol::SERVER_VERSION)], 1)],
            gauge,
        )
    }
}

// ----- the HTTP endpoint ----------------------------------------------------

/// The metrics endpoint, bound and ready to serve.
pub struct Endpoint {
    /// The listening socket.
    listener: Listener,
    /// What it listens on, for logs.
    addr: String,
}

/// A bound listening socket (std, so it can be bound before the async
/// runtime runs and start-up fails early).
enum Listener {
    /// TCP on loopback.
    Tcp(std::net::TcpListener),
    /// A Unix socket and its file, removed when the endpoint stops.
    Unix(std::os::unix::net::UnixListener, SocketFile),
}

/// A Unix socket file this process created.
struct SocketFile {
    /// Its path.
    path: PathBuf,
    /// (device, inode), so only our own file is ever removed.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn io_err(what: &'static str, addr: &str) -> impl FnOnce(std::io::Error) -> MetricsError {
    let addr = addr.to_string();
    move |source| MetricsError::Io { what, addr, source }
}

/// Clear a Unix socket path: a stale socket is removed, a live one or a
/// non-socket is an error.
fn clear_unix_path(path: &Path) -> Result<(), MetricsError> {
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot inspect", &shown)(e)),
        Ok(m) if !m.file_type().is_socket() => Err(MetricsError::NotASocket(path.to_path_buf())),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(MetricsError::Live(path.to_path_buf())),
            Err(_) => std::fs::remove_file(path).map_err(io_err("cannot remove stale", &shown)),
        },
    }
}

impl Endpoint {
    /// Bind the endpoint's socket (no serving yet).
    pub fn bind(listen: &MetricsListen) -> Result<Endpoint, MetricsError> {
        match listen {
            MetricsListen::Tcp(addr) => {
                let shown = addr.to_string();
                let l = std::net::TcpListener::bind(addr).map_err(io_err("cannot bind", &shown))?;
                l.set_nonblocking(true)
                    .map_err(io_err("cannot configure", &shown))?;
                let addr = l.local_addr().map_or(shown, |a| a.to_string());
                Ok(Endpoint {
                    listener: Listener::Tcp(l),
                    addr,
                })
            }
            MetricsListen::Unix(path) => {
                let shown = path.display().to_string();
                clear_unix_path(path)?;
                let l = std::os::unix::net::UnixListener::bind(path)
                    .map_err(io_err("cannot bind", &shown))?;
                l.set_nonblocking(true)
                    .map_err(io_err("cannot configure", &shown))?;
                let m =
                    std::fs::symlink_metadata(path).map_err(io_err("cannot inspect", &shown))?;
                let file = SocketFile {
                    path: path.clone(),
                    id: (m.dev(), m.ino()),
                };
                Ok(Endpoint {
                    listener: Listener::Unix(l, file),
                    addr: shown,
                })
            }
        }
    }

    /// Where it listens (`127.0.0.1:9464`, or the socket path).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Serve scrapes until the future is dropped (with the System). Must
    /// run on a Tokio runtime (the daemon's actix System).
    pub async fn serve(self, handle: Handle) {
        let turns = Arc::new(Semaphore::new(MAX_SCRAPES));
        tracing::info!("metrics endpoint: GET /metrics on {}", self.addr);
        match self.listener {
            Listener::Tcp(l) => match tokio::net::TcpListener::from_std(l) {
                Ok(l) => accept_loop(|| l.accept(), &handle, &turns).await,
                Err(e) => tracing::error!("metrics endpoint: {e}"),
            },
            Listener::Unix(l, _file) => match tokio::net::UnixListener::from_std(l) {
                Ok(l) => accept_loop(|| l.accept(), &handle, &turns).await,
                Err(e) => tracing::error!("metrics endpoint: {e}"),
            },
        }
    }
}

/// Accept connections for ever, answering each in a task of its own.
async fn accept_loop<S, A, F>(
    mut accept: impl FnMut() -> F,
    handle: &Handle,
    turns: &Arc<Semaphore>,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
    F: std::future::Future<Output = std::io::Result<(S, A)>>,
{
    loop {
        match accept().await {
            Ok((s, _)) => spawn_answer(s, handle, turns),
            Err(e) => accept_failed(e).await,
        }
    }
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!("metrics endpoint: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn_answer<S>(stream: S, handle: &Handle, turns: &Arc<Semaphore>)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let handle = handle.clone();
    let turns = turns.clone();
    actix_rt::spawn(async move {
        // The time limit covers the wait for a turn too: idle connections
        // cannot pile up behind busy ones.
        let _ = tokio::time::timeout(HTTP_TIMEOUT, async {
            if let Ok(_turn) = turns.acquire_owned().await {
                answer(stream, &handle).await;
            }
        })
        .await;
    });
}

/// What the endpoint answers to one request head.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (`head`: `HEAD /metrics`, headers only).
    Metrics {
        /// Leave the body out.
        head: bool,
    },
    /// Any other error: status line and a short text body.
    Error(u16, &'static str, &'static str),
}

/// Read the request head; `None` when the peer went away or sent too much.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Option<Route> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        match route(&buf) {
            Some(r) => return Some(r),
            None if buf.len() > MAX_REQUEST_HEAD => {
                return Some(Route::Error(
                    431,
                    "Request Header Fields Too Large",
                    "request head too large\n",
                ));
            }
            None => {}
        }
    }
}

/// Route a request head; None while it is incomplete.
fn route(buf: &[u8]) -> Option<Route> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Route::Error(400, "Bad Request", "bad request\n")),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            Some(match (req.method.unwrap_or(""), path) {
                ("GET", "/metrics") => Route::Metrics { head: false },
                ("HEAD", "/metrics") => Route::Metrics { head: true },
                ("GET" | "HEAD", _) => Route::Error(404, "Not Found", "not found: try /metrics\n"),
                _ => Route::Error(405, "Method Not Allowed", "only GET and HEAD\n"),
            })
        }
    }
}

/// Answer one connection: one request, one response, then close.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, handle: &Handle) {
    let Some(route) = read_head(&mut s).await else {
        return;
    };
    let (status, reason, content_type, body, head) = match route {
        Route::Metrics { head } => {
            match handle
                .stats_async()
                .await
                .map_err(|e| e.to_string())
                .and_then(|snap| exposition(&snap).map_err(|e| e.to_string()))
            {
                Ok(text) => (200, "OK", CONTENT_TYPE, text, head),
                Err(e) => (
                    503,
                    "Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("{e}\n"),
                    head,
                ),
            }
        }
        Route::Error(code, reason, body) => (
            code,
            reason,
            "text/plain; charset=utf-8",
            body.to_string(),
            false,
        ),
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(r("GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Route::Metrics { head: false })
        );
        assert_eq!(
            r("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Route::Metrics { head: false })
        );
        assert_eq!(
            r("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::Metrics { head: true })
        );
        assert!(matches!(
            r("GET / HTTP/1.1\r\n\r\n"),
            Some(Route::Error(404, ..))
        ));
        assert!(matches!(
            r("POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::Error(405, ..))
        ));
        assert!(matches!(
            r("\u{1}\u{2} nonsense\r\n\r\n"),
            Some(Route::Error(400, ..))
        ));
    }
}
