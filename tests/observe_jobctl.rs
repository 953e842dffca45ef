//! `jobctl`'s observability commands end to end against the real `jobd`:
//! `submit --batch` (pipelined, with and without `--wait`) and `wait` with
//! their plain progress lines when stderr is not a terminal, shell
//! completions, and `top` (its refusal without a terminal, and a smoke run
//! under tmux when tmux is installed).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Daemon, expect_code, jobctl, jobctl_bin, stderr, stdout};
use serde_json::json;

const CONFIG: &str = r#"
[pools.default]
threads = 2
[pools.io]
threads = 1
"#;

fn write_batch(dir: &Path, lines: &[String]) -> String {
    let f = dir.join("jobs.jsonl");
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    f.display().to_string()
}

#[test]
fn batch_submits_every_line_and_reports_plain_progress_off_a_terminal() {
    let d = Daemon::start_with(CONFIG, &[]);
    let mut lines: Vec<String> = (0..40)
        .map(|i| json!({"kind": "echo", "payload": {"n": i}}).to_string())
        .collect();
    lines.insert(7, String::new()); // blank lines are skipped
    lines.push(json!({"kind": "nope"}).to_string());
    let file = write_batch(d.dir.path(), &lines);

    let o = jobctl(&d.socket, &["submit", "--batch", &file]);
    // One job was refused: exit 1, and the other 40 were submitted.
    expect_code(&o, 1);
    let ids: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 40, "{}", stdout(&o));
    let e = stderr(&o);
    assert!(e.contains("jobctl: submitted 41/41 jobs in "), "{e}");
    assert!(e.contains("1 refused"), "{e}");
    assert!(e.contains("line 42: unknown_kind"), "{e}");
    assert!(
        !e.contains('\u{1b}'),
        "no terminal codes off a terminal: {e:?}"
    );

    // Ids come in file order: the payloads say so.
    let mut c = d.client();
    for (i, id) in ids.iter().enumerate().step_by(13) {
        let r = c
            .request(json!({"op": "wait", "job": id, "timeout_ms": 10_000}))
            .unwrap();
        assert_eq!(r["job"]["payload"]["n"], json!(i), "{r}");
    }

    let mut args = vec!["wait"];
    args.extend(ids.iter().map(String::as_str));
    let o = jobctl(&d.socket, &args);
    expect_code(&o, 0);
    assert_eq!(
        stdout(&o)
            .lines()
            .filter(|l| l.contains("succeeded"))
            .count(),
        40
    );
    let e = stderr(&o);
    assert!(e.contains("jobctl: final 40/40 jobs in "), "{e}");
    assert!(e.contains(": 40 succeeded"), "{e}");
    assert!(!e.contains('\u{1b}'), "{e:?}");
}

#[test]
fn batch_wait_shows_every_outcome_and_options_fill_in_fields() {
    let d = Daemon::start_with(CONFIG, &[]);
    let lines = vec![
        json!({"kind": "sleep", "payload": {"ms": 30}}).to_string(),
        json!({"kind": "sleep", "payload": {"ms": "soon"}}).to_string(),
        json!({"kind": "echo", "payload": "x", "pool": "default"}).to_string(),
    ];
    let file = write_batch(d.dir.path(), &lines);
    let o = jobctl(
        &d.socket,
        &[
            "submit",
            "--batch",
            &file,
            "--wait",
            "--pool",
            "io",
            "--priority",
            "4",
        ],
    );
    // One job failed: exit 1 after all are final.
    expect_code(&o, 1);
    let table = stdout(&o);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(rows[0].contains("succeeded"), "{table}");
    assert!(
        rows[1].contains("failed") && rows[1].contains("job_failed"),
        "{table}"
    );
    assert!(
        rows[2].contains("succeeded") && rows[2].contains("\"x\""),
        "{table}"
    );
    let e = stderr(&o);
    assert!(e.contains("submitted 3/3 jobs"), "{e}");
    assert!(
        e.contains("final 3/3 jobs") && e.contains("2 succeeded"),
        "{e}"
    );

    // --pool filled in where the line had none; the line's own pool won.
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r.split_whitespace().next().unwrap())
        .collect();
    let mut c = d.client();
    let pool = |c: &mut common::Client, id: &str| {
        let r = c.request(json!({"op": "status", "job": id})).unwrap();
        (r["job"]["pool"].clone(), r["job"]["priority"].clone())
    };
    assert_eq!(pool(&mut c, ids[0]), (json!("io"), json!(4)));
    assert_eq!(pool(&mut c, ids[2]), (json!("default"), json!(4)));
}

