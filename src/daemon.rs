//! Start-up and the daemon's life: from a loaded `Config` to a running
//! server and back. Resolves the state directory and socket path, checks
//! the socket (or takes the one socket activation passed), builds the
//! runtime (store, pools, kinds, retention; the store recovers before the
//! socket accepts; the systemd heartbeat rides on the Dispatcher's loop),
//! serves on an actix System on the calling thread until a signal, then
//! waits for the runtime to stop. Wires the systemd notifications (READY,
//! STOPPING) and the SIGHUP reload into the server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use jobd_actors::{
    Heartbeat, PoolConfig, Retention, Runtime, ShutdownError, SqliteStore, SqliteSync, StartError,
    Store,
};

use crate::auth::{Auth, LiveAuth, resolve_group};
use crate::config::{Config, Durability, GroupRef, Overrides};
use crate::reload::Reloader;
use crate::server::{self, Hooks, Listen, ServerError, Settings};
use crate::systemd::{self, Notifier, ServiceEnv, StatusNote};
use crate::{kinds, paths};

/// How long to wait for pool threads after the runtime stopped.
const THREAD_GRACE: Duration = Duration::from_secs(2);

/// Why the daemon could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory cannot be created.
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `[auth]` or `socket_group` names a group that does not exist.
    #[error("{0}")]
    Group(String),
    /// A job kind could not be registered.
    #[error("job kinds: {0}")]
    Kinds(String),
    /// The store could not be opened.
    #[error("{0}")]
    Store(String),
    /// The runtime did not start.
    #[error("{0}")]
    Runtime(#[from] StartError),
    /// The socket server failed.
    #[error("{0}")]
    Server(#[from] ServerError),
    /// The metrics endpoint could not be set up.
    #[error("{0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    /// A second signal cut the drain short.
    #[error("stopped without waiting for running jobs (second signal)")]
    Forced,
    /// The service manager passed a socket that cannot be used.
    #[error("{0}")]
    Activation(String),
}

/// The state directory: config (or `--state-dir`), else the default.
pub fn state_dir(cfg: &Config) -> PathBuf {
    cfg.state_dir
        .clone()
        .unwrap_or_else(paths::default_state_dir)
}

/// The socket path: config (or `--socket`/`JOBD_SOCKET`), else the default
/// for this user next to the state directory.
pub fn socket_path(cfg: &Config, state_dir: &std::path::Path) -> PathBuf {
    cfg.socket
        .clone()
        .unwrap_or_else(|| paths::default_socket_path(Some(state_dir)))
}

/// Create the state directory if missing: parents with the usual mode,
/// the directory itself readable by owner and group only.
fn create_state_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o750).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

