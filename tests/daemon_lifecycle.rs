//! The daemon's life against the real binary: SIGTERM drain, socket
//! hygiene (stale socket replaced, live one refused, mode set), start-up
//! configuration errors and environment overrides, and the `[auth]`
//! allow-lists (by uid, and by supplementary group).

// The shared harness predates clippy's collapsible_if/manual_contains
// lints; it is not ours to change.
mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::{Client, Daemon, run_jobd, signal, wait_exit};
use serde_json::{Value, json};

fn rq(c: &mut Client, v: Value) -> Value {
    c.request(v).expect("request")
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::getuid()
    }
}

#[test]
fn sigterm_drains_running_jobs_answers_waiters_and_exits_zero() {
    let mut d = Daemon::start_with(
        "shutdown_timeout_secs = 20\n[pools.default]\nthreads = 2\n",
        &[],
    );
    let mut running = d.client();
    running
        .send_line(&json!({"id": "run", "op": "submit", "job": {"kind": "sleep", "payload": {"ms": 600}}, "wait": true}).to_string())
        .unwrap();
    let mut queued = d.client();
    queued
        .send_line(&json!({"id": "later", "op": "submit", "job": {"kind": "echo", "delay_ms": 60000}, "wait": true}).to_string())
        .unwrap();
    let mut other = d.client();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = rq(&mut other, json!({"op": "stats"}));
        if r["pools"]["default"]["running"] == 1 && r["pools"]["default"]["delayed"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "jobs never started: {r}");
        std::thread::sleep(Duration::from_millis(5));
    }

    signal(&d.child, libc::SIGTERM);

    // New requests get shutting_down (or, once the drain is over, a close).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match other.request(json!({"op": "hello"})) {
            Ok(r) if r["ok"] == true => {
                assert!(Instant::now() < deadline, "still taking requests");
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(r) if r.is_null() => break,
            Ok(r) => {
                assert_eq!(r["error"]["code"], "shutting_down", "{r}");
                break;
            }
            Err(_) => break,
        }
    }
    // The waiter of the job that could not start hears why.
    let r = queued.read().unwrap();
    assert_eq!(r["id"], "later");
    assert_eq!(r["error"]["code"], "shutting_down", "{r}");
    // The running job finishes and its waiter gets the result.
    let r = running.read().unwrap();
    assert_eq!(r["id"], "run");
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["result"]["interrupted"], false, "{r}");

    let status = wait_exit(&mut d.child, Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists(), "socket file left behind");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let mut d = Daemon::start();
    // A live daemon: a second one on the same socket refuses to start.
    let (status, err) = run_jobd("", &d.socket, &[], Duration::from_secs(20));
    let status = status.expect("second jobd kept running");
    assert!(!status.success());
    assert!(err.contains("already listening"), "{err}");
    rq(&mut d.client(), json!({"op": "hello"}));

    // Killed hard, it leaves its socket file behind; a new start replaces it.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let meta = std::fs::symlink_metadata(&d.socket).expect("socket file left by kill -9");
    assert!(meta.file_type().is_socket());
    d.restart(&[]);
    let r = rq(&mut d.client(), json!({"op": "hello"}));
    assert_eq!(r["ok"], true);
}

