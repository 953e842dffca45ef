//! The `exec` job kind and the child-process runner that it shares with the
//! command kinds (`kinds::command`).
//!
//! `exec` runs a program given as an argv list, without a shell:
//!
//! ```json
//! {"argv": ["/usr/bin/du", "-sh", "/srv"], "stdin": "...", "env": {"LANG": "C"}, "cwd": "/srv"}
//! ```
//!
//! and answers `{"exit_code", "stdout", "stderr", "truncated", "duration_ms"}`.
//!
//! Rules, all enforced here:
//! - Off unless the config says `[exec] enabled = true`; while it is off the
//!   kind is not registered, so submissions get `unknown_kind`.
//! - `argv[0]` must be an absolute path that, after resolving symlinks, is
//!   one of the `[exec] allow` programs. The resolved path is what runs;
//!   the program still sees the `argv[0]` it was given.
//! - The environment is cleared except the daemon variables named in
//!   `[exec] env` (default `PATH`) and the payload's `env` entries (names
//!   starting with `LD_` are refused: they would let a caller load code
//!   into an allowed program).
//! - stdout and stderr are each capped at `max_output_bytes`; the rest is
//!   read and thrown away so the child never blocks on a full pipe, and
//!   `truncated` is true.
//! - **A non-zero exit fails the job** (`job_failed`, with the exit code and
//!   the end of stderr in the message), like a failed unit or cron job: so
//!   retries (`max_attempts`), `after` dependencies and `jobctl`'s exit code
//!   mean what one expects. A job that succeeds therefore always has
//!   `exit_code` 0 in its result.
//! - The child runs in its own process group. When the job times out or is
//!   cancelled the whole group gets SIGKILL; when the program exits by
//!   itself, whatever it left running in its group is killed too. A
//!   process that moves itself to another group or session (`setsid`,
//!   double-fork daemons) escapes this; run jobd under systemd (one cgroup)
//!   to catch those as well.
//! - The child dies with the daemon: it asks the kernel for SIGKILL when
//!   the worker thread that forked it exits (`PR_SET_PDEATHSIG`), so a
//!   daemon killed with SIGKILL, crashed or OOM-killed takes its running
//!   programs along. Only the direct child gets this; what the program
//!   started itself (the rest of its group) outlives such a daemon death.
//!   For those, the child records its group in the state directory before
//!   it execs the program, and the next daemon started there kills what is
//!   left of recorded groups before it runs any job (`kinds::exec_groups`).
//!   Under systemd the service's cgroup is killed as a whole anyway.
//! - Timeout: the job's `timeout_ms` if the submission set one, else
//!   `timeout_secs` from `[exec]` (or the command kind's own).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobd_actors::{JobContext, KindOptions, RuntimeBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::exec_groups::{self, PendingRecord, Recorder};

/// Name under which the general exec kind is registered.
pub const EXEC_KIND: &str = "exec";

/// The `[exec]` section of the daemon's config. Its limits also apply to
/// the command kinds (`[kinds.NAME]`), except `enabled`, `allow` and `pool`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// Register the general `exec` kind at all. Off by default: running
    /// arbitrary programs is something an operator must ask for.
    pub enabled: bool,
    /// Programs `exec` may run, as absolute paths (compared after resolving
    /// symlinks). Empty by default, so enabling exec alone allows nothing.
    pub allow: Vec<PathBuf>,
    /// Names of the daemon's own environment variables passed to children;
    /// every other variable is cleared.
    pub env: Vec<String>,
    /// Cap on captured stdout, and separately on stderr, in bytes.
    pub max_output_bytes: usize,
    /// Timeout of a child when the job sets none; 0 means no timeout.
    pub timeout_secs: u64,
    /// Pool the `exec` kind runs on.
    pub pool: String,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            enabled: false,
            allow: Vec::new(),
            env: vec!["PATH".to_string()],
            max_output_bytes: 1024 * 1024,
            timeout_secs: 60,
            pool: jobd_actors::DEFAULT_POOL.to_string(),
        }
    }
}

impl ExecConfig {
    /// The kind timeout that `timeout_secs` stands for (0 = none).
    pub(crate) fn default_timeout(&self) -> Option<Duration> {
        (self.timeout_secs > 0).then(|| Duration::from_secs(self.timeout_secs))
    }

