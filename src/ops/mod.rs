//! Running parsed requests against the runtime: one function per op group
//! (`submit`: submit and submit_batch; `jobs`: status, wait, cancel, retry,
//! list; `admin`: hello, stats, metrics, pause, resume). Each takes the `Handle`, the
//! request id and the op's arguments and returns the response. Only the
//! `*_async` methods of `Handle` are used: this code runs on the session's
//! event loop, which must never block.

mod admin;
mod jobs;
mod submit;

use jobd_actors::{ErrorInfo, Handle, JobRecord};
use serde_json::Value;

use crate::protocol::{Request, Response, code};

/// Run one request and build its response.
pub async fn execute(h: &Handle, id: Value, req: Request) -> Response {
    match req {
        Request::Hello => admin::hello(id),
        Request::Submit { job, wait } => submit::submit(h, id, job, wait).await,
        Request::SubmitBatch { jobs, wait } => submit::submit_batch(h, id, jobs, wait).await,
        Request::Status(job) => jobs::status(h, id, job).await,
        Request::Wait { job, timeout } => jobs::wait(h, id, job, timeout).await,
        Request::Cancel(job) => jobs::cancel(h, id, job).await,
        Request::Retry(job) => jobs::retry(h, id, job).await,
        Request::List(q) => jobs::list(h, id, q).await,
        Request::Stats => admin::stats(h, id).await,
        Request::Metrics => admin::metrics(h, id).await,
        Request::Pause(pool) => admin::set_paused(h, id, pool, true).await,
        Request::Resume(pool) => admin::set_paused(h, id, pool, false).await,
    }
}

/// A record as JSON. Serializing a record cannot fail (no maps with
/// non-string keys, no non-finite floats survive validation); if it ever
/// did, the client gets `internal` rather than a panic.
fn record_json(rec: &JobRecord) -> Result<Value, ErrorInfo> {
    serde_json::to_value(rec)
        .map_err(|e| ErrorInfo::new(code::INTERNAL, format!("cannot encode record: {e}")))
}
