//! The same job cycle against beanstalkd, over its text protocol on TCP
//! loopback. Producer connections `put` jobs, pipelined, keeping at most
//! `depth` jobs each in the system: a job counts as in flight from its
//! `put` until a worker has deleted it. Worker connections loop over
//! `reserve-with-timeout` and `delete`, the usual beanstalkd worker (two
//! round trips per job), and tell the job's producer (in-process channel)
//! that the cycle is complete. Latency: from the `put` to that moment.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::measure::{Budget, Limit, Recorder, Stats};

/// What to run.
pub struct Setup {
    /// beanstalkd's address (loopback only).
    pub addr: String,
    /// Producer connections.
    pub producers: usize,
    /// Worker connections.
    pub workers: usize,
    /// Jobs in flight per producer.
    pub depth: usize,
    /// How long.
    pub limit: Limit,
    /// Job body size (at least the producer and slot numbers).
    pub payload_bytes: usize,
}

/// How long anyone waits for beanstalkd before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

/// Run the cycle.
pub fn run(s: &Setup) -> Result<Stats> {
    let addr: SocketAddr = s
        .addr
        .parse()
        .with_context(|| format!("--addr {} is not an address", s.addr))?;
    if !addr.ip().is_loopback() {
        bail!("--addr must be a loopback address, not {addr}");
    }
    let budget = Budget::new(s.limit);
    let done = AtomicBool::new(false);
    let (txs, rxs): (Vec<Sender<usize>>, Vec<Receiver<usize>>) =
        (0..s.producers).map(|_| unbounded()).unzip();
    let (parts, end, worker_results) = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..s.workers)
            .map(|_| sc.spawn(|| worker(addr, &txs, &done)))
            .collect();
        let producers: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(p, rx)| {
                let budget = &budget;
                sc.spawn(move || producer(p, addr, s, budget, rx))
            })
            .collect();
        let parts: Vec<Result<Recorder>> = producers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a producer panicked")))
            })
            .collect();
        let end = Instant::now();
        done.store(true, Ordering::Relaxed);
        let w: Vec<Result<()>> = workers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
            })
            .collect();
        (parts, end, w)
    });
    let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
    worker_results.into_iter().collect::<Result<Vec<_>>>()?;
    Stats::merge(&budget, end, parts)
}

fn connect(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(PATIENCE))?;
    let r = BufReader::with_capacity(64 * 1024, s.try_clone()?);
    Ok((s, r))
}

fn read_line(r: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> Result<()> {
    line.clear();
    if r.read_until(b'\n', line)? == 0 {
        bail!("beanstalkd closed the connection");
    }
    Ok(())
}

/// One producer: `put` while fewer than `depth` of its jobs are in the
/// system, read the `INSERTED` answers, then wait for completions.
fn producer(
    p: usize,
    addr: SocketAddr,
    s: &Setup,
    budget: &Budget,
    done: Receiver<usize>,
) -> Result<Recorder> {
    let (mut w, mut r) = connect(addr)?;
    let mut rec = Recorder::new()?;
    let mut free: Vec<usize> = (0..s.depth).rev().collect();
    let mut sent_at = vec![Instant::now(); s.depth];
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut more = true;
    loop {
        let mut puts = Vec::new();
        while more && !free.is_empty() {
            if !budget.take() {
                more = false;
                break;
            }
            let Some(slot) = free.pop() else { break };
            let mut body = format!("{p}:{slot}:");
            while body.len() < s.payload_bytes {
                body.push('x');
            }
            sent_at[slot] = Instant::now();
            write!(out, "put 1024 0 60 {}\r\n{body}\r\n", body.len())?;
            puts.push(slot);
        }
        if !out.is_empty() {
            w.write_all(&out)?;
            out.clear();
        }
        for slot in puts {
            read_line(&mut r, &mut line)?;
            if !line.starts_with(b"INSERTED ") {
                eprintln!("put refused: {}", String::from_utf8_lossy(&line).trim_end());
                rec.record(budget, sent_at[slot], false);
                free.push(slot);
            }
        }
        if free.len() == s.depth {
            return Ok(rec);
        }
        let slot = done
            .recv_timeout(PATIENCE)
            .context("no job of ours was finished for a minute")?;
        rec.record(budget, sent_at[slot], true);
        free.push(slot);
        while let Ok(slot) = done.try_recv() {
            rec.record(budget, sent_at[slot], true);
            free.push(slot);
        }
    }
}

/// One worker: reserve, delete, tell the producer; until `done`.
fn worker(addr: SocketAddr, producers: &[Sender<usize>], done: &AtomicBool) -> Result<()> {
    let (mut w, mut r) = connect(addr)?;
    let mut line = Vec::new();
    let mut body = Vec::new();
    while !done.load(Ordering::Relaxed) {
        w.write_all(b"reserve-with-timeout 1\r\n")?;
        read_line(&mut r, &mut line)?;
        if line.starts_with(b"TIMED_OUT") || line.starts_with(b"DEADLINE_SOON") {
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let mut words = text.split_whitespace();
        let (Some("RESERVED"), Some(id), Some(bytes)) = (words.next(), words.next(), words.next())
        else {
            bail!("unexpected answer to reserve: {}", text.trim_end());
        };
        let id: u64 = id.parse()?;
        let bytes: usize = bytes.parse()?;
        body.resize(bytes + 2, 0);
        r.read_exact(&mut body)?;
        // One write, one packet (a `write!` on the socket would make several).
        let mut cmd = Vec::with_capacity(32);
        write!(cmd, "delete {id}\r\n")?;
        w.write_all(&cmd)?;
        read_line(&mut r, &mut line)?;
        if !line.starts_with(b"DELETED") {
            bail!(
                "unexpected answer to delete: {}",
                String::from_utf8_lossy(&line).trim_end()
            );
        }
        let text = String::from_utf8_lossy(&body[..bytes]);
        let mut parts = text.split(':');
        let (Some(Ok(p)), Some(Ok(slot))) = (
            parts.next().map(str::parse::<usize>),
            parts.next().map(str::parse::<usize>),
        ) else {
            bail!("a job that is not ours: {text}");
        };
        if let Some(tx) = producers.get(p) {
            let _ = tx.send(slot);
        }
    }
    Ok(())
}
