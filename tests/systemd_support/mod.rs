//! Helpers for the systemd tests (`tests/systemd_*.rs`): a stand-in for
//! systemd's notification socket (a Unix datagram socket whose path is
//! passed as `NOTIFY_SOCKET`), and starting the real `jobd` with a given
//! environment (and that socket).
#![allow(dead_code)] // each test binary uses a different subset

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Long enough for anything that should happen "at once" on a loaded CI
/// machine, short enough to fail a hung test quickly.
pub const LONG: Duration = Duration::from_secs(20);

/// One `sd_notify` datagram: its lines (`READY=1`, `STATUS=…`) and when it
/// arrived.
#[derive(Debug, Clone)]
pub struct Message {
    /// `KEY=value` lines.
    pub lines: Vec<String>,
    /// Arrival time.
    pub at: Instant,
}

impl Message {
    /// True when one of its lines is exactly `line`.
    pub fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    /// The value of `KEY=`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

/// A notification socket, as systemd would provide.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
    /// Every message received so far, in order.
    pub seen: Vec<Message>,
}

impl NotifySocket {
    /// Bind a fresh socket in a temporary directory.
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            sock,
            path,
            _dir: dir,
            seen: Vec::new(),
        }
    }

    /// The path to pass as `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next message, waiting at most `within`.
    pub fn recv(&mut self, within: Duration) -> Option<Message> {
        self.sock
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .expect("set_read_timeout");
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.sock.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let m = Message {
            lines: text.lines().map(str::to_string).collect(),
            at: Instant::now(),
        };
        self.seen.push(m.clone());
        Some(m)
    }

    /// Receive until a message satisfies `f` (at most `within`); that
    /// message. Panics, listing what arrived, when none does.
    pub fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        f: impl Fn(&Message) -> bool,
    ) -> Message {
        self.try_wait_for(within, f).unwrap_or_else(|| {
            panic!(
                "no notification {what} within {within:?}; got {:?}",
                self.seen.iter().map(|m| &m.lines).collect::<Vec<_>>()
            )
        })
    }

    /// Like `wait_for`, naming the daemon process waited for: when nothing
    /// comes, the panic says whether that process still runs.
    pub fn wait_from(
        &mut self,
        child: &mut Child,
        within: Duration,
        what: &str,
        f: impl Fn(&Message) -> bool,
    ) -> Message {
        match self.try_wait_for(within, f) {
            Some(m) => m,
            None => panic!(
                "no notification {what} within {within:?} (jobd: {}); got {:?}",
                match child.try_wait() {
                    Ok(Some(s)) => format!("exited, {s}"),
                    Ok(None) => "still running".to_string(),
                    Err(e) => format!("unknown: {e}"),
                },
                self.seen.iter().map(|m| &m.lines).collect::<Vec<_>>()
            ),
        }
    }

    /// Receive until a message satisfies `f`, at most `within`.
    pub fn try_wait_for(
        &mut self,
        within: Duration,
        f: impl Fn(&Message) -> bool,
    ) -> Option<Message> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let Some(m) = self.recv(left)
                && f(&m)
            {
                return Some(m);
            }
        }
    }

    /// Everything that arrives within `d`.
    pub fn collect_for(&mut self, d: Duration) -> Vec<Message> {
        let deadline = Instant::now() + d;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            if let Some(m) = self.recv(left) {
                got.push(m);
            }
        }
    }
}

/// A temporary directory with a config file, a state dir and a socket path.
pub struct Setup {
    /// Holds everything.
    pub dir: tempfile::TempDir,
    /// `jobd.toml` inside it.
    pub config: PathBuf,
    /// `state/` inside it.
    pub state_dir: PathBuf,
    /// `jobd.sock` inside it.
    pub socket: PathBuf,
}

impl Setup {
    /// A directory with `config` written to `jobd.toml`.
    pub fn new(config: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Setup {
            config: dir.path().join("jobd.toml"),
            state_dir: dir.path().join("state"),
            socket: dir.path().join("jobd.sock"),
            dir,
        };
        s.write_config(config);
        s
    }

    /// Replace the config file.
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Start `jobd` on this setup with exactly these extra variables
    /// (systemd's, `JOBD_LOG`, ...), the rest of the environment inherited
    /// minus anything systemd-related.
    pub fn spawn(&self, env: &[(&str, &str)], stderr: Stdio) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jobd"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--durability", "memory"]);
        for v in [
            "JOBD_SOCKET",
            "JOBD_LOG",
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
        ] {
            cmd.env_remove(v);
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn jobd")
    }

    /// `spawn` with `NOTIFY_SOCKET` set to `notify` as well as `env`; the
    /// daemon is killed and reaped when the result is dropped.
    pub fn spawn_notifying(
        &self,
        notify: &NotifySocket,
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Reap {
        let path = notify.path().to_str().expect("a UTF-8 temporary path");
        let mut all = vec![("NOTIFY_SOCKET", path)];
        all.extend_from_slice(env);
        Reap(self.spawn(&all, stderr))
    }
}

/// Kills and reaps a child process when dropped, so a failing test leaves
/// no daemon behind.
pub struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
