//! End-to-end tests of `jobctl` against the real `jobd`: every command,
//! human and `--json` output, the socket lookup (`--socket`, `JOBD_SOCKET`)
//! and the exit codes (0 success, 1 job not succeeded or request refused,
//! 2 usage or connection error), including the "is jobd running?" message.

// The shared harness predates the clippy rules these lints come from.
mod common;

use std::process::{Command, Stdio};

use common::{Daemon, expect_code, jobctl, jobctl_bin, stderr, stdout};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[exec]
enabled = true
allow = ["/bin/false", "/bin/echo"]

[pools.io]
threads = 1
"#;

#[test]
fn not_running_is_a_clear_connection_error_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let o = jobctl(&sock, &["hello"]);
    expect_code(&o, 2);
    let want = format!("cannot connect to {}: is jobd running?", sock.display());
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));

    // JOBD_SOCKET is used when --socket is not given.
    let o = Command::new(jobctl_bin())
        .args(["status", "1"])
        .env("JOBD_SOCKET", &sock)
        .output()
        .unwrap();
    expect_code(&o, 2);
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
}

#[test]
fn usage_errors_exit_2_and_help_documents_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("x.sock");
    // Missing kind; bad duration; bad payload JSON (checked before connecting).
    expect_code(&jobctl(&sock, &["submit"]), 2);
    expect_code(&jobctl(&sock, &["submit", "echo", "--delay", "5"]), 2);
    let o = jobctl(&sock, &["submit", "echo", "{not json"]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("not valid JSON"), "{}", stderr(&o));
    expect_code(&jobctl(&sock, &["frobnicate"]), 2);

    let o = jobctl(&sock, &["--help"]);
    expect_code(&o, 0);
    let help = stdout(&o);
    assert!(help.contains("Exit codes"), "{help}");
    assert!(help.contains("non-zero code fails"), "{help}");
}

