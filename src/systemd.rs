//! systemd integration: what the service manager hands the process at
//! start (socket activation: `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`;
//! the watchdog: `WATCHDOG_USEC`, `WATCHDOG_PID`), and the `sd_notify`
//! messages jobd sends back (`READY=1`, `STATUS=`, `STOPPING=1`,
//! `RELOADING=1`, `WATCHDOG=1`) through the `sd-notify` crate.
//!
//! Everything here is a no-op when the variables are absent, so the same
//! binary runs under systemd, under `systemd-socket-activate`, or by hand.
//! When jobd sends what (READY after recovery and `listen`, STATUS and
//! WATCHDOG from the Dispatcher's heartbeat, STOPPING at the drain) is
//! decided in `daemon`, `server` and `reload`.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobd_actors::Heartbeat;
use sd_notify::NotifyState;

/// The name `jobd.socket` gives its socket (`FileDescriptorName=jobd`).
pub const FD_NAME: &str = "jobd";

/// First file descriptor passed by socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// How often `STATUS=` is sent even when nothing changed.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Longest `STATUS=` text; longer notes are cut.
const STATUS_MAX: usize = 300;

/// What the service manager handed this process, read once at start.
#[derive(Debug)]
pub struct ServiceEnv {
    /// The listening socket passed by socket activation; an error when the
    /// variables were meant for us but do not describe a usable socket.
    pub activation: Result<Option<Activated>, String>,
    /// Watchdog timeout (`WATCHDOG_USEC`), when the watchdog is on for us.
    pub watchdog: Option<Duration>,
    /// Things worth a log line once logging is up.
    pub notes: Vec<String>,
}

impl ServiceEnv {
    /// Nothing from a service manager (for tests and embedding).
    pub fn none() -> ServiceEnv {
        ServiceEnv {
            activation: Ok(None),
            watchdog: None,
            notes: Vec::new(),
        }
    }
}

/// A listening socket inherited through socket activation.
#[derive(Debug)]
pub struct Activated {
    /// The socket, already listening; close-on-exec.
    pub listener: UnixListener,
    /// Its name from `LISTEN_FDNAMES` (`unknown` when none was given).
    pub name: String,
    /// The path it is bound to, if it has one.
    pub path: Option<PathBuf>,
}

/// Read the socket-activation and watchdog variables, then remove them from
/// the environment so that no child process (an `exec` job) sees them. The
/// passed descriptors are made close-on-exec for the same reason.
/// `NOTIFY_SOCKET` stays: every `sd_notify` call reads it. (`exec` jobs
/// never inherit it: their environment is built from scratch.)
///
/// # Safety
/// Changes the environment: call it before any other thread exists (first
/// thing in `main`), as `std::env::remove_var` requires.
pub unsafe fn take_service_env() -> ServiceEnv {
    let var = |n: &str| std::env::var(n).ok();
    let pid = std::process::id();
    let mut notes = Vec::new();
    let picked = pick_listen_fd(
        pid,
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        &mut notes,
    );
    let watchdog = watchdog_interval(
        pid,
        var("WATCHDOG_USEC").as_deref(),
        var("WATCHDOG_PID").as_deref(),
    );
    for name in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        // SAFETY: the caller guarantees no other thread runs yet.
        #[allow(unsafe_code)]
        unsafe {
            std::env::remove_var(name)
        };
    }
    let activation = picked.and_then(|p| match p {
        None => Ok(None),
        Some(p) => adopt(p).map(Some),
    });
    ServiceEnv {
        activation,
        watchdog,
        notes,
    }
}

/// Which passed descriptor to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Picked {
    /// Every passed descriptor (all are made close-on-exec).
    all: std::ops::Range<RawFd>,
    /// The one to listen on.
    fd: RawFd,
    /// Its name.
    name: String,
}