#[test]
fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobd.sock");
    std::fs::write(&path, "precious").unwrap();
    let (status, err) = run_jobd("", &path, &[], Duration::from_secs(20));
    assert!(!status.expect("jobd kept running").success());
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn the_socket_mode_is_set() {
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let d = Daemon::start_with("socket_mode = \"0600\"\n", &[]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn config_errors_stop_start_up_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let (status, err) = run_jobd(
        "max_conections = 5\n",
        &socket,
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(status.expect("jobd kept running").code(), Some(2), "{err}");
    assert!(err.contains("max_conections"), "{err}");
    assert!(err.contains("jobd.toml"), "{err}");

    let (status, err) = run_jobd(
        "[pools.io]\nthreads = \"many\"\n",
        &socket,
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(status.expect("jobd kept running").code(), Some(2), "{err}");
    assert!(err.contains("pools.io.threads"), "{err}");

    let (status, err) = run_jobd(
        "",
        &socket,
        &[("JOBD__MAX_CONNECTIONS", "lots")],
        Duration::from_secs(20),
    );
    assert_eq!(status.expect("jobd kept running").code(), Some(2), "{err}");
    assert!(
        err.contains("max_connections") && err.contains("environment"),
        "{err}"
    );
    assert!(!socket.exists());
}

#[test]
fn environment_overrides_the_file() {
    let d = Daemon::start_env(
        "[pools.default]\nthreads = 1\nmax_queued = 50\n",
        &[("JOBD__POOLS__DEFAULT__MAX_QUEUED", "2")],
    );
    let mut c = d.client();
    let s = rq(&mut c, json!({"op": "stats"}));
    assert_eq!(s["pools"]["default"]["max_queued"], 2, "{s}");
    assert_eq!(s["pools"]["default"]["threads"], 1, "{s}");
    // One running and two waiting fill the pool; the next is refused.
    for _ in 0..3 {
        let r = rq(
            &mut c,
            json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 30000}}}),
        );
        assert_eq!(r["ok"], true, "{r}");
    }
    let r = rq(&mut c, json!({"op": "submit", "job": {"kind": "echo"}}));
    assert_eq!(r["error"]["code"], "queue_full", "{r}");
}

#[test]
fn peers_off_the_allow_list_are_forbidden() {
    let d = Daemon::start_env("[auth]\nallow_uids = [4242424]\n", &[]);
    let mut c = d.client();
    for req in [
        json!({"id": 1, "op": "hello"}),
        json!({"id": 2, "op": "submit", "job": {"kind": "echo"}}),
        json!({"id": 3, "op": "nonsense"}),
    ] {
        let r = rq(&mut c, req.clone());
        assert_eq!(r["error"]["code"], "forbidden", "{req}: {r}");
        assert_eq!(r["id"], req["id"]);
    }
    let mut other = d.client();
    assert_eq!(
        rq(&mut other, json!({"op": "stats"}))["error"]["code"],
        "forbidden"
    );

    // Listed by uid: allowed.
    let d = Daemon::start_with(&format!("[auth]\nallow_uids = [{}]\n", uid()), &[]);
    let r = rq(
        &mut d.client(),
        json!({"op": "submit", "job": {"kind": "echo", "payload": 1}, "wait": true}),
    );
    assert_eq!(r["result"], 1, "{r}");
}

/// Run jobd with stderr on a pipe of ours until it listens, stop it, and
/// return its log lines. `journal`: set JOURNAL_STREAM to the pipe.
fn log_lines(extra: &[&str], journal: bool) -> Vec<String> {
    use std::io::BufRead;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let (reader, writer) = std::io::pipe().unwrap();
    let fd = std::os::fd::OwnedFd::from(reader.try_clone().unwrap());
    let meta = std::fs::File::from(fd).metadata().unwrap();
    let mut cmd = std::process::Command::new(common::jobd_bin());
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--durability", "memory", "--log-level", "info"])
        .args(extra)
        .env_remove("JOBD_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("JOBD_SOCKET")
        .stderr(writer);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // closes our copy of the pipe's writing end
    let mut lines = Vec::new();
    let mut r = std::io::BufReader::new(reader);
    let mut line = String::new();
    while r.read_line(&mut line).unwrap() > 0 {
        let listening = line.contains("listening on");
        lines.push(std::mem::take(&mut line));
        if listening {
            break;
        }
    }
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    while r.read_line(&mut line).unwrap() > 0 {
        lines.push(std::mem::take(&mut line));
    }
    lines
}

#[test]
fn logs_have_no_timestamps_under_journald_and_can_be_json() {
    let starts_with_time = |l: &String| l.len() > 4 && l[..4].chars().all(|c| c.is_ascii_digit());
    let plain = log_lines(&[], false);
    assert!(
        plain.iter().any(|l| l.contains("listening on")),
        "{plain:?}"
    );
    assert!(plain.iter().all(starts_with_time), "{plain:?}");
    assert!(
        plain.iter().all(|l| !l.contains('\u{1b}')),
        "ANSI codes on a pipe: {plain:?}"
    );

    let journal = log_lines(&[], true);
    assert!(
        journal.iter().any(|l| l.contains("listening on")),
        "{journal:?}"
    );
    assert!(!journal.iter().any(starts_with_time), "{journal:?}");

    let json = log_lines(&["--log-format", "json"], false);
    assert!(json.len() >= 2, "{json:?}");
    for l in &json {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
}

#[test]
fn a_durable_daemon_keeps_jobs_across_a_kill() {
    let mut d = Daemon::start_with("", &["--durability", "os"]);
    let mut c = d.client();
    let done = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo", "payload": "kept"}, "wait": true}),
    );
    let later = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo", "delay_ms": 600000}}),
    );
    assert!(d.state_dir.join("jobs.db").exists());
    d.restart(&["--durability", "os"]);
    let mut c = d.client();
    let r = rq(&mut c, json!({"op": "status", "job": done["job"]}));
    assert_eq!(r["job"]["result"], "kept", "{r}");
    let r = rq(&mut c, json!({"op": "status", "job": later["job"]}));
    assert_eq!(r["job"]["state"], "delayed", "{r}");
    let s = rq(&mut c, json!({"op": "stats"}));
    assert!(s["store"]["bytes"].as_u64().is_some_and(|b| b > 0), "{s}");
}

