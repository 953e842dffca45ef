//! Durability of the real daemon with its SQLite store: restarts keep
//! queued, delayed and finished jobs; SIGKILL under load loses no
//! acknowledged job and never runs a job twice at once; a full disk gives
//! `unavailable` and recovers; a corrupt store stops start-up clearly.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Daemon};
use serde_json::{Value, json};

const WORK_POOL: &str = "[pools.work]\nthreads = 1\nmax_queued = 100000\n";

fn ok(v: &Value) -> &Value {
    assert_eq!(v["ok"], json!(true), "request failed: {v}");
    v
}

fn submit(c: &mut Client, job: Value) -> String {
    let r = c.request(json!({"op": "submit", "job": job})).unwrap();
    ok(&r)["job"].as_str().expect("job id").to_string()
}

fn status(c: &mut Client, id: &str) -> Value {
    let r = c.request(json!({"op": "status", "job": id})).unwrap();
    ok(&r)["job"].clone()
}

fn wait(c: &mut Client, id: &str, ms: u64) -> Value {
    let r = c
        .request(json!({"op": "wait", "job": id, "timeout_ms": ms}))
        .unwrap();
    ok(&r)["job"].clone()
}

#[test]
fn restart_keeps_queued_order_priorities_delayed_jobs_and_results() {
    let mut d = Daemon::start_with(WORK_POOL, &["--durability", "os"]);
    let mut c = d.client();
    let done = submit(
        &mut c,
        json!({"kind": "echo", "payload": {"keep": 1}, "pool": "work"}),
    );
    assert_eq!(wait(&mut c, &done, 10_000)["state"], json!("succeeded"));
    ok(&c.request(json!({"op": "pause", "pool": "work"})).unwrap());
    // Priorities 1, 5, 3, 5: expected run order 5 (first), 5 (second), 3, 1.
    let queued: Vec<String> = [1, 5, 3, 5]
        .iter()
        .map(|p| {
            submit(
                &mut c,
                json!({"kind": "sleep", "payload": {"ms": 5}, "pool": "work", "priority": p}),
            )
        })
        .collect();
    let delayed = submit(
        &mut c,
        json!({"kind": "echo", "payload": 1, "pool": "work", "delay_ms": 3_600_000}),
    );
    let run_at = status(&mut c, &delayed)["run_at"].clone();

    let mut c = d.stop_and_restart(c, &["--durability", "os"]);
    let rec = status(&mut c, &done);
    assert_eq!(rec["state"], json!("succeeded"));
    assert_eq!(rec["result"], json!({"keep": 1}));
    let rec = status(&mut c, &delayed);
    assert_eq!(rec["state"], json!("delayed"));
    assert_eq!(rec["run_at"], run_at);
    for id in &queued {
        assert_eq!(
            status(&mut c, id)["state"],
            json!("queued"),
            "paused survives restart"
        );
    }
    ok(&c.request(json!({"op": "resume", "pool": "work"})).unwrap());
    let started: Vec<u64> = queued
        .iter()
        .map(|id| wait(&mut c, id, 10_000)["started_at"].as_u64().unwrap())
        .collect();
    // One worker, 5 ms each: start times order the runs.
    let order = [1usize, 3, 2, 0];
    for w in order.windows(2) {
        assert!(
            started[w[0]] < started[w[1]],
            "expected job {} before job {}: {started:?}",
            w[0],
            w[1]
        );
    }
}

/// Submit continuously from several connections, SIGKILL the daemon at
/// random moments, restart it, and check that every acknowledged job is
/// still there and reaches a final state, with attempts that never overlap.
#[test]
fn a_waiting_submit_is_answered_only_once_its_end_is_committed() {
    // With a store, a submit that waits is acknowledged by its outcome
    // alone: the job runs at once, and the answer waits until the job's
    // final record is committed. So every job answered before a crash is
    // found finished, with its result, after the restart.
    let args = ["--durability", "os"];
    let mut d = Daemon::start_with(WORK_POOL, &args);
    let mut c = d.client();
    let mut answered = Vec::new();
    for i in 0..40 {
        let r = c
            .request(json!({"op": "submit", "wait": true,
                "job": {"kind": "echo", "payload": {"n": i}, "pool": "work"}}))
            .unwrap();
        assert_eq!(ok(&r)["state"], json!("succeeded"), "{r}");
        answered.push((r["job"].as_str().expect("job id").to_string(), i));
    }
    let mut c = d.crash_and_restart(c, &args);
    for (id, i) in answered {
        let rec = status(&mut c, &id);
        assert_eq!(
            rec["state"],
            json!("succeeded"),
            "{id} after the crash: {rec}"
        );
        assert_eq!(rec["result"], json!({"n": i}), "{rec}");
        assert_eq!(rec["attempt"], json!(1), "{rec}");
    }
}