#[test]
fn hello_submit_status_wait_and_list() {
    let d = Daemon::start_with(CONFIG, &[]);
    let s = &d.socket;

    let o = jobctl(s, &["hello"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("jobd"), "{}", stdout(&o));

    // --wait prints the outcome.
    let o = jobctl(s, &["submit", "echo", r#"{"x": 1}"#, "--wait"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));
    assert!(stdout(&o).contains("\"x\": 1"), "{}", stdout(&o));

    // Without --wait: the id alone, then status and wait on it.
    let o = jobctl(
        s,
        &[
            "submit",
            "echo",
            "[1,2]",
            "--priority",
            "-2",
            "--pool",
            "io",
        ],
    );
    expect_code(&o, 0);
    let id = stdout(&o).trim().to_string();
    assert!(!id.is_empty() && !id.contains(' '), "{id:?}");
    let o = jobctl(s, &["wait", &id, "--timeout", "10s"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));
    let o = jobctl(s, &["status", &id]);
    expect_code(&o, 0);
    let out = stdout(&o);
    for want in [
        "state:",
        "succeeded",
        "pool:",
        "io",
        "priority:",
        "-2",
        "submitted by:",
    ] {
        assert!(out.contains(want), "missing {want}: {out}");
    }

    // --json gives the daemon's answer.
    let o = jobctl(s, &["--json", "status", &id]);
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["job"]["result"], json!([1, 2]));
    assert_eq!(v["job"]["id"], json!(id));

    let o = jobctl(s, &["list", "--pool", "io"]);
    expect_code(&o, 0);
    let out = stdout(&o);
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.lines().any(|l| l.starts_with(&id)), "{out}");
    let o = jobctl(
        s,
        &["--json", "list", "--state", "succeeded", "--limit", "1"],
    );
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1, "{v}");

    let o = jobctl(s, &["stats"]);
    expect_code(&o, 0);
    assert!(
        stdout(&o).contains("POOL") && stdout(&o).contains("echo"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn failed_timed_out_cancelled_and_refused_jobs_exit_1() {
    let d = Daemon::start_with(CONFIG, &[]);
    let s = &d.socket;

    // A program that exits non-zero fails its job.
    let o = jobctl(
        s,
        &["submit", "exec", r#"{"argv": ["/bin/false"]}"#, "--wait"],
    );
    expect_code(&o, 1);
    assert!(stderr(&o).contains("job_failed"), "{}", stderr(&o));

    // Timed out.
    let o = jobctl(
        s,
        &[
            "submit",
            "sleep",
            r#"{"ms": 10000}"#,
            "--timeout",
            "200ms",
            "--wait",
        ],
    );
    expect_code(&o, 1);
    assert!(stderr(&o).contains("timed_out"), "{}", stderr(&o));

    // Cancelled, and wait reports it; wait --timeout on an unfinished job.
    let o = jobctl(s, &["submit", "sleep", r#"{"ms": 30000}"#]);
    expect_code(&o, 0);
    let id = stdout(&o).trim().to_string();
    let o = jobctl(s, &["wait", &id, "--timeout", "100ms"]);
    expect_code(&o, 1);
    assert!(stdout(&o).contains("not final"), "{}", stdout(&o));
    let o = jobctl(s, &["cancel", &id]);
    expect_code(&o, 0);
    let o = jobctl(s, &["wait", &id]);
    expect_code(&o, 1);
    assert!(stdout(&o).contains("cancelled"), "{}", stdout(&o));

    // Several ids: 1 when any did not succeed.
    let ok = stdout(&jobctl(s, &["submit", "echo", "1"]))
        .trim()
        .to_string();
    let o = jobctl(s, &["wait", &ok, &id]);
    expect_code(&o, 1);
    let o = jobctl(s, &["wait", &ok]);
    expect_code(&o, 0);

    // Refused requests.
    let o = jobctl(s, &["submit", "no_such_kind", "--wait"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("unknown_kind"), "{}", stderr(&o));
    let o = jobctl(s, &["status", "999999"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("not_found"), "{}", stderr(&o));
}

#[test]
fn payload_from_a_file_and_stdin() {
    let d = Daemon::start_with(CONFIG, &[]);
    let f = d.dir.path().join("payload.json");
    std::fs::write(&f, r#"{"from": "file"}"#).unwrap();
    let o = jobctl(
        &d.socket,
        &[
            "--json",
            "submit",
            "echo",
            &format!("@{}", f.display()),
            "--wait",
        ],
    );
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["result"], json!({"from": "file"}));

    let mut child = Command::new(jobctl_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["--json", "submit", "echo", "@-", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"[\"stdin\"]").unwrap();
    let o = child.wait_with_output().unwrap();
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["result"], json!(["stdin"]));
}

#[test]
fn pause_resume_retry_and_dependencies() {
    let d = Daemon::start_with(CONFIG, &[]);
    let s = &d.socket;
    expect_code(&jobctl(s, &["pause", "io"]), 0);
    let id = stdout(&jobctl(s, &["submit", "echo", "1", "--pool", "io"]))
        .trim()
        .to_string();
    // Paused: still not final a little later.
    expect_code(&jobctl(s, &["wait", &id, "--timeout", "200ms"]), 1);
    expect_code(&jobctl(s, &["resume", "io"]), 0);
    expect_code(&jobctl(s, &["wait", &id, "--timeout", "10s"]), 0);

    // A failed job can be retried (it fails again here).
    let o = jobctl(s, &["submit", "exec", r#"{"argv": ["/bin/false"]}"#]);
    let failed = stdout(&o).trim().to_string();
    expect_code(&jobctl(s, &["wait", &failed]), 1);
    let o = jobctl(s, &["retry", &failed]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains(&failed), "{}", stdout(&o));
    expect_code(&jobctl(s, &["wait", &failed]), 1);

    // --after: runs once its dependency succeeded; --unique-key dedups.
    let first = stdout(&jobctl(s, &["submit", "sleep", r#"{"ms": 100}"#]))
        .trim()
        .to_string();
    let o = jobctl(
        s,
        &[
            "submit",
            "echo",
            "2",
            "--after",
            &first,
            "--unique-key",
            "k1",
            "--wait",
        ],
    );
    expect_code(&o, 0);
    let a = stdout(&jobctl(
        s,
        &["submit", "sleep", r#"{"ms": 2000}"#, "--unique-key", "k2"],
    ))
    .trim()
    .to_string();
    let o = jobctl(
        s,
        &["submit", "sleep", r#"{"ms": 2000}"#, "--unique-key", "k2"],
    );
    expect_code(&o, 0);
    assert_eq!(stdout(&o).trim(), a);
}
