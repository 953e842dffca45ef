//! Retries end to end through the socket and jobctl: exponential backoff
//! with jitter checked on the recorded `run_at` and attempt times (never by
//! sleeping), per-kind defaults from the config and per-job overrides,
//! `dead` versus `failed`/`timed_out`, and `retry` (one job, or every dead
//! job of a pool with `jobctl retry --all-dead`).

mod common;
mod lifecycle_common;

use common::Daemon;
use lifecycle_common::*;
use serde_json::{Value, json};

/// `run_at - end` of the attempt that just failed must be the nominal
/// delay minus at most 20% jitter (plus a few ms between the two clock
/// reads that record them).
fn assert_backoff(rec: &Value, attempt: usize, nominal: u64) {
    let end = u(&rec["attempts"][attempt - 1]["end"]);
    let delay = u(&rec["run_at"]) as i64 - end as i64;
    let low = (nominal * 8 / 10) as i64;
    assert!(
        delay >= low && delay <= nominal as i64 + 20,
        "after attempt {attempt}: run_at is {delay} ms after the failure, want {low}..={nominal}: {rec}"
    );
}

#[test]
fn backoff_grows_by_its_factor_up_to_its_cap() {
    let d = Daemon::start_with(GATED, &[]);
    let mut c = d.client();
    let g = gate(d.dir.path(), "backoff");
    let id = submit(
        &mut c,
        json!({"kind": "gated", "payload": {"gate": g}, "max_attempts": 4,
               "backoff": {"base_ms": 100, "factor": 2, "max_ms": 300}}),
    );
    // Nominal delays 100, 200, then 400 capped at 300. Each attempt is held
    // at its gate, so the record of the failure before it stays readable.
    let mut run_ats = Vec::new();
    for (attempt, nominal) in [(1, 100), (2, 200), (3, 300)] {
        poll_state(&mut c, &id, "running", attempt as u64);
        open(&g);
        let rec = poll_state(&mut c, &id, "running", attempt as u64 + 1);
        assert_backoff(&rec, attempt, nominal);
        assert_eq!(rec["error"]["code"], "job_failed", "{rec}");
        // The retry did not start before its time.
        assert!(
            u(&rec["attempts"][attempt]["start"]) >= u(&rec["run_at"]),
            "{rec}"
        );
        run_ats.push(u(&rec["run_at"]));
    }
    open(&g);
    let rec = wait_final(&mut c, &id);
    assert_eq!(rec["state"], "dead", "{rec}");
    assert_eq!(rec["attempt"], 4);
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4, "{rec}");
    for (i, a) in attempts.iter().enumerate() {
        let err = a["error"].as_str().unwrap_or_default();
        assert!(err.contains("exit"), "attempt {}: {a}", i + 1);
        assert!(u(&a["end"]) >= u(&a["start"]));
        if i > 0 {
            assert!(u(&a["start"]) >= run_ats[i - 1], "{rec}");
        }
    }
}

#[test]
fn the_default_backoff_is_one_second_minus_jitter() {
    let d = Daemon::start();
    let mut c = d.client();
    let id = submit(&mut c, failing(json!({"max_attempts": 2})));
    let rec = poll_state(&mut c, &id, "delayed", 1);
    assert_eq!(
        rec["backoff"],
        json!({"base_ms": 1000, "factor": 2.0, "max_ms": 300000})
    );
    assert_backoff(&rec, 1, 1000);
    assert_eq!(rec["max_attempts"], 2);
    assert_eq!(rec["error"]["code"], "job_failed");
    // A job waiting for its retry can be cancelled; it never runs again.
    let r = ok(&mut c, json!({"op": "cancel", "job": id}));
    assert_eq!(r["job"]["state"], "cancelled");
    assert_eq!(r["job"]["attempt"], 1);
}

const KIND_DEFAULTS: &str = r#"
[kinds.sleep]
max_attempts = 3
backoff = { base_ms = 5000, factor = 3 }

[kinds.echo]
timeout_secs = 7
"#;

