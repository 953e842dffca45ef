//! The wire protocol of DESIGN.md "Wire protocol (contract)": parsing one
//! request line into a typed [`Request`] (with every check a client can
//! fail: JSON, shape, field types, absurd numbers) and building response
//! lines. Nothing here talks to the runtime; `ops` runs requests and
//! `session` moves lines. `docs/protocol.md` is the user-facing description.

use std::borrow::Cow;
use std::time::Duration;

use jobd_actors::{
    Backoff, ErrorInfo, JobError, JobId, JobOptions, JobSpec, JobState, ListQuery, Peer,
};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The protocol version `hello` reports.
pub const PROTOCOL_VERSION: u32 = 1;

/// The server name `hello` reports.
pub const SERVER_NAME: &str = "jobd";

/// The version `hello` reports.
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest delay, timeout, or backoff a job may ask for: one year.
pub const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;

/// Most attempts a job may ask for.
pub const MAX_ATTEMPTS: u64 = 1000;

/// Most dependencies (`after`) one job may have.
pub const MAX_AFTER: usize = 10_000;

/// Most records one `list` page may return.
pub const MAX_LIST_LIMIT: u64 = 10_000;

/// The stable error codes of the protocol.
pub mod code {
    /// The line is not JSON (or not UTF-8).
    pub const BAD_JSON: &str = "bad_json";
    /// The JSON is not a valid request.
    pub const BAD_REQUEST: &str = "bad_request";
    /// No such op.
    pub const UNKNOWN_OP: &str = "unknown_op";
    /// The line is longer than `max_frame_bytes`.
    pub const TOO_LARGE: &str = "too_large";
    /// No job has this id.
    pub const NOT_FOUND: &str = "not_found";
    /// The peer is not on the allow-list.
    pub const FORBIDDEN: &str = "forbidden";
    /// The daemon is draining and takes no new requests.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// Too many connections, or the runtime is gone.
    pub const UNAVAILABLE: &str = "unavailable";
    /// A `wait` ran out of time.
    pub const TIMEOUT: &str = "timeout";
    /// A bug.
    pub const INTERNAL: &str = "internal";
    /// The job's handler failed.
    pub const JOB_FAILED: &str = "job_failed";
    /// The job ran past its timeout.
    pub const TIMED_OUT: &str = "timed_out";
    /// The job was cancelled.
    pub const CANCELLED: &str = "cancelled";
    /// A job it depended on did not succeed.
    pub const DEPENDENCY_FAILED: &str = "dependency_failed";
}

/// A job named by a client: a real id, or a string/number that cannot name
/// any job (answered `not_found` without asking the runtime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobRef {
    /// A well-formed id (the job may still not exist).
    Id(JobId),
    /// Text that names no job, kept for the error message.
    NoSuch(String),
}

impl JobRef {
    /// Read a job id from JSON: a string or a number. Anything else is a
    /// `bad_request`; a string or number that is not an id is `NoSuch`.
    pub fn from_json(v: &Value, field: &str) -> Result<JobRef, ErrorInfo> {
        match v {
            Value::String(s) => Ok(s
                .parse::<u64>()
                .map(|n| JobRef::Id(JobId(n)))
                .unwrap_or_else(|_| JobRef::NoSuch(s.clone()))),
            Value::Number(n) => Ok(n
                .as_u64()
                .map(|n| JobRef::Id(JobId(n)))
                .unwrap_or_else(|| JobRef::NoSuch(n.to_string()))),
            other => Err(bad_request(format!(
                "{field} must be a job id (a string or a number), not {}",
                type_name(other)
            ))),
        }
    }

    /// The id, or the `not_found` error this reference deserves.
    pub fn id(&self) -> Result<JobId, ErrorInfo> {
        match self {
            JobRef::Id(id) => Ok(*id),
            JobRef::NoSuch(s) => Err(JobError::NotFound(s.clone()).info()),
        }
    }
}