/// Under a file-size limit (`RLIMIT_FSIZE`, e.g. `prlimit --fsize`) a write
/// past the limit raises SIGXFSZ, which would kill the daemon. Ignored, the
/// write fails with EFBIG instead: the store reports it, submissions get
/// `unavailable`, and the daemon goes on (and recovers when space returns).
fn ignore_file_size_signal() {
    // SAFETY: setting a signal to SIG_IGN installs no handler code and
    // touches no memory; it is done before any thread of ours starts.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// File name of the SQLite store inside the state directory.
pub const STORE_FILE: &str = "jobs.db";

/// The store `durability` asks for: SQLite in the state directory for
/// `os` and `fsync`, none (memory only) for `memory`.
fn open_store(
    durability: Durability,
    state_dir: &std::path::Path,
) -> Result<Option<Box<dyn Store>>, DaemonError> {
    let sync = match durability {
        Durability::Memory => return Ok(None),
        Durability::Os => SqliteSync::Os,
        Durability::Fsync => SqliteSync::Fsync,
    };
    let store = SqliteStore::open(&state_dir.join(STORE_FILE), sync)
        .map_err(|e| DaemonError::Store(e.to_string()))?;
    Ok(Some(Box::new(store)))
}

/// A heartbeat callback for the Dispatcher's loop.
type HeartbeatHook = (Duration, Box<dyn FnMut(Heartbeat) + Send>);

/// Build the runtime the configuration describes.
fn build_runtime(
    cfg: &Config,
    state_dir: &std::path::Path,
    heartbeat: Option<HeartbeatHook>,
) -> Result<Runtime, DaemonError> {
    let mut b = Runtime::builder();
    if let Some((every, f)) = heartbeat {
        b = b.heartbeat(every, f);
    }
    if let Some(store) = open_store(cfg.durability, state_dir)? {
        b = b.store(store);
    }
    for (name, p) in cfg.pool_list() {
        b = b.pool_config(PoolConfig {
            threads: p.threads(),
            max_queued: p.max_queued(),
            name,
        });
    }
    b = b.retention(Retention {
        ttl: Duration::from_secs(cfg.result_ttl_secs),
        ..Retention::default()
    });
    let b = kinds::register_all(b, cfg).map_err(DaemonError::Kinds)?;
    Ok(b.start()?)
}

/// Run the daemon until SIGTERM/SIGINT and a clean drain. `over` is the
/// command-line layer `cfg` was loaded with (a reload applies it again);
/// `service` is what systemd handed the process (see `systemd`).
pub fn run(cfg: Config, over: Overrides, service: ServiceEnv) -> Result<(), DaemonError> {
    ignore_file_size_signal();
    for note in &service.notes {
        tracing::warn!("{note}");
    }
    let activated = service.activation.map_err(DaemonError::Activation)?;
    let notifier = Notifier::from_env();
    let state_dir = state_dir(&cfg);
    create_state_dir(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    let socket = socket_path(&cfg, &state_dir);
    let auth = Auth::from_config(&cfg.auth).map_err(DaemonError::Group)?;
    let listen = match activated {
        Some(a) => {
            tracing::info!(
                fd = systemd::fd_of(&a),
                name = %a.name,
                path = %a.path.as_ref().map_or("(unnamed)".into(), |p| p.display().to_string()),
                "socket activation: serving the socket the service manager passed \
                 (socket, socket_mode and socket_group of the configuration are not used)"
            );
            Listen::Inherited(a.listener)
        }
        None => {
            server::prepare_socket_path(&socket)?;
            Listen::Bind
        }
    };
    let socket_gid = match (&listen, &cfg.socket_group) {
        (Listen::Bind, Some(g)) => {
            let g: GroupRef = g.parse().unwrap_or_else(|e| match e {});
            Some(resolve_group(&g).map_err(|e| DaemonError::Group(format!("socket_group: {e}")))?)
        }
        _ => None,
    };
    server::raise_fd_limit();
    // Validated with the config; bound before the runtime starts so that a
    // busy port stops start-up at once.
    let metrics = match cfg.metrics.endpoint() {
        Ok(Some(listen)) => Some(crate::metrics::Endpoint::bind(&listen)?),
        Ok(None) => None,
        Err(e) => {
            return Err(DaemonError::Metrics(crate::metrics::MetricsError::Config(
                e.to_string(),
            )));
        }
    };
    let note = StatusNote::default();
    if let Some(w) = service.watchdog {
        tracing::info!(
            "systemd watchdog: {} ms, pinged every {} ms from the Dispatcher's loop",
            w.as_millis(),
            (w / 2).min(systemd::STATUS_EVERY).as_millis()
        );
    }
    let heartbeat = systemd::heartbeat(notifier.clone(), service.watchdog, note.clone())
        .map(|(every, f)| (every, Box::new(f) as Box<dyn FnMut(Heartbeat) + Send>));
    // Before any job runs: kill what a killed jobd left of its exec jobs'
    // process groups, and record this daemon's groups from now on.
    let runs_programs = cfg.exec.enabled || !cfg.command_kinds().is_empty();
    kinds::exec_groups::start(&state_dir, runs_programs);
    let runtime = build_runtime(&cfg, &state_dir, heartbeat)?;
    tracing::info!(
        state_dir = %state_dir.display(),
        durability = cfg.durability.as_str(),
        pools = cfg.pool_list().len(),
        "runtime started"
    );
    let auth = Arc::new(LiveAuth::new(auth));
    let settings = Settings {
        socket,
        socket_mode: cfg.socket_mode.0,
        socket_gid,
        max_frame_bytes: cfg.max_frame_bytes,
        max_in_flight: cfg.max_in_flight,
        max_connections: cfg.max_connections,
        idle_timeout: cfg.idle_timeout(),
        shutdown_timeout: Duration::from_secs(cfg.shutdown_timeout_secs),
        auth: auth.clone(),
    };
    let handle = runtime.handle();
    let served = actix_rt::System::new().block_on(async {
        if let Some(m) = metrics {
            actix_rt::spawn(m.serve(handle.clone()));
        }
        let reloader = Reloader::new(
            cfg,
            over,
            auth,
            handle.clone(),
            notifier.clone(),
            note.clone(),
        );
        let ready = notifier.clone();
        let stopping = notifier.clone();
        let hooks = Hooks {
            // The store has recovered (the runtime started) and the socket
            // listens: clients that connect now are served.
            ready: Some(Box::new(move || ready.ready("accepting connections"))),
            stopping: Some(Box::new(move || {
                note.set("draining: waiting for running jobs");
                stopping.stopping("draining: waiting for running jobs");
            })),
            reload: Some(Box::new(move || {
                let r = reloader.clone();
                async move {
                    let _ = r.reload().await;
                }
                .boxed_local()
            })),
        };
        server::serve(settings, listen, handle, hooks).await
    });
    let result = finish(served, runtime);
    // STOPPING=1 and friends go out on their own thread: send them before
    // the process ends.
    notifier.flush(NOTIFY_FLUSH);
    result
}

/// How long the last sd_notify messages may take at exit.
const NOTIFY_FLUSH: Duration = Duration::from_secs(1);

/// After serving: wait for the runtime's threads, or stop it on an error.
fn finish(
    served: Result<server::Stopped, ServerError>,
    runtime: Runtime,
) -> Result<(), DaemonError> {
    match served {
        Err(e) => {
            let _ = runtime.shutdown(Duration::from_secs(1));
            Err(e.into())
        }
        Ok(server::Stopped::Forced) => Err(DaemonError::Forced),
        Ok(server::Stopped::Clean) => {
            match runtime.wait_stopped(THREAD_GRACE) {
                Ok(()) => {}
                Err(ShutdownError::WorkersBusy(n)) => tracing::warn!(
                    "{n} handler(s) ignored cancellation and were still running at exit"
                ),
                Err(e) => tracing::error!("runtime: {e}"),
            }
            Ok(())
        }
    }
}
