//! One `Session` actor per connection: reads request lines, runs each one
//! concurrently (responses go out in completion order, each echoing its
//! `id`), and writes responses through a bounded outbox.
//!
//! Flow control, end to end:
//! - every line read takes a permit from a per-connection semaphore of
//!   `max_in_flight` permits; the permit travels with the request and its
//!   response and is released only once the response is written to the
//!   socket. With all permits out, the session stops reading.
//! - the outbox (a bounded channel to the writer task) holds at most one
//!   response per permit, so a client that stops reading stalls the writer,
//!   then the permits, then the reading: nothing is buffered without limit.
//!   A write that makes no progress for `idle_timeout` closes the connection.
//!
//! Closing: on end of input, idle timeout or daemon shutdown the session
//! stops reading, lets in-flight requests finish, flushes, then closes. On a
//! protocol violation that ends the stream (line too long, invalid UTF-8)
//! it answers the error, gives in-flight requests a second to finish, drops
//! the rest, flushes and closes. A
//! peer that hangs up completely is noticed even while requests are in
//! flight, and they are dropped. Nothing is lost on close: the writer task
//! owns the socket and drains the outbox before shutting it down (actix's
//! `FramedWrite` would drop its buffer when the actor stops).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, SpawnHandle, StreamHandler,
};
use futures::StreamExt;
use jobd_actors::{ErrorInfo, Handle};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::auth::{Credentials, LiveAuth};
use crate::ops;
use crate::protocol::{self, Response, code};

/// How often a session that stopped reading checks whether its peer hung up.
const HANGUP_POLL: Duration = Duration::from_millis(200);

/// After a protocol violation, how long requests already in flight get to
/// finish before they are dropped.
const ABANDON_GRACE: Duration = Duration::from_secs(1);

/// Responses are written in batches of up to this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// How many times the writer lets other tasks run to gather more answers
/// before one write (it stops as soon as a round brings nothing new).
const MAX_YIELDS: usize = 8;

/// What every session shares with the server.
pub struct Shared {
    /// The runtime.
    pub handle: Handle,
    /// Longest request line.
    pub max_frame_bytes: usize,
    /// Requests in flight per connection before reading stops.
    pub max_in_flight: usize,
    /// Close silent connections after this long; also the write-stall limit.
    pub idle_timeout: Option<Duration>,
    /// The allow-lists in effect (a reload replaces them).
    pub auth: Arc<LiveAuth>,
    /// Set once the daemon drains: new requests get `shutting_down`.
    pub draining: AtomicBool,
    /// Turns true when sessions must close (after the drain).
    pub close: watch::Receiver<bool>,
}

/// A response line on its way out, with the permit it holds.
type Outgoing = (String, OwnedSemaphorePermit);

/// What the reader yields.
enum ReadEvent {
    /// A request line.
    Line(String),
    /// A line over `max_frame_bytes`.
    TooLong,
    /// Bytes that are not UTF-8.
    BadUtf8,
    /// The socket failed.
    Failed(io::Error),
    /// Nothing in flight and nothing read for `idle_timeout`.
    Idle,
}

/// One read event and the in-flight permit it took.
struct Incoming {
    /// What was read.
    event: ReadEvent,
    /// Released once the answer to it is written (or it needs none).
    permit: OwnedSemaphorePermit,
}

/// When the connection last did anything (read a line or wrote answers),
/// shared by the reader and the writer for the idle timeout.
struct Activity {
    /// Start of the session's clock.
    start: std::time::Instant,
    /// Milliseconds from `start` to the last activity.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: std::time::Instant::now(),
            last_ms: Default::default(),
        }
    }

    /// Something happened now.
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last activity.
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// State of the reader stream.
struct Reader {
    /// The socket's reading half, split into lines with the size limit.
    lines: FramedRead<OwnedReadHalf, LinesCodec>,
    /// In-flight permits: one is taken before each line is read.
    permits: Arc<Semaphore>,
    /// All permits, to tell "nothing in flight" for the idle timeout.
    max_in_flight: usize,
    /// Silence after which an idle connection is closed.
    idle: Option<Duration>,
    /// Last read or write, for the idle timeout.
    activity: Arc<Activity>,
    /// Set after an event that ends reading (error, idle).
    done: bool,
}

