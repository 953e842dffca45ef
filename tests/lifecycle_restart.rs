//! The job lifecycle across a crash of a durable daemon (`--durability os`,
//! SIGKILL, start again on the same state directory): a delayed retry keeps
//! its `run_at` and attempts, dead jobs stay dead, listable and retryable,
//! unique keys still deduplicate, dependency chains go on (or fail) as
//! before, and paused pools stay paused. Events are ordered with paused
//! pools, gated jobs and a commit barrier, never with sleeps.

mod common;
mod lifecycle_common;

use common::Daemon;
use lifecycle_common::*;
use serde_json::{Value, json};

fn paused(c: &mut common::Client, pool: &str) -> Value {
    ok(c, json!({"op": "stats"}))["pools"][pool]["paused"].clone()
}

#[test]
fn a_delayed_retry_keeps_its_run_at_and_attempts_across_a_crash() {
    let mut d = Daemon::start_with(GATED, DURABLE);
    let mut c = d.client();
    // Waits an hour for its second attempt.
    let slow = submit(
        &mut c,
        failing(json!({"max_attempts": 3, "backoff": {"base_ms": 3_600_000}})),
    );
    let before_slow = poll_state(&mut c, &slow, "delayed", 1);
    // Failed once; its pool is paused before the retry could start.
    let g = gate(d.dir.path(), "retry");
    let soon = submit(
        &mut c,
        json!({"kind": "gated", "payload": {"gate": g}, "max_attempts": 2,
               "backoff": {"base_ms": 200}}),
    );
    poll_state(&mut c, &soon, "running", 1);
    ok(&mut c, json!({"op": "pause", "pool": "gated"}));
    open(&g);
    let before_soon = poll(&mut c, &soon, "failed its first attempt", |r| {
        r["attempt"] == 1 && r["state"] != "running"
    });
    barrier(&mut c);

    let mut c = d.crash_and_restart(c, DURABLE);
    let rec = status(&mut c, &slow);
    for field in [
        "state",
        "attempt",
        "max_attempts",
        "run_at",
        "attempts",
        "backoff",
        "error",
    ] {
        assert_eq!(rec[field], before_slow[field], "{field}: {rec}");
    }
    assert_eq!(rec["state"], "delayed");
    let rec = status(&mut c, &soon);
    for field in ["attempt", "run_at", "attempts", "error"] {
        assert_eq!(rec[field], before_soon[field], "{field}: {rec}");
    }
    assert_eq!(paused(&mut c, "gated"), true);

    // Resumed, it runs its second attempt (not before its run_at) and ends
    // dead: the attempt from before the crash counts.
    ok(&mut c, json!({"op": "resume", "pool": "gated"}));
    poll_state(&mut c, &soon, "running", 2);
    open(&g);
    let rec = wait_final(&mut c, &soon);
    assert_eq!(rec["state"], "dead", "{rec}");
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{rec}");
    assert!(
        u(&attempts[1]["start"]) >= u(&before_soon["run_at"]),
        "{rec}"
    );
    assert_eq!(attempts[0], before_soon["attempts"][0]);
}

#[test]
fn dead_jobs_stay_dead_listable_and_retryable_after_a_crash() {
    let mut d = Daemon::start_with("[pools.default]\nthreads = 2\n", DURABLE);
    let mut c = d.client();
    let (dead, failed) = dead_and_failed(&mut c);
    barrier(&mut c);

    let mut c = d.crash_and_restart(c, DURABLE);
    let rec = status(&mut c, &dead);
    assert_eq!(
        (&rec["state"], &rec["attempt"]),
        (&json!("dead"), &json!(2))
    );
    assert_eq!(list_page(&mut c, json!({"state": "dead"})).0, [num(&dead)]);
    assert_eq!(
        list_page(&mut c, json!({"state": "failed"})).0,
        [num(&failed)]
    );

    let o = jobctl(&d.socket, &["retry", "--all-dead"]);
    let out = expect_code(&o, 0);
    assert!(out.starts_with(&format!("job {} ", num(&dead))), "{out}");
    let rec = wait_final(&mut c, &dead);
    assert_eq!(rec["state"], "dead");
    assert_eq!(rec["attempts"].as_array().unwrap().len(), 4, "{rec}");
    ok(&mut c, json!({"op": "retry", "job": failed}));
    let rec = wait_final(&mut c, &failed);
    assert_eq!(rec["state"], "failed");
    assert_eq!(rec["attempts"].as_array().unwrap().len(), 2, "{rec}");
}

