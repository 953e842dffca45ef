//! Socket activation end to end with systemd's own tool:
//! `systemd-socket-activate -l SOCK --fdname=jobd -E NOTIFY_SOCKET=… jobd …`
//! binds the socket, starts jobd on the first connection and passes the
//! socket as fd 3 (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`). jobd
//! serves it without binding, says `READY=1`, runs jobs, hides the
//! activation variables and the descriptor from its children (exec jobs),
//! and leaves the socket file alone on exit.
//!
//! The environment is not inherited through `systemd-socket-activate`:
//! everything jobd needs is passed with `-E`.

mod common;
mod systemd_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Client, jobd_bin, signal, wait_exit};
use systemd_support::{LONG, NotifySocket, Reap, Setup};

const TOOL: &str = "systemd-socket-activate";

fn tool_present() -> bool {
    Command::new(TOOL)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn exec(c: &mut Client, argv: &[&str]) -> Value {
    let r = c
        .request(json!({"op": "submit", "wait": true,
            "job": {"kind": "exec", "payload": {"argv": argv}}}))
        .unwrap();
    assert_eq!(r["ok"], json!(true), "{r}");
    r["result"].clone()
}

#[test]
fn activated_jobd_serves_the_passed_socket() {
    if !tool_present() {
        eprintln!("skipped: {TOOL} is not installed");
        return;
    }
    // exec passes these daemon variables through if they exist: they must
    // not, once jobd has taken the socket.
    let setup = Setup::new(
        r#"
        [exec]
        enabled = true
        allow = ["/usr/bin/env", "/bin/sh"]
        env = ["PATH", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]
        "#,
    );
    let sock = setup.dir.path().join("activated.sock");
    let mut notify = NotifySocket::new();
    let notify_env = format!("NOTIFY_SOCKET={}", notify.path().display());
    let mut child = Reap(
        Command::new(TOOL)
            .arg("-l")
            .arg(&sock)
            .arg("--fdname=jobd")
            .args([
                "-E",
                &notify_env,
                "-E",
                "JOBD_LOG=warn",
                "-E",
                "PATH=/usr/bin:/bin",
            ])
            .arg(jobd_bin())
            .arg("--config")
            .arg(&setup.config)
            .arg("--state-dir")
            .arg(&setup.state_dir)
            .args(["--durability", "memory"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn systemd-socket-activate"),
    );

    // The tool binds first; jobd is not running yet.
    let deadline = Instant::now() + LONG;
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "{TOOL} did not bind {}",
            sock.display()
        );
        assert!(child.0.try_wait().unwrap().is_none(), "{TOOL} exited");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        notify.recv(Duration::from_millis(200)).is_none(),
        "jobd must start only on the first connection"
    );

    // The first connection starts jobd, which serves it.
    let mut c = Client::connect(&sock).unwrap();
    let hello = c.request(json!({"op": "hello"})).unwrap();
    assert_eq!(hello["ok"], json!(true), "{hello}");
    notify.wait_for(LONG, "READY=1", |m| m.has("READY=1"));
    let r = c
        .request(json!({"op": "submit", "wait": true,
            "job": {"kind": "echo", "payload": {"activated": true}}}))
        .unwrap();
    assert_eq!(r["state"], json!("succeeded"), "{r}");
    assert_eq!(r["result"], json!({"activated": true}));
    // A second connection, too.
    let mut c2 = Client::connect(&sock).unwrap();
    assert_eq!(
        c2.request(json!({"op": "hello"})).unwrap()["ok"],
        json!(true)
    );

    // jobd did not bind a socket of its own at its default place.
    assert!(!setup.state_dir.join("jobd.sock").exists());

    // Children see neither the activation variables nor the descriptor.
    let env = exec(&mut c, &["/usr/bin/env"]);
    let env = env["stdout"].as_str().unwrap();
    assert!(env.contains("PATH="), "{env}");
    assert!(!env.contains("LISTEN_"), "{env}");
    let fds = exec(&mut c, &["/bin/sh", "-c", "ls -l /proc/$$/fd"]);
    let fds = fds["stdout"].as_str().unwrap();
    assert!(
        !fds.contains("socket:"),
        "an exec job inherited a socket:\n{fds}"
    );

    // systemd-socket-activate execs jobd in its own place: same pid.
    signal(&child.0, libc::SIGTERM);
    assert!(wait_exit(&mut child.0, LONG).success());
    let seen: Vec<_> = notify.collect_for(Duration::from_millis(100));
    let stopping = notify.seen.iter().any(|m| m.has("STOPPING=1"));
    assert!(stopping, "{seen:?}");
    // The socket file belongs to whoever bound it: still there.
    assert!(is_socket(&sock), "jobd removed the inherited socket file");
}

#[test]
fn a_passed_descriptor_that_is_not_a_listening_socket_stops_start_up() {
    // LISTEN_FDS for this very process, but fd 3 is a plain file: refuse to
    // start (exit 1) rather than serve nothing or bind elsewhere.
    let setup = Setup::new("");
    let file = std::fs::File::open("/dev/null").unwrap();
    let mut cmd = Command::new("/bin/sh");
    // The shell puts /dev/null on fd 3 and replaces itself with jobd, so
    // LISTEN_PID (its pid, $$) names jobd.
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@" 3</dev/null"#)
        .arg(jobd_bin())
        .arg("--config")
        .arg(&setup.config)
        .arg("--socket")
        .arg(&setup.socket)
        .arg("--state-dir")
        .arg(&setup.state_dir)
        .args(["--durability", "memory"])
        .env("JOBD_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    drop(file);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("socket activation: fd 3"), "{err}");
    assert!(!setup.socket.exists(), "it must not bind instead");
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}
