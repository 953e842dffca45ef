//! The shipped unit files (`systemd/`), checked with systemd's own tools:
//!
//! - `systemd-analyze verify` prints nothing at all (it exits 0 on
//!   warnings, so any output counts as a failure). jobd is not installed at
//!   `/usr/local/bin/jobd` on a build machine, and verify rightly complains
//!   about a missing `ExecStart` binary; so the units are verified as
//!   copies that point at the binary these tests built and at an existing
//!   config file, changing nothing else, and the originals are verified
//!   too, where the only complaint allowed is that missing binary.
//! - `systemd-analyze security --offline=true`: exposure at most 1.5, and
//!   the score README.md states is the one measured.
//! - the sysusers.d file creates the `jobd` user and group.
//! - the directives the service needs are there.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
const INSTALLED_BIN: &str = "/usr/local/bin/jobd";
const INSTALLED_CONFIG: &str = "/etc/jobd/jobd.toml";

fn unit(name: &str) -> PathBuf {
    Path::new(UNITS).join(name)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Everything a command printed, both streams.
fn printed(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `Key=Value` lines of a unit file, by key (a key may repeat).
fn directives(path: &Path) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            map.entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    map
}

#[test]
fn units_verify_without_a_word_when_pointed_at_the_built_binary() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("jobd.toml");
    std::fs::write(&config, "").unwrap();
    let bin = common::jobd_bin();
    let service = std::fs::read_to_string(unit("jobd.service")).unwrap();
    assert!(service.contains(INSTALLED_BIN) && service.contains(INSTALLED_CONFIG));
    let copy = service
        .replace(INSTALLED_BIN, bin.to_str().unwrap())
        .replace(INSTALLED_CONFIG, config.to_str().unwrap());
    // Only those two paths changed.
    assert_eq!(copy.lines().count(), service.lines().count());
    let changed: Vec<_> = service
        .lines()
        .zip(copy.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(changed[0].0.starts_with("ExecStart="));
    std::fs::write(dir.path().join("jobd.service"), copy).unwrap();
    std::fs::copy(unit("jobd.socket"), dir.path().join("jobd.socket")).unwrap();

    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("jobd.service"))
        .arg(dir.path().join("jobd.socket")));
    assert!(out.status.success(), "{}", printed(&out));
    assert_eq!(
        printed(&out),
        "",
        "systemd-analyze verify must print nothing"
    );
}

#[test]
fn shipped_units_verify_with_no_complaint_but_the_uninstalled_binary() {
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit("jobd.service"))
        .arg(unit("jobd.socket")));
    let text = printed(&out);
    if Path::new(INSTALLED_BIN).is_file() {
        assert_eq!(text, "", "systemd-analyze verify must print nothing");
    } else {
        for line in text.lines() {
            assert!(
                line.contains(INSTALLED_BIN) && line.contains("not executable"),
                "unexpected complaint: {line}\n{text}"
            );
        }
    }
}

/// The overall exposure `systemd-analyze security --offline=true` reports.
fn exposure() -> f64 {
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit("jobd.service")));
    let text = printed(&out);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for jobd.service:"))
        .unwrap_or_else(|| panic!("no overall exposure line:\n{text}"));
    let after = line.split(':').nth(1).unwrap().trim();
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read a number in {line:?}"))
}

#[test]
fn security_exposure_is_at_most_1_5_and_the_readme_says_what_it_is() {
    let score = exposure();
    assert!(score <= 1.5, "exposure {score} > 1.5");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Install as a service")
        .nth(1)
        .expect("README.md has an \"Install as a service\" section");
    let stated = format!("exposure level {score:.1}");
    assert!(
        section.contains(&stated),
        "README.md should state \"{stated}\" (the measured score)"
    );
}

#[test]
fn the_sysusers_file_creates_the_jobd_user_and_group() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let file = std::fs::File::open(unit("jobd.sysusers")).unwrap();
    let out = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg("-")
        .stdin(file));
    assert!(out.status.success(), "{}", printed(&out));
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("jobd:")), "{group}");
    assert!(passwd.lines().any(|l| l.starts_with("jobd:")), "{passwd}");
}

#[test]
fn units_carry_the_directives_jobd_relies_on() {
    let service = directives(&unit("jobd.service"));
    let want = [
        ("Type", "notify"),
        (
            "ExecStart",
            "/usr/local/bin/jobd --config /etc/jobd/jobd.toml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("RuntimeDirectory", "jobd"),
        ("StateDirectory", "jobd"),
        ("ConfigurationDirectory", "jobd"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("CapabilityBoundingSet", ""),
        ("User", "jobd"),
        // The socket lives in /run/jobd: stopping the service must not
        // delete it under jobd.socket's feet.
        ("RuntimeDirectoryPreserve", "yes"),
        // SIGTERM to jobd alone, so that running exec jobs can finish
        // during the drain.
        ("KillMode", "mixed"),
    ];
    for (k, v) in want {
        assert!(
            service.get(k).is_some_and(|vs| vs.iter().any(|x| x == v)),
            "jobd.service needs {k}={v}; has {:?}",
            service.get(k)
        );
    }
    assert!(service.get("WatchdogSec").is_some_and(|v| !v[0].is_empty()));
    assert!(
        !service.contains_key("PrivateUsers"),
        "PrivateUsers= would hide clients' uids from SO_PEERCRED"
    );

    let socket = directives(&unit("jobd.socket"));
    for (k, v) in [
        ("ListenStream", "/run/jobd/jobd.sock"),
        ("SocketMode", "0660"),
        ("SocketGroup", "jobd"),
        ("FileDescriptorName", "jobd"),
    ] {
        assert_eq!(socket.get(k), Some(&vec![v.to_string()]), "jobd.socket {k}");
    }
}
