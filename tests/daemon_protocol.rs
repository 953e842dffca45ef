//! Protocol round trips against the real daemon: every op, the exact answer
//! shapes of DESIGN.md, job outcomes through `submit` with `wait`, and the
//! peer credentials recorded on jobs.

// The shared harness predates clippy's collapsible_if/manual_contains
// lints; it is not ours to change.
mod common;

use std::time::{Duration, Instant};

use common::{Client, Daemon, rq};
use serde_json::{Value, json};

/// Poll `status` until the job is in `state` (at most 10 s).
fn wait_state(c: &mut Client, job: &Value, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = rq(c, json!({"op": "status", "job": job}));
        if r["job"]["state"] == state {
            return r;
        }
        assert!(Instant::now() < deadline, "job never became {state}: {r}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hello_has_the_contract_shape() {
    let d = Daemon::start();
    let mut c = d.client();
    let r = rq(&mut c, json!({"id": 1, "op": "hello"}));
    assert_eq!(
        r,
        json!({"id": 1, "ok": true, "server": "jobd", "version": "0.1.0", "protocol": 1})
    );
    let r = rq(&mut c, json!({"id": "x-1", "op": "hello"}));
    assert_eq!(r["id"], "x-1");
}

#[test]
fn submit_wait_status_wait_and_outcomes() {
    let d = Daemon::start_with("[pools.default]\nthreads = 4\n", &[]);
    let mut c = d.client();

    // Submit with wait: the result comes back.
    let r = rq(
        &mut c,
        json!({"id": 2, "op": "submit", "job": {"kind": "echo", "payload": {"x": 1}}, "wait": true}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["state"], "succeeded");
    assert_eq!(r["result"], json!({"x": 1}));
    assert!(r["job"].is_string());

    // Submit without wait, every field.
    let r = rq(
        &mut c,
        json!({"id": 3, "op": "submit", "job": {"kind": "sleep", "payload": {"ms": 300},
            "pool": "default", "priority": 5, "delay_ms": 0, "timeout_ms": 5000,
            "max_attempts": 3, "unique_key": "k1",
            "backoff": {"base_ms": 10, "factor": 2.0, "max_ms": 100}}}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let job = r["job"].clone();
    assert!(
        matches!(r["state"].as_str(), Some("queued" | "running")),
        "{r}"
    );

    // The same unique key while it runs: the same job, deduplicated.
    let dup = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 1}, "unique_key": "k1"}}),
    );
    assert_eq!(dup["job"], job);
    assert_eq!(dup["deduplicated"], true);

    // status: the record with every contract field.
    let st = wait_state(&mut c, &job, "running");
    let rec = &st["job"];
    for field in [
        "id",
        "kind",
        "pool",
        "state",
        "priority",
        "attempt",
        "max_attempts",
        "payload",
        "result",
        "error",
        "attempts",
        "created_at",
        "submitted_by",
    ] {
        assert!(rec.get(field).is_some(), "status lacks {field}: {rec}");
    }
    assert_eq!(rec["id"], job);
    assert_eq!(rec["kind"], "sleep");
    assert_eq!(rec["pool"], "default");
    assert_eq!(rec["priority"], 5);
    assert_eq!(rec["attempt"], 1);
    assert_eq!(rec["max_attempts"], 3);
    assert_eq!(rec["payload"], json!({"ms": 300}));
    assert_eq!(rec["timeout_ms"], 5000);

    // Numeric ids work too; wait returns the final record.
    let id_num: u64 = job.as_str().unwrap().parse().unwrap();
    let w = rq(
        &mut c,
        json!({"id": 5, "op": "wait", "job": id_num, "timeout_ms": 5000}),
    );
    assert_eq!(w["ok"], true, "{w}");
    assert_eq!(w["job"]["state"], "succeeded");
    assert_eq!(
        w["job"]["result"]["slept_ms"].as_u64().map(|m| m >= 300),
        Some(true)
    );

    // A payload the kind cannot decode fails the job, saying why.
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": "soon"}}, "wait": true}),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["state"], "failed");
    assert_eq!(r["error"]["code"], "job_failed");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("soon"),
        "{r}"
    );
    assert!(r["job"].is_string());

    // Past its timeout: timed_out.
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 5000}, "timeout_ms": 50}, "wait": true}),
    );
    assert_eq!(
        (r["ok"].clone(), r["state"].clone()),
        (json!(false), json!("timed_out")),
        "{r}"
    );
    assert_eq!(r["error"]["code"], "timed_out");

    // Retries used up: dead, still job_failed.
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": "x"}, "max_attempts": 2,
            "backoff": {"base_ms": 1, "max_ms": 1}}, "wait": true}),
    );
    assert_eq!(r["state"], "dead", "{r}");
    assert_eq!(r["error"]["code"], "job_failed");

    // wait on a job that is not final in time: timeout, and the job goes on.
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 400}}}),
    );
    let slow = r["job"].clone();
    let w = rq(&mut c, json!({"op": "wait", "job": slow, "timeout_ms": 20}));
    assert_eq!(w["ok"], false);
    assert_eq!(w["error"]["code"], "timeout");
    let w = rq(
        &mut c,
        json!({"op": "wait", "job": slow, "timeout_ms": 5000}),
    );
    assert_eq!(w["job"]["state"], "succeeded", "{w}");
}

