//! Reload on SIGHUP with the real daemon, while a client keeps submitting:
//! the log level changes (an info line appears that did not before), the
//! default pool grows from 1 to 3 threads and gets a new `max_queued`
//! (`stats` shows both), every job submitted before, during and after the
//! reload succeeds, systemd hears `RELOADING=1` + `MONOTONIC_USEC=` then
//! `READY=1`, and a setting that needs a restart is named in the log and in
//! `STATUS=`. A configuration that does not parse is reported and the old
//! one kept; `[auth]` changes apply to connections already open.

mod common;
mod systemd_support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Client, signal, wait_exit};
use systemd_support::{LONG, NotifySocket, Setup};

const BEFORE: &str = r#"
log_level = "warn"
[pools.default]
threads = 1
max_queued = 1000
"#;

const AFTER: &str = r#"
log_level = "info"
socket_mode = "0600"
[pools.default]
threads = 3
max_queued = 500
"#;

/// Keeps `IN_FLIGHT` short jobs in flight on one connection until told to
/// stop; counts successes and keeps every failure.
struct Submitter {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<Value>>,
}

const IN_FLIGHT: usize = 8;

impl Submitter {
    fn start(socket: &std::path::Path) -> Submitter {
        let mut c = Client::connect(socket).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (s, d) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let job = |id: usize| {
                json!({"id": id, "op": "submit", "wait": true,
                    "job": {"kind": "sleep", "payload": {"ms": 5}}})
                .to_string()
            };
            let mut failures = Vec::new();
            let mut next = 0;
            for _ in 0..IN_FLIGHT {
                c.send_line(&job(next)).unwrap();
                next += 1;
            }
            let mut outstanding = IN_FLIGHT;
            while outstanding > 0 {
                let r = c.read().unwrap();
                outstanding -= 1;
                if r["ok"] == json!(true) && r["state"] == json!("succeeded") {
                    d.fetch_add(1, Ordering::SeqCst);
                } else {
                    failures.push(r);
                }
                if !s.load(Ordering::SeqCst) {
                    c.send_line(&job(next)).unwrap();
                    next += 1;
                    outstanding += 1;
                }
            }
            failures
        });
        Submitter { stop, done, thread }
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Wait until `n` jobs succeeded in all.
    fn wait_done(&self, n: usize) {
        let deadline = Instant::now() + LONG;
        while self.done() < n {
            assert!(
                Instant::now() < deadline,
                "jobs stopped flowing at {}",
                self.done()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) -> Vec<Value> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// stderr lines as they come, from a reader thread.
struct Log {
    rx: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Log {
    fn new(stderr: std::process::ChildStderr) -> Log {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Log {
            rx,
            lines: Vec::new(),
        }
    }

    /// Read until a line contains `text`; its index.
    fn wait_for(&mut self, text: &str) -> usize {
        if let Some(i) = self.lines.iter().position(|l| l.contains(text)) {
            return i;
        }
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(text);
                    self.lines.push(l);
                    if hit {
                        return self.lines.len() - 1;
                    }
                }
                Err(_) => panic!("no log line with {text:?}:\n{}", self.lines.join("\n")),
            }
        }
    }
}

fn pool(c: &mut Client) -> Value {
    let s = c.request(json!({"op": "stats"})).unwrap();
    assert_eq!(s["ok"], json!(true), "{s}");
    s["pools"]["default"].clone()
}

