//! Bad input and load against the real daemon: every class of bad input
//! gets its error code while the daemon keeps serving the same and other
//! connections; pipelining, many clients, many connections, flow control
//! against a client that never reads, the connection cap and idle timeout.

// The shared harness predates clippy's collapsible_if/manual_contains
// lints; it is not ours to change.
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Client, Daemon, rq};
use serde_json::{Value, json};

/// The connection and a fresh one both still answer.
fn still_serving(d: &Daemon, c: Option<&mut Client>) {
    if let Some(c) = c {
        let r = rq(
            c,
            json!({"op": "submit", "job": {"kind": "echo", "payload": "same"}, "wait": true}),
        );
        assert_eq!(r["result"], "same", "{r}");
    }
    let mut other = d.client();
    let r = rq(
        &mut other,
        json!({"op": "submit", "job": {"kind": "echo", "payload": "other"}, "wait": true}),
    );
    assert_eq!(r["result"], "other", "{r}");
}

#[test]
fn bad_lines_get_codes_and_the_connection_goes_on() {
    let d = Daemon::start();
    let mut c = d.client();
    let cases: &[(&str, &str)] = &[
        ("this is not json", "bad_json"),
        ("{\"id\":1,\"op\":\"hello\"", "bad_json"),
        ("[1,2,3]", "bad_request"),
        ("42", "bad_request"),
        ("\"hello\"", "bad_request"),
        ("null", "bad_request"),
        ("{}", "bad_request"),
        ("{\"id\":1,\"op\":5}", "bad_request"),
        ("{\"id\":[1],\"op\":\"hello\"}", "bad_request"),
        ("{\"id\":1,\"op\":\"launch_missiles\"}", "unknown_op"),
        ("{\"id\":1,\"op\":\"submit\"}", "bad_request"),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":\"echo\"}",
            "bad_request",
        ),
        ("{\"id\":1,\"op\":\"submit\",\"job\":{}}", "bad_request"),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":7}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"wat\":1}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\"},\"wait\":\"yes\"}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"nope\"}}",
            "unknown_kind",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"pool\":\"nope\"}}",
            "unknown_pool",
        ),
        // Negative and absurd numbers.
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"priority\":99999999999}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"delay_ms\":-5}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"delay_ms\":1e30}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"delay_ms\":18446744073709551615}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"timeout_ms\":0}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"max_attempts\":0}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"max_attempts\":4294967296}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"backoff\":{\"factor\":1e300}}}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"wait\",\"job\":\"1\",\"timeout_ms\":-1}",
            "bad_request",
        ),
        (
            "{\"id\":1,\"op\":\"list\",\"limit\":100000000}",
            "bad_request",
        ),
        ("{\"id\":1,\"op\":\"status\",\"job\":\"abc\"}", "not_found"),
    ];
    for (line, code) in cases {
        c.send_line(line).unwrap();
        let r = c.read().unwrap();
        assert_eq!(r["ok"], false, "{line}: {r}");
        assert_eq!(r["error"]["code"], *code, "{line}: {r}");
        assert!(r["error"]["message"].is_string(), "{line}: {r}");
    }
    // Ids are echoed even on errors, and null when there was none.
    let r = rq(&mut c, json!({"id": 77, "op": "nope"}));
    assert_eq!(r["id"], 77);
    c.send_line("{nope").unwrap();
    assert_eq!(c.read().unwrap()["id"], Value::Null);
    // Blank lines are ignored.
    c.send_line("").unwrap();
    c.send_line("   ").unwrap();
    still_serving(&d, Some(&mut c));
}

#[test]
fn deep_nesting_is_refused_without_a_crash() {
    let d = Daemon::start();
    let mut c = d.client();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    c.send_line(&deep).unwrap();
    assert_eq!(c.read().unwrap()["error"]["code"], "bad_json");
    let payload = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    c.send_line(&format!(
        "{{\"id\":1,\"op\":\"submit\",\"job\":{{\"kind\":\"echo\",\"payload\":{payload}}}}}"
    ))
    .unwrap();
    assert_eq!(c.read().unwrap()["error"]["code"], "bad_json");
    still_serving(&d, Some(&mut c));
}

#[test]
fn huge_payload_within_the_limit_round_trips() {
    let d = Daemon::start();
    let mut c = d.client();
    let big = "x".repeat(1_000_000);
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "echo", "payload": big}, "wait": true}),
    );
    assert_eq!(r["ok"], true);
    assert_eq!(r["result"].as_str().map(str::len), Some(1_000_000));
    still_serving(&d, Some(&mut c));
}