#[test]
fn cancelled_and_dependency_failed_outcomes() {
    let d = Daemon::start_with("[pools.default]\nthreads = 2\n", &[]);
    let mut a = d.client();
    let mut b = d.client();

    // A running job cancelled from another connection: its waiter hears
    // `cancelled` at once.
    let r = rq(
        &mut b,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 10000}}}),
    );
    let job = r["job"].clone();
    a.send_line(
        &json!({"id": "w", "op": "submit", "job": {"kind": "echo"}, "wait": true}).to_string(),
    )
    .unwrap();
    assert_eq!(a.read().unwrap()["id"], "w");
    a.send_line(&json!({"id": "w2", "op": "wait", "job": job}).to_string())
        .unwrap();
    wait_state(&mut b, &job, "running");
    let started = Instant::now();
    let c = rq(&mut b, json!({"op": "cancel", "job": job}));
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["job"]["state"], "cancelled");
    let w = a.read().unwrap();
    assert_eq!(w["id"], "w2");
    assert_eq!(w["job"]["state"], "cancelled", "{w}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // A queued job that is cancelled never runs.
    let r = rq(
        &mut b,
        json!({"op": "submit", "job": {"kind": "echo", "payload": 1, "delay_ms": 60000}}),
    );
    assert_eq!(r["state"], "delayed", "{r}");
    let c = rq(&mut b, json!({"op": "cancel", "job": r["job"]}));
    assert_eq!(c["job"]["state"], "cancelled");
    assert_eq!(c["job"]["attempt"], 0);

    // A dependency that ends without success cancels its dependents with
    // dependency_failed (ordered: the dependent is seen waiting first).
    let x = rq(
        &mut b,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 10000}}}),
    );
    a.send_line(
        &json!({"id": "y", "op": "submit", "job": {"kind": "echo", "after": [x["job"]]}, "wait": true})
            .to_string(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rq(
        &mut b,
        json!({"op": "list", "kind": "echo", "state": "delayed"}),
    )["jobs"]
        .as_array()
        .is_none_or(|j| j.is_empty())
    {
        assert!(Instant::now() < deadline, "dependent never waited");
        std::thread::sleep(Duration::from_millis(5));
    }
    rq(&mut b, json!({"op": "cancel", "job": x["job"]}));
    let y = a.read().unwrap();
    assert_eq!(y["id"], "y");
    assert_eq!(y["ok"], false, "{y}");
    assert_eq!(y["state"], "cancelled");
    assert_eq!(y["error"]["code"], "dependency_failed");
    // Submitting after the dependency already failed is refused outright.
    let r = rq(
        &mut b,
        json!({"op": "submit", "job": {"kind": "echo", "after": [x["job"]]}}),
    );
    assert_eq!(r["error"]["code"], "dependency_failed", "{r}");
    // And one that succeeded lets them run.
    let x = rq(
        &mut b,
        json!({"op": "submit", "job": {"kind": "echo", "payload": 7}}),
    );
    let y = rq(
        &mut b,
        json!({"op": "submit", "job": {"kind": "echo", "payload": 8, "after": [x["job"]]}, "wait": true}),
    );
    assert_eq!(y["result"], 8, "{y}");
}

#[test]
fn submit_batch_is_all_or_nothing() {
    let d = Daemon::start();
    let mut c = d.client();
    let r = rq(
        &mut c,
        json!({"op": "submit_batch", "jobs": [
            {"kind": "echo", "payload": 1}, {"kind": "echo", "payload": 2}]}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let ids = r["jobs"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 2);
    for (i, id) in ids.iter().enumerate() {
        let w = rq(&mut c, json!({"op": "wait", "job": id, "timeout_ms": 5000}));
        assert_eq!(w["job"]["payload"], json!(i + 1));
    }

    // One bad job (an unknown kind at index 1) rejects the whole batch.
    let before =
        rq(&mut c, json!({"op": "stats"}))["pools"]["default"]["counters"]["submitted"].clone();
    let r = rq(
        &mut c,
        json!({"op": "submit_batch", "jobs": [{"kind": "echo"}, {"kind": "nope"}]}),
    );
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "bad_request");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("job 1"),
        "{r}"
    );
    let after =
        rq(&mut c, json!({"op": "stats"}))["pools"]["default"]["counters"]["submitted"].clone();
    assert_eq!(before, after, "a rejected batch admitted jobs");

    // Malformed at parse time: also named by index.
    let r = rq(
        &mut c,
        json!({"op": "submit_batch", "jobs": [{"kind": "echo"}, {"kind": "echo", "prio": 1}]}),
    );
    assert_eq!(r["error"]["code"], "bad_request");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("job 1"),
        "{r}"
    );

    // With wait: every outcome, in order.
    let r = rq(
        &mut c,
        json!({"op": "submit_batch", "wait": true, "jobs": [
            {"kind": "echo", "payload": "a"}, {"kind": "sleep", "payload": {"ms": "bad"}}]}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["outcomes"][0]["state"], "succeeded");
    assert_eq!(r["outcomes"][0]["result"], "a");
    assert_eq!(r["outcomes"][1]["state"], "failed");
    assert_eq!(r["outcomes"][1]["error"]["code"], "job_failed");
}

#[test]
fn status_wait_cancel_retry_name_missing_jobs() {
    let d = Daemon::start();
    let mut c = d.client();
    for op in ["status", "wait", "cancel", "retry"] {
        for job in [
            json!("abc"),
            json!("999999"),
            json!(999999),
            json!(-1),
            json!(1.5),
        ] {
            let r = rq(&mut c, json!({"op": op, "job": job}));
            assert_eq!(r["error"]["code"], "not_found", "{op} {job}: {r}");
        }
        for job in [json!([1]), json!({"id": 1}), json!(null), json!(true)] {
            let r = rq(&mut c, json!({"op": op, "job": job}));
            assert_eq!(r["error"]["code"], "bad_request", "{op} {job}: {r}");
        }
        let r = rq(&mut c, json!({"op": op}));
        assert_eq!(r["error"]["code"], "bad_request", "{op}: {r}");
    }
}

#[test]
fn retry_queues_failed_jobs_again() {
    let d = Daemon::start();
    let mut c = d.client();
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": "x"}}, "wait": true}),
    );
    assert_eq!(r["state"], "failed");
    let job = r["job"].clone();
    let r = rq(&mut c, json!({"op": "retry", "job": job}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        matches!(
            r["job"]["state"].as_str(),
            Some("queued" | "running" | "failed")
        ),
        "{r}"
    );
    let w = rq(
        &mut c,
        json!({"op": "wait", "job": job, "timeout_ms": 5000}),
    );
    assert_eq!(w["job"]["state"], "failed");
    assert_eq!(w["job"]["attempts"].as_array().unwrap().len(), 2, "{w}");

    // Succeeded jobs cannot be retried.
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo"}, "wait": true}),
    );
    let r = rq(&mut c, json!({"op": "retry", "job": r["job"]}));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
}

