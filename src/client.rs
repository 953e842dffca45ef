//! A small blocking client for the jobd socket protocol (newline-delimited
//! JSON over a Unix stream socket; see `docs/protocol.md`). `jobctl` is
//! built on it; any Rust program can use it too.
//!
//! Every request gets a fresh numeric `id`. [`Client::call`] sends one
//! request and reads until its answer. To pipeline, [`Client::send`]
//! several requests first, then [`Client::recv`] each id: answers that
//! arrive for other ids meanwhile are kept until asked for, so the order in
//! which the daemon answers does not matter.
//!
//! ```no_run
//! use jobd::client::Client;
//! use serde_json::json;
//!
//! let mut c = Client::connect("/run/jobd/jobd.sock".as_ref())?;
//! let a = c.send("submit", json!({"job": {"kind": "echo", "payload": 1}}))?;
//! let b = c.send("submit", json!({"job": {"kind": "echo", "payload": 2}}))?;
//! let (ra, rb) = (c.recv(a)?, c.recv(b)?);
//! assert!(ra.is_ok() && rb.is_ok());
//! println!("jobs {} and {}", ra.get("job"), rb.get("job"));
//! # Ok::<(), jobd::client::ClientError>(())
//! ```
//!
//! The client does not interpret answers beyond `id`, `ok` and `error`; it
//! hands back the whole JSON object as a [`Response`].

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

/// Why a request got no answer (as opposed to an `"ok":false` answer,
/// which is a [`Response`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached: the daemon is most likely not
    /// running, or listens elsewhere.
    #[error("cannot connect to {}: is jobd running? ({cause})", path.display())]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// What the OS said (in the message, not a separate `source`, so
        /// that error chains do not print it twice).
        cause: std::io::Error,
    },
    /// Reading or writing the connection failed (or timed out).
    #[error("connection to jobd failed: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon closed the connection before answering.
    #[error("jobd closed the connection before answering")]
    Closed,
    /// The daemon sent something that is not a JSON object.
    #[error("jobd sent an unreadable answer: {0}")]
    BadResponse(String),
    /// The caller passed request fields that are not a JSON object.
    #[error("request fields must be a JSON object")]
    NotAnObject,
}

/// One answer from the daemon: the whole JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Response(pub Value);

/// The `error` object of an `"ok":false` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Stable snake_case code (`not_found`, `job_failed`, …).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl Response {
    /// True for `"ok": true`.
    pub fn is_ok(&self) -> bool {
        self.0.get("ok") == Some(&Value::Bool(true))
    }

    /// The error of an `"ok": false` answer (code `internal` if the daemon
    /// gave none).
    pub fn error(&self) -> Option<ApiError> {
        if self.is_ok() {
            return None;
        }
        let e = self.0.get("error");
        let s = |k: &str| {
            e.and_then(|e| e.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Some(ApiError {
            code: s("code").unwrap_or_else(|| "internal".to_string()),
            message: s("message").unwrap_or_else(|| "no message".to_string()),
        })
    }

    /// A top-level field, `Value::Null` when absent.
    pub fn get(&self, field: &str) -> &Value {
        self.0.get(field).unwrap_or(&Value::Null)
    }
}

/// A blocking connection to jobd.
pub struct Client {
    /// Socket path, for messages.
    path: PathBuf,
    /// Buffered reads of answer lines.
    reader: BufReader<UnixStream>,
    /// Buffered writes of request lines (flushed by every `send`).
    writer: BufWriter<UnixStream>,
    /// Id of the next request.
    next_id: u64,
    /// Answers read while waiting for another id, by request id.
    early: HashMap<u64, Response>,
}

impl Client {
    /// Connect to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|cause| ClientError::Connect {
            path: path.to_path_buf(),
            cause,
        })?;
        let read_half = stream.try_clone()?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(read_half),
            writer: BufWriter::new(stream),
            next_id: 1,
            early: HashMap::new(),
        })
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Give up on a read after `timeout` (`None`, the default: wait as long
    /// as it takes).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.reader.get_ref().set_read_timeout(timeout)?;
        Ok(())
    }

    /// Send request `op` with `fields` (a JSON object, or null for none)
    /// without waiting; returns the request id to pass to [`recv`](Self::recv).
    pub fn send(&mut self, op: &str, fields: Value) -> Result<u64, ClientError> {
        let mut req = match fields {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => return Err(ClientError::NotAnObject),
        };
        let id = self.next_id;
        self.next_id += 1;
        req.insert("id".into(), Value::from(id));
        req.insert("op".into(), Value::from(op));
        let mut line = serde_json::to_vec(&Value::Object(req))
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .and_then(|()| self.writer.flush())
            .map_err(closed_or_io)?;
        Ok(id)
    }

    /// Block until the answer to request `id` arrives. Answers to other
    /// requests read meanwhile are kept for their own `recv`. An answer
    /// without a usable id (the daemon could not read a request) is
    /// returned to whichever `recv` is waiting.
    pub fn recv(&mut self, id: u64) -> Result<Response, ClientError> {
        if let Some(r) = self.early.remove(&id) {
            return Ok(r);
        }
        loop {
            let r = self.read_one()?;
            match r.0.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => return Ok(r),
                Some(got) => {
                    self.early.insert(got, r);
                }
                None => return Ok(r),
            }
        }
    }

    /// Block until the next answer to any request: one already read by an
    /// earlier [`recv`](Self::recv) first, else the next line. For callers
    /// that pipeline many requests and take answers as they come (the
    /// answer's `id` tells which request it is for).
    pub fn recv_any(&mut self) -> Result<Response, ClientError> {
        if let Some(id) = self.early.keys().next().copied()
            && let Some(r) = self.early.remove(&id)
        {
            return Ok(r);
        }
        self.read_one()
    }

    /// Send one request and wait for its answer.
    pub fn call(&mut self, op: &str, fields: Value) -> Result<Response, ClientError> {
        let id = self.send(op, fields)?;
        self.recv(id)
    }

    fn read_one(&mut self) -> Result<Response, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(closed_or_io)? == 0 {
            return Err(ClientError::Closed);
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v @ Value::Object(_)) => Ok(Response(v)),
            Ok(_) => Err(ClientError::BadResponse(line.trim_end().to_string())),
            Err(e) => Err(ClientError::BadResponse(format!(
                "{e}: {}",
                line.trim_end()
            ))),
        }
    }
}

