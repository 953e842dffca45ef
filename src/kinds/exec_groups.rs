//! Process groups of running exec children, recorded on disk, and the
//! start-up reaper that kills what a killed daemon left of them.
//!
//! Every program that `kinds::exec` runs (the `exec` kind and the command
//! kinds) leads a process group of its own. A daemon killed outright takes
//! that program along (`PR_SET_PDEATHSIG`), but not what the program started
//! itself. So while a child runs, a small file in `<state_dir>/exec-groups/`
//! names its group, and the next daemon started on the same state directory
//! kills whatever is left of the groups named there, before it runs any
//! job, and removes the files.
//!
//! One file per child, named `<daemon pid>-<n>`:
//!
//! ```text
//! jobd exec group 1
//! boot 0f4c…        (/proc/sys/kernel/random/boot_id)
//! daemon 4711 8812  (pid and start time of the daemon that wrote it)
//! session 4700      (the daemon's session, which the group is in)
//! group 4790 9120   (the group id = the child's pid, and its start time)
//! ```
//!
//! A start time is field 22 of `/proc/PID/stat` (clock ticks since boot);
//! with the pid it names one process for the life of a boot.
//!
//! **When it is written.** The forked child writes the file itself, in one
//! `write`, before it execs the program (`PendingRecord::write_in_child`):
//! so the record exists before the program can start anything, and a record
//! that was cut short means the program never ran. Having the child wait
//! until the *parent* wrote the file cannot work with
//! `std::process::Command`: `spawn` returns only once the child has exec'd,
//! so the parent would wait for the child and the child for the parent.
//! The daemon removes the file once it has killed the group.
//!
//! **What the reaper kills, and nothing else.** A group id is the pid of
//! the process that made the group, and the kernel hands out no pid that is
//! still in use as a group id. So group `<pgid>` is still the recorded one
//! unless the recorded group died out entirely and the number was given to
//! someone else later. A record leads to a SIGKILL of the group only when:
//! - it was written during this boot;
//! - the daemon that wrote it is gone (a daemon still running on the same
//!   state directory keeps its records);
//! - a process whose pid is `<pgid>`, if there is one (the leader, maybe a
//!   zombie), started at the recorded time;
//! - every live member of the group is in the recorded session (a group
//!   never spans sessions) and started no earlier than the leader.
//!
//! Otherwise the record is dropped without a signal. What these checks
//! cannot exclude is the recorded group dying out and its number being
//! reused within the microseconds between the check and the kill, which
//! takes a full wrap-around of the pid space.
//!
//! Here: the record format, writing it from the forked child (no
//! allocation, only async-signal-safe calls), removing it, and the reaper.
//! Not here: spawning children and killing their groups during a job
//! (`kinds::exec`).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The directory, inside the state directory, that holds the records.
pub const GROUPS_DIR: &str = "exec-groups";

/// First line of every record: the format and its version.
const MAGIC: &str = "jobd exec group 1";

/// Room for a whole record in the child (the shared lines are checked to
/// fit when the recorder is opened; the child adds at most ~50 bytes).
const RECORD_MAX: usize = 512;

/// The recorder of this daemon, set once at start-up by `start`. Unset
/// (unit tests, an application embedding the kinds without `start`), no
/// records are written.
static RECORDER: OnceLock<Recorder> = OnceLock::new();

/// The daemon's recorder, if `start` set one up.
pub(crate) fn recorder() -> Option<&'static Recorder> {
    RECORDER.get()
}

