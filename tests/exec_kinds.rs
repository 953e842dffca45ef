//! End-to-end tests of the `exec` kind and config-defined command kinds
//! against the real `jobd`: off by default, the allow-list, the cleared
//! environment, output caps, non-zero exits, and that a timeout or a cancel
//! kills the job's whole process group (a backgrounded grandchild too), and
//! that what a SIGKILLed daemon left of a group dies when jobd restarts.
//! Command kinds: placeholder substitution, injection attempts staying one
//! literal argument, stdin payloads, retries, start-up validation.

// The shared harness predates the clippy rules these lints come from.
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Client, Daemon};
use serde_json::{Value, json};

/// exec enabled for a shell and a few tools, small caps for the tests.
const EXEC_CONFIG: &str = r#"
[exec]
enabled = true
allow = ["/bin/sh", "/bin/echo", "/bin/false"]
max_output_bytes = 1000
timeout_secs = 20
"#;

/// Submit with `wait` and return the response.
fn run(c: &mut Client, job: Value) -> Value {
    c.request(json!({"op": "submit", "job": job, "wait": true}))
        .expect("submit")
}

fn exec_job(argv: &[&str]) -> Value {
    json!({"kind": "exec", "payload": {"argv": argv}})
}

/// Live (not zombie) processes whose process group is `pgid`, from /proc.
/// Zombies do not count: the container's init may never reap them.
fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the parenthesised command: state ppid pgrp ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z" && f[0] != "X" {
            found.push(pid);
        }
    }
    found
}

/// Poll (at most 5 s) until no live process of group `pgid` is left.
fn assert_group_gone(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = live_group_members(pgid);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of group {pgid} survived: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait (at most 10 s) until `path` holds a number, and return it.
fn read_pid_file(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(n) = s.trim().parse()
        {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A shell script that backgrounds `sleep 1000`, writes its own pid (= the
/// group id) to `pidfile`, and waits.
fn grandchild_script(pidfile: &Path) -> String {
    format!(
        "/bin/sleep 1000 & echo $$ > {}.tmp && mv {0}.tmp {0}; wait",
        pidfile.display()
    )
}

#[test]
fn exec_is_off_by_default() {
    let d = Daemon::start();
    let mut c = d.client();
    let r = run(&mut c, exec_job(&["/bin/echo", "hi"]));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "unknown_kind", "{r}");
}

#[test]
fn exec_runs_allowed_programs_and_refuses_others_by_name() {
    let d = Daemon::start_with(EXEC_CONFIG, &[]);
    let mut c = d.client();
    let r = run(&mut c, exec_job(&["/bin/echo", "hello", "world"]));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["state"], "succeeded");
    let res = &r["result"];
    assert_eq!(res["exit_code"], 0);
    assert_eq!(res["stdout"], "hello world\n");
    assert_eq!(res["stderr"], "");
    assert_eq!(res["truncated"], false);
    assert!(res["duration_ms"].is_u64());

    let r = run(&mut c, exec_job(&["/bin/cat", "/etc/passwd"]));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["state"], "failed");
    assert_eq!(r["error"]["code"], "job_failed");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("/bin/cat") && msg.contains("allow"), "{msg}");

    // Relative names and a path that resolves elsewhere are refused too.
    for argv in [["echo", "x"], ["/bin/../bin/cat", "x"]] {
        let r = run(&mut c, exec_job(&argv));
        assert_eq!(r["error"]["code"], "job_failed", "{r}");
    }
    // A bad payload fails the job with a reason.
    let r = run(&mut c, json!({"kind": "exec", "payload": {"argv": []}}));
    assert!(
        r["error"]["message"].as_str().unwrap().contains("argv"),
        "{r}"
    );
    let r = run(&mut c, json!({"kind": "exec", "payload": {"cmd": "ls"}}));
    assert_eq!(r["error"]["code"], "job_failed", "{r}");
}