/// Decide from the variables whether sockets were passed to this process
/// (`pid`) and which one to use: the one named `jobd`, else the first
/// (fd 3). Variables meant for another process (a `LISTEN_PID` that is not
/// ours, e.g. inherited from a parent) are ignored.
pub(crate) fn pick_listen_fd(
    pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<Option<Picked>, String> {
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let listen_pid: u32 = listen_pid
        .trim()
        .parse()
        .map_err(|_| format!("socket activation: LISTEN_PID={listen_pid:?} is not a pid"))?;
    if listen_pid != pid {
        notes.push(format!(
            "ignoring LISTEN_FDS: meant for process {listen_pid}, not this one ({pid})"
        ));
        return Ok(None);
    }
    let n: RawFd = listen_fds
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| format!("socket activation: LISTEN_FDS={listen_fds:?} is not a count"))?;
    if n == 0 {
        return Ok(None);
    }
    let all = LISTEN_FDS_START..LISTEN_FDS_START + n;
    let names: Option<Vec<&str>> = names.map(|s| s.split(':').collect());
    let (index, name) = match &names {
        Some(list) if list.len() == n as usize => match list.iter().position(|&x| x == FD_NAME) {
            Some(i) => (i, FD_NAME.to_string()),
            None => {
                notes.push(format!(
                        "no passed socket is named '{FD_NAME}' (LISTEN_FDNAMES={}); using fd {LISTEN_FDS_START}",
                        list.join(":")
                    ));
                (0, list[0].to_string())
            }
        },
        Some(list) => {
            notes.push(format!(
                "LISTEN_FDNAMES names {} sockets but LISTEN_FDS={n}; ignoring the names",
                list.len()
            ));
            (0, "unknown".to_string())
        }
        None => (0, "unknown".to_string()),
    };
    Ok(Some(Picked {
        fd: LISTEN_FDS_START + index as RawFd,
        all,
        name,
    }))
}

/// Make every passed descriptor close-on-exec, check that the chosen one is
/// a listening Unix stream socket, and take ownership of it.
fn adopt(p: Picked) -> Result<Activated, String> {
    for fd in p.all.clone() {
        set_cloexec(fd).map_err(|e| format!("socket activation: fd {fd}: {e}"))?;
    }
    check_listening_unix_stream(p.fd)
        .map_err(|e| format!("socket activation: fd {}: {e}", p.fd))?;
    // SAFETY: the descriptor was passed to this process for it to own (the
    // LISTEN_* variables named this pid), it is open (checked above), and
    // nothing else in the process wraps it: the variables are gone now.
    #[allow(unsafe_code)]
    let listener = unsafe { UnixListener::from_raw_fd(p.fd) };
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(PathBuf::from));
    Ok(Activated {
        listener,
        name: p.name,
        path,
    })
}

/// Set `FD_CLOEXEC` on a descriptor.
fn set_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an integer descriptor touches no memory of ours; a
    // closed descriptor gives EBADF.
    #[allow(unsafe_code)]
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if flags & libc::FD_CLOEXEC == 0
            && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An integer socket option.
fn sockopt(fd: RawFd, name: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a local
    // c_int, and updates `len`.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// The passed descriptor must be an `AF_UNIX` `SOCK_STREAM` socket that
/// already listens (`ListenStream=` with a path).
fn check_listening_unix_stream(fd: RawFd) -> Result<(), String> {
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| format!("not a socket ({e})"))?;
    if domain != libc::AF_UNIX {
        return Err(format!(
            "not a Unix socket (address family {domain}); jobd.socket needs ListenStream=/path"
        ));
    }
    let kind = sockopt(fd, libc::SO_TYPE).map_err(|e| e.to_string())?;
    if kind != libc::SOCK_STREAM {
        return Err("not a stream socket; jobd.socket needs ListenStream=".into());
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| e.to_string())? == 0 {
        return Err("the socket is not listening (Accept=yes is not supported)".into());
    }
    Ok(())
}