/// One parsed request.
#[derive(Debug, Clone)]
pub enum Request {
    /// Who is there.
    Hello,
    /// Submit one job, optionally waiting for its outcome.
    Submit {
        /// The job.
        job: JobSpec,
        /// Answer only once the job is final.
        wait: bool,
    },
    /// Submit several jobs, all or nothing.
    SubmitBatch {
        /// The jobs, in order.
        jobs: Vec<JobSpec>,
        /// Answer only once every job is final.
        wait: bool,
    },
    /// A job's record.
    Status(JobRef),
    /// Wait until a job is final.
    Wait {
        /// The job.
        job: JobRef,
        /// Give up after this long (None: no limit).
        timeout: Option<Duration>,
    },
    /// Cancel a job.
    Cancel(JobRef),
    /// Queue a failed or dead job again.
    Retry(JobRef),
    /// A page of job records.
    List(ListQuery),
    /// Counters, gauges, latencies.
    Stats,
    /// The same as Prometheus text.
    Metrics,
    /// Stop starting jobs of a pool.
    Pause(String),
    /// Start them again.
    Resume(String),
}

impl Request {
    /// The op name, for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Submit { .. } => "submit",
            Request::SubmitBatch { .. } => "submit_batch",
            Request::Status(_) => "status",
            Request::Wait { .. } => "wait",
            Request::Cancel(_) => "cancel",
            Request::Retry(_) => "retry",
            Request::List(_) => "list",
            Request::Stats => "stats",
            Request::Metrics => "metrics",
            Request::Pause(_) => "pause",
            Request::Resume(_) => "resume",
        }
    }

    /// Record who sent it on every job it submits.
    pub fn set_peer(&mut self, peer: Peer) {
        match self {
            Request::Submit { job, .. } => job.options.submitted_by = Some(peer),
            Request::SubmitBatch { jobs, .. } => {
                for j in jobs {
                    j.options.submitted_by = Some(peer);
                }
            }
            _ => {}
        }
    }
}

/// A request line that could not be turned into a [`Request`]: the id to
/// answer with (null when there was none) and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The request's id, or null.
    pub id: Value,
    /// The error to answer.
    pub error: ErrorInfo,
}

fn bad_request(message: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(code::BAD_REQUEST, message)
}

/// How a JSON value's type reads in an error message ("a string", …).
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `submit`, the request that comes by the million, as it is usually
/// sent: read in one pass straight into typed fields, without building a
/// JSON tree first and converting it after.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FastSubmit {
    #[serde(default)]
    id: Value,
    op: SubmitOp,
    job: WireJob,
    #[serde(default)]
    wait: bool,
}

/// The only op `FastSubmit` takes.
#[derive(Deserialize)]
enum SubmitOp {
    #[serde(rename = "submit")]
    Submit,
}

/// A well-formed `submit` whose job passes every check, read the fast way;
/// None for anything else (the general path then gives the same answer,
/// or the precise error).
fn parse_fast_submit(line: &str) -> Option<(Value, Request)> {
    let f: FastSubmit = serde_json::from_str(line).ok()?;
    let SubmitOp::Submit = f.op;
    if !matches!(f.id, Value::Null | Value::Number(_) | Value::String(_)) {
        return None;
    }
    let job = job_from_wire(f.job).ok()?;
    Some((f.id, Request::Submit { job, wait: f.wait }))
}

/// Parse one line. On success, the id to echo (null if the request had
/// none) and the request.
pub fn parse(line: &str) -> Result<(Value, Request), Rejected> {
    match parse_fast_submit(line) {
        Some(parsed) => Ok(parsed),
        None => parse_general(line),
    }
}