#[test]
fn exec_environment_is_cleared_except_configured_and_payload_names() {
    let d = Daemon::start_with(EXEC_CONFIG, &[]);
    let mut c = d.client();
    // The test process (and so jobd) has HOME and PATH set.
    assert!(std::env::var_os("HOME").is_some());
    let r = run(
        &mut c,
        json!({"kind": "exec", "payload": {
            "argv": ["/bin/sh", "-c", "echo \"[$HOME][$FOO][${PATH:+path}]\"; pwd; cat"],
            "env": {"FOO": "bar baz"},
            "cwd": "/tmp",
            "stdin": "from stdin"
        }}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["stdout"], "[][bar baz][path]\n/tmp\nfrom stdin");
    let r = run(
        &mut c,
        json!({"kind": "exec", "payload": {
            "argv": ["/bin/echo"], "env": {"LD_PRELOAD": "/tmp/evil.so"}
        }}),
    );
    assert_eq!(r["error"]["code"], "job_failed", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("LD_PRELOAD")
    );
}

#[test]
fn exec_output_is_capped_per_stream_and_the_child_is_not_blocked() {
    let d = Daemon::start_with(EXEC_CONFIG, &[]);
    let mut c = d.client();
    // 1 MiB on stdout (far beyond a pipe buffer), then a line on stderr:
    // if the runner stopped reading at the cap the child would hang.
    let r = run(
        &mut c,
        exec_job(&[
            "/bin/sh",
            "-c",
            "i=0; while [ $i -lt 1024 ]; do head -c 1024 /dev/zero; i=$((i+1)); done; echo end >&2",
        ]),
    );
    assert_eq!(r["ok"], true, "{r}");
    let res = &r["result"];
    assert_eq!(res["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(res["stderr"], "end\n");
    assert_eq!(res["truncated"], true);
}

#[test]
fn exec_non_zero_exit_fails_the_job_with_code_and_stderr() {
    let d = Daemon::start_with(EXEC_CONFIG, &[]);
    let mut c = d.client();
    let r = run(
        &mut c,
        exec_job(&["/bin/sh", "-c", "echo nope >&2; exit 7"]),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["state"], "failed");
    assert_eq!(r["error"]["code"], "job_failed");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("code 7") && msg.contains("nope"), "{msg}");
}

#[test]
fn exec_timeout_kills_the_whole_process_group() {
    let d = Daemon::start_with(EXEC_CONFIG, &[]);
    let mut c = d.client();
    let pidfile = d.dir.path().join("pgid");
    let t0 = Instant::now();
    let r = run(
        &mut c,
        json!({"kind": "exec", "timeout_ms": 1000,
               "payload": {"argv": ["/bin/sh", "-c", grandchild_script(&pidfile)]}}),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["state"], "timed_out", "{r}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let pgid = read_pid_file(&pidfile);
    assert_group_gone(pgid);
}

#[test]
fn exec_default_timeout_comes_from_the_config() {
    let config = EXEC_CONFIG.replace("timeout_secs = 20", "timeout_secs = 1");
    let d = Daemon::start_with(&config, &[]);
    let mut c = d.client();
    let pidfile = d.dir.path().join("pgid");
    let r = run(
        &mut c,
        json!({"kind": "exec",
               "payload": {"argv": ["/bin/sh", "-c", grandchild_script(&pidfile)]}}),
    );
    assert_eq!(r["state"], "timed_out", "{r}");
    assert_group_gone(read_pid_file(&pidfile));
}

#[test]
fn exec_cancel_kills_the_whole_process_group() {
    let d = Daemon::start_with(EXEC_CONFIG, &[]);
    let mut c = d.client();
    let pidfile = d.dir.path().join("pgid");
    let r = c
        .request(json!({"op": "submit", "job": {"kind": "exec",
            "payload": {"argv": ["/bin/sh", "-c", grandchild_script(&pidfile)]}}}))
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let id = r["job"].clone();
    // The script is running once it wrote its pid.
    let pgid = read_pid_file(&pidfile);
    assert!(!live_group_members(pgid).is_empty());
    let r = c.request(json!({"op": "cancel", "job": id})).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let r = c
        .request(json!({"op": "wait", "job": id, "timeout_ms": 5000}))
        .unwrap();
    assert_eq!(r["job"]["state"], "cancelled", "{r}");
    assert_group_gone(pgid);
}

/// Command kinds, with exec left off.
const COMMAND_CONFIG: &str = r#"
[exec]
max_output_bytes = 4096

[pools.io]
threads = 2

[kinds.show]
pool = "io"
argv = ["/usr/bin/printf", "<%s>", "{a}", "{n}", "{{literal}}"]

[kinds.stdin]
argv = ["/bin/cat"]
stdin_payload = true

[kinds.slow]
argv = ["/bin/sh", "-c", "/bin/sleep 1000 & echo $$ > \"$1\"; wait", "sh", "{pidfile}"]
timeout_secs = 1

[kinds.flaky]
argv = ["/bin/sh", "-c", "echo attempt >&2; exit 3"]
max_attempts = 2
"#;

#[test]
fn command_kinds_substitute_whole_arguments_and_never_expand_them() {
    let d = Daemon::start_with(COMMAND_CONFIG, &[]);
    let mut c = d.client();
    // exec itself stays off.
    let r = run(&mut c, exec_job(&["/bin/echo"]));
    assert_eq!(r["error"]["code"], "unknown_kind", "{r}");

    let r = run(
        &mut c,
        json!({"kind": "show", "payload": {"a": "x; rm -rf /", "n": 42}}),
    );
    assert_eq!(r["ok"], true, "{r}");
    // printf repeats its format once per argument: three arguments, each
    // passed exactly as given.
    assert_eq!(r["result"]["stdout"], "<x; rm -rf /><42><{literal}>");
    for evil in ["$(id)", "`id`", "a b  c", "*", "'\"", "-v"] {
        let r = run(
            &mut c,
            json!({"kind": "show", "payload": {"a": evil, "n": 1.5}}),
        );
        assert_eq!(
            r["result"]["stdout"],
            format!("<{evil}><1.5><{{literal}}>"),
            "{r}"
        );
    }
    // The job ran on the kind's pool.
    let r = c
        .request(json!({"op": "submit", "job": {"kind": "show", "payload": {"a": "", "n": 0}}}))
        .unwrap();
    let r = c
        .request(json!({"op": "wait", "job": r["job"], "timeout_ms": 5000}))
        .unwrap();
    assert_eq!(r["job"]["pool"], "io", "{r}");
}

#[test]
fn command_kinds_reject_missing_or_mistyped_fields_by_name() {
    let d = Daemon::start_with(COMMAND_CONFIG, &[]);
    let mut c = d.client();
    let r = run(&mut c, json!({"kind": "show", "payload": {"a": "x"}}));
    assert_eq!(r["error"]["code"], "job_failed", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("'n'") && msg.contains("missing"), "{msg}");
    let r = run(
        &mut c,
        json!({"kind": "show", "payload": {"a": ["x"], "n": 1}}),
    );
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("'a'") && msg.contains("array"), "{msg}");
}

#[test]
fn command_kind_can_take_the_payload_on_stdin() {
    let d = Daemon::start_with(COMMAND_CONFIG, &[]);
    let mut c = d.client();
    let payload = json!({"text": "$(id); `x`", "n": [1, 2]});
    let r = run(&mut c, json!({"kind": "stdin", "payload": payload}));
    assert_eq!(r["ok"], true, "{r}");
    let out: Value = serde_json::from_str(r["result"]["stdout"].as_str().unwrap()).unwrap();
    assert_eq!(out, payload);
}

#[test]
fn command_kind_timeout_kills_its_group_and_failures_retry() {
    let d = Daemon::start_with(COMMAND_CONFIG, &[]);
    let mut c = d.client();
    let pidfile = d.dir.path().join("pgid");
    let r = run(
        &mut c,
        json!({"kind": "slow", "payload": {"pidfile": pidfile.to_str().unwrap()}}),
    );
    assert_eq!(r["state"], "timed_out", "{r}");
    assert_group_gone(read_pid_file(&pidfile));

    // max_attempts = 2 from the kind; a short backoff from the submission.
    let r = run(
        &mut c,
        json!({"kind": "flaky", "backoff": {"base_ms": 10, "factor": 1.0, "max_ms": 10}}),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["state"], "dead", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("code 3"), "{msg}");
    let s = c.request(json!({"op": "status", "job": r["job"]})).unwrap();
    assert_eq!(s["job"]["attempt"], 2, "{s}");
}

#[test]
fn invalid_command_kinds_stop_start_up_naming_the_kind() {
    for (config, name) in [
        ("[kinds.rel]\nargv = [\"printf\", \"x\"]\n", "rel"),
        ("[kinds.empty]\nargv = []\n", "empty"),
        (
            "[kinds.inner]\nargv = [\"/bin/echo\", \"--size={size}\"]\n",
            "inner",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("jobd.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut child = std::process::Command::new(common::jobd_bin())
            .arg("--config")
            .arg(&cfg)
            .arg("--socket")
            .arg(dir.path().join("jobd.sock"))
            .arg("--state-dir")
            .arg(dir.path())
            .args(["--durability", "memory"])
            .env_remove("JOBD_SOCKET")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = common::wait_exit(&mut child, Duration::from_secs(20));
        assert!(!status.success(), "jobd started with {config}");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(err.contains(&format!("'{name}'")), "{name}: {err}");
    }
}

/// `(state, ppid)` of `pid` from /proc, or None once it is gone.
fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// A shell script that writes its pid to `pidfile` and then becomes
/// `sleep 30` (same pid, still the daemon's direct child).
fn sleeper_script(pidfile: &Path) -> String {
    format!(
        "echo $$ > {0}.tmp && mv {0}.tmp {0}; exec /bin/sleep 30",
        pidfile.display()
    )
}

#[test]
fn exec_children_die_when_the_daemon_is_killed() {
    let mut d = Daemon::start_with(EXEC_CONFIG, &[]);
    let mut c = d.client();
    let pidfile = d.dir.path().join("pid");
    let r = c
        .request(json!({"op": "submit", "job": {"kind": "exec",
            "payload": {"argv": ["/bin/sh", "-c", sleeper_script(&pidfile)]}}}))
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let pid = read_pid_file(&pidfile);
    let daemon = d.child.id() as i32;
    assert_eq!(
        proc_state(pid).map(|s| s.1),
        Some(daemon),
        "not jobd's child"
    );

    // No SIGTERM, no drain: the daemon just disappears.
    common::signal(&d.child, libc::SIGKILL);
    let _ = d.child.wait();

    // Zombies count as gone: the container's init may never reap them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some((state, _)) = proc_state(pid)
        && state != 'Z'
        && state != 'X'
    {
        if Instant::now() > deadline {
            // SAFETY: kill(2) on the pid our job started; cleans up before failing.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            panic!("the exec child {pid} outlived the SIGKILLed daemon");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exec_children_keep_running_when_their_pool_is_resized_down() {
    // The child dies with the thread that forked it; a pool resized down
    // retires that thread only once its job is done.
    let config = format!("{EXEC_CONFIG}\n[pools.default]\nthreads = 2\n");
    let d = Daemon::start_with(&config, &[]);
    let mut c = d.client();
    let pidfile = d.dir.path().join("pid");
    let release = d.dir.path().join("release");
    let script = format!(
        "echo $$ > {0}.tmp && mv {0}.tmp {0}; while [ ! -e {1} ]; do /bin/sleep 0.02; done; echo done",
        pidfile.display(),
        release.display()
    );
    let r = c
        .request(json!({"op": "submit", "job": {"kind": "exec",
            "payload": {"argv": ["/bin/sh", "-c", script]}}}))
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let id = r["job"].clone();
    read_pid_file(&pidfile);

    let config = config.replace("threads = 2", "threads = 1");
    std::fs::write(d.dir.path().join("jobd.toml"), config).unwrap();
    common::signal(&d.child, libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.request(json!({"op": "stats"})).unwrap();
        if s["pools"]["default"]["threads"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the pool was not resized: {s}");
        std::thread::sleep(Duration::from_millis(10));
    }

    std::fs::write(&release, "").unwrap();
    let r = c
        .request(json!({"op": "wait", "job": id, "timeout_ms": 10000}))
        .unwrap();
    assert_eq!(r["job"]["state"], "succeeded", "{r}");
    assert_eq!(r["job"]["result"]["stdout"], "done\n", "{r}");
}

/// Start time (field 22 of /proc/PID/stat) of a live, non-zombie `pid`.
fn live_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.first().is_some_and(|s| *s == "Z" || *s == "X") {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// Kills a test's leftover process when the test fails half-way, but only
/// while `pid` still names the process it was made for.
struct Leftover {
    pid: i32,
    start: Option<u64>,
}

impl Drop for Leftover {
    fn drop(&mut self) {
        if self.start.is_some() && live_start_time(self.pid) == self.start {
            // SAFETY: kill(2) on the process this test started (same pid
            // and start time).
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
    }
}

/// Poll (at most 5 s) until `pid` is gone or a zombie; false if it lives.
fn dies_within_5s(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while live_start_time(pid).is_some() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn a_restarted_daemon_kills_what_a_killed_one_left_of_its_exec_jobs() {
    let mut d = Daemon::start_with(EXEC_CONFIG, &[]);
    let mut c = d.client();
    let pidfile = d.dir.path().join("grandchild");
    let script = format!(
        "/bin/sleep 300 & echo $! > {0}.tmp && mv {0}.tmp {0}; wait",
        pidfile.display()
    );
    let r = c
        .request(json!({"op": "submit", "job": {"kind": "exec",
            "payload": {"argv": ["/bin/sh", "-c", script]}}}))
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let grandchild = read_pid_file(&pidfile);
    let _cleanup = Leftover {
        pid: grandchild,
        start: live_start_time(grandchild),
    };
    // While the job runs, its group is on record in the state directory.
    let records = d.state_dir.join("exec-groups");
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 1);

    // The daemon dies without a drain; the kernel kills the shell it
    // started (the leader of the job's group), not the shell's own child.
    drop(c);
    common::signal(&d.child, libc::SIGKILL);
    let _ = d.child.wait();
    let shell = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(2)?
                .parse::<i32>()
                .ok()
        })
        .expect("the grandchild's group");
    assert!(dies_within_5s(shell), "the job's shell outlived jobd");
    assert!(
        live_start_time(grandchild).is_some(),
        "the grandchild died with jobd: nothing left to reap"
    );

    // The next daemon on the same state directory kills it before it
    // accepts connections.
    d.restart(&[]);
    assert!(
        dies_within_5s(grandchild),
        "the grandchild {grandchild} outlived the restart"
    );
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
}
