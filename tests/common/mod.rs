//! Test harness shared by the end-to-end tests: start the real `jobd`
//! binary with a temporary state directory and socket, wait until it
//! answers `hello`, talk NDJSON to it, and kill it on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running daemon for one test.
pub struct Daemon {
    /// The daemon process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its state directory (inside `dir`).
    pub state_dir: PathBuf,
    /// Keeps the temporary directory alive.
    pub dir: tempfile::TempDir,
}

/// Path of the `jobd` binary built for these tests.
pub fn jobd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jobd"))
}

/// Path of the `jobctl` binary built for these tests.
pub fn jobctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jobctl"))
}

impl Daemon {
    /// Start with no config file and `durability = memory`.
    pub fn start() -> Daemon {
        Daemon::start_with("", &[])
    }

    /// Start with the given TOML config text and extra arguments.
    pub fn start_with(config: &str, args: &[&str]) -> Daemon {
        let (dir, state_dir, socket, config_path) = layout(config);
        let mut d = Daemon {
            child: spawn_jobd(&config_path, &socket, &state_dir, args),
            socket,
            state_dir,
            dir,
        };
        d.wait_ready();
        d
    }

    /// Start again on the same state directory and socket (after a stop or
    /// a kill), with the same config file.
    pub fn restart(&mut self, args: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let config_path = self.dir.path().join("jobd.toml");
        self.child = spawn_jobd(&config_path, &self.socket, &self.state_dir, args);
        self.wait_ready();
    }

    /// Block until the daemon answers `hello` (at most 20 s).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("jobd exited during start-up: {status}");
            }
            if let Ok(mut c) = Client::connect(&self.socket)
                && let Ok(r) = c.request(json!({"op": "hello"}))
                && r["ok"] == json!(true)
            {
                return;
            }
            assert!(Instant::now() < deadline, "jobd did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new client connection.
    pub fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect to jobd")
    }

    /// Send SIGTERM and wait for the exit status (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        signal(&self.child, libc::SIGTERM);
        wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `jobd` on a test's config, socket and state directory, with the
/// environment cleared of what would change its behaviour (a socket to
/// use, systemd's variables) and quiet logs unless `JOBD_TEST_LOG` says.
fn jobd_command(config: &Path, socket: &Path, state_dir: &Path) -> Command {
    let mut cmd = Command::new(jobd_bin());
    cmd.arg("--config")
        .arg(config)
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .env_remove("JOBD_SOCKET")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env(
            "JOBD_LOG",
            std::env::var("JOBD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null());
    cmd
}

fn spawn_jobd(config: &Path, socket: &Path, state_dir: &Path, args: &[&str]) -> Child {
    let mut cmd = jobd_command(config, socket, state_dir);
    if !args.contains(&"--durability") {
        cmd.args(["--durability", "memory"]);
    }
    cmd.args(args).spawn().expect("spawn jobd")
}

/// Send a signal to a child process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) with a pid we own; no memory is shared.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Wait for a child to exit, killing it (and failing) after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A blocking NDJSON connection to the daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connect to a socket.
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            next_id: 1,
        })
    }

    /// Send one raw line (a newline is added).
    pub fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")
    }

    /// Send raw bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Read one response line as JSON (`Value::Null` at end of stream).
    pub fn read(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(Value::Null);
        }
        serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}: {line}"))
        })
    }

    /// Send a request (an `id` is added if missing) and read responses
    /// until the one with that id.
    pub fn request(&mut self, mut req: Value) -> std::io::Result<Value> {
        if req.get("id").is_none() {
            req["id"] = json!(self.next_id);
            self.next_id += 1;
        }
        let id = req["id"].clone();
        self.send_line(&req.to_string())?;
        loop {
            let r = self.read()?;
            if r.is_null() || r["id"] == id {
                return Ok(r);
            }
        }
    }
}

// ----- added by the daemon branch ------------------------------------------

