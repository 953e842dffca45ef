//! jobctl's job-lifecycle helpers: `retry --all-dead` (page through the
//! dead jobs with `list` and retry each, pipelined) and the `backoff` object
//! of `submit --backoff-*`.

use std::time::Duration;

use anyhow::bail;
use jobd::client::{Client, Response};
use serde_json::{Map, Value, json};

/// Dead jobs listed per page.
const PAGE: u64 = 100;

/// Retry requests in flight at once (well under the daemon's 64).
const IN_FLIGHT: usize = 32;

/// The `backoff` object of a submission, if any `--backoff-*` flag is set;
/// members not given are left to the daemon's defaults.
pub(crate) fn backoff(
    base: Option<Duration>,
    factor: Option<f64>,
    max: Option<Duration>,
) -> anyhow::Result<Option<Value>> {
    let mut b = Map::new();
    if let Some(d) = base {
        b.insert("base_ms".into(), Value::from(ms(d)));
    }
    if let Some(f) = factor {
        if !(1.0..=100.0).contains(&f) {
            bail!("--backoff-factor must be between 1 and 100, not {f}");
        }
        b.insert("factor".into(), json!(f));
    }
    if let Some(d) = max {
        b.insert("max_ms".into(), Value::from(ms(d)));
    }
    Ok((!b.is_empty()).then_some(Value::Object(b)))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `retry --all-dead [--pool P] [--kind K]`: every dead job (newest first)
/// is queued again with fresh attempts. Prints `job ID STATE` per job (the
/// answers with `--json`) and a count on stderr. Exit code 1 when a retry
/// or the listing was refused, else 0 (also when there was nothing to do).
///
/// Paging is by id, so a retried job that dies again quickly is not met a
/// second time in the same run.
pub(crate) fn retry_all_dead(
    c: &mut Client,
    pool: Option<&str>,
    kind: Option<&str>,
    json: bool,
) -> anyhow::Result<u8> {
    let mut query = json!({ "state": "dead", "limit": PAGE });
    if let Some(p) = pool {
        query["pool"] = Value::from(p);
    }
    if let Some(k) = kind {
        query["kind"] = Value::from(k);
    }
    let (mut retried, mut refused) = (0usize, 0usize);
    loop {
        let page = c.call("list", query.clone())?;
        if let Some(e) = page.error() {
            eprintln!("jobctl: list: {}: {}", e.code, e.message);
            return Ok(1);
        }
        let ids: Vec<Value> = page
            .get("jobs")
            .as_array()
            .map(|jobs| jobs.iter().map(|j| j["id"].clone()).collect())
            .unwrap_or_default();
        for chunk in ids.chunks(IN_FLIGHT) {
            let mut sent = Vec::with_capacity(chunk.len());
            for id in chunk {
                sent.push((id, c.send("retry", json!({ "job": id }))?));
            }
            for (id, req) in sent {
                let r = c.recv(req)?;
                if show(&r, id, json) {
                    retried += 1;
                } else {
                    refused += 1;
                }
            }
        }
        match page.get("cursor") {
            Value::Null => break,
            cursor => query["cursor"] = cursor.clone(),
        }
    }
    if !json {
        let which = match (pool, kind) {
            (None, None) => String::new(),
            (p, k) => {
                let mut parts = Vec::new();
                if let Some(p) = p {
                    parts.push(format!("pool {p}"));
                }
                if let Some(k) = k {
                    parts.push(format!("kind {k}"));
                }
                format!(" ({})", parts.join(", "))
            }
        };
        eprintln!("retried {retried} dead job(s){which}");
        if refused > 0 {
            eprintln!("jobctl: {refused} retry request(s) refused");
        }
    }
    Ok(u8::from(refused > 0))
}

/// Print one retry answer; true when it was accepted.
fn show(r: &Response, id: &Value, json: bool) -> bool {
    let id = match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if json {
        println!("{}", r.0);
    }
    match r.error() {
        None => {
            if !json {
                let state = r.get("job")["state"].as_str().unwrap_or("").to_string();
                println!("job {id} {state}");
            }
            true
        }
        Some(e) => {
            eprintln!("jobctl: job {id}: {}: {}", e.code, e.message);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_flags_make_the_wire_object() {
        assert_eq!(backoff(None, None, None).unwrap(), None);
        assert_eq!(
            backoff(Some(Duration::from_millis(250)), Some(3.0), None).unwrap(),
            Some(json!({"base_ms": 250, "factor": 3.0}))
        );
        assert_eq!(
            backoff(None, None, Some(Duration::from_secs(60))).unwrap(),
            Some(json!({"max_ms": 60000}))
        );
        assert!(backoff(None, Some(0.5), None).is_err());
        assert!(backoff(None, Some(f64::NAN), None).is_err());
    }

    #[test]
    fn submit_and_retry_flags_parse() {
        use clap::Parser;

        use crate::{Cli, Cmd, submit_request};
        let cli = Cli::try_parse_from([
            "jobctl",
            "submit",
            "sleep",
            "--max-attempts",
            "4",
            "--backoff-base",
            "250ms",
            "--backoff-factor",
            "3",
            "--backoff-max",
            "1s",
        ])
        .unwrap();
        let Cmd::Submit(a) = &cli.cmd else {
            panic!("not a submit")
        };
        assert_eq!(
            submit_request(a).unwrap(),
            json!({"job": {"kind": "sleep", "max_attempts": 4,
                "backoff": {"base_ms": 250, "factor": 3.0, "max_ms": 1000}}})
        );
        let cli = Cli::try_parse_from(["jobctl", "retry", "--all-dead", "--pool", "io"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Retry { id: None, all_dead: true, pool: Some(ref p), kind: None } if p == "io"
        ));
        for bad in [
            &["jobctl", "retry"][..],
            &["jobctl", "retry", "7", "--all-dead"],
            &["jobctl", "retry", "7", "--pool", "io"],
            &["jobctl", "submit", "echo", "--backoff-factor", "0.5"],
        ] {
            let parsed = Cli::try_parse_from(bad);
            let usage_error = match parsed {
                Err(_) => true,
                Ok(cli) => match &cli.cmd {
                    Cmd::Submit(a) => submit_request(a).is_err(),
                    _ => false,
                },
            };
            assert!(usage_error, "{bad:?}");
        }
    }
}