    /// The daemon's own variables named in `env`, those that are set.
    pub(crate) fn passed_env(&self) -> Vec<(OsString, OsString)> {
        self.env
            .iter()
            .filter_map(|name| std::env::var_os(name).map(|v| (OsString::from(name), v)))
            .collect()
    }
}

/// Register the `exec` kind when `cfg.enabled`; otherwise return `b` as it
/// is, so that `exec` submissions get `unknown_kind`.
pub fn register(b: RuntimeBuilder, cfg: &ExecConfig) -> RuntimeBuilder {
    if !cfg.enabled {
        return b;
    }
    let options = KindOptions {
        timeout: cfg.default_timeout(),
        ..KindOptions::default()
    };
    let cfg = cfg.clone();
    let pool = cfg.pool.clone();
    b.raw_handler(EXEC_KIND, &pool, options, move |ctx, payload| {
        run_exec(ctx, &cfg, payload)
    })
}

/// The `exec` payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecPayload {
    /// Program and arguments; no shell is involved.
    argv: Vec<String>,
    /// Text written to the child's stdin (stdin is empty otherwise).
    #[serde(default)]
    stdin: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Working directory (absolute); the daemon's own otherwise.
    #[serde(default)]
    cwd: Option<String>,
}

fn run_exec(ctx: &JobContext<'_>, cfg: &ExecConfig, payload: &Value) -> Result<Value, String> {
    let p = ExecPayload::deserialize(payload).map_err(|e| format!("invalid exec payload: {e}"))?;
    let Some(program) = p.argv.first() else {
        return Err("invalid exec payload: argv is empty".to_string());
    };
    let resolved = check_allowed(program, &cfg.allow)?;
    let mut env = cfg.passed_env();
    for (k, v) in &p.env {
        check_env_name(k)?;
        env.push((OsString::from(k), OsString::from(v)));
    }
    let cwd = match &p.cwd {
        Some(c) if !Path::new(c).is_absolute() => {
            return Err(format!("exec: cwd '{c}' is not an absolute path"));
        }
        Some(c) => Some(PathBuf::from(c)),
        None => None,
    };
    let spec = ChildSpec {
        program: resolved,
        argv: p.argv.clone(),
        env,
        cwd,
        stdin: p.stdin.map(String::into_bytes),
        max_output_bytes: cfg.max_output_bytes,
        deadline: job_deadline(ctx, cfg.default_timeout()),
    };
    let out = run_child(&spec, &|| ctx.is_cancelled())?;
    out.into_result()
}

/// The deadline of this attempt: the job's own (which the runtime derives
/// from the submission's `timeout_ms`, else the kind's timeout), else
/// `fallback` from now.
pub(crate) fn job_deadline(ctx: &JobContext<'_>, fallback: Option<Duration>) -> Option<Instant> {
    ctx.deadline()
        .or_else(|| fallback.map(|t| Instant::now() + t))
}

/// Check `program` against the allow-list and return the resolved path to
/// run. Both sides are compared after resolving symlinks.
pub(crate) fn check_allowed(program: &str, allow: &[PathBuf]) -> Result<PathBuf, String> {
    let path = Path::new(program);
    if !path.is_absolute() {
        return Err(format!(
            "exec: program '{program}' refused: argv[0] must be an absolute path"
        ));
    }
    let resolved = path
        .canonicalize()
        .map_err(|e| format!("exec: program '{program}' refused: cannot resolve it: {e}"))?;
    let allowed = allow
        .iter()
        .any(|a| a.is_absolute() && a.canonicalize().is_ok_and(|allowed| allowed == resolved));
    if allowed {
        Ok(resolved)
    } else {
        Err(format!(
            "exec: program '{program}' refused: it is not on the [exec] allow list"
        ))
    }
}

/// Refuse environment names that cannot be set or that would let a caller
/// change which code an allowed program runs.
fn check_env_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Err(format!("exec: invalid environment variable name '{name}'"));
    }
    if name.starts_with("LD_") {
        return Err(format!(
            "exec: environment variable '{name}' refused (dynamic linker settings)"
        ));
    }
    Ok(())
}