/// The reader as a stream: take a permit, then read a line.
fn read_events(r: Reader) -> impl futures::Stream<Item = Incoming> + 'static {
    futures::stream::unfold(r, |mut r| async move {
        if r.done {
            return None;
        }
        // The semaphore is never closed, so this only waits.
        let permit = r.permits.clone().acquire_owned().await.ok()?;
        loop {
            let next = match r.idle {
                None => r.lines.next().await,
                Some(d) => {
                    // Wake when `d` has passed since the last activity (a
                    // full `d` if that moment is already past: requests
                    // were in flight).
                    let left = d.saturating_sub(r.activity.quiet_for());
                    let wait = if left.is_zero() { d } else { left };
                    match tokio::time::timeout(wait, r.lines.next()).await {
                        Ok(n) => n,
                        // Idle: nothing in flight (we hold one permit) and
                        // nothing read or written for `d`.
                        Err(_)
                            if r.permits.available_permits() + 1 >= r.max_in_flight
                                && r.activity.quiet_for() >= d =>
                        {
                            r.done = true;
                            return Some((
                                Incoming {
                                    event: ReadEvent::Idle,
                                    permit,
                                },
                                r,
                            ));
                        }
                        Err(_) => continue,
                    }
                }
            };
            r.activity.touch();
            let event = match next {
                None => return None,
                Some(Ok(line)) => ReadEvent::Line(line),
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => ReadEvent::TooLong,
                Some(Err(LinesCodecError::Io(e))) if e.kind() == io::ErrorKind::InvalidData => {
                    ReadEvent::BadUtf8
                }
                Some(Err(LinesCodecError::Io(e))) => ReadEvent::Failed(e),
            };
            if !matches!(event, ReadEvent::Line(_)) {
                r.done = true;
            }
            return Some((Incoming { event, permit }, r));
        }
    })
}

/// How the writer ended.
#[derive(Debug)]
enum WriterEnd {
    /// Everything written and the socket shut down.
    Flushed,
    /// The peer is gone.
    HungUp,
    /// A write made no progress for the stall limit.
    Stalled,
    /// A write failed.
    Failed(io::Error),
}

/// True when the peer closed its end completely (POLLHUP), as opposed to
/// only shutting down its writing side.
fn peer_hung_up(w: &OwnedWriteHalf) -> bool {
    let fd = w.as_ref().as_raw_fd();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, timeout 0 (never blocks); `fd` stays open
    // because `w` is borrowed for the call.
    #[allow(unsafe_code)]
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && (pfd.revents & (libc::POLLHUP | libc::POLLERR)) != 0
}

/// Write with the stall limit.
async fn write_all(
    w: &mut OwnedWriteHalf,
    buf: &[u8],
    stall: Option<Duration>,
) -> Result<(), WriterEnd> {
    let r = match stall {
        None => w.write_all(buf).await,
        Some(d) => match tokio::time::timeout(d, w.write_all(buf)).await {
            Ok(r) => r,
            Err(_) => return Err(WriterEnd::Stalled),
        },
    };
    r.map_err(|e| match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => WriterEnd::HungUp,
        _ => WriterEnd::Failed(e),
    })
}

/// The writer task: owns the socket's writing half, writes responses in
/// batches, releases their permits once written, and drains everything
/// before shutting the socket down.
async fn write_loop(
    mut w: OwnedWriteHalf,
    mut outbox: mpsc::Receiver<Outgoing>,
    mut reading_stopped: watch::Receiver<bool>,
    stall: Option<Duration>,
    activity: Arc<Activity>,
) -> WriterEnd {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut held: Vec<OwnedSemaphorePermit> = Vec::new();
    let mut watch_hangup = false;
    loop {
        let first = tokio::select! {
            m = outbox.recv() => match m {
                Some(m) => m,
                None => break,
            },
            _ = reading_stopped.changed(), if !watch_hangup => {
                watch_hangup = true;
                continue;
            }
            _ = tokio::time::sleep(HANGUP_POLL), if watch_hangup => {
                if peer_hung_up(&w) {
                    return WriterEnd::HungUp;
                }
                continue;
            }
        };
        let mut next = Some(first);
        let mut yields = 0;
        loop {
            while let Some((line, permit)) = next.take() {
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
                held.push(permit);
                if buf.len() >= WRITE_BATCH {
                    break;
                }
                next = outbox.try_recv().ok();
            }
            // Coalesce: let the other tasks of this thread that are ready
            // (answers whose jobs just finished) run first, and write
            // everything they produced in one syscall. Without this, jobs
            // finishing one by one on the workers cost a write each.
            if buf.len() >= WRITE_BATCH || yields == MAX_YIELDS {
                break;
            }
            yields += 1;
            tokio::task::yield_now().await;
            next = outbox.try_recv().ok();
            if next.is_none() {
                break;
            }
        }
        if let Err(end) = write_all(&mut w, &buf, stall).await {
            return end;
        }
        activity.touch();
        buf.clear();
        held.clear();
    }
    let shut = async {
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    };
    match stall {
        None => shut.await,
        Some(d) => {
            let _ = tokio::time::timeout(d, shut).await;
        }
    }
    WriterEnd::Flushed
}