/// Any request: the line as a JSON tree first, then each op's fields.
fn parse_general(line: &str) -> Result<(Value, Request), Rejected> {
    let value: Value = serde_json::from_str(line).map_err(|e| Rejected {
        id: Value::Null,
        error: ErrorInfo::new(code::BAD_JSON, format!("not valid JSON: {e}")),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(Rejected {
            id: Value::Null,
            error: bad_request(format!(
                "a request must be a JSON object, not {}",
                type_name(&value)
            )),
        });
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => Value::Null,
        Some(v @ (Value::Number(_) | Value::String(_))) => v,
        Some(other) => {
            return Err(Rejected {
                id: Value::Null,
                error: bad_request(format!(
                    "id must be a number or a string, not {}",
                    type_name(&other)
                )),
            });
        }
    };
    let reject = |error: ErrorInfo| Rejected {
        id: id.clone(),
        error,
    };
    let op = match obj.remove("op") {
        Some(Value::String(op)) => op,
        Some(other) => {
            return Err(reject(bad_request(format!(
                "op must be a string, not {}",
                type_name(&other)
            ))));
        }
        None => return Err(reject(bad_request("missing field `op`"))),
    };
    let request = parse_op(&op, obj).map_err(reject)?;
    Ok((id, request))
}

/// Deserialize the fields of an op (everything but `id` and `op`).
fn fields<T: for<'de> Deserialize<'de>>(op: &str, obj: Map<String, Value>) -> Result<T, ErrorInfo> {
    serde_json::from_value(Value::Object(obj)).map_err(|e| bad_request(format!("{op}: {e}")))
}

/// The ops that take just a job id.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobArg {
    job: Value,
}

/// The ops that take just a pool name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolArg {
    pool: String,
}

/// Ops without fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// Fields of `submit`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitArgs {
    job: Value,
    #[serde(default)]
    wait: bool,
}

/// Fields of `submit_batch`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchArgs {
    jobs: Vec<Value>,
    #[serde(default)]
    wait: bool,
}

/// Fields of `wait`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitArgs {
    job: Value,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// Fields of `list`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    cursor: Option<Value>,
    #[serde(default)]
    order: Option<String>,
}

fn parse_op(op: &str, obj: Map<String, Value>) -> Result<Request, ErrorInfo> {
    Ok(match op {
        "hello" => {
            fields::<NoArgs>(op, obj)?;
            Request::Hello
        }
        "stats" => {
            fields::<NoArgs>(op, obj)?;
            Request::Stats
        }
        "metrics" => {
            fields::<NoArgs>(op, obj)?;
            Request::Metrics
        }
        "submit" => {
            let a: SubmitArgs = fields(op, obj)?;
            let job = parse_job(a.job).map_err(|e| match e {
                JobFieldError::Bad(m) => bad_request(format!("submit: job: {m}")),
                JobFieldError::NoSuchJob(s) => JobError::NotFound(s).info(),
            })?;
            Request::Submit { job, wait: a.wait }
        }
        "submit_batch" => {
            let a: BatchArgs = fields(op, obj)?;
            let jobs = a
                .jobs
                .into_iter()
                .enumerate()
                .map(|(i, j)| {
                    parse_job(j).map_err(|e| bad_request(format!("submit_batch: job {i}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Request::SubmitBatch { jobs, wait: a.wait }
        }
        "status" | "cancel" | "retry" => {
            let a: JobArg = fields(op, obj)?;
            let job = JobRef::from_json(&a.job, "job")?;
            match op {
                "status" => Request::Status(job),
                "cancel" => Request::Cancel(job),
                _ => Request::Retry(job),
            }
        }
        "wait" => {
            let a: WaitArgs = fields(op, obj)?;
            let job = JobRef::from_json(&a.job, "job")?;
            let timeout = match a.timeout_ms {
                Some(ms) if ms > MAX_DURATION_MS => {
                    return Err(bad_request(format!(
                        "wait: timeout_ms must be at most {MAX_DURATION_MS} (one year)"
                    )));
                }
                other => other.map(Duration::from_millis),
            };
            Request::Wait { job, timeout }
        }
        "list" => Request::List(parse_list(fields(op, obj)?)?),
        "pause" | "resume" => {
            let a: PoolArg = fields(op, obj)?;
            if op == "pause" {
                Request::Pause(a.pool)
            } else {
                Request::Resume(a.pool)
            }
        }
        other => {
            return Err(ErrorInfo::new(
                code::UNKNOWN_OP,
                format!("no op named '{other}'"),
            ));
        }
    })
}

fn parse_list(a: ListArgs) -> Result<ListQuery, ErrorInfo> {
    let state = match a.state {
        None => None,
        Some(s) => Some(
            s.parse::<JobState>()
                .map_err(|e| bad_request(format!("list: state: {e}")))?,
        ),
    };
    let limit = match a.limit {
        None => None,
        Some(n) if n == 0 || n > MAX_LIST_LIMIT => {
            return Err(bad_request(format!(
                "list: limit must be between 1 and {MAX_LIST_LIMIT}"
            )));
        }
        Some(n) => Some(n as usize),
    };
    let cursor = match a.cursor {
        None | Some(Value::Null) => None,
        Some(v) => match JobRef::from_json(&v, "cursor")? {
            JobRef::Id(id) => Some(id),
            JobRef::NoSuch(s) => {
                return Err(bad_request(format!(
                    "list: cursor {s:?} is not a cursor this server gave out"
                )));
            }
        },
    };
    let oldest_first = match a.order.as_deref() {
        None | Some("newest") => false,
        Some("oldest") => true,
        Some(other) => {
            return Err(bad_request(format!(
                "list: order must be \"newest\" or \"oldest\", not {other:?}"
            )));
        }
    };
    Ok(ListQuery {
        state,
        pool: a.pool,
        kind: a.kind,
        limit,
        cursor,
        oldest_first,
    })
}

/// The job object of `submit` and `submit_batch`, as sent. Fields are
/// those of docs/protocol.md; `parse_job` checks their ranges.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireJob {
    kind: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_attempts: Option<u64>,
    #[serde(default)]
    backoff: Option<WireBackoff>,
    #[serde(default)]
    unique_key: Option<String>,
    #[serde(default)]
    after: Option<Vec<Value>>,
}

/// `backoff` as sent; missing members take the defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBackoff {
    #[serde(default)]
    base_ms: Option<u64>,
    #[serde(default)]
    factor: Option<f64>,
    #[serde(default)]
    max_ms: Option<u64>,
}

fn check_ms(field: &str, ms: u64) -> Result<Duration, String> {
    if ms > MAX_DURATION_MS {
        Err(format!(
            "{field} must be at most {MAX_DURATION_MS} (one year), got {ms}"
        ))
    } else {
        Ok(Duration::from_millis(ms))
    }
}

/// Why a submitted job object was refused.
enum JobFieldError {
    /// A malformed field (`bad_request`).
    Bad(String),
    /// `after` names no job (`not_found` for a single submit).
    NoSuchJob(String),
}

impl From<String> for JobFieldError {
    fn from(m: String) -> Self {
        JobFieldError::Bad(m)
    }
}

impl std::fmt::Display for JobFieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobFieldError::Bad(m) => f.write_str(m),
            JobFieldError::NoSuchJob(s) => write!(f, "after: no job with id {s}"),
        }
    }
}