#[test]
fn a_line_over_the_limit_gets_too_large_then_a_close() {
    let d = Daemon::start_with("max_frame_bytes = 4096\n", &[]);
    let mut c = d.client();
    // An answer owed before the bad line is still delivered.
    c.send_line(&json!({"id": "before", "op": "hello"}).to_string())
        .unwrap();
    let mut line =
        String::from("{\"id\":1,\"op\":\"submit\",\"job\":{\"kind\":\"echo\",\"payload\":\"");
    line.push_str(&"y".repeat(10_000));
    line.push_str("\"}}");
    // The daemon may close while we are still writing: ignore write errors.
    let _ = c.send_line(&line);
    let mut got = Vec::new();
    loop {
        match c.read() {
            Ok(Value::Null) | Err(_) => break,
            Ok(v) => got.push(v),
        }
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter().any(|r| r["id"] == "before" && r["ok"] == true),
        "{got:?}"
    );
    assert!(
        got.iter().any(|r| r["error"]["code"] == "too_large"),
        "{got:?}"
    );
    still_serving(&d, None);
}

#[test]
fn invalid_utf8_gets_bad_json_then_a_close() {
    let d = Daemon::start();
    let mut c = d.client();
    c.send_raw(b"{\"id\":1,\"op\":\"hel\xff\xfelo\"}\n")
        .unwrap();
    let r = c.read().unwrap();
    assert_eq!(r["error"]["code"], "bad_json", "{r}");
    assert_eq!(c.read().unwrap(), Value::Null, "connection not closed");
    still_serving(&d, None);
}

#[test]
fn a_client_that_disconnects_mid_wait_hurts_nobody() {
    let d = Daemon::start_with("[pools.default]\nthreads = 2\n", &[]);
    let mut waiter = d.client();
    waiter
        .send_line(&json!({"id": 1, "op": "submit", "job": {"kind": "sleep", "payload": {"ms": 300}}, "wait": true}).to_string())
        .unwrap();
    let mut c = d.client();
    let deadline = Instant::now() + Duration::from_secs(5);
    let job = loop {
        let r = rq(
            &mut c,
            json!({"op": "list", "kind": "sleep", "state": "running"}),
        );
        if let Some(j) = r["jobs"].get(0) {
            break j["id"].clone();
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    };
    drop(waiter);
    // The job is not cancelled by the waiter going away, and finishes.
    let w = rq(
        &mut c,
        json!({"op": "wait", "job": job, "timeout_ms": 5000}),
    );
    assert_eq!(w["job"]["state"], "succeeded", "{w}");
    // A half-closed client still gets the answers it is owed.
    let mut half = d.client();
    half.send_line(&json!({"id": 9, "op": "submit", "job": {"kind": "sleep", "payload": {"ms": 100}}, "wait": true}).to_string())
        .unwrap();
    half.shutdown_write().unwrap();
    let r = half.read().unwrap();
    assert_eq!(
        (r["id"].clone(), r["state"].clone()),
        (json!(9), json!("succeeded")),
        "{r}"
    );
    assert_eq!(half.read().unwrap(), Value::Null);
    still_serving(&d, Some(&mut c));
}

#[test]
fn ten_thousand_pipelined_submits_are_all_answered() {
    let d = Daemon::start_with("[pools.default]\nmax_queued = 100000\n", &[]);
    let c = d.client();
    let mut w = c.writer_clone().unwrap();
    const N: usize = 10_000;
    let writer = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for i in 0..N {
            buf.extend_from_slice(
                json!({"id": i, "op": "submit", "job": {"kind": "echo", "payload": i}})
                    .to_string()
                    .as_bytes(),
            );
            buf.push(b'\n');
        }
        w.write_all(&buf).unwrap();
    });
    let mut c = c;
    let started = Instant::now();
    let mut seen = vec![false; N];
    let mut jobs = std::collections::HashSet::new();
    for _ in 0..N {
        let r = c.read().unwrap();
        assert_eq!(r["ok"], true, "{r}");
        let i = r["id"].as_u64().unwrap() as usize;
        assert!(!seen[i], "answered twice: {i}");
        seen[i] = true;
        assert!(
            jobs.insert(r["job"].as_str().unwrap().to_string()),
            "job id reused"
        );
    }
    writer.join().unwrap();
    eprintln!(
        "10,000 pipelined submits answered in {:?}",
        started.elapsed()
    );
    assert!(seen.iter().all(|s| *s));
    still_serving(&d, Some(&mut c));
}

#[test]
fn at_least_64_requests_in_flight_per_connection() {
    let d = Daemon::start();
    let mut other = d.client();
    let r = rq(
        &mut other,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 60000}}}),
    );
    let job = r["job"].clone();
    let mut c = d.client();
    for i in 0..63 {
        c.send_line(&json!({"id": i, "op": "wait", "job": job}).to_string())
            .unwrap();
    }
    // The 64th request is read and answered while 63 waits are pending.
    c.send_line(&json!({"id": "hello", "op": "hello"}).to_string())
        .unwrap();
    let r = c.read().unwrap();
    assert_eq!(r["id"], "hello", "{r}");
    rq(&mut other, json!({"op": "cancel", "job": job}));
    for _ in 0..63 {
        let r = c.read().unwrap();
        assert_eq!(r["job"]["state"], "cancelled", "{r}");
    }
}