/// One connection.
pub struct Session {
    /// What all sessions share.
    shared: Arc<Shared>,
    /// The peer's credentials, if the OS told us.
    peer: Option<Credentials>,
    /// The writer's queue; None once closing (so the writer can finish).
    outbox: Option<mpsc::Sender<Outgoing>>,
    /// The reader stream, cancelled when closing.
    reader: Option<SpawnHandle>,
    /// Tells the writer that reading stopped (start watching for hang-up).
    reading_stopped: watch::Sender<bool>,
    /// Cancels every in-flight request when the session goes away.
    in_flight: CancellationToken,
    _cancel_on_drop: DropGuard,
    /// Requests read, for the closing log line.
    requests: u64,
    /// Held while the session lives: the server's connection count.
    _conn: OwnedSemaphorePermit,
    /// Held while the session lives: the server waits for all to drop.
    _alive: mpsc::Sender<()>,
}

impl Session {
    /// Start a session actor for an accepted connection.
    pub fn start(
        stream: UnixStream,
        shared: Arc<Shared>,
        conn: OwnedSemaphorePermit,
        alive: mpsc::Sender<()>,
    ) {
        let peer = match Credentials::of(&stream) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("cannot read peer credentials: {e}");
                None
            }
        };
        let allowed = shared.auth.allows(peer.as_ref());
        match &peer {
            Some(c) => tracing::info!(
                uid = c.peer.uid,
                gid = c.peer.gid,
                groups = ?c.groups,
                pid = c.peer.pid,
                allowed,
                "connection opened"
            ),
            None => tracing::info!(allowed, "connection opened (peer unknown)"),
        }
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel::<Outgoing>(shared.max_in_flight + 1);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(shared.max_in_flight));
        let activity = Arc::new(Activity::new());
        let reader = Reader {
            lines: FramedRead::new(rd, LinesCodec::new_with_max_length(shared.max_frame_bytes)),
            permits,
            max_in_flight: shared.max_in_flight,
            idle: shared.idle_timeout,
            activity: activity.clone(),
            done: false,
        };
        let stall = shared.idle_timeout;
        Session::create(move |ctx| {
            let writer = actix_rt::spawn(write_loop(wr, rx, stopped_rx, stall, activity));
            ctx.spawn(actix::fut::wrap_future::<_, Session>(writer).map(
                |end, _act: &mut Session, ctx: &mut Context<Session>| {
                    match end {
                        Ok(WriterEnd::Flushed) | Ok(WriterEnd::HungUp) => {}
                        Ok(WriterEnd::Stalled) => {
                            tracing::info!("closing a connection whose peer stopped reading")
                        }
                        Ok(WriterEnd::Failed(e)) => tracing::debug!("write failed: {e}"),
                        Err(e) => tracing::error!("session writer crashed: {e}"),
                    }
                    ctx.stop();
                },
            ));
            let reader = ctx.add_stream(read_events(reader));
            let mut close = shared.close.clone();
            ctx.spawn(
                actix::fut::wrap_future::<_, Session>(async move {
                    // Ends when the server says close (or is gone).
                    while !*close.borrow_and_update() {
                        if close.changed().await.is_err() {
                            break;
                        }
                    }
                })
                .map(|_, act: &mut Session, ctx: &mut Context<Session>| act.close(ctx, false)),
            );
            let in_flight = CancellationToken::new();
            Session {
                shared,
                peer,
                outbox: Some(tx),
                reader: Some(reader),
                reading_stopped: stopped_tx,
                _cancel_on_drop: in_flight.clone().drop_guard(),
                in_flight,
                requests: 0,
                _conn: conn,
                _alive: alive,
            }
        });
    }
}

impl Session {
    /// The peer's uid for log lines (`-1` when unknown).
    fn uid(&self) -> i64 {
        self.peer.as_ref().map_or(-1, |c| i64::from(c.peer.uid))
    }

    /// Queue a response line. The outbox has room for one line per permit,
    /// so this only fails once the writer is gone (and then nobody can be
    /// answered anyway).
    fn send(&self, r: &Response, permit: OwnedSemaphorePermit) {
        if let Some(tx) = &self.outbox {
            let _ = tx.try_send((r.to_line(), permit));
        }
    }