/// Turn a submitted job object into a spec, checking every field.
fn parse_job(v: Value) -> Result<JobSpec, JobFieldError> {
    if !v.is_object() {
        return Err(format!("must be an object, not {}", type_name(&v)).into());
    }
    let w: WireJob = serde_json::from_value(v).map_err(|e| e.to_string())?;
    job_from_wire(w)
}

/// Check the fields of a submitted job and make it a spec.
fn job_from_wire(w: WireJob) -> Result<JobSpec, JobFieldError> {
    if w.kind.is_empty() {
        return Err(JobFieldError::Bad("kind must not be empty".into()));
    }
    let priority = match w.priority {
        None => 0,
        Some(p) => i32::try_from(p)
            .map_err(|_| format!("priority must fit in a 32-bit signed integer, got {p}"))?,
    };
    let delay = match w.delay_ms {
        None | Some(0) => None,
        Some(ms) => Some(check_ms("delay_ms", ms)?),
    };
    let timeout = match w.timeout_ms {
        None => None,
        Some(0) => return Err(JobFieldError::Bad("timeout_ms must be at least 1".into())),
        Some(ms) => Some(check_ms("timeout_ms", ms)?),
    };
    let max_attempts = match w.max_attempts {
        None => None,
        Some(n) if n == 0 || n > MAX_ATTEMPTS => {
            return Err(
                format!("max_attempts must be between 1 and {MAX_ATTEMPTS}, got {n}").into(),
            );
        }
        Some(n) => Some(n as u32),
    };
    let backoff = match w.backoff {
        None => None,
        Some(b) => {
            let d = Backoff::default();
            let base_ms = b.base_ms.unwrap_or(d.base_ms);
            let max_ms = b.max_ms.unwrap_or(d.max_ms);
            let factor = b.factor.unwrap_or(d.factor);
            check_ms("backoff.base_ms", base_ms)?;
            check_ms("backoff.max_ms", max_ms)?;
            if !(1.0..=100.0).contains(&factor) {
                return Err(
                    format!("backoff.factor must be between 1 and 100, got {factor}").into(),
                );
            }
            Some(Backoff {
                base_ms,
                factor,
                max_ms,
            })
        }
    };
    let after = match w.after {
        None => Vec::new(),
        Some(list) if list.len() > MAX_AFTER => {
            return Err(format!("after may list at most {MAX_AFTER} jobs").into());
        }
        Some(list) => {
            let mut ids = Vec::with_capacity(list.len());
            for v in &list {
                match JobRef::from_json(v, "after").map_err(|e| e.message)? {
                    JobRef::Id(id) => ids.push(id),
                    JobRef::NoSuch(s) => return Err(JobFieldError::NoSuchJob(s)),
                }
            }
            ids
        }
    };
    if w.pool.as_deref() == Some("") {
        return Err(JobFieldError::Bad("pool must not be empty".into()));
    }
    Ok(JobSpec {
        kind: w.kind,
        payload: w.payload,
        options: JobOptions {
            pool: w.pool,
            priority,
            delay,
            timeout,
            max_attempts,
            backoff,
            unique_key: w.unique_key,
            after,
            submitted_by: None,
        },
    })
}