/// Daemon start-up, before any job runs: kill what a previous daemon on
/// this state directory left running of its exec jobs' process groups,
/// then, when `record` (exec or a command kind is configured), record the
/// groups of this daemon's children from now on. Problems are logged, never
/// fatal: without `/proc` or a writable state directory jobd runs as it
/// did before records existed.
pub fn start(state_dir: &Path, record: bool) {
    let dir = state_dir.join(GROUPS_DIR);
    let me = match Me::now() {
        Ok(me) => me,
        Err(e) => {
            tracing::warn!(
                "cannot read this process's identity from /proc ({e}): process groups \
                 of exec jobs are not recorded, and those a killed jobd left are not reaped"
            );
            return;
        }
    };
    match reap(&dir, &me) {
        Ok(outcomes) => log_outcomes(&dir, &outcomes),
        Err(e) => tracing::warn!(
            dir = %dir.display(),
            "cannot read the records of exec process groups: {e}; \
             none that a killed jobd left were reaped"
        ),
    }
    if record {
        match Recorder::open(&dir, &me) {
            Ok(r) => {
                // `start` runs once per process; a second call keeps the first.
                let _ = RECORDER.set(r);
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                "cannot record the process groups of exec jobs: {e}; \
                 if jobd is killed, what their programs started keeps running"
            ),
        }
    }
}

/// One log line per group killed (warn: something outlived a daemon), one
/// summary line.
fn log_outcomes(dir: &Path, outcomes: &[(String, Outcome)]) {
    let (mut killed, mut dropped, mut kept) = (0, 0, 0);
    for (name, o) in outcomes {
        match o {
            Outcome::Killed { pgid, processes } => {
                killed += 1;
                tracing::warn!(
                    pgid,
                    processes,
                    "killed a process group of an exec job that a previous jobd left running"
                );
            }
            Outcome::Dropped(why) => {
                dropped += 1;
                tracing::debug!(record = %name, "exec group record removed without a signal: {why}");
            }
            Outcome::Kept(why) => {
                kept += 1;
                tracing::info!(record = %name, "exec group record kept: {why}");
            }
            Outcome::Failed(e) => {
                tracing::warn!(record = %name, "exec group record: {e}");
            }
        }
    }
    if !outcomes.is_empty() {
        tracing::info!(
            dir = %dir.display(),
            "exec process groups of a previous jobd: {killed} killed, {dropped} already \
             ended (or their ids reused), {kept} kept"
        );
    }
}

/// The fields of `/proc/PID/stat` the records need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    /// State letter (`R`, `S`, `Z`, …).
    state: u8,
    /// Process group id.
    pgrp: i32,
    /// Session id.
    session: i32,
    /// Start time, in clock ticks since boot.
    start: u64,
}

impl ProcStat {
    /// A zombie (or dead) process: it runs nothing any more, only its pid
    /// (and so its group id) stays taken until it is reaped.
    fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parse `/proc/PID/stat`. Allocates nothing, so the forked child can use
/// it. The command name (field 2) is in parentheses and may hold anything,
/// `)` and spaces too; the fields after the last `)` are plain.
fn parse_stat(text: &[u8]) -> Option<ProcStat> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let mut fields = text[close + 1..]
        .split(|&b| b == b' ' || b == b'\n')
        .filter(|f| !f.is_empty());
    // Fields 3 (state), 4 (ppid), 5 (pgrp), 6 (session), …, 22 (start).
    let state = *fields.next()?.first()?;
    let _ppid = fields.next()?;
    let pgrp = i32::try_from(parse_u64(fields.next()?)?).ok()?;
    let session = i32::try_from(parse_u64(fields.next()?)?).ok()?;
    let start = parse_u64(fields.nth(22 - 7)?)?;
    Some(ProcStat {
        state,
        pgrp,
        session,
        start,
    })
}

/// A decimal number of plain digits, without allocating.
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
    })
}

/// `/proc/PID/stat` of one process, if it exists.
fn proc_stat(pid: i32) -> Option<ProcStat> {
    std::fs::read(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|b| parse_stat(&b))
}

/// Every process in `/proc` now (those that vanish meanwhile are skipped).
fn all_processes() -> io::Result<HashMap<i32, ProcStat>> {
    let mut procs = HashMap::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok())
            && let Some(stat) = proc_stat(pid)
        {
            procs.insert(pid, stat);
        }
    }
    Ok(procs)
}

/// What records are compared with: this boot and this daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Me {
    /// `/proc/sys/kernel/random/boot_id`: differs after every boot.
    boot: String,
    /// This process.
    pid: i32,
    /// Its start time.
    start: u64,
    /// Its session, which its children (and their groups) share.
    session: i32,
}