#[test]
fn list_filters_and_pages() {
    let d = Daemon::start();
    let mut c = d.client();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = rq(
            &mut c,
            json!({"op": "submit", "job": {"kind": "echo", "payload": i}, "wait": true}),
        );
        ids.push(r["job"].clone());
    }
    rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": "x"}}, "wait": true}),
    );

    let r = rq(&mut c, json!({"op": "list", "kind": "echo"}));
    let got: Vec<Value> = r["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].clone())
        .collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(got, newest_first);
    assert!(r.get("cursor").is_none(), "{r}");

    // Pages of two, newest first, following the cursor.
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let r = rq(
            &mut c,
            json!({"op": "list", "kind": "echo", "limit": 2, "cursor": cursor}),
        );
        seen.extend(
            r["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].clone()),
        );
        match r.get("cursor") {
            Some(cur) => cursor = cur.clone(),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);

    let r = rq(
        &mut c,
        json!({"op": "list", "kind": "echo", "order": "oldest", "limit": 1}),
    );
    assert_eq!(r["jobs"][0]["id"], ids[0]);
    assert!(r["cursor"].is_string());

    let r = rq(&mut c, json!({"op": "list", "state": "failed"}));
    assert_eq!(r["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(r["jobs"][0]["kind"], "sleep");
    let r = rq(&mut c, json!({"op": "list", "pool": "nope"}));
    assert_eq!(r["jobs"], json!([]));
    for bad in [
        json!({"op": "list", "state": "sleepy"}),
        json!({"op": "list", "limit": 0}),
        json!({"op": "list", "limit": -5}),
        json!({"op": "list", "order": "random"}),
        json!({"op": "list", "colour": "red"}),
    ] {
        assert_eq!(
            rq(&mut c, bad.clone())["error"]["code"],
            "bad_request",
            "{bad}"
        );
    }
}

#[test]
fn stats_pause_resume() {
    let d = Daemon::start_with(
        "[pools.default]\nthreads = 1\n[pools.io]\nthreads = 1\n",
        &[],
    );
    let mut c = d.client();
    rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo"}, "wait": true}),
    );
    let s = rq(&mut c, json!({"op": "stats"}));
    assert_eq!(s["ok"], true);
    assert_eq!(s["active_jobs"], 0);
    assert_eq!(s["store"], Value::Null, "memory: no store");
    let p = &s["pools"]["default"];
    assert_eq!(p["threads"], 1);
    assert_eq!(p["counters"]["succeeded"], 1);
    assert!(s["pools"]["io"].is_object());
    let k = &s["kinds"]["echo"];
    assert_eq!(k["counters"]["succeeded"], 1);
    for h in ["queue_wait_ms", "run_time_ms"] {
        for q in ["p50", "p90", "p99", "max"] {
            assert!(k[h][q].is_number(), "{h}.{q}: {s}");
        }
    }

    // Paused: submissions are taken but nothing starts.
    let r = rq(&mut c, json!({"op": "pause", "pool": "io"}));
    assert_eq!(
        r,
        json!({"id": r["id"], "ok": true, "pool": "io", "paused": true})
    );
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo", "pool": "io", "payload": 3}}),
    );
    assert_eq!(r["ok"], true);
    let job = r["job"].clone();
    let w = rq(&mut c, json!({"op": "wait", "job": job, "timeout_ms": 100}));
    assert_eq!(w["error"]["code"], "timeout");
    let s = rq(&mut c, json!({"op": "stats"}));
    assert_eq!(s["pools"]["io"]["paused"], true);
    assert_eq!(s["pools"]["io"]["queued"], 1);
    let r = rq(&mut c, json!({"op": "resume", "pool": "io"}));
    assert_eq!(r["paused"], false);
    let w = rq(
        &mut c,
        json!({"op": "wait", "job": job, "timeout_ms": 5000}),
    );
    assert_eq!(w["job"]["result"], 3);

    assert_eq!(
        rq(&mut c, json!({"op": "pause", "pool": "nope"}))["error"]["code"],
        "unknown_pool"
    );
    assert_eq!(
        rq(&mut c, json!({"op": "pause"}))["error"]["code"],
        "bad_request"
    );
}

#[test]
fn peer_credentials_are_recorded() {
    let d = Daemon::start();
    let mut c = d.client();
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo"}, "wait": true}),
    );
    let st = rq(&mut c, json!({"op": "status", "job": r["job"]}));
    let by = &st["job"]["submitted_by"];
    // SAFETY: getuid/getgid cannot fail.
    #[allow(unsafe_code)]
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!(by["uid"], uid, "{st}");
    assert_eq!(by["gid"], gid, "{st}");
    assert_eq!(by["pid"], std::process::id(), "{st}");
}

