//! Controlling jobs end to end: cancelling running jobs (a Rust handler
//! sees `ctx.is_cancelled()` and frees its worker; a command kind's whole
//! process group is killed), pausing and resuming pools, unique keys while
//! a job runs, and dependencies, through the socket and jobctl.

mod common;
mod lifecycle_common;

use std::time::{Duration, Instant};

use common::Daemon;
use lifecycle_common::*;
use serde_json::json;

#[test]
fn a_cancelled_sleep_stops_at_once_and_frees_its_worker() {
    let d = Daemon::start_with("[pools.default]\nthreads = 1\n", &[]);
    let mut c = d.client();
    let mut w = d.client();
    let job = submit(&mut c, json!({"kind": "sleep", "payload": {"ms": 600_000}}));
    poll_state(&mut c, &job, "running", 1);
    w.send_line(&json!({"id": "w", "op": "wait", "job": job}).to_string())
        .unwrap();
    let started = Instant::now();
    let r = ok(&mut c, json!({"op": "cancel", "job": job}));
    assert_eq!(r["job"]["state"], "cancelled");
    assert_eq!(r["job"]["error"]["code"], "cancelled");
    assert_eq!(r["job"]["attempts"][0]["error"], "cancelled by request");
    let r = w.read().unwrap();
    assert_eq!(
        (&r["id"], &r["job"]["state"]),
        (&json!("w"), &json!("cancelled"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waiter answered late"
    );
    // The only worker is free again: the handler saw is_cancelled() and
    // returned (it would otherwise sleep for ten minutes).
    let r = ok(
        &mut c,
        json!({"op": "submit", "wait": true, "job": {"kind": "echo", "payload": "next"}}),
    );
    assert_eq!(r["result"], "next");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Cancelling a final job changes nothing.
    let r = ok(&mut c, json!({"op": "cancel", "job": job}));
    assert_eq!(r["job"]["state"], "cancelled");
}

const TREE: &str = r#"
[kinds.tree]
argv = ["/bin/sh", "-c", "/bin/sleep 60 & echo $! >> \"$1\"; echo $$ >> \"$1\"; wait", "sh", "{pids}"]
timeout_secs = 0
"#;

#[test]
fn a_cancelled_command_job_has_its_process_group_killed() {
    let d = Daemon::start_with(TREE, &[]);
    let mut c = d.client();
    let pids_file = d.dir.path().join("pids");
    let job = submit(
        &mut c,
        json!({"kind": "tree", "payload": {"pids": pids_file}}),
    );
    let pids = read_pids(&pids_file, 2);
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
    let r = ok(&mut c, json!({"op": "cancel", "job": job}));
    assert_eq!(r["job"]["state"], "cancelled");
    let deadline = Instant::now() + LONG;
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "the shell or its background child survived the cancel: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(wait_final(&mut c, &job)["state"], "cancelled");
}

#[test]
fn a_paused_pool_finishes_running_jobs_and_holds_queued_ones() {
    let d = Daemon::start_with(GATED, &[]);
    let sock = d.socket.as_path();
    let mut c = d.client();
    let g = gate(d.dir.path(), "pause");
    let running = submit(
        &mut c,
        json!({"kind": "gated", "payload": {"gate": g}, "unique_key": "only-one"}),
    );
    poll_state(&mut c, &running, "running", 1);
    // A unique key holds while its job runs.
    let r = ok(
        &mut c,
        json!({"op": "submit", "job": {"kind": "gated", "payload": {"gate": "x"}, "unique_key": "only-one"}}),
    );
    assert_eq!(
        (&r["job"], &r["deduplicated"], &r["state"]),
        (&running, &json!(true), &json!("running"))
    );

    let out = expect_code(&jobctl(sock, &["pause", "gated"]), 0);
    assert_eq!(out.trim(), "pool gated paused");
    // Submissions are still taken.
    let queued = submit(
        &mut c,
        json!({"kind": "echo", "payload": 5, "pool": "gated"}),
    );
    // The running job finishes (here: fails, it is the gated kind).
    open(&g);
    assert_eq!(wait_final(&mut c, &running)["state"], "failed");
    // The queued one does not start.
    let e = rq(
        &mut c,
        json!({"op": "wait", "job": queued, "timeout_ms": 50}),
    );
    assert_eq!(e["error"]["code"], "timeout", "{e}");
    let s = ok(&mut c, json!({"op": "stats"}));
    let p = &s["pools"]["gated"];
    assert_eq!(
        (&p["paused"], &p["queued"], &p["running"]),
        (&json!(true), &json!(1), &json!(0)),
        "{s}"
    );

    let out = expect_code(&jobctl(sock, &["resume", "gated"]), 0);
    assert_eq!(out.trim(), "pool gated resumed");
    assert_eq!(wait_final(&mut c, &queued)["result"], 5);
    let o = jobctl(sock, &["pause", "nope"]);
    expect_code(&o, 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown_pool"));
}

#[test]
fn jobctl_submit_after_runs_dependents_in_order_or_cancels_them() {
    let d = Daemon::start_with("[pools.work]\nthreads = 1\n", &[]);
    let sock = d.socket.as_path();
    let mut c = d.client();
    expect_code(&jobctl(sock, &["pause", "work"]), 0);
    let a = submit(
        &mut c,
        json!({"kind": "echo", "payload": "a", "pool": "work"}),
    );
    let a_id = a.as_str().unwrap();
    let b = expect_code(
        &jobctl(sock, &["submit", "echo", "\"b\"", "--after", a_id]),
        0,
    );
    let b = json!(b.trim());
    let rec = status(&mut c, &b);
    assert_eq!(
        (&rec["state"], &rec["after"]),
        (&json!("delayed"), &json!([a]))
    );
    // Waiting for a dependency counts as delayed in list and stats.
    let (ids, _) = list_page(&mut c, json!({"state": "delayed"}));
    assert_eq!(ids, [num(&b)]);
    expect_code(&jobctl(sock, &["resume", "work"]), 0);
    let rb = wait_final(&mut c, &b);
    assert_eq!(rb["result"], "b");
    assert!(rb["started_at"].as_u64() >= status(&mut c, &a)["finished_at"].as_u64());

    // A dependency that is cancelled cancels its dependents.
    expect_code(&jobctl(sock, &["pause", "work"]), 0);
    let x = submit(&mut c, json!({"kind": "echo", "pool": "work"}));
    let x_id = x.as_str().unwrap();
    let y = expect_code(
        &jobctl(sock, &["submit", "echo", "--after", x_id, "--after", a_id]),
        0,
    );
    let y = json!(y.trim());
    expect_code(&jobctl(sock, &["cancel", x_id]), 0);
    let ry = wait_final(&mut c, &y);
    assert_eq!(
        (&ry["state"], &ry["error"]["code"]),
        (&json!("cancelled"), &json!("dependency_failed"))
    );
    let out = expect_code(&jobctl(sock, &["status", y.as_str().unwrap()]), 0);
    assert!(out.contains("dependency_failed"), "{out}");
    assert!(
        out.contains(&format!("dependency {x_id} ended cancelled")),
        "{out}"
    );
    // Refused outright: a dependency that already failed, or none at all.
    let o = jobctl(sock, &["submit", "echo", "--after", x_id]);
    expect_code(&o, 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("dependency_failed"));
    let o = jobctl(sock, &["submit", "echo", "--after", "999999"]);
    expect_code(&o, 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_found"));
}