/// One response line under construction: `id` and `ok` first, then the
/// fields in the order they were added.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    id: Value,
    ok: bool,
    fields: Vec<(Cow<'static, str>, Value)>,
}

impl Response {
    /// A successful answer to request `id`.
    pub fn ok(id: Value) -> Response {
        Response {
            id,
            ok: true,
            fields: Vec::new(),
        }
    }

    /// An unsuccessful answer to request `id` (add `error` yourself).
    pub fn failed(id: Value) -> Response {
        Response {
            id,
            ok: false,
            fields: Vec::new(),
        }
    }

    /// An error answer: `{"id":..,"ok":false,"error":{"code","message"}}`.
    pub fn error(id: Value, error: &ErrorInfo) -> Response {
        Response::failed(id).with("error", error_json(error))
    }

    /// Add a field.
    pub fn with(mut self, key: impl Into<Cow<'static, str>>, value: Value) -> Response {
        self.fields.push((key.into(), value));
        self
    }

    /// True for `"ok":true`.
    pub fn is_ok(&self) -> bool {
        self.ok
    }

    /// The error code, if this is an error answer.
    pub fn error_code(&self) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == "error")
            .and_then(|(_, v)| v.get("code"))
            .and_then(Value::as_str)
    }

    /// The error message, if this is an error answer.
    pub fn error_message(&self) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == "error")
            .and_then(|(_, v)| v.get("message"))
            .and_then(Value::as_str)
    }

    /// The id this answers.
    pub fn id(&self) -> &Value {
        &self.id
    }

    /// The line to send (without the newline).
    pub fn to_line(&self) -> String {
        // Serialized straight into one buffer: no string per field.
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(b"{\"id\":");
        write_json(&mut out, &self.id);
        out.extend_from_slice(if self.ok {
            b",\"ok\":true"
        } else {
            b",\"ok\":false"
        });
        for (k, v) in &self.fields {
            out.push(b',');
            write_json(&mut out, k.as_ref());
            out.push(b':');
            write_json(&mut out, v);
        }
        out.push(b'}');
        // serde_json writes UTF-8 only; the rest are ASCII literals.
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// Append `v` as JSON. Writing into a `Vec` cannot fail, and neither can
/// serializing strings or a `Value` (its map keys are strings).
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(&mut *out, v);
}