#[test]
fn kinds_take_defaults_from_the_config_and_jobs_override_them() {
    let d = Daemon::start_with(KIND_DEFAULTS, &[]);
    let mut c = d.client();

    // The kind's attempts and backoff.
    let id = submit(&mut c, failing(json!({})));
    let rec = poll_state(&mut c, &id, "delayed", 1);
    assert_eq!(rec["max_attempts"], 3);
    assert_eq!(
        rec["backoff"],
        json!({"base_ms": 5000, "factor": 3.0, "max_ms": 300000})
    );
    assert_backoff(&rec, 1, 5000);
    ok(&mut c, json!({"op": "cancel", "job": id}));

    // The job's own: a single attempt ends failed, not dead.
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": failing(json!({"max_attempts": 1})), "wait": true}),
    );
    assert_eq!((&r["ok"], &r["state"]), (&json!(false), &json!("failed")));
    assert_eq!(r["error"]["code"], "job_failed");

    // The kind's three attempts with the job's short backoff: dead, every
    // attempt's error kept.
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": failing(json!({"backoff": {"base_ms": 1}})), "wait": true}),
    );
    assert_eq!(
        (&r["ok"], &r["state"]),
        (&json!(false), &json!("dead")),
        "{r}"
    );
    let rec = status(&mut c, &r["job"]);
    assert_eq!(rec["attempt"], 3);
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts
            .iter()
            .all(|a| a["error"].as_str().unwrap().contains("invalid payload")),
        "{rec}"
    );

    // Timeouts: the kind's default, and attempts that time out are retried
    // like failures, then the job is dead.
    let echo = submit(&mut c, json!({"kind": "echo", "payload": 1}));
    let rec = status(&mut c, &echo);
    assert_eq!(rec["timeout_ms"], 7000, "{rec}");
    let r = rq(
        &mut c,
        json!({"op": "submit", "wait": true, "job": {"kind": "sleep", "payload": {"ms": 60000},
            "timeout_ms": 30, "max_attempts": 2, "backoff": {"base_ms": 1}}}),
    );
    assert_eq!(r["state"], "dead", "{r}");
    let rec = status(&mut c, &r["job"]);
    assert_eq!(rec["error"]["code"], "timed_out", "{rec}");
    for a in rec["attempts"].as_array().unwrap() {
        assert_eq!(a["error"], "timed out after 30 ms", "{rec}");
    }
    let r = rq(
        &mut c,
        json!({"op": "submit", "wait": true, "job": {"kind": "sleep", "payload": {"ms": 60000},
            "timeout_ms": 30, "max_attempts": 1}}),
    );
    assert_eq!(
        (&r["state"], &r["error"]["code"]),
        (&json!("timed_out"), &json!("timed_out"))
    );
}