#[test]
fn unique_keys_still_deduplicate_after_a_crash() {
    let mut d = Daemon::start_with("[pools.work]\nthreads = 1\n", DURABLE);
    let sock = d.socket.clone();
    expect_code(&jobctl(&sock, &["pause", "work"]), 0);
    let mut c = d.client();
    // Acknowledged submissions are committed, and the pause with them.
    let held = submit(
        &mut c,
        json!({"kind": "echo", "payload": 1, "pool": "work", "unique_key": "k1"}),
    );
    let later = submit(
        &mut c,
        json!({"kind": "echo", "payload": 2, "delay_ms": 3_600_000, "unique_key": "k2"}),
    );

    let mut c = d.crash_and_restart(c, DURABLE);
    assert_eq!(paused(&mut c, "work"), true);
    assert_eq!(status(&mut c, &held)["state"], "queued");
    let r = ok(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo", "payload": 3, "pool": "work", "unique_key": "k1"}}),
    );
    assert_eq!(
        (&r["job"], &r["deduplicated"], &r["state"]),
        (&held, &json!(true), &json!("queued"))
    );
    let r = ok(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo", "unique_key": "k2"}}),
    );
    assert_eq!(
        (&r["job"], &r["deduplicated"], &r["state"]),
        (&later, &json!(true), &json!("delayed"))
    );
    // Keys are per kind.
    let r = ok(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 1}, "pool": "work", "unique_key": "k1"}}),
    );
    assert_ne!(r["job"], held);
    assert!(r.get("deduplicated").is_none(), "{r}");

    // A waiting duplicate waits for the existing job, and gets its outcome.
    let mut w = d.client();
    w.send_line(
        &json!({"id": "dup", "op": "submit", "wait": true,
                "job": {"kind": "echo", "payload": 4, "pool": "work", "unique_key": "k1"}})
        .to_string(),
    )
    .unwrap();
    // The pool is still paused: the job has not run.
    let e = rq(&mut c, json!({"op": "wait", "job": held, "timeout_ms": 50}));
    assert_eq!(e["error"]["code"], "timeout", "{e}");
    expect_code(&jobctl(&sock, &["resume", "work"]), 0);
    let r = w.read().unwrap();
    assert_eq!(r["id"], "dup");
    assert_eq!(
        (&r["job"], &r["state"], &r["result"], &r["deduplicated"]),
        (&held, &json!("succeeded"), &json!(1), &json!(true)),
        "{r}"
    );
    // Once the job is final its key is free again.
    let r = ok(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo", "pool": "work", "unique_key": "k1"}}),
    );
    assert_ne!(r["job"], held);
    assert!(r.get("deduplicated").is_none(), "{r}");
}

#[test]
fn dependency_chains_go_on_after_a_crash() {
    let mut d = Daemon::start_with("[pools.work]\nthreads = 2\n", DURABLE);
    let mut c = d.client();
    ok(&mut c, json!({"op": "pause", "pool": "work"}));
    let a = submit(
        &mut c,
        json!({"kind": "echo", "payload": "a", "pool": "work"}),
    );
    let b = submit(
        &mut c,
        json!({"kind": "echo", "payload": "b", "pool": "work", "after": [a]}),
    );
    let cc = submit(
        &mut c,
        json!({"kind": "echo", "payload": "c", "after": [b]}),
    );
    let bad = submit(&mut c, failing(json!({"pool": "work"})));
    let orphan = submit(&mut c, json!({"kind": "echo", "after": [a, bad]}));
    assert_eq!(status(&mut c, &b)["state"], "delayed");

    let mut c = d.crash_and_restart(c, DURABLE);
    assert_eq!(paused(&mut c, "work"), true);
    for (id, state) in [
        (&a, "queued"),
        (&b, "delayed"),
        (&cc, "delayed"),
        (&bad, "queued"),
        (&orphan, "delayed"),
    ] {
        assert_eq!(status(&mut c, id)["state"], state, "{id}");
    }
    expect_code(&jobctl(&d.socket, &["resume", "work"]), 0);
    let rc = wait_final(&mut c, &cc);
    assert_eq!(
        (&rc["state"], &rc["result"]),
        (&json!("succeeded"), &json!("c"))
    );
    let (ra, rb) = (status(&mut c, &a), status(&mut c, &b));
    assert_eq!(rb["result"], "b");
    assert!(u(&rb["started_at"]) >= u(&ra["finished_at"]), "{ra}\n{rb}");
    assert!(u(&rc["started_at"]) >= u(&rb["finished_at"]), "{rb}\n{rc}");

    let ro = wait_final(&mut c, &orphan);
    assert_eq!(ro["state"], "cancelled", "{ro}");
    assert_eq!(ro["error"]["code"], "dependency_failed", "{ro}");
    let msg = ro["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("dependency {} ", num(&bad))), "{msg}");
    assert_eq!(ro["attempt"], 0, "it never ran");
}