#[test]
fn a_bad_batch_file_is_a_usage_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_batch(dir.path(), &["{\"kind\":\"echo\"}".into(), "{oops".into()]);
    // Checked before connecting: no daemon needed.
    let o = jobctl(&dir.path().join("none.sock"), &["submit", "--batch", &file]);
    expect_code(&o, 2);
    assert!(
        stderr(&o).contains("line 2: not valid JSON"),
        "{}",
        stderr(&o)
    );
    let o = jobctl(
        &dir.path().join("none.sock"),
        &["submit", "echo", "--batch", &file],
    );
    expect_code(&o, 2);
    let o = jobctl(&dir.path().join("none.sock"), &["submit"]);
    expect_code(&o, 2);
}

#[test]
fn completions_cover_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let none = dir.path().join("none.sock");
    let o = jobctl(&none, &["completions", "bash"]);
    expect_code(&o, 0);
    let bash = stdout(&o);
    assert!(bash.contains("complete -F"), "{bash}");
    for sub in [
        "submit",
        "wait",
        "status",
        "list",
        "stats",
        "top",
        "completions",
        "--batch",
    ] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    for shell in ["zsh", "fish"] {
        let o = jobctl(&none, &["completions", shell]);
        expect_code(&o, 0);
        assert!(
            stdout(&o).contains("jobctl") && stdout(&o).contains("submit"),
            "{shell}"
        );
    }
    expect_code(&jobctl(&none, &["completions", "tcsh"]), 2);
}

#[test]
fn top_needs_a_terminal() {
    let d = Daemon::start_with(CONFIG, &[]);
    let o = jobctl(&d.socket, &["top"]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("needs a terminal"), "{}", stderr(&o));
}

/// A private tmux server for one test, killed on drop.
struct Tmux {
    /// `-L` socket name.
    name: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn screen(&self) -> String {
        stdout(&self.cmd(&["capture-pane", "-p", "-t", "top"]))
    }

    /// Poll the screen until `pred` holds (at most 20 s).
    fn until(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "tmux: no {what} on screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_runs_live_under_tmux_and_quits_on_q() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED top_runs_live_under_tmux_and_quits_on_q: tmux is not installed");
        return;
    }
    let d = Daemon::start_with(CONFIG, &[]);
    let tmux = Tmux {
        name: format!("jobd-test-{}", std::process::id()),
    };
    let command = format!(
        "{} --socket {} top --interval 200ms",
        jobctl_bin().display(),
        d.socket.display()
    );
    let o = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "36",
        &command,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    tmux.until("pool table", |s| {
        s.contains("jobd top")
            && s.lines()
                .any(|l| l.contains("│default ") && l.contains("0/2"))
    });

    // A failure shows up within a refresh or two, with its id.
    let mut c = d.client();
    let r = c
        .request(json!({"op": "submit", "wait": true,
                        "job": {"kind": "sleep", "payload": {"ms": "soon"}}}))
        .unwrap();
    let id = r["job"].as_str().unwrap().to_string();
    let s = tmux.until("failure", |s| {
        s.lines().any(|l| l.contains(&id) && l.contains("failed"))
    });
    assert!(s.contains("recent failures"), "{s}");

    tmux.cmd(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.cmd(&["has-session", "-t", "top"]).status.success() {
        assert!(Instant::now() < deadline, "top did not quit on q");
        std::thread::sleep(Duration::from_millis(50));
    }
}