/// What to run: everything `run_child` needs, already checked.
#[derive(Debug, Clone)]
pub(crate) struct ChildSpec {
    /// The executable to start (absolute).
    pub(crate) program: PathBuf,
    /// The full argv; `argv[0]` is what the program sees as its name.
    pub(crate) argv: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Working directory, if not the daemon's.
    pub(crate) cwd: Option<PathBuf>,
    /// Bytes for stdin; `None` gives the child an empty stdin.
    pub(crate) stdin: Option<Vec<u8>>,
    /// Cap per output stream.
    pub(crate) max_output_bytes: usize,
    /// When to kill the child; `None` for never.
    pub(crate) deadline: Option<Instant>,
}

/// What a child did, once it has exited and its group is gone.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChildOutput {
    /// Exit code when it exited normally.
    pub(crate) exit_code: Option<i32>,
    /// The signal that ended it, otherwise.
    pub(crate) signal: Option<i32>,
    /// Captured stdout (at most `max_output_bytes`).
    pub(crate) stdout: Vec<u8>,
    /// Captured stderr (at most `max_output_bytes`).
    pub(crate) stderr: Vec<u8>,
    /// True when either stream had more than the cap.
    pub(crate) truncated: bool,
    /// From spawn to exit.
    pub(crate) duration: Duration,
}

/// At most this much of stderr goes into a failure message.
const STDERR_IN_ERROR: usize = 2000;

impl ChildOutput {
    /// The job's outcome: the result object on exit code 0, else an error
    /// naming the exit code (or signal) with the end of stderr.
    pub(crate) fn into_result(self) -> Result<Value, String> {
        match (self.exit_code, self.signal) {
            (Some(0), _) => Ok(json!({
                "exit_code": 0,
                "stdout": String::from_utf8_lossy(&self.stdout),
                "stderr": String::from_utf8_lossy(&self.stderr),
                "truncated": self.truncated,
                "duration_ms": self.duration.as_millis() as u64,
            })),
            (code, signal) => {
                let how = match (code, signal) {
                    (Some(c), _) => format!("exited with code {c}"),
                    (None, Some(s)) => format!("was killed by signal {s}"),
                    (None, None) => "ended for an unknown reason".to_string(),
                };
                let text = String::from_utf8_lossy(&self.stderr);
                let text = text.trim();
                let tail = tail_chars(text, STDERR_IN_ERROR);
                if tail.is_empty() {
                    Err(format!("program {how}"))
                } else {
                    let dots = if tail.len() < text.len() { "…" } else { "" };
                    Err(format!("program {how}; stderr: {dots}{tail}"))
                }
            }
        }
    }
}