/// This process's supplementary groups (getgroups(2)).
fn own_groups() -> Vec<u32> {
    let mut g: Vec<libc::gid_t> = vec![0; 65536];
    // SAFETY: the buffer holds as many gids as we say.
    #[allow(unsafe_code)]
    let n = unsafe { libc::getgroups(g.len() as libc::c_int, g.as_mut_ptr()) };
    assert!(n >= 0, "getgroups failed");
    g.truncate(n as usize);
    g
}

/// `jobctl hello` run as `uid`/`gid` with exactly the supplementary
/// `groups` (needs root to set them).
fn hello_as(socket: &std::path::Path, uid: u32, gid: u32, groups: &[u32]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut cmd = std::process::Command::new(common::jobctl_bin());
    cmd.arg("--socket")
        .arg(socket)
        .arg("hello")
        .env_clear()
        .current_dir("/")
        .stdin(std::process::Stdio::null());
    // SAFETY: only system calls between fork and exec; `groups` was
    // allocated before the fork and is only read.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run jobctl as another user")
}

#[test]
fn supplementary_groups_count_for_allow_groups() {
    if uid() == 0 {
        // As root: a made-up user whose only way in is a supplementary group.
        let (user, primary, extra) = (4_242_424, 4_242_425, 4_242_426);
        // Ready once `hello` gets any answer: root itself is refused.
        let d = Daemon::start_env(
            &format!("socket_mode = \"0666\"\n[auth]\nallow_groups = [{extra}]\n"),
            &[],
        );
        // Let the made-up user reach the socket inside our temporary dir.
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();

        let out = hello_as(&d.socket, user, primary, &[7, extra]);
        let say = |o: &std::process::Output| {
            format!(
                "{}\nstdout: {}\nstderr: {}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        assert!(out.status.success(), "{}", say(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("jobd"));

        // The same user without that group is refused.
        let out = hello_as(&d.socket, user, primary, &[7]);
        assert!(!out.status.success(), "{}", say(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("forbidden"),
            "{}",
            say(&out)
        );
        return;
    }
    // SAFETY: getegid cannot fail.
    #[allow(unsafe_code)]
    let primary = unsafe { libc::getegid() };
    let Some(extra) = own_groups().into_iter().find(|g| *g != primary) else {
        eprintln!(
            "skipped: not root and no supplementary group besides the primary one \
             (id -G), so no peer can differ from the primary-gid-only rule"
        );
        return;
    };
    let d = Daemon::start_env(&format!("[auth]\nallow_groups = [{extra}]\n"), &[]);
    let r = rq(&mut d.client(), json!({"op": "hello"}));
    assert_eq!(r["ok"], true, "allowed through group {extra}: {r}");
}