impl Me {
    /// Read from /proc.
    fn now() -> io::Result<Me> {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
            .trim()
            .to_string();
        if boot.is_empty() || boot.contains(char::is_whitespace) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "odd boot_id"));
        }
        let pid = std::process::id() as i32;
        let stat = std::fs::read("/proc/self/stat")?;
        let stat = parse_stat(&stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "odd /proc/self/stat"))?;
        // SAFETY: getsid(0) takes an integer and reads nothing of ours.
        #[allow(unsafe_code)]
        let session = unsafe { libc::getsid(0) };
        if session < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Me {
            boot,
            pid,
            start: stat.start,
            session,
        })
    }
}

/// One record, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// Boot id when it was written.
    boot: String,
    /// The daemon that wrote it.
    daemon_pid: i32,
    /// That daemon's start time.
    daemon_start: u64,
    /// That daemon's session, and the group's.
    session: i32,
    /// The group id, which is the pid of its leader (the exec child).
    pgid: i32,
    /// The leader's start time.
    leader_start: u64,
}

impl Record {
    /// The lines every record of daemon `me` shares (all but `group`).
    fn shared_lines(me: &Me) -> String {
        format!(
            "{MAGIC}\nboot {}\ndaemon {} {}\nsession {}\n",
            me.boot, me.pid, me.start, me.session
        )
    }

    /// Parse a whole record; `None` for anything else (a record cut short
    /// included).
    fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let mut field = |key: &str| {
            let line = lines.next()?;
            let rest = line.strip_prefix(key)?.strip_prefix(' ')?;
            Some(rest.split(' ').collect::<Vec<_>>())
        };
        let boot = field("boot")?;
        let daemon = field("daemon")?;
        let session = field("session")?;
        let group = field("group")?;
        let (&[boot], &[dpid, dstart], &[sid], &[pgid, gstart]) =
            (&boot[..], &daemon[..], &session[..], &group[..])
        else {
            return None;
        };
        let r = Record {
            boot: boot.to_string(),
            daemon_pid: dpid.parse().ok()?,
            daemon_start: dstart.parse().ok()?,
            session: sid.parse().ok()?,
            pgid: pgid.parse().ok()?,
            leader_start: gstart.parse().ok()?,
        };
        // Never a group id that kill(2) reads as "all" or "ours".
        (r.pgid > 1 && !r.boot.is_empty() && text.ends_with('\n') && lines.next().is_none())
            .then_some(r)
    }
}