/// The last (at most) `max` bytes of `s`, cut at a character boundary.
fn tail_chars(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Why `run_child` did not produce an output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RunError {
    /// The program could not be started.
    Spawn(String),
    /// It was killed because the job was cancelled or passed its deadline.
    Stopped,
    /// Talking to it failed (pipes, waiting).
    Io(String),
}

impl From<RunError> for String {
    fn from(e: RunError) -> String {
        match e {
            RunError::Spawn(m) | RunError::Io(m) => m,
            RunError::Stopped => "program killed: the job was cancelled or timed out".to_string(),
        }
    }
}

/// A capped output buffer: keeps the first `cap` bytes, counts the rest.
#[derive(Debug)]
pub(crate) struct CappedBuf {
    /// The kept bytes.
    data: Vec<u8>,
    /// How many bytes may be kept.
    cap: usize,
    /// True once a byte was dropped.
    truncated: bool,
}

impl CappedBuf {
    /// An empty buffer keeping at most `cap` bytes.
    pub(crate) fn new(cap: usize) -> Self {
        CappedBuf {
            data: Vec::new(),
            cap,
            truncated: false,
        }
    }

    /// Add bytes, dropping whatever goes past the cap.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let room = self.cap - self.data.len();
        if bytes.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

/// How often the runner looks at the child and the job's cancel flag.
const POLL_MS: i32 = 5;
/// After the program exited and its group was killed, how long to keep
/// reading output that something outside the group may still hold open.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// One end of a pipe to the child that we still read from or write to.
struct Pipe<T> {
    file: T,
    open: bool,
}

/// Run a child to completion: spawn it in its own process group, feed
/// stdin, capture capped output, and kill the whole group with SIGKILL when
/// `stop()` turns true (poll every few ms) or the deadline passes. When the
/// program exits by itself, what is left in its group is killed as well, so
/// no process of the job survives it. Blocks the calling (pool) thread.
/// The group is on record (`kinds::exec_groups`) while it runs, when the
/// daemon set a recorder up at start-up.
pub(crate) fn run_child(
    spec: &ChildSpec,
    stop: &dyn Fn() -> bool,
) -> Result<ChildOutput, RunError> {
    run_child_recorded(spec, stop, exec_groups::recorder())
}

/// `run_child` with the recorder to use (`None`: no record).
fn run_child_recorded(
    spec: &ChildSpec,
    stop: &dyn Fn() -> bool,
    recorder: Option<&Recorder>,
) -> Result<ChildOutput, RunError> {
    let mut cmd = Command::new(&spec.program);
    if let Some((name, rest)) = spec.argv.split_first() {
        cmd.arg0(name).args(rest);
    }
    cmd.env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    // Recorded before the fork, so the child can tell whether the daemon
    // died before it asked to die with it.
    let daemon_pid = std::process::id() as libc::pid_t;
    // A `pre_exec` makes std fork instead of using posix_spawn (vfork):
    // the fork copies the daemon's page tables, which costs about 5 ms per
    // 100 MiB of its anonymous memory (measured on 2 cores; jobd idles at
    // ~1 MiB, where the difference is lost in the noise).
    // The child writes its group's record itself, after the fork and before
    // exec: so the record exists before the program can start anything.
    let record = recorder.map(Recorder::prepare);
    let in_child = record.clone();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: `die_with_daemon` makes two
    // system calls, `write_in_child` a few (open, read, write, close,
    // getpid) on stack buffers; neither allocates.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            die_with_daemon(daemon_pid)?;
            match &in_child {
                Some(r) => r.write_in_child(),
                None => Ok(()),
            }
        });
    }
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let program = spec.program.display();
            let msg = match (&record, recorder) {
                (Some(r), Some(rec)) if !r.is_complete() => format!(
                    "cannot run {program}: recording its process group in {} failed: {e}",
                    rec.dir().display()
                ),
                _ => format!("cannot run {program}: {e}"),
            };
            // std reaped the child: its group is gone, and so goes its record.
            if let Some(r) = &record {
                r.remove();
            }
            return Err(RunError::Spawn(msg));
        }
    };
    // The child is the leader of a new group whose id is its pid.
    let pid = child.id() as libc::pid_t;
    // Whatever happens below, the group must not outlive this call, nor
    // its record the group.
    let group = GroupGuard { pgid: pid, record };

    let mut stdin = child.stdin.take().map(|f| Pipe {
        file: f,
        open: true,
    });
    let mut stdin_bytes: &[u8] = spec.stdin.as_deref().unwrap_or(&[]);
    let mut out = child.stdout.take().map(|f| Pipe {
        file: f,
        open: true,
    });
    let mut err = child.stderr.take().map(|f| Pipe {
        file: f,
        open: true,
    });
    for fd in [
        stdin.as_ref().map(|p| p.file.as_raw_fd()),
        out.as_ref().map(|p| p.file.as_raw_fd()),
        err.as_ref().map(|p| p.file.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        set_nonblocking(fd).map_err(|e| RunError::Io(format!("pipe setup failed: {e}")))?;
    }
    let mut out_buf = CappedBuf::new(spec.max_output_bytes);
    let mut err_buf = CappedBuf::new(spec.max_output_bytes);
    let mut chunk = vec![0u8; 64 * 1024];

    let mut exited_at: Option<Instant> = None;
    let mut stopped = false;
    loop {
        // 1. Has the leader exited? (Not reaped yet, so its pid, which is
        //    the group id, cannot be reused while we kill the group.)
        if exited_at.is_none() && leader_exited(pid) {
            group.kill();
            exited_at = Some(Instant::now());
        }
        // 2. Cancelled or past the deadline: kill the whole group.
        if exited_at.is_none()
            && !stopped
            && (stop() || spec.deadline.is_some_and(|d| Instant::now() >= d))
        {
            group.kill();
            stopped = true;
        }
        if stopped && let Some(p) = &mut stdin {
            p.open = false;
        }
        let streams_open =
            out.as_ref().is_some_and(|p| p.open) || err.as_ref().is_some_and(|p| p.open);
        if let Some(t) = exited_at
            && (!streams_open || t.elapsed() >= DRAIN_GRACE)
        {
            break;
        }
        // 3. Wait for I/O or the next tick.
        let mut fds = Vec::with_capacity(3);
        if let Some(p) = &stdin
            && p.open
        {
            fds.push(pollfd(p.file.as_raw_fd(), libc::POLLOUT));
        }
        if let Some(p) = &out
            && p.open
        {
            fds.push(pollfd(p.file.as_raw_fd(), libc::POLLIN));
        }
        if let Some(p) = &err
            && p.open
        {
            fds.push(pollfd(p.file.as_raw_fd(), libc::POLLIN));
        }
        poll(&mut fds, POLL_MS);
        // 4. Move bytes (non-blocking; errors other than WouldBlock close
        //    that stream, which is all we can do about them).
        if let Some(p) = &mut stdin
            && p.open
        {
            feed(p, &mut stdin_bytes);
        }
        if let Some(p) = &mut out {
            drain(p, &mut out_buf, &mut chunk);
        }
        if let Some(p) = &mut err {
            drain(p, &mut err_buf, &mut chunk);
        }
        if let Some(p) = &stdin
            && !p.open
        {
            // Closing our end gives the child EOF.
            stdin = None;
        }
    }
    // The group was killed when the leader's exit was seen, while the
    // leader was still unreaped: it is done, and no kill may follow the
    // reaping below (the number could then name another group).
    group.release();
    let status = child
        .wait()
        .map_err(|e| RunError::Io(format!("cannot wait for the program: {e}")))?;
    let duration = started.elapsed();
    if stopped {
        return Err(RunError::Stopped);
    }
    Ok(ChildOutput {
        exit_code: status.code(),
        signal: status.signal(),
        truncated: out_buf.truncated || err_buf.truncated,
        stdout: out_buf.data,
        stderr: err_buf.data,
        duration,
    })
}

