//! sd_notify end to end: the real `jobd` with `NOTIFY_SOCKET` pointing at a
//! datagram socket of the test. `READY=1` arrives only once a client can
//! connect (the test connects the moment it arrives, without retrying),
//! `STATUS=` carries the job counts and follows them, `WATCHDOG=1` is sent
//! at half of `WATCHDOG_USEC` (also while draining: it comes from the
//! Dispatcher's loop), and SIGTERM gives `STOPPING=1`.

mod common;
mod systemd_support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use common::{Client, signal, wait_exit};
use systemd_support::{LONG, NotifySocket, Reap, Setup};

#[test]
fn ready_status_watchdog_and_stopping() {
    let mut notify = NotifySocket::new();
    let setup = Setup::new("shutdown_timeout_secs = 20\n");
    let mut child = setup.spawn_notifying(
        &notify,
        &[("WATCHDOG_USEC", "200000"), ("JOBD_LOG", "warn")],
        Stdio::inherit(),
    );

    // READY=1: connect at once, no retry. It must work.
    let ready = notify.wait_from(&mut child.0, LONG, "READY=1", |m| m.has("READY=1"));
    let mut c = Client::connect(&setup.socket).expect("READY=1 came before the socket accepts");
    let hello = c.request(json!({"op": "hello"})).unwrap();
    assert_eq!(hello["ok"], json!(true), "{hello}");
    assert!(ready.get("STATUS").is_some(), "{:?}", ready.lines);

    // STATUS= with the counts.
    notify.wait_for(LONG, "STATUS with counts", |m| {
        m.get("STATUS") == Some("0 running, 0 queued")
    });

    // WATCHDOG=1 about every 100 ms (half of 200 ms).
    let first = notify.wait_for(LONG, "WATCHDOG=1", |m| m.has("WATCHDOG=1"));
    let mut last = first.clone();
    for _ in 0..5 {
        last = notify.wait_for(Duration::from_secs(5), "WATCHDOG=1", |m| {
            m.has("WATCHDOG=1")
        });
    }
    let five_gaps = last.at - first.at;
    assert!(
        five_gaps >= Duration::from_millis(250) && five_gaps < Duration::from_secs(3),
        "5 watchdog intervals took {five_gaps:?} (expected about 500 ms)"
    );

    // STATUS follows the counts: a running job shows up.
    let r = c
        .request(json!({"op": "submit", "job": {"kind": "sleep", "payload": {"ms": 1500}}}))
        .unwrap();
    assert_eq!(r["ok"], json!(true), "{r}");
    notify.wait_for(LONG, "STATUS with the running job", |m| {
        m.get("STATUS")
            .is_some_and(|s| s.starts_with("1 running, 0 queued"))
    });

    // SIGTERM: STOPPING=1 while the job still runs, watchdog pings go on
    // during the drain, and the daemon exits cleanly once the job is done.
    signal(&child.0, libc::SIGTERM);
    let stopping = notify.wait_from(&mut child.0, LONG, "STOPPING=1", |m| m.has("STOPPING=1"));
    assert!(
        stopping
            .get("STATUS")
            .is_some_and(|s| s.contains("draining")),
        "{:?}",
        stopping.lines
    );
    notify.wait_for(Duration::from_secs(5), "WATCHDOG=1 while draining", |m| {
        m.has("WATCHDOG=1")
    });
    assert!(wait_exit(&mut child.0, LONG).success());
    assert!(
        notify.seen.iter().filter(|m| m.has("READY=1")).count() == 1,
        "READY=1 is sent once"
    );
}

#[test]
fn no_watchdog_pings_when_watchdog_pid_is_another_process() {
    let mut notify = NotifySocket::new();
    let setup = Setup::new("");
    let mut child = setup.spawn_notifying(
        &notify,
        &[
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
            ("JOBD_LOG", "warn"),
        ],
        Stdio::inherit(),
    );
    notify.wait_from(&mut child.0, LONG, "READY=1", |m| m.has("READY=1"));
    // Twelve watchdog intervals' worth of silence.
    let got = notify.collect_for(Duration::from_millis(600));
    assert!(
        !got.iter().any(|m| m.has("WATCHDOG=1")),
        "{:?}",
        got.iter().map(|m| &m.lines).collect::<Vec<_>>()
    );
    signal(&child.0, libc::SIGTERM);
    notify.wait_from(&mut child.0, LONG, "STOPPING=1", |m| m.has("STOPPING=1"));
    assert!(wait_exit(&mut child.0, LONG).success());
}

#[test]
fn without_notify_socket_nothing_changes() {
    // The same binary by hand: no NOTIFY_SOCKET, no messages, serves as usual.
    let setup = Setup::new("");
    let mut child = Reap(setup.spawn(&[("JOBD_LOG", "warn")], Stdio::inherit()));
    let deadline = std::time::Instant::now() + LONG;
    let mut c = loop {
        if let Ok(c) = Client::connect(&setup.socket) {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "jobd did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = c
        .request(json!({"op": "submit", "job": {"kind": "echo", "payload": 7}, "wait": true}))
        .unwrap();
    assert_eq!(r["result"], json!(7), "{r}");
    signal(&child.0, libc::SIGTERM);
    assert!(wait_exit(&mut child.0, LONG).success());
}