/// What to do about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Its group is the recorded one and has live members: SIGKILL it.
    Kill {
        /// Live members seen.
        processes: usize,
    },
    /// Remove the record, signal nothing.
    Drop(&'static str),
    /// Leave the record alone.
    Keep(&'static str),
}

/// Decide about `rec` from a snapshot of every process (see the module
/// comment for the rules).
fn judge(rec: &Record, me: &Me, procs: &HashMap<i32, ProcStat>) -> Verdict {
    if rec.boot != me.boot {
        return Verdict::Drop("written before the last boot");
    }
    if rec.daemon_pid == me.pid && rec.daemon_start == me.start {
        return Verdict::Keep("written by this daemon");
    }
    if let Some(d) = procs.get(&rec.daemon_pid)
        && d.start == rec.daemon_start
        && !d.is_dead()
    {
        return Verdict::Keep("the daemon that wrote it is still running");
    }
    if let Some(leader) = procs.get(&rec.pgid)
        && leader.start != rec.leader_start
    {
        return Verdict::Drop("its group ended: the id belongs to another process now");
    }
    let members: Vec<&ProcStat> = procs
        .values()
        .filter(|p| p.pgrp == rec.pgid && !p.is_dead())
        .collect();
    if members.is_empty() {
        return Verdict::Drop("nothing of its group is left");
    }
    if members
        .iter()
        .any(|p| p.session != rec.session || p.start < rec.leader_start)
    {
        return Verdict::Drop("its group ended: the id belongs to another group now");
    }
    Verdict::Kill {
        processes: members.len(),
    }
}

/// What the reaper did with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The group got SIGKILL; the record is removed.
    Killed {
        /// The group id.
        pgid: i32,
        /// Live members it had.
        processes: usize,
    },
    /// Removed without a signal, and why.
    Dropped(&'static str),
    /// Left in place, and why.
    Kept(&'static str),
    /// Something failed (a kill or a removal).
    Failed(String),
}

/// `(daemon pid, n)` from a record's file name `<daemon pid>-<n>`.
fn parse_name(name: &str) -> Option<(i32, u64)> {
    let (pid, n) = name.split_once('-')?;
    Some((pid.parse().ok()?, n.parse().ok()?))
}

/// Go through every record in `dir` (a missing `dir` has none) and act on
/// it; files whose names are not records' are left alone.
fn reap(dir: &Path, me: &Me) -> io::Result<Vec<(String, Outcome)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| parse_name(n).is_some())
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    names.sort();
    let procs = all_processes()?;
    let mut outcomes = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                outcomes.push((name, Outcome::Failed(format!("cannot read it: {e}"))));
                continue;
            }
        };
        let outcome = match Record::parse(&text) {
            None => unreadable(&name, me, &procs),
            Some(rec) => match judge(&rec, me, &procs) {
                Verdict::Keep(why) => Outcome::Kept(why),
                Verdict::Drop(why) => Outcome::Dropped(why),
                Verdict::Kill { processes } => match kill_group(rec.pgid) {
                    Ok(true) => Outcome::Killed {
                        pgid: rec.pgid,
                        processes,
                    },
                    Ok(false) => Outcome::Dropped("nothing of its group is left"),
                    // Retrying at every start would not help (EPERM: the
                    // members changed user); the warning is what is left.
                    Err(e) => {
                        Outcome::Failed(format!("cannot kill process group {}: {e}", rec.pgid))
                    }
                },
            },
        };
        let outcome = match outcome {
            Outcome::Kept(_) => outcome,
            done => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Outcome::Failed(format!("cannot remove it: {e}"))
                }
                _ => done,
            },
        };
        outcomes.push((name, outcome));
    }
    Ok(outcomes)
}

/// A record that does not parse: written by a child killed half-way (its
/// program never started), so it is removed; unless the daemon its name
/// names may still be running and its child be writing it right now.
fn unreadable(name: &str, me: &Me, procs: &HashMap<i32, ProcStat>) -> Outcome {
    match parse_name(name) {
        Some((pid, _)) if pid != me.pid && procs.get(&pid).is_some_and(|p| !p.is_dead()) => {
            Outcome::Kept("unreadable, and a process with its daemon's pid is running")
        }
        _ => Outcome::Dropped("unreadable: its program never started"),
    }
}

/// SIGKILL group `pgid`: `Ok(true)` when it had members, `Ok(false)` when
/// none were left (ESRCH).
fn kill_group(pgid: i32) -> io::Result<bool> {
    if pgid <= 1 {
        return Ok(false);
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let r = unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Where this daemon records its children's groups: the open directory and
/// the lines every record shares.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// The records directory.
    dir: PathBuf,
    /// The same, open: the child writes relative to it (`openat`), so it
    /// needs no path buffer of its own.
    dir_fd: Arc<OwnedFd>,
    /// `Record::shared_lines` of this daemon, as bytes.
    shared: Arc<[u8]>,
    /// This daemon's pid, first part of every file name.
    daemon_pid: i32,
    /// Second part of the next file name.
    next: AtomicU64,
}

impl Recorder {
    /// Create `dir` (mode 0700) if needed and open it.
    fn open(dir: &Path, me: &Me) -> io::Result<Recorder> {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            r => r?,
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir)?;
        let shared = Record::shared_lines(me).into_bytes();
        if shared.len() + 64 > RECORD_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "record too long",
            ));
        }
        Ok(Recorder {
            dir: dir.to_path_buf(),
            dir_fd: Arc::new(OwnedFd::from(file)),
            shared: shared.into(),
            daemon_pid: me.pid,
            next: AtomicU64::new(1),
        })
    }

    /// The record for the next child, before its fork.
    pub(crate) fn prepare(&self) -> PendingRecord {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{n}", self.daemon_pid);
        PendingRecord {
            dir_fd: self.dir_fd.clone(),
            path: self.dir.join(&name),
            // Invariant: digits and '-' contain no NUL byte.
            name: CString::new(name).expect("a record name has no NUL byte"),
            shared: self.shared.clone(),
        }
    }

    /// The records directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// One child's record: prepared before the fork, written by the child,