#[test]
fn sighup_applies_log_level_pools_and_auth_while_jobs_flow() {
    let setup = Setup::new(BEFORE);
    let mut notify = NotifySocket::new();
    // JOBD_LOG empty: the configured log_level decides.
    let mut child = setup.spawn_notifying(&notify, &[("JOBD_LOG", "")], Stdio::piped());
    let mut log = Log::new(child.0.stderr.take().unwrap());
    notify.wait_for(LONG, "READY=1", |m| m.has("READY=1"));
    let mut admin = Client::connect(&setup.socket).unwrap();
    assert_eq!(pool(&mut admin)["threads"], json!(1));

    let jobs = Submitter::start(&setup.socket);
    jobs.wait_done(20);

    // Reload while jobs flow.
    setup.write_config(AFTER);
    signal(&child.0, libc::SIGHUP);
    let reloading = notify.wait_for(LONG, "RELOADING=1", |m| m.has("RELOADING=1"));
    let usec: u64 = reloading
        .get("MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {:?}", reloading.lines));
    assert!(usec > 0);
    let ready = notify.wait_for(LONG, "READY=1 after the reload", |m| m.has("READY=1"));
    let status = ready.get("STATUS").unwrap_or_default();
    assert!(
        status.contains("restart needed for socket_mode"),
        "{status}"
    );

    let p = pool(&mut admin);
    assert_eq!(
        (&p["threads"], &p["max_queued"]),
        (&json!(3), &json!(500)),
        "{p}"
    );
    let at_reload = jobs.done();
    jobs.wait_done(at_reload + 30);
    let failures = jobs.finish();
    assert!(
        failures.is_empty(),
        "jobs failed across the reload: {failures:?}"
    );

    // The log level: nothing at info before the reload, info lines after.
    let applied = log.wait_for("reload applied log_level");
    let _ = Client::connect(&setup.socket)
        .unwrap()
        .request(json!({"op": "hello"}));
    let opened = log.wait_for("connection opened");
    assert!(opened > applied, "{}", log.lines.join("\n"));
    assert!(
        !log.lines[..applied].iter().any(|l| l.contains(" INFO ")),
        "info lines before the level changed:\n{}",
        log.lines.join("\n")
    );
    log.wait_for("reload could not apply socket_mode");

    // A broken file: reported, the old configuration stays.
    setup.write_config("this is [ not toml");
    signal(&child.0, libc::SIGHUP);
    notify.wait_for(LONG, "RELOADING=1", |m| m.has("RELOADING=1"));
    let ready = notify.wait_for(LONG, "READY=1", |m| m.has("READY=1"));
    assert!(
        ready
            .get("STATUS")
            .is_some_and(|s| s.contains("reload failed")),
        "{:?}",
        ready.lines
    );
    log.wait_for("reload failed, keeping the previous configuration");
    assert_eq!(pool(&mut admin)["threads"], json!(3));

    // [auth] applies at once, on the connection already open.
    setup.write_config(&format!("{AFTER}\n[auth]\nallow_uids = [4242]\n"));
    signal(&child.0, libc::SIGHUP);
    notify.wait_for(LONG, "RELOADING=1", |m| m.has("RELOADING=1"));
    notify.wait_for(LONG, "READY=1", |m| m.has("READY=1"));
    let r = admin.request(json!({"op": "hello"})).unwrap();
    assert_eq!(r["error"]["code"], json!("forbidden"), "{r}");
    setup.write_config(AFTER);
    signal(&child.0, libc::SIGHUP);
    notify.wait_for(LONG, "RELOADING=1", |m| m.has("RELOADING=1"));
    notify.wait_for(LONG, "READY=1", |m| m.has("READY=1"));
    assert_eq!(
        admin.request(json!({"op": "hello"})).unwrap()["ok"],
        json!(true)
    );

    signal(&child.0, libc::SIGTERM);
    assert!(wait_exit(&mut child.0, LONG).success());
}

#[test]
fn sighup_adds_a_pool_live() {
    let setup = Setup::new("");
    let mut notify = NotifySocket::new();
    let mut child = setup.spawn_notifying(&notify, &[("JOBD_LOG", "warn")], Stdio::inherit());
    notify.wait_for(LONG, "READY=1", |m| m.has("READY=1"));
    let mut c = Client::connect(&setup.socket).unwrap();
    let job = json!({"op": "submit", "wait": true,
        "job": {"kind": "echo", "payload": 1, "pool": "extra"}});
    let r = c.request(job.clone()).unwrap();
    assert_eq!(r["error"]["code"], json!("unknown_pool"), "{r}");

    setup.write_config("[pools.extra]\nthreads = 2\n");
    signal(&child.0, libc::SIGHUP);
    let ready = notify.wait_for(LONG, "READY=1 after the reload", |m| {
        m.has("READY=1") && !m.get("STATUS").is_some_and(|s| s.contains("accepting"))
    });
    assert!(
        !ready.get("STATUS").unwrap_or_default().contains("restart"),
        "{:?}",
        ready.lines
    );
    let r = c.request(job).unwrap();
    assert_eq!(r["state"], json!("succeeded"), "{r}");
    let s = c.request(json!({"op": "stats"})).unwrap();
    assert_eq!(s["pools"]["extra"]["threads"], json!(2), "{s}");

    signal(&child.0, libc::SIGTERM);
    assert!(wait_exit(&mut child.0, LONG).success());
}
