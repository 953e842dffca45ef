//! Metrics end to end: the `metrics` op after known jobs, read back with an
//! independent Prometheus text parser; the optional HTTP endpoint over
//! loopback TCP and over a Unix socket; refusal of non-loopback addresses;
//! and the per-pool breakdown in `stats`.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Client, Daemon, run_jobd};
use prometheus_parse::{Scrape, Value as PValue};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[pools.default]
threads = 2
[pools.io]
threads = 1
"#;

fn ok(r: &Value) -> &Value {
    assert_eq!(r["ok"], json!(true), "{r}");
    r
}

fn submit(c: &mut Client, job: Value) -> String {
    let r = c.request(json!({"op": "submit", "job": job})).unwrap();
    ok(&r)["job"].as_str().unwrap().to_string()
}

fn wait_final(c: &mut Client, id: &str) -> String {
    let r = c
        .request(json!({"op": "wait", "job": id, "timeout_ms": 20_000}))
        .unwrap();
    ok(&r)["job"]["state"].as_str().unwrap().to_string()
}

fn metrics_text(c: &mut Client) -> String {
    let r = c.request(json!({"op": "metrics"})).unwrap();
    ok(&r)["text"].as_str().unwrap().to_string()
}

fn parse(text: &str) -> Scrape {
    // The parser skips lines it cannot read; check first that every sample
    // line is `name{labels} value` with a number, so nothing is skipped.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "unreadable sample line: {line}"
        );
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(
            name.starts_with("jobd_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "metric name off convention: {name}"
        );
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the one sample of `name` with exactly these labels.
fn sample<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> &'a PValue {
    let found: Vec<_> = s
        .samples
        .iter()
        .filter(|x| {
            x.metric == name
                && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
                && x.labels.len() == labels.len()
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    &found[0].value
}

fn num(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(s, name, labels) {
        PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => *v,
        other => panic!("{name} is not a number: {other:?}"),
    }
}

#[test]
fn metrics_op_reports_known_jobs_in_prometheus_text() {
    let d = Daemon::start_with(CONFIG, &[]);
    let mut c = d.client();
    for i in 0..3 {
        let id = submit(&mut c, json!({"kind": "echo", "payload": i}));
        assert_eq!(wait_final(&mut c, &id), "succeeded");
    }
    let id = submit(&mut c, json!({"kind": "echo", "pool": "io"}));
    assert_eq!(wait_final(&mut c, &id), "succeeded");
    let id = submit(&mut c, json!({"kind": "sleep", "payload": {"ms": "soon"}}));
    assert_eq!(wait_final(&mut c, &id), "failed");
    let id = submit(
        &mut c,
        json!({"kind": "sleep", "payload": {"ms": "soon"}, "max_attempts": 2,
               "backoff": {"base_ms": 1, "factor": 1, "max_ms": 1}}),
    );
    assert_eq!(wait_final(&mut c, &id), "dead");
    let id = submit(
        &mut c,
        json!({"kind": "sleep", "payload": {"ms": 10_000}, "timeout_ms": 50}),
    );
    assert_eq!(wait_final(&mut c, &id), "timed_out");
    let id = submit(&mut c, json!({"kind": "echo", "delay_ms": 600_000}));
    ok(&c.request(json!({"op": "cancel", "job": id})).unwrap());
    // Left waiting: one delayed job, and one queued in a paused pool.
    submit(&mut c, json!({"kind": "echo", "delay_ms": 600_000}));
    ok(&c.request(json!({"op": "pause", "pool": "io"})).unwrap());
    submit(&mut c, json!({"kind": "echo", "pool": "io"}));

    let s = parse(&metrics_text(&mut c));
    let def_echo = [("pool", "default"), ("kind", "echo")];
    let outcome = |pool, kind, o| {
        num(
            &s,
            "jobd_jobs_total",
            &[("pool", pool), ("kind", kind), ("outcome", o)],
        )
    };
    assert_eq!(outcome("default", "echo", "succeeded"), 3.0);
    assert_eq!(outcome("io", "echo", "succeeded"), 1.0);
    assert_eq!(outcome("default", "echo", "cancelled"), 1.0);
    assert_eq!(outcome("default", "sleep", "failed"), 1.0);
    assert_eq!(outcome("default", "sleep", "dead"), 1.0);
    assert_eq!(outcome("default", "sleep", "succeeded"), 0.0);
    assert_eq!(num(&s, "jobd_jobs_submitted_total", &def_echo), 5.0);
    assert_eq!(
        num(
            &s,
            "jobd_jobs_submitted_total",
            &[("pool", "io"), ("kind", "echo")]
        ),
        2.0
    );
    let def_sleep = [("pool", "default"), ("kind", "sleep")];
    assert_eq!(num(&s, "jobd_attempts_started_total", &def_sleep), 4.0);
    assert_eq!(num(&s, "jobd_attempts_retried_total", &def_sleep), 1.0);
    assert_eq!(num(&s, "jobd_attempts_timed_out_total", &def_sleep), 1.0);

    assert_eq!(num(&s, "jobd_queue_depth", &[("pool", "io")]), 1.0);
    assert_eq!(num(&s, "jobd_queue_depth", &[("pool", "default")]), 0.0);
    assert_eq!(num(&s, "jobd_delayed_jobs", &[("pool", "default")]), 1.0);
    assert_eq!(num(&s, "jobd_pool_paused", &[("pool", "io")]), 1.0);
    assert_eq!(num(&s, "jobd_pool_paused", &[("pool", "default")]), 0.0);
    assert_eq!(num(&s, "jobd_queue_limit", &[("pool", "io")]), 10_000.0);
    assert_eq!(
        num(&s, "jobd_threads", &[("pool", "io"), ("state", "idle")]),
        1.0
    );
    assert_eq!(num(&s, "jobd_active_jobs", &[]), 2.0);
    // The timed-out sleep may still hold its thread until it notices; the
    // pool's threads always add up.
    let busy = num(
        &s,
        "jobd_threads",
        &[("pool", "default"), ("state", "busy")],
    );
    let idle = num(
        &s,
        "jobd_threads",
        &[("pool", "default"), ("state", "idle")],
    );
    assert_eq!(busy + idle, 2.0);
    assert_eq!(
        num(
            &s,
            "jobd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Histograms: one sample per attempt that ran, every bucket cumulative.
    let PValue::Histogram(buckets) = sample(&s, "jobd_run_time_seconds", &def_echo) else {
        panic!("jobd_run_time_seconds is not a histogram");
    };
    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
    assert_eq!(inf.count, 3.0);
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    assert_eq!(num(&s, "jobd_run_time_seconds_count", &def_echo), 3.0);
    assert_eq!(num(&s, "jobd_queue_wait_seconds_count", &def_sleep), 4.0);
    // Run times are those of attempts whose handler reported back in
    // time: the three quick failures (the timed-out one is not timed).
    assert_eq!(num(&s, "jobd_run_time_seconds_count", &def_sleep), 3.0);
    // No store with durability = memory: no store series.
    assert!(
        s.samples
            .iter()
            .all(|x| !x.metric.starts_with("jobd_store_"))
    );
}

#[test]
fn stats_break_pools_down_by_kind_with_latencies() {
    let d = Daemon::start_with(CONFIG, &[]);
    let mut c = d.client();
    let a = submit(&mut c, json!({"kind": "echo", "pool": "io"}));
    let b = submit(&mut c, json!({"kind": "sleep", "payload": {"ms": 20}}));
    assert_eq!(wait_final(&mut c, &a), "succeeded");
    assert_eq!(wait_final(&mut c, &b), "succeeded");
    let r = c.request(json!({"op": "stats"})).unwrap();
    let pools = &ok(&r)["pools"];
    assert_eq!(
        pools["io"]["kinds"]["echo"]["counters"]["succeeded"],
        json!(1)
    );
    assert!(pools["io"]["kinds"]["sleep"].is_null(), "{}", pools["io"]);
    assert_eq!(
        pools["default"]["kinds"]["sleep"]["counters"]["succeeded"],
        json!(1)
    );
    let run = &pools["default"]["run_time_ms"];
    assert_eq!(run["count"], json!(1));
    assert!(run["p50"].as_f64().unwrap() >= 19.0, "{run}");
    assert_eq!(pools["io"]["queue_wait_ms"]["count"], json!(1));
    // Kinds still sum over pools.
    assert_eq!(r["kinds"]["echo"]["counters"]["succeeded"], json!(1));
}

#[test]
fn metrics_include_the_store_when_jobs_are_durable() {
    let d = Daemon::start_with("", &["--durability", "os"]);
    let mut c = d.client();
    let id = submit(&mut c, json!({"kind": "echo"}));
    wait_final(&mut c, &id);
    let s = parse(&metrics_text(&mut c));
    assert!(num(&s, "jobd_store_size_bytes", &[]) > 0.0);
    assert!(num(&s, "jobd_store_committed_changes_total", &[]) >= 1.0);
    assert_eq!(num(&s, "jobd_store_failing", &[]), 0.0);
}

/// A loopback port nobody listens on (bound and released; the daemon
/// binds it right after).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Send a raw HTTP request and read the whole answer (the server closes).
fn http(stream: &mut (impl Read + Write), request: &str) -> (String, String) {
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .expect("a complete HTTP answer");
    (head.to_string(), body.to_string())
}

fn tcp(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn http_endpoint_serves_get_metrics_on_loopback() {
    let port = free_port();
    let d = Daemon::start_with(
        &format!("{CONFIG}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        &[],
    );
    let mut c = d.client();
    let id = submit(&mut c, json!({"kind": "echo"}));
    wait_final(&mut c, &id);

    let (head, body) = http(
        &mut tcp(port),
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    let s = parse(&body);
    let echo_ok = [
        ("pool", "default"),
        ("kind", "echo"),
        ("outcome", "succeeded"),
    ];
    assert_eq!(num(&s, "jobd_jobs_total", &echo_ok), 1.0);
    // The same numbers as the op.
    let op = parse(&metrics_text(&mut c));
    assert_eq!(num(&op, "jobd_jobs_total", &echo_ok), 1.0);

    let (head, body) = http(&mut tcp(port), "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.is_empty());
    let (head, _) = http(&mut tcp(port), "GET / HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http(
        &mut tcp(port),
        "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(head.contains("Allow: GET, HEAD"), "{head}");
    let (head, _) = http(&mut tcp(port), "not http at all\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // A scraper that says nothing does not hold up the next one.
    let _silent = tcp(port);
    let (head, _) = http(&mut tcp(port), "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[test]
fn http_endpoint_on_a_unix_socket_is_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.sock");
    let mut d = Daemon::start_with(
        &format!("[metrics]\nlisten = \"{}\"\n", path.display()),
        &[],
    );
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (head, body) = http(&mut s, "GET /metrics HTTP/1.1\r\nHost: jobd\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(num(&parse(&body), "jobd_active_jobs", &[]), 0.0);
    assert!(d.terminate(Duration::from_secs(20)).success());
    assert!(!path.exists(), "the metrics socket outlived the daemon");
}

#[test]
fn a_non_loopback_metrics_address_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("jobd.sock");
    for listen in ["0.0.0.0:9464", "10.1.2.3:9464"] {
        let (status, err) = run_jobd(
            &format!("[metrics]\nlisten = \"{listen}\"\n"),
            &socket,
            &[],
            Duration::from_secs(20),
        );
        let status = status.expect("jobd should exit by itself");
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains("metrics.listen"), "{err}");
        assert!(err.contains("loopback"), "{err}");
        assert!(!socket.exists());
    }
}