fn spawn_jobd_env(
    config: &Path,
    socket: &Path,
    state_dir: &Path,
    env: &[(&str, &str)],
    stderr: Stdio,
) -> Child {
    jobd_command(config, socket, state_dir)
        .args(["--durability", "memory"])
        .envs(env.iter().copied())
        .stderr(stderr)
        .spawn()
        .expect("spawn jobd")
}

impl Daemon {
    /// Start with extra environment variables. Ready once `hello` gets any
    /// answer at all (so this also works when the test's uid is refused).
    pub fn start_env(config: &str, env: &[(&str, &str)]) -> Daemon {
        let (dir, state_dir, socket, config_path) = layout(config);
        let mut child = spawn_jobd_env(&config_path, &socket, &state_dir, env, Stdio::inherit());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("jobd exited during start-up: {status}");
            }
            if let Ok(mut c) = Client::connect(&socket)
                && let Ok(r) = c.request(json!({"op": "hello"}))
                && !r.is_null()
            {
                break;
            }
            assert!(Instant::now() < deadline, "jobd did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            socket,
            state_dir,
            dir,
        }
    }
}

/// Run `jobd` with this config text on `socket` (state in a fresh temp
/// dir), expecting it to stop by itself within `timeout`: its exit status
/// (None if it was still running and got killed) and its stderr.
pub fn run_jobd(
    config: &str,
    socket: &Path,
    env: &[(&str, &str)],
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("jobd.toml");
    std::fs::write(&config_path, config).expect("write config");
    let mut child = spawn_jobd_env(
        &config_path,
        socket,
        &dir.path().join("state"),
        env,
        Stdio::piped(),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (status, err)
}

impl Client {
    /// Shut down the writing side (the daemon sees end of input).
    pub fn shutdown_write(&self) -> std::io::Result<()> {
        self.writer.shutdown(std::net::Shutdown::Write)
    }

    /// A second handle on the socket, for writing from another thread.
    pub fn writer_clone(&self) -> std::io::Result<UnixStream> {
        self.writer.try_clone()
    }
}

/// Run `jobctl --socket SOCKET ARGS…` (no stdin, `JOBD_SOCKET` unset) and
/// collect its output.
pub fn jobctl(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(jobctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("JOBD_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run jobctl")
}

// ----- added by the test-dedupe branch --------------------------------------

/// A request that must get an answer (any answer, `ok` or not); that answer.
pub fn rq(c: &mut Client, v: Value) -> Value {
    c.request(v).expect("request")
}

/// A finished process's standard output, as text.
pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A finished process's standard error, as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert a finished process's exit code (showing both streams when it
/// differs); its standard output.
pub fn expect_code(o: &std::process::Output, want: i32) -> String {
    let out = stdout(o);
    assert_eq!(
        o.status.code(),
        Some(want),
        "stdout: {out}\nstderr: {}",
        stderr(o)
    );
    out
}

impl Daemon {
    /// Close `c`, stop the daemon with SIGTERM (it must exit cleanly within
    /// 20 s) and start it again on the same state directory with `args`; a
    /// connection to the new process.
    pub fn stop_and_restart(&mut self, c: Client, args: &[&str]) -> Client {
        drop(c);
        let status = self.terminate(Duration::from_secs(20));
        assert!(status.success(), "jobd did not stop cleanly: {status}");
        self.restart(args);
        self.client()
    }

    /// Close `c`, kill the daemon (SIGKILL, as a crash would) and start it
    /// again on the same state directory with `args`; a connection to the
    /// new process.
    pub fn crash_and_restart(&mut self, c: Client, args: &[&str]) -> Client {
        drop(c);
        self.restart(args);
        self.client()
    }
}

/// A temporary directory for one daemon: it, its state directory
/// (created), its socket path and its config file (written from `config`).
fn layout(config: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let socket = dir.path().join("jobd.sock");
    let config_path = dir.path().join("jobd.toml");
    std::fs::write(&config_path, config).expect("write config");
    (dir, state_dir, socket, config_path)
}