fn kill_cycles(cycles: usize) {
    let mut d = Daemon::start_with(
        "[pools.default]\nthreads = 2\nmax_queued = 1000000\n",
        &["--durability", "os"],
    );
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut seed = std::process::id() as u64 ^ 0x5eed;
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..3)
            .map(|p| {
                let socket = d.socket.clone();
                let acked = acked.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let Ok(mut c) = Client::connect(&socket) else {
                        return;
                    };
                    let mut n = 0u64;
                    // One producer waits for each outcome: its jobs run
                    // before they are written, and an answer must mean a
                    // committed ending.
                    let waiting = p == 2;
                    while !stop.load(Ordering::Relaxed) {
                        let job = if n.is_multiple_of(3) {
                            json!({"kind": "sleep", "payload": {"ms": 2}, "max_attempts": 5,
                                   "backoff": {"base_ms": 1, "factor": 1.0, "max_ms": 1}})
                        } else {
                            json!({"kind": "echo", "payload": [cycle, p, n]})
                        };
                        match c.request(json!({"op": "submit", "job": job, "wait": waiting})) {
                            Ok(r) if r["ok"] == json!(true) => {
                                acked
                                    .lock()
                                    .unwrap()
                                    .push(r["job"].as_str().unwrap().to_string());
                            }
                            // Killed mid-request: this one was not acknowledged.
                            _ => return,
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        // xorshift: a kill somewhere between 50 and 400 ms in.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 350));
        common::signal(&d.child, libc::SIGKILL);
        let _ = d.child.wait();
        stop.store(true, Ordering::Relaxed);
        for p in producers {
            p.join().unwrap();
        }
        d.restart(&["--durability", "os"]);
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "too little load to prove anything: {}",
        acked.len()
    );
    let unique: HashSet<&String> = acked.iter().collect();
    assert_eq!(unique.len(), acked.len(), "an id was acknowledged twice");
    let mut c = d.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &acked {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let rec = wait(&mut c, id, left.max(1));
        let state = rec["state"].as_str().unwrap();
        assert!(
            ["succeeded", "failed", "dead"].contains(&state),
            "job {id} ended {state}"
        );
        let attempts = rec["attempts"].as_array().unwrap();
        for w in attempts.windows(2) {
            let end = w[0]["end"].as_u64().expect("an earlier attempt has ended");
            assert!(
                w[1]["start"].as_u64().unwrap() >= end,
                "job {id} ran twice at once: {rec}"
            );
        }
    }
    eprintln!(
        "{cycles} kill cycles, {} acknowledged jobs, none lost",
        acked.len()
    );
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_job() {
    kill_cycles(5);
}

/// Run jobd to completion on a prepared state directory (it is expected
/// to refuse to start).
fn run_on_state(
    dir: &std::path::Path,
    state: &std::path::Path,
    durability: &str,
) -> std::process::Output {
    Command::new(common::jobd_bin())
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .arg("--state-dir")
        .arg(state)
        .args(["--durability", durability, "--config", "/dev/null"])
        .env_remove("JOBD_SOCKET")
        .output()
        .unwrap()
}

#[test]
fn a_corrupt_store_stops_start_up_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("jobs.db"), vec![0x5au8; 16384]).unwrap();
    let out = run_on_state(dir.path(), &state, "os");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jobs.db"), "message names the file: {err}");
    assert!(
        err.contains("not a database"),
        "message gives the cause: {err}"
    );
    assert!(
        !dir.path().join("s.sock").exists(),
        "no socket for a broken store"
    );
}

#[test]
fn an_unwritable_store_stops_start_up_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("jobs.db")).unwrap(); // a directory, not a file
    let out = run_on_state(dir.path(), &state, "fsync");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jobs.db"), "message names the file: {err}");
}

#[test]
fn a_full_disk_gives_unavailable_keeps_committed_jobs_and_recovers() {
    let mut d = Daemon::start_with("", &["--durability", "os"]);
    let mut c = d.client();
    let before = submit(&mut c, json!({"kind": "echo", "payload": "kept"}));
    assert_eq!(wait(&mut c, &before, 10_000)["state"], json!("succeeded"));
    // From now on the daemon may not grow any file past its current size
    // plus a little: the store's log fills up.
    let pid = d.child.id().to_string();
    let limit = std::fs::metadata(d.state_dir.join("jobs.db"))
        .unwrap()
        .len()
        + 64 * 1024;
    let st = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--fsize={limit}:unlimited")])
        .status()
        .unwrap();
    assert!(st.success());
    let big = "y".repeat(32 * 1024);
    let mut refused = None;
    for _ in 0..200 {
        let r = c
            .request(json!({"op": "submit", "job": {"kind": "echo", "payload": big}}))
            .unwrap();
        if r["ok"] == json!(false) {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("writes past the file size limit must fail");
    assert_eq!(refused["error"]["code"], json!("unavailable"), "{refused}");
    // Still alive, still answering, committed jobs intact.
    assert_eq!(status(&mut c, &before)["result"], json!("kept"));
    let r = c.request(json!({"op": "hello"})).unwrap();
    assert_eq!(r["ok"], json!(true));
    // Space comes back: the daemon notices by itself.
    let st = Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited"])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let r = c
            .request(json!({"op": "submit", "job": {"kind": "echo", "payload": "back"}}))
            .unwrap();
        if r["ok"] == json!(true) {
            break r["job"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "store did not recover: {r}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(wait(&mut c, &after, 10_000)["result"], json!("back"));
    let mut c = d.stop_and_restart(c, &["--durability", "os"]);
    assert_eq!(status(&mut c, &before)["state"], json!("succeeded"));
    assert_eq!(status(&mut c, &after)["state"], json!("succeeded"));
}

/// The long version, for `scripts/crash-soak.sh N`.
#[test]
#[ignore = "long: run it with scripts/crash-soak.sh"]
fn crash_soak() {
    let cycles = std::env::var("JOBD_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    kill_cycles(cycles);
}