/// A peer that hung up is `Closed`; anything else stays an I/O error.
fn closed_or_io(e: std::io::Error) -> ClientError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    match e.kind() {
        BrokenPipe | ConnectionReset => ClientError::Closed,
        _ => ClientError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::net::UnixListener;

    /// A fake daemon that reads `n` requests, then answers them in reverse
    /// order, echoing each id and op.
    fn reversing_server(path: &Path, n: usize) -> std::thread::JoinHandle<Vec<Value>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut reqs = Vec::new();
            for _ in 0..n {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                reqs.push(serde_json::from_str::<Value>(&line).unwrap());
            }
            for q in reqs.iter().rev() {
                let a = json!({"id": q["id"], "ok": true, "op": q["op"]});
                writeln!(w, "{a}").unwrap();
            }
            reqs
        })
    }

    #[test]
    fn pipelined_answers_in_any_order_reach_their_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let server = reversing_server(&path, 3);
        let mut c = Client::connect(&path).unwrap();
        let a = c.send("hello", Value::Null).unwrap();
        let b = c.send("stats", json!({})).unwrap();
        let d = c.send("status", json!({"job": "7"})).unwrap();
        assert_eq!(c.recv(a).unwrap().get("op"), "hello");
        assert_eq!(c.recv(d).unwrap().get("op"), "status");
        assert_eq!(c.recv(b).unwrap().get("op"), "stats");
        let reqs = server.join().unwrap();
        assert_eq!(reqs[2]["job"], "7");
        assert_ne!(reqs[0]["id"], reqs[1]["id"]);
        // The server hung up: the next call says so.
        assert!(matches!(
            c.call("hello", Value::Null),
            Err(ClientError::Closed)
        ));
    }

    #[test]
    fn recv_any_takes_answers_as_they_come_kept_ones_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let server = reversing_server(&path, 3);
        let mut c = Client::connect(&path).unwrap();
        let ids: Vec<u64> = (0..3)
            .map(|_| c.send("hello", Value::Null).unwrap())
            .collect();
        // Waiting for the first request reads (and keeps) the other two.
        assert_eq!(c.recv(ids[0]).unwrap().get("id"), &json!(ids[0]));
        let mut rest: Vec<u64> = (0..2)
            .map(|_| c.recv_any().unwrap().get("id").as_u64().unwrap())
            .collect();
        rest.sort();
        assert_eq!(rest, ids[1..]);
        server.join().unwrap();
        assert!(matches!(c.recv_any(), Err(ClientError::Closed)));
    }

    #[test]
    fn connect_error_names_the_path_and_asks_about_the_daemon() {
        let e = Client::connect(Path::new("/nonexistent/jobd.sock"))
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot connect to /nonexistent/jobd.sock: is jobd running?"),
            "{msg}"
        );
    }

    #[test]
    fn response_errors() {
        let r = Response(
            json!({"id": 1, "ok": false, "error": {"code": "not_found", "message": "no job 9"}}),
        );
        assert_eq!(
            r.error(),
            Some(ApiError {
                code: "not_found".into(),
                message: "no job 9".into()
            })
        );
        assert!(Response(json!({"ok": true})).error().is_none());
        assert_eq!(
            Response(json!({"ok": false})).error().unwrap().code,
            "internal"
        );
    }
}
