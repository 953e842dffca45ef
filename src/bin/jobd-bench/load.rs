//! The NDJSON load client: N connections to a Unix socket, each on its own
//! thread, each keeping `depth` requests in flight. A connection writes all
//! the requests it may send in one `write`, then reads answers (all that
//! have arrived) before it sends more. Request ids are slot numbers, reused
//! once answered, so an answer finds its send time without a map.
//!
//! The same client drives jobd (`submit`, `cycle`) and the bare echo server
//! (`echo`): the cost on the client's side is the same for both.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::measure::{Budget, Limit, Recorder, Stats};

/// What an answer must look like to count as a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// jobd: `"ok":true`.
    Jobd,
    /// The echo server: any line with a known id.
    Echo,
}

/// The part of a submit request after `{"id":N,`, newline included.
pub fn submit_line(kind: &str, payload_bytes: usize, wait: bool) -> String {
    let kind = serde_json::Value::from(kind);
    let payload = serde_json::Value::from("x".repeat(payload_bytes));
    format!(
        "\"op\":\"submit\",\"wait\":{wait},\"job\":{{\"kind\":{kind},\"payload\":{payload}}}}}\n"
    )
}

/// Run `tail` requests over `connections` connections until `limit`.
pub fn run(
    socket: &Path,
    connections: usize,
    depth: usize,
    limit: Limit,
    tail: &str,
    expect: Expect,
) -> Result<Stats> {
    let budget = Budget::new(limit);
    let parts: Vec<Result<Recorder>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|_| s.spawn(|| connection(socket, depth, &budget, tail, expect)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a connection thread panicked")))
            })
            .collect()
    });
    let end = Instant::now();
    let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
    Stats::merge(&budget, end, parts)
}

/// One connection's loop.
fn connection(
    socket: &Path,
    depth: usize,
    budget: &Budget,
    tail: &str,
    expect: Expect,
) -> Result<Recorder> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut rec = Recorder::new()?;
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut sent_at = vec![None::<Instant>; depth];
    let mut out = Vec::with_capacity(depth * (tail.len() + 16));
    let mut line = Vec::with_capacity(256);
    let mut more = true;
    let mut reported = false;
    loop {
        while more && !free.is_empty() {
            if !budget.take() {
                more = false;
                break;
            }
            let Some(slot) = free.pop() else { break };
            sent_at[slot] = Some(Instant::now());
            write!(out, "{{\"id\":{slot},")?;
            out.extend_from_slice(tail.as_bytes());
        }
        if !out.is_empty() {
            writer.write_all(&out)?;
            out.clear();
        }
        if free.len() == depth {
            return Ok(rec);
        }
        // One answer (waiting for it), then every one already here.
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                bail!("the server closed the connection");
            }
            let (slot, ok) = parse_answer(&line, expect)?;
            let Some(sent) = sent_at.get_mut(slot).and_then(Option::take) else {
                bail!(
                    "answer to no request in flight: {}",
                    String::from_utf8_lossy(&line)
                );
            };
            if !ok && !reported {
                reported = true;
                eprintln!("failed: {}", String::from_utf8_lossy(&line).trim_end());
            }
            rec.record(budget, sent, ok);
            free.push(slot);
            if !reader.buffer().contains(&b'\n') {
                break;
            }
        }
    }
}

/// The id (a slot number) of an answer, and whether it is a success. The
/// fast path reads `{"id":N,"ok":true` as jobd writes it; anything else is
/// parsed as JSON.
fn parse_answer(line: &[u8], expect: Expect) -> Result<(usize, bool)> {
    if let Some(rest) = line.strip_prefix(b"{\"id\":") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0
            && let Ok(id) = std::str::from_utf8(&rest[..digits])
                .unwrap_or("x")
                .parse::<usize>()
        {
            let ok = match expect {
                Expect::Echo => true,
                Expect::Jobd => rest[digits..].starts_with(b",\"ok\":true"),
            };
            return Ok((id, ok));
        }
    }
    let v: serde_json::Value = serde_json::from_slice(line)
        .with_context(|| format!("answer is not JSON: {}", String::from_utf8_lossy(line)))?;
    let Some(id) = v["id"].as_u64() else {
        bail!("answer without an id: {}", String::from_utf8_lossy(line));
    };
    let ok = expect == Expect::Echo || v["ok"] == serde_json::Value::Bool(true);
    Ok((id as usize, ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_fast_or_as_json() {
        let j = Expect::Jobd;
        assert_eq!(
            parse_answer(b"{\"id\":12,\"ok\":true,\"x\":1}\n", j).unwrap(),
            (12, true)
        );
        assert_eq!(
            parse_answer(b"{\"id\":3,\"ok\":false}\n", j).unwrap(),
            (3, false)
        );
        assert_eq!(
            parse_answer(b"{\"ok\":true, \"id\":7}\n", j).unwrap(),
            (7, true)
        );
        assert_eq!(
            parse_answer(b"{\"id\":5,\"op\":\"submit\"}\n", Expect::Echo).unwrap(),
            (5, true)
        );
        assert!(parse_answer(b"nope\n", j).is_err());
    }
}