    /// Answer a request this session refuses itself.
    fn refuse(&self, id: Value, error: ErrorInfo, permit: OwnedSemaphorePermit) {
        tracing::warn!(
            uid = self.uid(),
            code = %error.code,
            "rejected request: {}",
            error.message
        );
        self.send(&Response::error(id, &error), permit);
    }

    /// Stop reading and close once the outbox is written. With `abandon`
    /// (the client broke the protocol), requests still in flight get
    /// `ABANDON_GRACE` to finish and are then dropped unanswered; otherwise
    /// they all finish first.
    fn close(&mut self, ctx: &mut Context<Self>, abandon: bool) {
        if let Some(r) = self.reader.take() {
            ctx.cancel_future(r);
        }
        let _ = self.reading_stopped.send(true);
        self.outbox = None;
        if abandon {
            let token = self.in_flight.clone();
            ctx.run_later(ABANDON_GRACE, move |_, _| token.cancel());
        }
    }

    /// One request line.
    fn on_line(&mut self, line: String, permit: OwnedSemaphorePermit) {
        if line.trim().is_empty() {
            return; // blank lines are ignored (keep-alives, stray newlines)
        }
        self.requests += 1;
        let parsed = protocol::parse(&line);
        // Checked per request: a reload that changes the lists applies to
        // open connections too.
        if !self.shared.auth.allows(self.peer.as_ref()) {
            let id = match &parsed {
                Ok((id, _)) => id.clone(),
                Err(r) => r.id.clone(),
            };
            let e = ErrorInfo::new(
                code::FORBIDDEN,
                "this user may not use jobd (see [auth] in the daemon's config)",
            );
            return self.refuse(id, e, permit);
        }
        let (id, mut req) = match parsed {
            Ok(p) => p,
            Err(r) => return self.refuse(r.id, r.error, permit),
        };
        if self.shared.draining.load(Ordering::Acquire) {
            let e = ErrorInfo::new(code::SHUTTING_DOWN, "jobd is shutting down");
            return self.refuse(id, e, permit);
        }
        if let Some(c) = &self.peer {
            req.set_peer(c.peer);
        }
        let Some(tx) = self.outbox.clone() else {
            return;
        };
        let handle = self.shared.handle.clone();
        let cancel = self.in_flight.clone();
        let uid = self.uid();
        let op = req.op();
        actix_rt::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = ops::execute(&handle, id, req) => {
                    if let Some(c) = r.error_code()
                        && !is_outcome(c)
                    {
                        let m = r.error_message().unwrap_or_default();
                        tracing::warn!(uid, op, code = c, "rejected request: {m}");
                    }
                    let _ = tx.send((r.to_line(), permit)).await;
                }
            }
        });
    }
}

/// Codes that report what happened to a job rather than a refused request.
fn is_outcome(code: &str) -> bool {
    matches!(
        code,
        code::JOB_FAILED
            | code::TIMED_OUT
            | code::CANCELLED
            | code::DEPENDENCY_FAILED
            | code::TIMEOUT
    )
}

impl Actor for Session {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        tracing::info!(
            uid = self.uid(),
            requests = self.requests,
            "connection closed"
        );
    }
}

impl StreamHandler<Incoming> for Session {
    fn handle(&mut self, item: Incoming, ctx: &mut Context<Self>) {
        let Incoming { event, permit } = item;
        match event {
            ReadEvent::Line(line) => self.on_line(line, permit),
            ReadEvent::TooLong => {
                let max = self.shared.max_frame_bytes;
                let e = ErrorInfo::new(
                    code::TOO_LARGE,
                    format!("request line longer than {max} bytes; closing"),
                );
                self.refuse(Value::Null, e, permit);
                self.close(ctx, true);
            }
            ReadEvent::BadUtf8 => {
                let e = ErrorInfo::new(code::BAD_JSON, "request is not valid UTF-8; closing");
                self.refuse(Value::Null, e, permit);
                self.close(ctx, true);
            }
            ReadEvent::Failed(e) => {
                tracing::debug!(uid = self.uid(), "read failed: {e}");
                self.close(ctx, true);
            }
            ReadEvent::Idle => {
                tracing::info!(uid = self.uid(), "closing an idle connection");
                drop(permit);
                self.close(ctx, false);
            }
        }
    }

    /// End of input: finish what is in flight, then close. (The default
    /// would stop the actor and drop unwritten answers.)
    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.close(ctx, false);
    }
}
