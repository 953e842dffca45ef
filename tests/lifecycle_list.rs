//! `list` end to end: filters by state, pool and kind, limits, newest or
//! oldest first, and cursor paging through 250 jobs in pages of 100, with
//! the daemon's memory and with the SQLite store after a restart (finished
//! jobs then come back from the store); and `jobctl list`.

mod common;
mod lifecycle_common;

use common::{Client, Daemon};
use lifecycle_common::*;
use serde_json::{Value, json};

const POOLS: &str = "[pools.default]\nthreads = 2\n[pools.work]\nthreads = 1\n";

/// What the daemon holds after `populate`.
struct Jobs {
    /// 250 succeeded echo jobs on `default`, in submission order.
    echoes: Vec<u64>,
    /// Dead and failed `sleep` jobs on `work`.
    dead: Vec<u64>,
    failed: u64,
    /// Echo jobs waiting on the paused `work` pool.
    queued: Vec<u64>,
    /// An echo delayed by an hour on `default`.
    delayed: u64,
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().expect("ids").iter().map(num).collect()
}

fn populate(c: &mut Client) -> Jobs {
    let batch: Vec<Value> = (0..250)
        .map(|i| json!({"kind": "echo", "payload": i}))
        .collect();
    let r = ok(
        c,
        json!({"op": "submit_batch", "wait": true, "jobs": batch}),
    );
    let echoes = ids(&r["jobs"]);
    let bad = |n: u32| {
        json!({"kind": "sleep", "payload": {"ms": "soon"}, "pool": "work",
               "max_attempts": n, "backoff": {"base_ms": 1}})
    };
    let r = ok(
        c,
        json!({"op": "submit_batch", "wait": true, "jobs": [bad(2), bad(1), bad(2)]}),
    );
    let mut sleeps = ids(&r["jobs"]);
    let failed = sleeps.remove(1);
    ok(c, json!({"op": "pause", "pool": "work"}));
    let queued = (0..2)
        .map(|i| {
            num(&submit(
                c,
                json!({"kind": "echo", "payload": i, "pool": "work"}),
            ))
        })
        .collect();
    let delayed = num(&submit(
        c,
        json!({"kind": "echo", "payload": "later", "delay_ms": 3_600_000}),
    ));
    Jobs {
        echoes,
        dead: sleeps,
        failed,
        queued,
        delayed,
    }
}

