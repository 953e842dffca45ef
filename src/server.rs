//! The socket server: socket hygiene (stale sockets replaced, live ones
//! refused, mode and group set before `listen`, the file removed on exit),
//! or a socket inherited through socket activation (used as it is, never
//! removed); the accept loop with its connection cap; SIGHUP handed to the
//! daemon's reload hook; and the shutdown sequence on SIGTERM/SIGINT.
//!
//! Shutdown: stop accepting; from then on every new request is answered
//! `shutting_down`; the runtime drains (running jobs get up to
//! `shutdown_timeout` to finish, every waiter is answered); then each
//! session flushes what it owes and closes; the socket file is removed.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jobd_actors::{ErrorInfo, Handle};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixSocket, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::auth::LiveAuth;
use crate::protocol::{Response, code};
use crate::session::{Session, Shared};

/// Pending connections the kernel queues for us.
const BACKLOG: u32 = 1024;

/// How long sessions get to flush their last answers after the drain.
const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process is listening on the socket.
    #[error("another jobd is already listening on {0} (stop it first, or pick another --socket)")]
    Live(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// A file-system or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServerError {
    let path = path.to_path_buf();
    move |source| ServerError::Io { what, path, source }
}

/// How the server runs (from the config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The socket path.
    pub socket: PathBuf,
    /// Its file mode.
    pub socket_mode: u32,
    /// Its group, if set.
    pub socket_gid: Option<u32>,
    /// Longest request line.
    pub max_frame_bytes: usize,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Connections at once.
    pub max_connections: usize,
    /// Idle and write-stall limit.
    pub idle_timeout: Option<Duration>,
    /// How long running jobs get to finish on shutdown.
    pub shutdown_timeout: Duration,
    /// The allow-lists in effect (a reload replaces them).
    pub auth: Arc<LiveAuth>,
}

/// Where the listening socket comes from.
#[derive(Debug)]
pub enum Listen {
    /// Bind `Settings::socket` (mode and group from the settings); the file
    /// is removed on exit.
    Bind,
    /// A socket that is already listening, passed by the service manager
    /// (socket activation). Its file belongs to the socket unit: it is
    /// neither changed nor removed.
    Inherited(std::os::unix::net::UnixListener),
}

/// A future run by a hook on the server's own (single-threaded) System.
pub type LocalTask = futures::future::LocalBoxFuture<'static, ()>;

/// What the daemon wants to hear about while the server runs.
#[derive(Default)]
pub struct Hooks {
    /// Called once the socket accepts connections.
    pub ready: Option<Box<dyn FnOnce()>>,
    /// Called when the drain begins (first SIGTERM/SIGINT).
    pub stopping: Option<Box<dyn FnOnce()>>,
    /// Run on SIGHUP, one run at a time (signals that arrive during a run
    /// lead to one more run); not run once the drain began.
    pub reload: Option<Box<dyn FnMut() -> LocalTask>>,
}

/// Make the socket's directory and clear the way for binding: a stale
/// socket (nobody answers) is removed; a live one, or a file that is not a
/// socket, is an error. Runs before the runtime starts, so a second daemon
/// fails fast.
pub fn prepare_socket_path(path: &Path) -> Result<(), ServerError> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io_err("cannot create the socket directory", parent))?;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot inspect", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServerError::Live(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(io_err("cannot remove stale socket", path))?;
            tracing::info!("removed stale socket {}", path.display());
            Ok(())
        }
        Err(e) => Err(io_err("cannot probe existing socket", path)(e)),
    }
}

/// The socket file we created.
struct SocketFile {
    /// Where it is.
    path: PathBuf,
    /// (device, inode) of the file, so we only ever remove our own (not a
    /// newer daemon's).
    file_id: (u64, u64),
}

impl SocketFile {
    /// Remove the socket file if it is still the one we created.
    fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.file_id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

/// A bound, listening socket and its file.
struct Bound {
    /// Accepts connections.
    listener: UnixListener,
    /// Removed on exit; None for an inherited socket.
    file: Option<SocketFile>,
}

impl Bound {
    /// Bind, set mode and group, then listen (so nobody can connect through
    /// a wrong mode in between). Needs the tokio runtime.
    fn new(s: &Settings) -> Result<Bound, ServerError> {
        let path = &s.socket;
        let sock = UnixSocket::new_stream().map_err(io_err("cannot create socket for", path))?;
        sock.bind(path).map_err(io_err("cannot bind", path))?;
        let cleanup = |e: ServerError| {
            let _ = std::fs::remove_file(path);
            e
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(s.socket_mode))
            .map_err(io_err("cannot set the mode of", path))
            .map_err(cleanup)?;
        if let Some(gid) = s.socket_gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(io_err("cannot set the group of", path))
                .map_err(cleanup)?;
        }
        let meta = std::fs::symlink_metadata(path)
            .map_err(io_err("cannot inspect", path))
            .map_err(cleanup)?;
        let listener = sock
            .listen(BACKLOG)
            .map_err(io_err("cannot listen on", path))
            .map_err(cleanup)?;
        Ok(Bound {
            listener,
            file: Some(SocketFile {
                path: path.clone(),
                file_id: (meta.dev(), meta.ino()),
            }),
        })
    }