/// removed by the parent once the group is gone.
#[derive(Debug, Clone)]
pub(crate) struct PendingRecord {
    /// The records directory, open.
    dir_fd: Arc<OwnedFd>,
    /// File name inside it.
    name: CString,
    /// Full path, for the parent.
    path: PathBuf,
    /// The lines all records of this daemon share.
    shared: Arc<[u8]>,
}

impl PendingRecord {
    /// In the forked child, before exec: write the whole record (shared
    /// lines, then `group <own pid> <own start time>`) in one `write`.
    ///
    /// Only async-signal-safe calls (open, read, write, close, getpid) on
    /// stack buffers; nothing is allocated.
    pub(crate) fn write_in_child(&self) -> io::Result<()> {
        let mut stat = [0u8; 1024];
        let n = read_self_stat(&mut stat)?;
        let Some(me) = parse_stat(&stat[..n]) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: getpid has no preconditions and cannot fail.
        #[allow(unsafe_code)]
        let pid = unsafe { libc::getpid() };
        let mut buf = [0u8; RECORD_MAX];
        let mut len = 0;
        let fits = put(&mut buf, &mut len, &self.shared)
            && put(&mut buf, &mut len, b"group ")
            && put_u64(&mut buf, &mut len, pid as u64)
            && put(&mut buf, &mut len, b" ")
            && put_u64(&mut buf, &mut len, me.start)
            && put(&mut buf, &mut len, b"\n");
        if !fits {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        write_file_at(self.dir_fd.as_raw_fd(), &self.name, &buf[..len])
    }

    /// True when the record is on disk and whole (after a failed spawn:
    /// the failure came after the recording).
    pub(crate) fn is_complete(&self) -> bool {
        std::fs::read_to_string(&self.path).is_ok_and(|t| Record::parse(&t).is_some())
    }

    /// Remove the record (call once the group is killed). A record that is
    /// not there is fine; a failure is logged (the next start drops it).
    pub(crate) fn remove(&self) {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => tracing::warn!(
                path = %self.path.display(),
                "cannot remove an exec group record: {e}"
            ),
            _ => {}
        }
    }
}

/// Append `bytes` to `buf` at `len`; false when they do not fit.
fn put(buf: &mut [u8], len: &mut usize, bytes: &[u8]) -> bool {
    let Some(dst) = buf.get_mut(*len..*len + bytes.len()) else {
        return false;
    };
    dst.copy_from_slice(bytes);
    *len += bytes.len();
    true
}

/// Append `v` in decimal, without allocating.
fn put_u64(buf: &mut [u8], len: &mut usize, mut v: u64) -> bool {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(buf, len, &digits[i..])
}

