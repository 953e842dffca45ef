//! Helpers shared by the `lifecycle_*` end-to-end tests (on top of the
//! harness in `tests/common`): short request helpers, polling a job until
//! it reaches a state, a commit barrier for crash tests, a gate that holds
//! a command-kind job until the test opens it, jobctl, and process checks.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::Client;

/// Arguments for a daemon with the SQLite store.
pub const DURABLE: &[&str] = &["--durability", "os"];

/// Long enough for anything that should happen "at once" on a loaded CI
/// machine, short enough to fail a hung test quickly.
pub const LONG: Duration = Duration::from_secs(20);

/// A command kind `gated` on pool `gated` (one thread): each attempt waits
/// until the file named by the payload's `gate` exists, removes it and
/// fails (exit 1). The test decides when an attempt ends by creating the
/// file. (An attempt gives up waiting after about 30 s, so a failed test
/// leaves no shell behind for long.)
pub const GATED: &str = r#"
[pools.gated]
threads = 1

[kinds.gated]
pool = "gated"
argv = ["/bin/sh", "-c", "n=0; while [ ! -e \"$1\" ] && [ $n -lt 6000 ]; do /bin/sleep 0.005; n=$((n+1)); done; rm -f \"$1\"; echo \"attempt failed\" >&2; exit 1", "sh", "{gate}"]
timeout_secs = 0
"#;

/// A `sleep` job whose payload cannot be decoded: every attempt fails at
/// once with `job_failed`. `extra`'s fields are added to the job.
pub fn failing(extra: Value) -> Value {
    let mut job = json!({"kind": "sleep", "payload": {"ms": "soon"}});
    if let (Some(j), Some(e)) = (job.as_object_mut(), extra.as_object()) {
        j.extend(e.clone());
    }
    job
}

/// Submit, and wait for, one `dead` job (two attempts) and one `failed`
/// job (a single attempt), both `failing` on the default pool; their ids.
pub fn dead_and_failed(c: &mut Client) -> (Value, Value) {
    let r = rq(
        c,
        json!({"op": "submit", "wait": true,
               "job": failing(json!({"max_attempts": 2, "backoff": {"base_ms": 1}}))}),
    );
    assert_eq!(r["state"], "dead", "{r}");
    let dead = r["job"].clone();
    let r = rq(
        c,
        json!({"op": "submit", "wait": true, "job": failing(json!({}))}),
    );
    assert_eq!(r["state"], "failed", "{r}");
    (dead, r["job"].clone())
}

/// A number in a record (a time, a count); panics naming what it got.
pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A request that must succeed; its answer.
pub fn ok(c: &mut Client, v: Value) -> Value {
    let r = rq(c, v.clone());
    assert_eq!(r["ok"], true, "{v} → {r}");
    r
}

/// Submit a job (no wait); its id.
pub fn submit(c: &mut Client, job: Value) -> Value {
    ok(c, json!({"op": "submit", "job": job}))["job"].clone()
}

/// A job's record.
pub fn status(c: &mut Client, id: &Value) -> Value {
    ok(c, json!({"op": "status", "job": id}))["job"].clone()
}

/// Wait (at most `LONG`) until the job is final; its record.
pub fn wait_final(c: &mut Client, id: &Value) -> Value {
    let ms = LONG.as_millis() as u64;
    ok(c, json!({"op": "wait", "job": id, "timeout_ms": ms}))["job"].clone()
}

/// Poll `status` (at most `LONG`) until `pred` holds for the record.
pub fn poll(c: &mut Client, id: &Value, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LONG;
    loop {
        let rec = status(c, id);
        if pred(&rec) {
            return rec;
        }
        assert!(Instant::now() < deadline, "job {id} never {what}: {rec}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Poll until the job is in `state` with attempt number `attempt`.
pub fn poll_state(c: &mut Client, id: &Value, state: &str, attempt: u64) -> Value {
    poll(c, id, &format!("{state} at attempt {attempt}"), |r| {
        r["state"] == state && r["attempt"] == attempt
    })
}

/// Make sure every change the daemon made so far is committed to its
/// store: a submission is acknowledged only once its batch commits, and
/// batches commit in order. The barrier job (an echo delayed by an hour on
/// the default pool) is cancelled right away.
pub fn barrier(c: &mut Client) {
    let id = submit(
        c,
        json!({"kind": "echo", "payload": "barrier", "delay_ms": 3_600_000}),
    );
    ok(c, json!({"op": "cancel", "job": id}));
}

/// The ids of one `list` answer, and its cursor.
pub fn list_page(c: &mut Client, query: Value) -> (Vec<u64>, Value) {
    let mut q = query;
    q["op"] = json!("list");
    let r = ok(c, q);
    let ids = r["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").parse().expect("numeric id"))
        .collect();
    (ids, r.get("cursor").cloned().unwrap_or(Value::Null))
}

/// Every id a listing gives, following its cursor; and the page sizes.
pub fn list_all(c: &mut Client, query: Value) -> (Vec<u64>, Vec<usize>) {
    let (mut all, mut sizes) = (Vec::new(), Vec::new());
    let mut q = query;
    loop {
        let (ids, cursor) = list_page(c, q.clone());
        sizes.push(ids.len());
        all.extend(ids);
        if cursor.is_null() {
            return (all, sizes);
        }
        q["cursor"] = cursor;
    }
}

/// Numeric value of a job id as the daemon sends it.
pub fn num(id: &Value) -> u64 {
    id.as_str().expect("string id").parse().expect("numeric id")
}

pub use crate::common::{expect_code, jobctl, rq};

/// A gate file for a `gated` job, in `dir`.
pub fn gate(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("gate-{name}"))
}

/// Open a gate: the held attempt ends (and fails).
pub fn open(gate: &Path) {
    std::fs::write(gate, b"go").expect("write gate file");
}

/// True while a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

/// Wait (at most `LONG`) until `path` holds numbers, one per line.
pub fn read_pids(path: &Path, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + LONG;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            let pids: Vec<i32> = s.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.len() >= n {
                return pids;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never held {n} pids",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