#[test]
fn pipelined_answers_may_come_out_of_order() {
    let d = Daemon::start_with("[pools.default]\nthreads = 2\n", &[]);
    let mut c = d.client();
    c.send_line(&json!({"id": "slow", "op": "submit", "job": {"kind": "sleep", "payload": {"ms": 300}}, "wait": true}).to_string())
        .unwrap();
    c.send_line(&json!({"id": "fast", "op": "hello"}).to_string())
        .unwrap();
    assert_eq!(c.read().unwrap()["id"], "fast");
    let slow = c.read().unwrap();
    assert_eq!(slow["id"], "slow");
    assert_eq!(slow["state"], "succeeded");
}

#[test]
fn metrics_answers_prometheus_text() {
    // Its content is tested in observe_metrics.rs.
    let d = Daemon::start();
    let mut c = d.client();
    let r = rq(&mut c, json!({"op": "metrics"}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap()
            .contains("# TYPE jobd_queue_depth gauge")
    );
    assert_eq!(
        rq(&mut c, json!({"op": "metrics", "format": "json"}))["error"]["code"],
        "bad_request"
    );
}

#[test]
fn a_handler_that_stops_at_its_deadline_is_timed_out_not_succeeded() {
    // `sleep` stops as soon as ctx.is_cancelled() turns true, which happens
    // at the deadline: the outcome must still be timed_out, every time.
    let d = Daemon::start_with("[pools.default]\nthreads = 4\n", &[]);
    let mut c = d.client();
    for i in 0..20 {
        c.send_line(
            &json!({"id": i, "op": "submit", "wait": true,
                "job": {"kind": "sleep", "payload": {"ms": 5000}, "timeout_ms": 15}})
            .to_string(),
        )
        .unwrap();
    }
    for _ in 0..20 {
        let r = c.read().unwrap();
        assert_eq!(r["state"], "timed_out", "{r}");
        assert_eq!(r["error"]["code"], "timed_out", "{r}");
    }
}