/// The watchdog timeout when `WATCHDOG_USEC` is set (non-zero) and
/// `WATCHDOG_PID` names this process or is unset.
pub(crate) fn watchdog_interval(
    pid: u32,
    usec: Option<&str>,
    wd_pid: Option<&str>,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match wd_pid {
        Some(p) if p.trim().parse::<u32>().ok() != Some(pid) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// Messages waiting for the sender thread; more are dropped (and counted
/// in the log), never waited for.
const NOTIFY_QUEUE: usize = 256;

/// Sends `sd_notify` messages when `NOTIFY_SOCKET` is set; does nothing
/// otherwise. Cheap to clone; usable from any thread; never blocks.
///
/// The datagrams are written by a thread of its own (`jobd-notify`): a
/// send to a busy service manager can block, and the heartbeat that pings
/// the watchdog runs on the Dispatcher's loop, which must never block.
/// A stalled Dispatcher still stops the pings: it is what produces them.
/// Call `flush` before the process exits, or the last messages (STOPPING)
/// may be lost with the thread.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// To the sender thread; None when `NOTIFY_SOCKET` is not set (or the
    /// thread could not start).
    tx: Option<crossbeam_channel::Sender<Outgoing>>,
}

/// What the sender thread is asked to do.
#[derive(Debug)]
enum Outgoing {
    /// Send one datagram with these `KEY=value` lines.
    Lines(Vec<String>),
    /// Say when everything queued before this is sent.
    Flush(crossbeam_channel::Sender<()>),
}

impl Notifier {
    /// On when `NOTIFY_SOCKET` is set: starts the sender thread.
    pub fn from_env() -> Notifier {
        if std::env::var_os("NOTIFY_SOCKET").is_none_or(|v| v.is_empty()) {
            return Notifier { tx: None };
        }
        let (tx, rx) = crossbeam_channel::bounded::<Outgoing>(NOTIFY_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("jobd-notify".into())
            .spawn(move || {
                let mut warned = false;
                for out in rx {
                    let lines = match out {
                        Outgoing::Lines(l) => l,
                        Outgoing::Flush(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    let states: Vec<NotifyState<'_>> =
                        lines.iter().map(|l| NotifyState::Custom(l)).collect();
                    if let Err(e) = sd_notify::notify(false, &states) {
                        if warned {
                            tracing::debug!("sd_notify failed: {e}");
                        } else {
                            warned = true;
                            tracing::warn!("sd_notify failed (NOTIFY_SOCKET): {e}");
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => Notifier { tx: Some(tx) },
            Err(e) => {
                tracing::warn!(
                    "cannot start the sd_notify thread, systemd will not hear from jobd: {e}"
                );
                Notifier { tx: None }
            }
        }
    }

    /// A notifier that sends nothing.
    pub fn off() -> Notifier {
        Notifier { tx: None }
    }

    /// True when messages go anywhere.
    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(tx) = &self.tx else {
            return;
        };
        let lines = states.iter().map(ToString::to_string).collect();
        if tx.try_send(Outgoing::Lines(lines)).is_err() {
            tracing::debug!("sd_notify queue full: message dropped");
        }
    }

    /// Wait (at most `within`) until every message queued so far is sent:
    /// before the process exits.
    pub fn flush(&self, within: Duration) {
        let Some(tx) = &self.tx else {
            return;
        };
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if tx.send_timeout(Outgoing::Flush(done_tx), within).is_ok() {
            let _ = done_rx.recv_timeout(within);
        }
    }

    /// `READY=1` with a status line: start-up (or a reload) is complete.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&cut(status))]);
    }

    /// `STATUS=`.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(&cut(status))]);
    }

    /// `STOPPING=1` with a status line: the drain begins.
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(&cut(status))]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (when the clock can be read).
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        states.push(NotifyState::Status("reloading the configuration"));
        self.send(&states);
    }
}

/// Cut a status text to `STATUS_MAX` bytes (on a character boundary) and
/// to one line.
fn cut(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.len() <= STATUS_MAX {
        return line.to_string();
    }
    let mut end = STATUS_MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// A short note appended to the periodic `STATUS=` line (e.g. "draining",
/// or what the last reload could not apply). Shared between the server,
/// the reload path and the heartbeat.
#[derive(Debug, Clone, Default)]
pub struct StatusNote(Arc<Mutex<String>>);

impl StatusNote {
    /// Replace the note (empty: none).
    pub fn set(&self, note: impl Into<String>) {
        *self.lock() = note.into();
    }

    /// The current note.
    pub fn get(&self) -> String {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, String> {
        // Nobody panics while holding it; a poisoned note is still a string.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The status line for a heartbeat: job counts, then the note.
pub fn status_line(hb: Heartbeat, note: &str) -> String {
    let counts = format!("{} running, {} queued", hb.running, hb.waiting);
    if note.is_empty() {
        counts
    } else {
        format!("{counts}; {note}")
    }
}

/// The heartbeat to install on the runtime (see
/// `RuntimeBuilder::heartbeat`), or None when there is nobody to notify:
/// it runs on the Dispatcher's own event loop, sends `WATCHDOG=1` on every
/// tick when the watchdog is on (ticks at half its timeout, so a stalled
/// loop stops the pings and systemd restarts jobd), and `STATUS=` with the
/// job counts when they changed or `STATUS_EVERY` passed.
pub fn heartbeat(
    notifier: Notifier,
    watchdog: Option<Duration>,
    note: StatusNote,
) -> Option<(Duration, impl FnMut(Heartbeat) + Send + 'static)> {
    if !notifier.is_on() {
        return None;
    }
    let tick = match watchdog {
        Some(w) => (w / 2).min(STATUS_EVERY),
        None => STATUS_EVERY,
    }
    .max(Duration::from_millis(1));
    let mut last: Option<(Instant, String)> = None;
    let f = move |hb: Heartbeat| {
        let text = status_line(hb, &note.get());
        let due = last
            .as_ref()
            .is_none_or(|(at, prev)| *prev != text || at.elapsed() + tick / 2 >= STATUS_EVERY);
        let mut states = Vec::with_capacity(2);
        if watchdog.is_some() {
            states.push(NotifyState::Watchdog);
        }
        if due {
            states.push(NotifyState::Status(&text));
        }
        if !states.is_empty() {
            notifier.send(&states);
        }
        if due {
            last = Some((Instant::now(), text.clone()));
        }
    };
    Some((tick, f))
}

/// The raw descriptor of an activated listener, for log lines.
pub fn fd_of(a: &Activated) -> RawFd {
    a.listener.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(
        pid: &str,
        fds: &str,
        names: Option<&str>,
    ) -> (Result<Option<Picked>, String>, Vec<String>) {
        let mut notes = Vec::new();
        let r = pick_listen_fd(42, Some(pid), Some(fds), names, &mut notes);
        (r, notes)
    }

    #[test]
    fn nothing_passed_means_no_activation() {
        let mut notes = Vec::new();
        assert_eq!(pick_listen_fd(42, None, None, None, &mut notes), Ok(None));
        assert_eq!(
            pick_listen_fd(42, None, Some("1"), None, &mut notes),
            Ok(None)
        );
        assert_eq!(pick("42", "0", None).0, Ok(None));
    }

    #[test]
    fn another_process_s_sockets_are_ignored() {
        let (r, notes) = pick("41", "1", Some("jobd"));
        assert_eq!(r, Ok(None));
        assert!(notes[0].contains("41"), "{notes:?}");
    }

    #[test]
    fn the_socket_named_jobd_wins_else_fd_3() {
        let (r, _) = pick("42", "3", Some("other:jobd:more"));
        let p = r.unwrap().unwrap();
        assert_eq!((p.fd, p.name.as_str(), p.all.clone()), (4, "jobd", 3..6));

        let (r, notes) = pick("42", "2", Some("a:b"));
        assert_eq!(r.unwrap().unwrap().fd, 3);
        assert!(notes[0].contains("no passed socket is named 'jobd'"));

        let (r, notes) = pick("42", "1", None);
        assert_eq!(r.unwrap().unwrap().fd, 3);
        assert!(notes.is_empty());

        let (r, notes) = pick("42", "2", Some("jobd"));
        assert_eq!(r.unwrap().unwrap().fd, 3);
        assert!(notes[0].contains("ignoring the names"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(pick("me", "1", None).0.is_err());
        assert!(pick("42", "many", None).0.is_err());
        assert!(pick("42", "-1", None).0.is_err());
    }

    #[test]
    fn watchdog_needs_usec_and_our_pid_or_none() {
        let half = Some(Duration::from_millis(200));
        assert_eq!(watchdog_interval(7, Some("200000"), None), half);
        assert_eq!(watchdog_interval(7, Some("200000"), Some("7")), half);
        assert_eq!(watchdog_interval(7, Some("200000"), Some("8")), None);
        assert_eq!(watchdog_interval(7, Some("0"), None), None);
        assert_eq!(watchdog_interval(7, Some("soon"), None), None);
        assert_eq!(watchdog_interval(7, None, Some("7")), None);
    }

    #[test]
    fn status_lines_are_short_single_lines() {
        let hb = Heartbeat {
            waiting: 5,
            running: 2,
        };
        assert_eq!(status_line(hb, ""), "2 running, 5 queued");
        assert_eq!(status_line(hb, "draining"), "2 running, 5 queued; draining");
        assert_eq!(cut("a\nb"), "a");
        let long = "é".repeat(400);
        let c = cut(&long);
        assert!(c.len() <= STATUS_MAX + "…".len(), "{}", c.len());
    }

    #[test]
    fn a_non_socket_descriptor_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = check_listening_unix_stream(f.as_raw_fd()).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = check_listening_unix_stream(a.as_raw_fd()).unwrap_err();
        assert!(e.contains("not listening"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        check_listening_unix_stream(l.as_raw_fd()).unwrap();
    }
}