/// Read `/proc/self/stat` into `buf` (its start is all we need); the
/// number of bytes read.
fn read_self_stat(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the path is a NUL-terminated literal; read(2) writes into the
    // unfilled part of `buf` only, whose pointer and length describe it.
    #[allow(unsafe_code)]
    let fd = unsafe {
        libc::open(
            c"/proc/self/stat".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    let mut n = 0;
    let done = with_fd(fd, |fd| {
        while n < buf.len() {
            #[allow(unsafe_code)]
            let r = retry_eintr(|| unsafe {
                libc::read(fd, buf[n..].as_mut_ptr().cast(), buf.len() - n)
            })?;
            if r == 0 {
                break;
            }
            n += r;
        }
        Ok(())
    });
    done.map(|()| n)
}

/// Create (or truncate) `name` in directory `dir_fd` with mode 0600 and
/// write `bytes` to it.
fn write_file_at(dir_fd: i32, name: &CString, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; write(2)
    // reads only the part of `bytes` its pointer and length describe.
    #[allow(unsafe_code)]
    let fd = unsafe {
        libc::openat(
            dir_fd,
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600 as libc::c_uint,
        )
    };
    with_fd(fd, |fd| {
        let mut done = 0;
        while done < bytes.len() {
            #[allow(unsafe_code)]
            let r = retry_eintr(|| unsafe {
                libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done)
            })?;
            if r == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            done += r;
        }
        Ok(())
    })
}

/// Run `f` on a descriptor that `open` returned (`fd < 0`: the error it
/// set), then close it; a failed close is an error too. Allocates nothing
/// (it runs in the forked child).
fn with_fd(fd: i32, f: impl FnOnce(i32) -> io::Result<()>) -> io::Result<()> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let done = f(fd);
    // SAFETY: the descriptor is ours and closed once, here.
    #[allow(unsafe_code)]
    let closed = unsafe { libc::close(fd) };
    match done {
        Ok(()) if closed != 0 => Err(io::Error::last_os_error()),
        other => other,
    }
}