#[test]
fn a_client_that_never_reads_is_not_buffered_without_limit() {
    let d = Daemon::start_with("[pools.default]\nmax_queued = 1000000\n", &[]);
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let line = json!({"id": 1, "op": "hello"}).to_string() + "\n";
    let batch = line.repeat(1000);
    let mut w = &s;
    let mut sent = 0usize;
    let blocked = loop {
        match w.write(batch.as_bytes()) {
            Ok(n) => sent += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break true;
            }
            Err(e) => panic!("write failed: {e}"),
        }
        if sent > 200 * 1024 * 1024 {
            break false;
        }
    };
    assert!(
        blocked,
        "the daemon read {sent} bytes from a client that never reads"
    );
    // Everyone else is served meanwhile.
    still_serving(&d, None);
    // Once it reads, it gets answers.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    let n = (&s).read(&mut buf).unwrap();
    assert!(n > 0);
}

#[test]
fn a_hundred_concurrent_clients() {
    let d = Daemon::start_with("[pools.default]\nthreads = 4\n", &[]);
    let threads: Vec<_> = (0..100)
        .map(|t| {
            let socket = d.socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                for i in 0..20 {
                    let r = c
                        .request(json!({"op": "submit", "job": {"kind": "echo", "payload": [t, i]}, "wait": true}))
                        .unwrap();
                    assert_eq!(r["result"], json!([t, i]), "{r}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut c = d.client();
    let s = rq(&mut c, json!({"op": "stats"}));
    assert_eq!(s["kinds"]["echo"]["counters"]["succeeded"], 2000);
}

#[test]
fn thousands_of_connections_at_once() {
    let d = Daemon::start_with("max_connections = 5000\n", &[]);
    let mut conns: Vec<UnixStream> = (0..2000)
        .map(|_| UnixStream::connect(&d.socket).expect("connect"))
        .collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(format!("{{\"id\":{i},\"op\":\"hello\"}}\n").as_bytes())
            .unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = std::io::BufReader::new(&*s);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], i);
        assert_eq!(v["ok"], true);
    }
    drop(conns);
    still_serving(&d, None);
}

/// A connection that `hello` answers, retrying for up to 5 s while every
/// slot is taken (the harness's readiness probe may still hold one for a
/// moment after start-up, and a closed connection frees its slot a moment
/// after the close).
fn connect_ok(d: &Daemon) -> Client {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = d.client();
        if c.request(json!({"op": "hello"}))
            .is_ok_and(|r| r["ok"] == true)
        {
            return c;
        }
        assert!(Instant::now() < deadline, "no free slot");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_over_the_cap_get_unavailable() {
    let d = Daemon::start_with("max_connections = 2\n", &[]);
    let a = connect_ok(&d);
    let _b = connect_ok(&d);
    let mut c = d.client();
    let r = c.read().unwrap();
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    assert_eq!(c.read().unwrap(), Value::Null);
    drop(a);
    // A slot frees up once a connection closes.
    connect_ok(&d);
}

#[test]
fn idle_connections_are_closed() {
    let d = Daemon::start_with("idle_timeout_secs = 1\n", &[]);
    let mut c = d.client();
    rq(&mut c, json!({"op": "hello"}));
    let started = Instant::now();
    assert_eq!(c.read().unwrap(), Value::Null);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn the_idle_clock_runs_from_the_last_answer() {
    // A connection with a request in flight is not idle, and the idle
    // clock restarts from its answer, not from the request.
    let d = Daemon::start_with("idle_timeout_secs = 2\n", &[]);
    let mut c = d.client();
    let r = rq(
        &mut c,
        json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 3900}}, "wait": true}),
    );
    assert_eq!(r["state"], "succeeded", "{r}");
    std::thread::sleep(Duration::from_millis(1000));
    let r = rq(&mut c, json!({"op": "hello"}));
    assert_eq!(r["ok"], true, "closed too early after a late answer: {r}");
}

#[test]
fn a_client_gone_mid_wait_frees_its_connection_slot() {
    // With room for two connections: one waits on a long job and hangs up.
    // Its slot must come back long before the job ends.
    let d = Daemon::start_with("max_connections = 2\n", &[]);
    let mut gone = connect_ok(&d);
    gone.send_line(&json!({"id": 1, "op": "submit", "job": {"kind": "sleep", "payload": {"ms": 20000}}, "wait": true}).to_string())
        .unwrap();
    let mut b = connect_ok(&d);
    let deadline = Instant::now() + Duration::from_secs(5);
    while rq(&mut b, json!({"op": "list", "state": "running"}))["jobs"] == json!([]) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(gone);
    let started = Instant::now();
    let _c = connect_ok(&d);
    assert!(started.elapsed() < Duration::from_secs(5));
    let r = rq(&mut b, json!({"op": "list", "state": "running"}));
    assert_eq!(
        r["jobs"].as_array().map(Vec::len),
        Some(1),
        "the job itself goes on: {r}"
    );
}