    /// Take over a listening socket passed by the service manager. Needs
    /// the tokio runtime.
    fn inherited(l: std::os::unix::net::UnixListener) -> Result<Bound, ServerError> {
        let path = l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_default();
        let listener = l
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(l))
            .map_err(io_err("cannot use the inherited socket", &path))?;
        Ok(Bound {
            listener,
            file: None,
        })
    }
}

/// Raise the soft open-files limit to the hard one: each connection is a
/// file descriptor, and the usual soft limit (1024) is below what
/// `max_connections` allows.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    #[allow(unsafe_code)]
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Answer a connection over the cap with `unavailable` and close it,
/// without holding up the accept loop.
fn turn_away(mut stream: UnixStream, max: usize) {
    actix_rt::spawn(async move {
        let e = ErrorInfo::new(
            code::UNAVAILABLE,
            format!("too many connections (max_connections = {max}); try again later"),
        );
        let mut line = Response::error(Value::Null, &e).to_line();
        line.push('\n');
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(line.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    });
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The drain finished: every waiter was answered.
    Clean,
    /// A second signal cut the drain short.
    Forced,
}

/// Serve until SIGTERM or SIGINT, then drain and return. `hooks.ready` is
/// called once the socket accepts connections, `hooks.stopping` when the
/// drain begins, `hooks.reload` on SIGHUP.
pub async fn serve(
    s: Settings,
    listen: Listen,
    handle: Handle,
    hooks: Hooks,
) -> Result<Stopped, ServerError> {
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signals)?;
    // Installed before the socket accepts: a SIGHUP right after READY=1
    // must reload, not kill (its default action).
    let hup = signal(SignalKind::hangup()).map_err(ServerError::Signals)?;
    let bound = match listen {
        Listen::Bind => Bound::new(&s)?,
        Listen::Inherited(l) => Bound::inherited(l)?,
    };
    let (close_tx, close_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        handle: handle.clone(),
        max_frame_bytes: s.max_frame_bytes,
        max_in_flight: s.max_in_flight,
        idle_timeout: s.idle_timeout,
        auth: s.auth.clone(),
        draining: Default::default(),
        close: close_rx,
    });
    let connections = Arc::new(Semaphore::new(s.max_connections));
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    match &bound.file {
        Some(f) => tracing::info!(
            "listening on {} (mode {:04o})",
            f.path.display(),
            s.socket_mode
        ),
        None => tracing::info!("listening on the socket passed by the service manager"),
    }
    let reloads = actix_rt::spawn(reload_loop(hup, hooks.reload));
    if let Some(ready) = hooks.ready {
        ready();
    }
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = int.recv() => { tracing::info!("SIGINT received"); break; }
            r = bound.listener.accept() => match r {
                Ok((stream, _)) => match connections.clone().try_acquire_owned() {
                    Ok(permit) => Session::start(stream, shared.clone(), permit, alive_tx.clone()),
                    Err(_) => {
                        tracing::warn!("connection refused: max_connections ({}) reached", s.max_connections);
                        turn_away(stream, s.max_connections);
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }

    // Stop admitting: new requests get shutting_down; nobody new connects.
    shared.draining.store(true, Ordering::Release);
    reloads.abort();
    if let Some(stopping) = hooks.stopping {
        stopping();
    }
    let Bound { listener, file } = bound;
    drop(listener);
    tracing::info!(
        "draining: running jobs get up to {} s to finish",
        s.shutdown_timeout.as_secs()
    );
    let deadline = Instant::now() + s.shutdown_timeout;
    let forced = tokio::select! {
        _ = handle.shutdown_async(deadline) => false,
        _ = term.recv() => true,
        _ = int.recv() => true,
    };
    if forced {
        tracing::warn!("second signal: not waiting for running jobs");
    }
    // Every waiter has its answer now: let sessions flush and close.
    let _ = close_tx.send(true);
    drop(alive_tx);
    let _ = tokio::time::timeout(FLUSH_GRACE, alive_rx.recv()).await;
    if let Some(file) = file {
        file.remove();
    }
    tracing::info!("stopped");
    Ok(if forced {
        Stopped::Forced
    } else {
        Stopped::Clean
    })
}

/// Run the reload hook on every SIGHUP, one run at a time. Signals that
/// arrive during a run are merged by tokio into one more wake-up.
async fn reload_loop(
    mut hup: tokio::signal::unix::Signal,
    mut reload: Option<Box<dyn FnMut() -> LocalTask>>,
) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received");
        match &mut reload {
            Some(run) => run().await,
            None => tracing::info!("nothing to reload"),
        }
    }
}