/// In the forked child, before exec: have the kernel SIGKILL this process
/// when its parent thread (the pool worker that forked it) exits, which
/// includes the daemon dying by SIGKILL, a crash or an OOM kill; then exit
/// at once if the daemon already died between the fork and the `prctl`
/// (the child would have been re-parented, so `getppid` changed).
///
/// The signal is tied to the forking *thread*, not the process. That is
/// safe here because a worker thread is inside `run_child` until the child
/// is reaped: a pool resized down retires a worker only after its current
/// job, so no thread exits while its child runs. The setting survives
/// `execve`, except into a set-user-ID or set-group-ID program or one with
/// file capabilities, which the kernel resets; it is not inherited by the
/// program's own children.
fn die_with_daemon(daemon_pid: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl(2) and getppid(2) take integers and touch no memory of
    // ours; both are async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        let sig = libc::SIGKILL as libc::c_ulong;
        if libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != daemon_pid {
            // Nobody is left to read this error; the child just ends.
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// Write what the pipe takes now; close it when done or when the child
/// closed its end (EPIPE: it does not want the rest).
fn feed(p: &mut Pipe<std::process::ChildStdin>, rest: &mut &[u8]) {
    while !rest.is_empty() {
        match p.file.write(rest) {
            Ok(0) => break,
            Ok(n) => *rest = &rest[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    p.open = false;
}

/// Read everything available now into `buf`; mark the pipe closed at EOF.
fn drain<R: Read>(p: &mut Pipe<R>, buf: &mut CappedBuf, chunk: &mut [u8]) {
    while p.open {
        match p.file.read(chunk) {
            Ok(0) => p.open = false,
            Ok(n) => buf.push(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => p.open = false,
        }
    }
}

/// Kills the process group on `kill()` and again when dropped unless
/// released (so also on a panic or an early return), so no member outlives
/// `run_child`; then removes the group's record.
struct GroupGuard {
    /// The group: the child's pid.
    pgid: libc::pid_t,
    /// Its record, removed once the group is killed.
    record: Option<PendingRecord>,
}

impl GroupGuard {
    fn kill(&self) {
        kill_group(self.pgid);
    }

    /// The group has been killed for good: remove its record and signal
    /// nothing more.
    fn release(mut self) {
        if let Some(r) = self.record.take() {
            r.remove();
        }
        // Drop then finds no group to kill (`kill_group` ignores ids <= 1).
        self.pgid = 0;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.pgid);
        // Every member now has SIGKILL pending (and cannot fork): the
        // group is as good as gone, so is the need for its record.
        if let Some(r) = self.record.take() {
            r.remove();
        }
    }
}

/// SIGKILL every process of group `pgid`. ESRCH (none left) is fine.
pub(crate) fn kill_group(pgid: libc::pid_t) {
    if pgid <= 1 {
        // Never signal "every process" (-1) or our own group (0).
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// True when the child `pid` has exited; leaves it unreaped (`WNOWAIT`), so
/// its pid stays reserved and `-pid` still names its group.
fn leader_exited(pid: libc::pid_t) -> bool {
    // SAFETY: siginfo_t is plain data for which all-zero bytes is valid;
    // waitid writes into it and reads nothing else of ours.
    #[allow(unsafe_code)]
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        // With WNOHANG, si_pid stays 0 while the child is running. An error
        // (ECHILD) means it is gone already: treat as exited.
        r != 0 || info.si_pid() != 0
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// poll(2) with a timeout in ms; with no fds it just sleeps. Errors (EINTR)
/// only shorten the wait, which the caller's loop tolerates.
fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) {
    if fds.is_empty() {
        std::thread::sleep(Duration::from_millis(timeout_ms as u64));
        return;
    }
    // SAFETY: the pointer and length describe a live, exclusively borrowed
    // slice of pollfd for the duration of the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms);
    }
}

fn set_nonblocking(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    #[allow(unsafe_code)]
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str]) -> ChildSpec {
        ChildSpec {
            program: PathBuf::from(argv[0]),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: None,
            stdin: None,
            max_output_bytes: 1024,
            deadline: Some(Instant::now() + Duration::from_secs(20)),
        }
    }

    fn never() -> bool {
        false
    }

    #[test]
    fn capped_buf_keeps_the_first_bytes_and_flags_the_rest() {
        let mut b = CappedBuf::new(5);
        b.push(b"abc");
        assert!(!b.truncated);
        b.push(b"defg");
        assert_eq!(b.data, b"abcde");
        assert!(b.truncated);
        b.push(b"h");
        assert_eq!(b.data, b"abcde");
        let mut exact = CappedBuf::new(3);
        exact.push(b"xyz");
        assert!(!exact.truncated);
    }

    #[test]
    fn allow_list_needs_absolute_listed_programs() {
        let allow = vec![PathBuf::from("/bin/echo")];
        let resolved = check_allowed("/bin/echo", &allow).unwrap();
        assert_eq!(resolved, Path::new("/bin/echo").canonicalize().unwrap());
        let e = check_allowed("/bin/cat", &allow).unwrap_err();
        assert!(e.contains("'/bin/cat'") && e.contains("allow list"), "{e}");
        let e = check_allowed("echo", &allow).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = check_allowed("/no/such/prog", &allow).unwrap_err();
        assert!(e.contains("/no/such/prog"), "{e}");
        assert!(check_allowed("/bin/echo", &[]).is_err());
        // A relative allow entry never matches.
        assert!(check_allowed("/bin/echo", &[PathBuf::from("bin/echo")]).is_err());
    }

    #[test]
    fn allow_list_compares_after_resolving_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("my-echo");
        std::os::unix::fs::symlink("/bin/echo", &link).unwrap();
        let real = Path::new("/bin/echo").canonicalize().unwrap();
        // Allowing the real program allows a link to it, and vice versa.
        assert_eq!(
            check_allowed(link.to_str().unwrap(), std::slice::from_ref(&real)).unwrap(),
            real
        );
        assert!(check_allowed("/bin/echo", std::slice::from_ref(&link)).is_ok());
        // A path with `..` that lands elsewhere is refused.
        let sneaky = format!("{}/../../bin/cat", dir.path().display());
        assert!(check_allowed(&sneaky, &[link]).is_err());
    }

    #[test]
    fn env_names_that_load_code_are_refused() {
        assert!(check_env_name("LANG").is_ok());
        assert!(check_env_name("LD_PRELOAD").is_err());
        assert!(check_env_name("A=B").is_err());
        assert!(check_env_name("").is_err());
    }

    #[test]
    fn runs_a_program_and_captures_both_streams() {
        let mut s = spec(&["/bin/sh", "-c", "printf out; printf err >&2; exit 0"]);
        s.stdin = None;
        let out = run_child(&s, &never).unwrap();
        assert_eq!(out.exit_code, Some(0));
        assert_eq!(out.stdout, b"out");
        assert_eq!(out.stderr, b"err");
        assert!(!out.truncated);
    }

    #[test]
    fn feeds_stdin_and_clears_the_environment() {
        let mut s = spec(&["/bin/sh", "-c", "cat; echo \"[$HOME][$FOO]\""]);
        s.stdin = Some(b"hello\n".to_vec());
        s.env.push(("FOO".into(), "bar".into()));
        let out = run_child(&s, &never).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n[][bar]\n");
    }

    #[test]
    fn big_stdin_to_a_program_that_ignores_it_does_not_hang() {
        let mut s = spec(&["/bin/true"]);
        s.stdin = Some(vec![b'x'; 4 * 1024 * 1024]);
        let out = run_child(&s, &never).unwrap();
        assert_eq!(out.exit_code, Some(0));
    }

    #[test]
    fn output_beyond_the_cap_is_read_and_dropped() {
        // 2 MiB on stdout would block the child on a full pipe if we
        // stopped reading at the cap.
        let mut s = spec(&["/bin/sh", "-c", "head -c 2097152 /dev/zero; echo done >&2"]);
        s.max_output_bytes = 1000;
        let out = run_child(&s, &never).unwrap();
        assert_eq!(out.exit_code, Some(0));
        assert_eq!(out.stdout.len(), 1000);
        assert_eq!(out.stderr, b"done\n");
        assert!(out.truncated);
    }

    #[test]
    fn non_zero_exit_fails_with_code_and_stderr() {
        let s = spec(&["/bin/sh", "-c", "echo boom >&2; exit 3"]);
        let out = run_child(&s, &never).unwrap();
        assert_eq!(out.exit_code, Some(3));
        let e = out.into_result().unwrap_err();
        assert!(e.contains("code 3") && e.contains("boom"), "{e}");
        let ok = run_child(&spec(&["/bin/echo", "hi"]), &never)
            .unwrap()
            .into_result()
            .unwrap();
        assert_eq!(ok["exit_code"], 0);
        assert_eq!(ok["stdout"], "hi\n");
        assert_eq!(ok["truncated"], false);
    }

    /// True when `pid` is gone or a zombie within 5 s (zombies count as
    /// dead: the container's init may never reap them).
    fn dies_soon(pid: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim().to_string()));
            match state {
                None => return true,
                Some(r) if r.starts_with('Z') || r.starts_with('X') => return true,
                Some(_) if Instant::now() > deadline => return false,
                Some(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    #[test]
    fn a_child_dies_when_the_thread_that_forked_it_exits() {
        // What happens to a retired worker thread's child, and (the whole
        // process being a set of threads) to every child when jobd dies.
        let daemon_pid = std::process::id() as libc::pid_t;
        let mut child = std::thread::spawn(move || {
            let mut cmd = Command::new("/bin/sleep");
            cmd.arg("100");
            // SAFETY: as in run_child.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(move || die_with_daemon(daemon_pid));
            }
            cmd.spawn().unwrap()
        })
        .join()
        .unwrap();
        let died = dies_soon(child.id());
        if !died {
            let _ = child.kill();
        }
        // Reap it (it is still our child: the thread, not the process, died).
        let _ = child.wait();
        assert!(died, "the child outlived the thread that forked it");
    }

    #[test]
    fn a_child_whose_daemon_died_before_it_was_set_up_exits() {
        // A parent pid that is not ours stands for "the daemon died between
        // fork and prctl": the program must not start.
        let mut cmd = Command::new("/bin/echo");
        // SAFETY: as in run_child.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| die_with_daemon(1));
        }
        let e = cmd.output().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "{e}");
    }

    #[test]
    fn a_running_childs_group_is_on_record_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let groups = dir.path().join(exec_groups::GROUPS_DIR);
        let recorder = exec_groups::test_recorder(&groups);
        // The program prints its pid (= its group) and the records there
        // are while it runs.
        let script = format!("echo $$; cat {}/*", groups.display());
        let out = run_child_recorded(&spec(&["/bin/sh", "-c", &script]), &never, Some(&recorder))
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (pid, record) = text.split_once('\n').unwrap();
        assert!(record.starts_with("jobd exec group 1\n"), "{text}");
        assert!(record.contains(&format!("\ngroup {pid} ")), "{text}");
        assert_eq!(std::fs::read_dir(&groups).unwrap().count(), 0);

        // A program that cannot start leaves no record behind.
        let e = run_child_recorded(&spec(&["/no/such/program"]), &never, Some(&recorder));
        assert!(matches!(e, Err(RunError::Spawn(ref m)) if m.contains("/no/such/program")));
        assert_eq!(std::fs::read_dir(&groups).unwrap().count(), 0);

        // No record, no program.
        std::fs::remove_dir(&groups).unwrap();
        let mark = dir.path().join("ran");
        let script = format!("touch {}", mark.display());
        let e = run_child_recorded(&spec(&["/bin/sh", "-c", &script]), &never, Some(&recorder))
            .unwrap_err();
        assert!(
            matches!(e, RunError::Spawn(ref m) if m.contains("recording its process group")),
            "{e:?}"
        );
        assert!(!mark.exists());
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let e = run_child(&spec(&["/no/such/program"]), &never).unwrap_err();
        assert!(matches!(e, RunError::Spawn(ref m) if m.contains("/no/such/program")));
    }

    /// Live (not zombie) processes whose process group is `pgid`, from /proc.
    pub(crate) fn live_group_members(pgid: i32) -> Vec<i32> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the parenthesised command: state ppid pgrp ...
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z" && f[0] != "X" {
                found.push(pid);
            }
        }
        found
    }

    /// True while a live process of group `pgid` exists after 5 s of
    /// polling (SIGKILL is delivered asynchronously).
    fn group_alive(pgid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if live_group_members(pgid).is_empty() {
                return false;
            }
            if Instant::now() > deadline {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn live_group_members_sees_a_running_group() {
        let mut child = Command::new("/bin/sleep")
            .arg("100")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        assert_eq!(live_group_members(pgid), [pgid]);
        kill_group(pgid);
        child.wait().unwrap();
        assert!(!group_alive(pgid));
    }

    /// Run a shell that starts `sleep 1000` in the background and reports
    /// the pgid, with the given deadline/stop; return (result, pgid).
    fn run_with_grandchild(
        deadline: Option<Instant>,
        stop: &dyn Fn() -> bool,
    ) -> (Result<ChildOutput, RunError>, i32) {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pgid");
        let script = format!("sleep 1000 & echo $$ > {}; wait", pidfile.display());
        let mut s = spec(&["/bin/sh", "-c", &script]);
        s.deadline = deadline;
        let r = run_child(&s, stop);
        let pgid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (r, pgid)
    }

    #[test]
    fn deadline_kills_the_whole_group() {
        let t0 = Instant::now();
        let (r, pgid) =
            run_with_grandchild(Some(Instant::now() + Duration::from_millis(300)), &never);
        assert_eq!(r.unwrap_err(), RunError::Stopped);
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(!group_alive(pgid), "a process of group {pgid} survived");
    }

    #[test]
    fn stop_kills_the_whole_group() {
        let t0 = Instant::now();
        let stop = move || t0.elapsed() > Duration::from_millis(300);
        let (r, pgid) = run_with_grandchild(None, &stop);
        assert_eq!(r.unwrap_err(), RunError::Stopped);
        assert!(!group_alive(pgid), "a process of group {pgid} survived");
    }

    #[test]
    fn leftovers_are_killed_when_the_program_exits() {
        // The shell exits at once, leaving `sleep` holding stdout open.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pgid");
        let script = format!("sleep 1000 & echo $$ > {}; echo bye", pidfile.display());
        let t0 = Instant::now();
        let out = run_child(&spec(&["/bin/sh", "-c", &script]), &never).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(out.stdout, b"bye\n");
        let pgid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!group_alive(pgid));
    }
}