#[test]
fn jobctl_submits_with_backoff_and_shows_every_attempt() {
    let d = Daemon::start();
    let sock = d.socket.as_path();
    let o = jobctl(
        sock,
        &[
            "submit",
            "sleep",
            r#"{"ms":"soon"}"#,
            "--wait",
            "--max-attempts",
            "3",
            "--backoff-base",
            "5ms",
            "--backoff-factor",
            "1.5",
            "--backoff-max",
            "1s",
        ],
    );
    expect_code(&o, 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dead"), "{err}");
    let id = err
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no id in {err}"))
        .to_string();
    let mut c = d.client();
    let rec = status(&mut c, &json!(id));
    assert_eq!(
        rec["backoff"],
        json!({"base_ms": 5, "factor": 1.5, "max_ms": 1000})
    );
    let out = expect_code(&jobctl(sock, &["status", &id]), 0);
    assert!(out.contains("attempt:       3 of 3"), "{out}");
    assert!(out.contains("attempts:"), "{out}");
    assert_eq!(
        out.matches("invalid payload").count(),
        4,
        "3 attempts + the error: {out}"
    );
}

#[test]
fn dead_and_failed_jobs_are_retried_with_fresh_attempts() {
    let d = Daemon::start_with("[pools.work]\nthreads = 2\n", &[]);
    let mut c = d.client();
    let (dead, failed) = dead_and_failed(&mut c);

    // Listed by state; retried: queued again, attempt 0, history kept.
    let (ids, _) = list_page(&mut c, json!({"state": "dead"}));
    assert_eq!(ids, [num(&dead)]);
    let (ids, _) = list_page(&mut c, json!({"state": "failed"}));
    assert_eq!(ids, [num(&failed)]);
    let r = ok(&mut c, json!({"op": "retry", "job": dead}));
    assert!(
        matches!(r["job"]["state"].as_str(), Some("queued" | "running")),
        "{r}"
    );
    // Fresh attempts (it may have started already), the old ones kept.
    let fresh = u(&r["job"]["attempt"]);
    assert!(fresh <= 1, "{r}");
    assert_eq!(
        r["job"]["attempts"].as_array().unwrap().len() as u64,
        2 + fresh
    );
    let rec = wait_final(&mut c, &dead);
    assert_eq!(
        (&rec["state"], &rec["attempt"]),
        (&json!("dead"), &json!(2))
    );
    assert_eq!(rec["attempts"].as_array().unwrap().len(), 4, "{rec}");
    ok(&mut c, json!({"op": "retry", "job": failed}));
    assert_eq!(wait_final(&mut c, &failed)["state"], "failed");

    // Only failed and dead jobs.
    let r = rq(
        &mut c,
        json!({"op": "submit", "wait": true, "job": {"kind": "echo"}}),
    );
    let e = rq(&mut c, json!({"op": "retry", "job": r["job"]}));
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    let running = submit(&mut c, json!({"kind": "sleep", "payload": {"ms": 60000}}));
    poll_state(&mut c, &running, "running", 1);
    let e = rq(&mut c, json!({"op": "retry", "job": running}));
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("running"),
        "{e}"
    );
    ok(&mut c, json!({"op": "cancel", "job": running}));
}

#[test]
fn jobctl_retry_all_dead_pages_through_every_dead_job_of_a_pool() {
    let d = Daemon::start_with("[pools.work]\nthreads = 2\n", &[]);
    let mut c = d.client();
    // 150 dead jobs on `work` (more than one page of 100), one on `default`.
    let jobs: Vec<Value> = (0..150)
        .map(|_| failing(json!({"pool": "work", "max_attempts": 2, "backoff": {"base_ms": 1}})))
        .collect();
    let r = ok(
        &mut c,
        json!({"op": "submit_batch", "wait": true, "jobs": jobs}),
    );
    assert!(
        r["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["state"] == "dead")
    );
    let r = rq(
        &mut c,
        json!({"op": "submit", "wait": true,
               "job": failing(json!({"max_attempts": 2, "backoff": {"base_ms": 1}}))}),
    );
    assert_eq!(r["state"], "dead");
    let other = num(&r["job"]);

    // Paused, so the retried jobs stay queued where the test can see them.
    let sock = d.socket.as_path();
    expect_code(&jobctl(sock, &["pause", "work"]), 0);
    let o = jobctl(sock, &["retry", "--all-dead", "--pool", "work"]);
    let out = expect_code(&o, 0);
    assert_eq!(out.lines().count(), 150, "{out}");
    assert!(
        out.lines()
            .all(|l| l.starts_with("job ") && l.ends_with(" queued")),
        "{out}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("retried 150 dead job(s) (pool work)"), "{err}");
    let (dead, _) = list_all(&mut c, json!({"state": "dead", "limit": 1000}));
    assert_eq!(dead, [other], "only the other pool's dead job is left");
    let (queued, _) = list_all(&mut c, json!({"state": "queued", "pool": "work"}));
    assert_eq!(queued.len(), 150);

    // Nothing dead on work: nothing to do, still success.
    let o = jobctl(sock, &["retry", "--all-dead", "--pool", "work"]);
    assert_eq!(expect_code(&o, 0), "");
    // Every pool, as JSON.
    let o = jobctl(sock, &["--json", "retry", "--all-dead"]);
    let out = expect_code(&o, 0);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["job"]["id"], other.to_string());
    expect_code(&jobctl(sock, &["resume", "work"]), 0);
    for id in queued {
        assert_eq!(
            wait_final(&mut c, &json!(id.to_string()))["attempts"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
    }
}