/// `{"code":..,"message":..}`.
pub fn error_json(e: &ErrorInfo) -> Value {
    serde_json::json!({ "code": e.code, "message": e.message })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ok(line: &str) -> (Value, Request) {
        parse(line).unwrap_or_else(|r| panic!("{line}: {r:?}"))
    }

    fn err(line: &str) -> Rejected {
        match parse(line) {
            Ok(r) => panic!("{line} parsed: {r:?}"),
            Err(r) => r,
        }
    }

    #[test]
    fn full_submit_parses() {
        let (id, r) = ok(
            r#"{"id":3,"op":"submit","job":{"kind":"sleep","payload":{"ms":50},
            "pool":"default","priority":5,"delay_ms":0,"timeout_ms":1000,"max_attempts":3,
            "unique_key":"k1","backoff":{"base_ms":10},"after":["1",2]}}"#,
        );
        assert_eq!(id, json!(3));
        let Request::Submit { job, wait } = r else {
            panic!()
        };
        assert!(!wait);
        assert_eq!(job.kind, "sleep");
        assert_eq!(job.payload, json!({"ms":50}));
        assert_eq!(job.options.priority, 5);
        assert_eq!(job.options.delay, None);
        assert_eq!(job.options.timeout, Some(Duration::from_secs(1)));
        assert_eq!(job.options.max_attempts, Some(3));
        assert_eq!(job.options.unique_key.as_deref(), Some("k1"));
        assert_eq!(job.options.backoff.unwrap().base_ms, 10);
        assert_eq!(job.options.backoff.unwrap().max_ms, 300_000);
        assert_eq!(job.options.after, vec![JobId(1), JobId(2)]);
    }

    #[test]
    fn the_fast_submit_reads_what_the_general_path_reads() {
        for line in [
            r#"{"id":1,"op":"submit","job":{"kind":"echo","payload":"xxxx"},"wait":true}"#,
            r#"{"wait":false,"job":{"payload":{"a":[1,2]},"kind":"echo","priority":-3},"op":"submit","id":"s"}"#,
            r#"{"op":"submit","job":{"kind":"sleep","payload":{"ms":5},"pool":"io","delay_ms":10,
               "timeout_ms":20,"max_attempts":2,"backoff":{"factor":3},"unique_key":"u","after":[4,"5"]}}"#,
        ] {
            let fast = parse_fast_submit(line).expect("read the fast way");
            let general = parse_general(line).expect("read the general way");
            assert_eq!(format!("{fast:?}"), format!("{general:?}"), "{line}");
        }
        // Anything the fast path does not take goes the general way, with
        // its precise answers: a duplicate field (the last one counts), an
        // id of the wrong type, another op.
        let dup = r#"{"op":"submit","job":{"kind":"a"},"job":{"kind":"b"}}"#;
        assert!(parse_fast_submit(dup).is_none());
        let Request::Submit { job, .. } = ok(dup).1 else {
            panic!()
        };
        assert_eq!(job.kind, "b");
        assert!(parse_fast_submit(r#"{"id":[1],"op":"submit","job":{"kind":"a"}}"#).is_none());
        assert!(parse_fast_submit(r#"{"op":"status","job":"1"}"#).is_none());
    }

    #[test]
    fn ids_are_echoed_or_null() {
        assert_eq!(ok(r#"{"id":"a","op":"hello"}"#).0, json!("a"));
        assert_eq!(ok(r#"{"op":"hello"}"#).0, Value::Null);
        let r = err(r#"{"id":{"x":1},"op":"hello"}"#);
        assert_eq!((r.id, r.error.code.as_str()), (Value::Null, "bad_request"));
    }

    #[test]
    fn bad_input_gets_its_code() {
        assert_eq!(err("{nope").error.code, "bad_json");
        assert_eq!(err("[1,2]").error.code, "bad_request");
        assert_eq!(err("42").error.code, "bad_request");
        assert_eq!(err(r#"{"id":1}"#).error.code, "bad_request");
        assert_eq!(err(r#"{"id":1,"op":7}"#).error.code, "bad_request");
        let r = err(r#"{"id":1,"op":"frobnicate"}"#);
        assert_eq!((r.id, r.error.code.as_str()), (json!(1), "unknown_op"));
        let r = err(r#"{"id":2,"op":"submit","job":{"kind":"echo","colour":"red"}}"#);
        assert_eq!(r.error.code, "bad_request");
        assert!(r.error.message.contains("colour"), "{}", r.error.message);
        for job in [
            r#"{"kind":"echo","priority":2147483648}"#,
            r#"{"kind":"echo","priority":1.5}"#,
            r#"{"kind":"echo","delay_ms":-1}"#,
            r#"{"kind":"echo","delay_ms":99999999999999}"#,
            r#"{"kind":"echo","timeout_ms":0}"#,
            r#"{"kind":"echo","max_attempts":0}"#,
            r#"{"kind":"echo","max_attempts":1001}"#,
            r#"{"kind":"echo","backoff":{"factor":-2}}"#,
            r#"{"kind":"echo","after":[{"x":1}]}"#,
            r#"{"kind":5}"#,
            r#"{"payload":1}"#,
            r#""echo""#,
        ] {
            let line = format!(r#"{{"id":1,"op":"submit","job":{job}}}"#);
            assert_eq!(err(&line).error.code, "bad_request", "{job}");
        }
        assert_eq!(
            err(r#"{"id":1,"op":"status","job":[1]}"#).error.code,
            "bad_request"
        );
        assert_eq!(
            err(r#"{"id":1,"op":"list","state":"sleeping"}"#).error.code,
            "bad_request"
        );
        assert_eq!(
            err(r#"{"id":1,"op":"hello","extra":1}"#).error.code,
            "bad_request"
        );
    }

    #[test]
    fn after_naming_no_job_is_not_found() {
        let r = err(r#"{"id":1,"op":"submit","job":{"kind":"echo","after":["abc"]}}"#);
        assert_eq!(r.error.code, "not_found");
        let r = err(r#"{"id":1,"op":"submit_batch","jobs":[{"kind":"echo","after":["abc"]}]}"#);
        assert_eq!(r.error.code, "bad_request");
        assert!(r.error.message.contains("job 0"), "{}", r.error.message);
    }

    #[test]
    fn batch_errors_name_the_index() {
        let r =
            err(r#"{"id":1,"op":"submit_batch","jobs":[{"kind":"echo"},{"kind":"echo","x":1}]}"#);
        assert_eq!(r.error.code, "bad_request");
        assert!(r.error.message.contains("job 1"), "{}", r.error.message);
    }

    #[test]
    fn job_refs_accept_strings_and_numbers() {
        let (_, r) = ok(r#"{"op":"status","job":"42"}"#);
        assert!(matches!(r, Request::Status(JobRef::Id(JobId(42)))));
        let (_, r) = ok(r#"{"op":"status","job":42}"#);
        assert!(matches!(r, Request::Status(JobRef::Id(JobId(42)))));
        let (_, r) = ok(r#"{"op":"status","job":"abc"}"#);
        let Request::Status(j) = r else { panic!() };
        assert_eq!(j.id().unwrap_err().code, "not_found");
        let (_, r) = ok(r#"{"op":"cancel","job":-3}"#);
        let Request::Cancel(j) = r else { panic!() };
        assert_eq!(j.id().unwrap_err().code, "not_found");
    }

    #[test]
    fn list_options() {
        let (_, r) =
            ok(r#"{"op":"list","state":"running","limit":5,"cursor":"9","order":"oldest"}"#);
        let Request::List(q) = r else { panic!() };
        assert_eq!(q.state, Some(JobState::Running));
        assert_eq!(q.limit, Some(5));
        assert_eq!(q.cursor, Some(JobId(9)));
        assert!(q.oldest_first);
        assert_eq!(err(r#"{"op":"list","limit":0}"#).error.code, "bad_request");
    }

    #[test]
    fn response_lines_put_id_and_ok_first() {
        let r = Response::ok(json!(7)).with("job", json!("42"));
        assert_eq!(r.to_line(), r#"{"id":7,"ok":true,"job":"42"}"#);
        let e = Response::error(Value::Null, &ErrorInfo::new("bad_json", "x \"y\""));
        assert_eq!(
            e.to_line(),
            r#"{"id":null,"ok":false,"error":{"code":"bad_json","message":"x \"y\""}}"#
        );
        assert_eq!(e.error_code(), Some("bad_json"));
    }
}