fn desc(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

fn asc(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

/// Every filter, order and page size against what `populate` made.
fn check(c: &mut Client, j: &Jobs) {
    let mut everything: Vec<u64> = j.echoes.clone();
    everything.extend(&j.dead);
    everything.extend(&j.queued);
    everything.push(j.failed);
    everything.push(j.delayed);

    // Default page size 100, newest first, the cursor until the end.
    let (all, sizes) = list_all(c, json!({}));
    assert_eq!(all, desc(everything.clone()));
    assert_eq!(sizes, [100, 100, 56]);

    // 250 succeeded echoes: pages of 100, 100, 50, both orders.
    let q = json!({"kind": "echo", "state": "succeeded", "limit": 100});
    let (newest, sizes) = list_all(c, q.clone());
    assert_eq!(newest, desc(j.echoes.clone()));
    assert_eq!(sizes, [100, 100, 50]);
    let mut oldest_q = q.clone();
    oldest_q["order"] = json!("oldest");
    let (oldest, sizes) = list_all(c, oldest_q);
    assert_eq!(oldest, asc(j.echoes.clone()));
    assert_eq!(sizes, [100, 100, 50]);
    // A page that ends exactly at the last job has no cursor.
    let (page, cursor) = list_page(
        c,
        json!({"kind": "echo", "state": "succeeded", "limit": 250}),
    );
    assert_eq!((page.len(), cursor), (250, Value::Null));
    let (page, cursor) = list_page(c, json!({"kind": "echo", "limit": 7}));
    assert_eq!(
        page,
        desc(
            everything
                .iter()
                .copied()
                .filter(|i| !j.dead.contains(i) && *i != j.failed)
                .collect()
        )[..7]
    );
    assert_eq!(cursor, json!(page[6].to_string()));

    // State, pool and kind, alone and together.
    assert_eq!(
        list_all(c, json!({"state": "dead"})).0,
        desc(j.dead.clone())
    );
    assert_eq!(list_all(c, json!({"state": "failed"})).0, [j.failed]);
    assert_eq!(
        list_all(c, json!({"state": "queued"})).0,
        desc(j.queued.clone())
    );
    assert_eq!(list_all(c, json!({"state": "delayed"})).0, [j.delayed]);
    assert_eq!(
        list_all(c, json!({"state": "running"})).0,
        Vec::<u64>::new()
    );
    let mut work = j.dead.clone();
    work.extend(&j.queued);
    work.push(j.failed);
    assert_eq!(list_all(c, json!({"pool": "work"})).0, desc(work));
    assert_eq!(
        list_all(c, json!({"pool": "work", "kind": "echo"})).0,
        desc(j.queued.clone())
    );
    assert_eq!(
        list_all(
            c,
            json!({"pool": "work", "kind": "sleep", "state": "dead", "order": "oldest"})
        )
        .0,
        asc(j.dead.clone())
    );
    assert_eq!(
        list_all(c, json!({"pool": "default", "state": "dead"})).0,
        Vec::<u64>::new()
    );
    assert_eq!(list_all(c, json!({"kind": "nope"})).0, Vec::<u64>::new());
}

#[test]
fn list_filters_and_pages_in_memory() {
    let d = Daemon::start_with(POOLS, &[]);
    let mut c = d.client();
    let jobs = populate(&mut c);
    check(&mut c, &jobs);
}

#[test]
fn list_filters_and_pages_with_the_store_after_a_restart() {
    let mut d = Daemon::start_with(POOLS, DURABLE);
    let mut c = d.client();
    let jobs = populate(&mut c);
    check(&mut c, &jobs);
    let mut c = d.stop_and_restart(c, DURABLE);
    check(&mut c, &jobs);
    // Records read back are whole.
    let (page, _) = list_page(&mut c, json!({"state": "dead", "limit": 1}));
    let rec = status(&mut c, &json!(page[0].to_string()));
    assert_eq!(rec["attempts"].as_array().unwrap().len(), 2, "{rec}");
}

#[test]
fn jobctl_list_pages_with_its_cursor_in_both_orders() {
    let d = Daemon::start_with(POOLS, &[]);
    let mut c = d.client();
    let jobs = populate(&mut c);
    let sock = d.socket.as_path();
    let first_ids = |out: &str| -> Vec<u64> {
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    };
    let args = [
        "list",
        "--kind",
        "echo",
        "--state",
        "succeeded",
        "--limit",
        "100",
        "--oldest",
    ];
    let o = jobctl(sock, &args);
    let out = expect_code(&o, 0);
    let page = first_ids(&out);
    assert_eq!(page, asc(jobs.echoes.clone())[..100]);
    let err = String::from_utf8_lossy(&o.stderr);
    let hint = format!("more: jobctl list --cursor {} --oldest", page[99]);
    assert!(err.contains(&hint), "{err}");
    let cursor = page[99].to_string();
    let mut next = args.to_vec();
    next.extend(["--cursor", &cursor]);
    let out = expect_code(&jobctl(sock, &next), 0);
    assert_eq!(first_ids(&out), asc(jobs.echoes.clone())[100..200]);

    let out = expect_code(
        &jobctl(sock, &["list", "--state", "dead", "--pool", "work"]),
        0,
    );
    assert_eq!(first_ids(&out), desc(jobs.dead.clone()));
    assert!(
        out.lines()
            .skip(1)
            .all(|l| l.contains("dead") && l.contains("2/2")),
        "{out}"
    );
}