/// A read(2) or write(2), again while a signal interrupts it; the bytes it
/// moved.
fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let r = call();
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// A recorder on `dir` for this process, for tests of the runner.
#[cfg(test)]
pub(crate) fn test_recorder(dir: &Path) -> Recorder {
    Recorder::open(dir, &Me::now().expect("/proc")).expect("records dir")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    fn me() -> Me {
        Me::now().unwrap()
    }

    fn ps(state: u8, pgrp: i32, session: i32, start: u64) -> ProcStat {
        ProcStat {
            state,
            pgrp,
            session,
            start,
        }
    }

    impl Record {
        /// The text a child writes for this record.
        fn to_text(&self) -> String {
            format!(
                "{MAGIC}\nboot {}\ndaemon {} {}\nsession {}\ngroup {} {}\n",
                self.boot,
                self.daemon_pid,
                self.daemon_start,
                self.session,
                self.pgid,
                self.leader_start
            )
        }
    }

    /// A record of group `pgid` (leader started at `leader_start`) by a
    /// daemon that is gone: this process's pid with another start time.
    fn record(me: &Me, pgid: i32, leader_start: u64) -> Record {
        Record {
            boot: me.boot.clone(),
            daemon_pid: me.pid,
            daemon_start: me.start + 1,
            session: me.session,
            pgid,
            leader_start,
        }
    }

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = b"42 (a) b (c)) R 1 7 9 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 7\n";
        assert_eq!(parse_stat(line), Some(ps(b'R', 7, 9, 12345)));
        assert_eq!(parse_stat(b"42 (x) R 1 7"), None);
        assert_eq!(parse_stat(b"no parenthesis"), None);
        // Our own line: group and session as the kernel reports them.
        let own = proc_stat(std::process::id() as i32).unwrap();
        // SAFETY: getpgrp/getsid take no pointers.
        #[allow(unsafe_code)]
        let (pgrp, sid) = unsafe { (libc::getpgrp(), libc::getsid(0)) };
        assert_eq!((own.pgrp, own.session), (pgrp, sid));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b""), None);
    }

    #[test]
    fn a_written_record_reads_back_and_a_cut_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let groups = dir.path().join(GROUPS_DIR);
        let me = me();
        let rec = Recorder::open(&groups, &me).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&groups).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Called here rather than in a forked child, it records this process.
        let pending = rec.prepare();
        pending.write_in_child().unwrap();
        assert!(pending.is_complete());
        let text = std::fs::read_to_string(&pending.path).unwrap();
        let got = Record::parse(&text).unwrap();
        assert_eq!(
            got,
            Record {
                boot: me.boot.clone(),
                daemon_pid: me.pid,
                daemon_start: me.start,
                session: me.session,
                pgid: me.pid,
                leader_start: me.start,
            }
        );
        assert_eq!(got.to_text(), text);
        for cut in 0..text.len() {
            assert_eq!(Record::parse(&text[..cut]), None, "{:?}", &text[..cut]);
        }
        assert_eq!(Record::parse(&format!("{text}more\n")), None);
        // Names count up; remove takes the file away (twice is fine).
        assert_ne!(rec.prepare().path, pending.path);
        pending.remove();
        pending.remove();
        assert!(!pending.path.exists());
    }

    #[test]
    fn the_verdict_ties_a_group_to_its_record_or_leaves_it_alone() {
        let me = me();
        let (pgid, t, sid) = (5000, 700, me.session);
        let rec = record(&me, pgid, t);
        let judge_with =
            |procs: &[(i32, ProcStat)]| judge(&rec, &me, &procs.iter().copied().collect());

        // The leader (even a zombie) and a grandchild: ours.
        let leader = (pgid, ps(b'Z', pgid, sid, t));
        let member = (5001, ps(b'S', pgid, sid, t + 3));
        assert_eq!(
            judge_with(&[leader, member]),
            Verdict::Kill { processes: 1 }
        );
        // The leader reaped, a member left: still ours.
        assert_eq!(judge_with(&[member]), Verdict::Kill { processes: 1 });
        // Only zombies, or nothing: nothing to do.
        assert!(matches!(judge_with(&[leader]), Verdict::Drop(_)));
        assert!(matches!(judge_with(&[]), Verdict::Drop(_)));
        // A process with the group's pid that started at another time: reused.
        let other_leader = (pgid, ps(b'S', pgid, sid, t + 50));
        assert!(matches!(
            judge_with(&[other_leader, member]),
            Verdict::Drop(_)
        ));
        // Members that cannot be the recorded group's.
        let other_session = (5002, ps(b'S', pgid, sid + 1, t + 3));
        assert!(matches!(
            judge_with(&[member, other_session]),
            Verdict::Drop(_)
        ));
        let too_old = (5003, ps(b'S', pgid, sid, t - 1));
        assert!(matches!(judge_with(&[too_old]), Verdict::Drop(_)));
        // Written before a reboot: whatever runs now is not ours.
        let old_boot = Record {
            boot: "another-boot".into(),
            ..rec.clone()
        };
        let procs = [leader, member].into_iter().collect();
        assert!(matches!(judge(&old_boot, &me, &procs), Verdict::Drop(_)));
        // The daemon that wrote it still runs: its job is still running.
        let live = Record {
            daemon_pid: 4000,
            daemon_start: 10,
            ..rec.clone()
        };
        let daemon = (4000, ps(b'S', 4000, sid, 10));
        let procs = [daemon, leader, member].into_iter().collect();
        assert!(matches!(judge(&live, &me, &procs), Verdict::Keep(_)));
        // ... unless it is a zombie, or its pid now names another process.
        let zombie = (4000, ps(b'Z', 4000, sid, 10));
        let procs = [zombie, leader, member].into_iter().collect();
        assert_eq!(judge(&live, &me, &procs), Verdict::Kill { processes: 1 });
        let reused = (4000, ps(b'S', 4000, sid, 11));
        let procs = [reused, leader, member].into_iter().collect();
        assert_eq!(judge(&live, &me, &procs), Verdict::Kill { processes: 1 });
    }

    /// `sleep 100` leading a group of its own, and its start time.
    fn group_leader() -> (Child, i32, u64) {
        let child = Command::new("/bin/sleep")
            .arg("100")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = proc_stat(pid).unwrap().start;
        (child, pid, start)
    }

    /// Send SIGTERM to `child` and return the signal that ended it: SIGTERM
    /// when nothing killed it before, SIGKILL when the reaper did (a
    /// pending SIGKILL wins).
    fn end(mut child: Child) -> Option<i32> {
        // SAFETY: kill(2) on our own unreaped child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        child.wait().unwrap().signal()
    }

    fn write_record(dir: &Path, name: &str, rec: &Record) {
        std::fs::write(dir.join(name), rec.to_text()).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_reaper_kills_a_recorded_group_and_spares_a_reused_id() {
        let dir = tempfile::tempdir().unwrap();
        let me = me();
        let (ours, ours_pid, ours_start) = group_leader();
        let (reused, reused_pid, reused_start) = group_leader();
        write_record(dir.path(), "1-1", &record(&me, ours_pid, ours_start));
        // Same pid, another start time: the recorded group is long gone and
        // this process merely got its number.
        write_record(
            dir.path(),
            "1-2",
            &record(&me, reused_pid, reused_start + 1),
        );
        let out = reap(dir.path(), &me).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(
            out[0],
            (
                "1-1".to_string(),
                Outcome::Killed {
                    pgid: ours_pid,
                    processes: 1
                }
            )
        );
        assert!(matches!(out[1].1, Outcome::Dropped(_)), "{out:?}");
        assert_eq!(end(ours), Some(libc::SIGKILL));
        assert_eq!(
            end(reused),
            Some(libc::SIGTERM),
            "a process not on record was killed"
        );
        assert!(names(dir.path()).is_empty());
    }

    /// True when `pid` is gone or a zombie within 5 s.
    fn dies_soon(pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_stat(pid).is_some_and(|p| !p.is_dead()) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    #[test]
    fn the_reaper_kills_what_is_left_of_a_group_whose_leader_is_gone() {
        // A shell leads a group, starts `sleep` in it, then exits and is
        // reaped: the state a daemon's death leaves (the kernel killed the
        // leader, its grandchild lives on).
        let mut sh = Command::new("/bin/sh")
            .args(["-c", "/bin/sleep 100 & echo $!; read x"])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pgid = sh.id() as i32;
        let start = proc_stat(pgid).unwrap().start;
        let mut line = String::new();
        std::io::BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let sleep: i32 = line.trim().parse().unwrap();
        drop(sh.stdin.take());
        sh.wait().unwrap();
        assert!(proc_stat(pgid).is_none());
        assert_eq!(proc_stat(sleep).map(|p| p.pgrp), Some(pgid));

        let dir = tempfile::tempdir().unwrap();
        let me = me();
        // A record whose leader started later than the member cannot be its.
        write_record(dir.path(), "1-1", &record(&me, pgid, start + 1_000_000));
        let out = reap(dir.path(), &me).unwrap();
        assert!(matches!(out[0].1, Outcome::Dropped(_)), "{out:?}");
        assert!(proc_stat(sleep).is_some_and(|p| !p.is_dead()));

        write_record(dir.path(), "1-2", &record(&me, pgid, start));
        let out = reap(dir.path(), &me).unwrap();
        assert_eq!(
            out,
            [("1-2".to_string(), Outcome::Killed { pgid, processes: 1 })]
        );
        assert!(dies_soon(sleep), "the grandchild {sleep} survived");
    }

    #[test]
    fn the_reaper_keeps_records_of_a_running_daemon_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let me = me();
        let (child, pid, start) = group_leader();
        // Written by this (running) process; reaped by a "new daemon" that
        // differs from it.
        let live = Record {
            daemon_start: me.start,
            ..record(&me, pid, start)
        };
        write_record(dir.path(), "7-1", &live);
        let new_daemon = Me {
            start: me.start + 1,
            ..me.clone()
        };
        std::fs::write(dir.path().join("notes.txt"), "not a record").unwrap();
        // Cut short, by a daemon with our pid (a dead one, for the reaper).
        std::fs::write(dir.path().join(format!("{}-3", me.pid)), "jobd exec gr").unwrap();
        let out: HashMap<String, Outcome> =
            reap(dir.path(), &new_daemon).unwrap().into_iter().collect();
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            matches!(out[&format!("{}-3", me.pid)], Outcome::Dropped(_)),
            "{out:?}"
        );
        assert!(matches!(out["7-1"], Outcome::Kept(_)), "{out:?}");
        assert_eq!(end(child), Some(libc::SIGTERM));
        assert_eq!(names(dir.path()), ["7-1", "notes.txt"]);
        // No directory, no records.
        assert_eq!(reap(&dir.path().join("none"), &me).unwrap(), []);
    }
}
