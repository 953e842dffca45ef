//! Ops on existing jobs: `status`, `wait`, `cancel`, `retry`, `list`.

use std::time::Duration;

use jobd_actors::{ErrorInfo, Handle, JobError, JobRecord, ListQuery};
use serde_json::{Value, json};

use super::record_json;
use crate::protocol::{JobRef, Response, code};

/// `{"ok":true,"job":{record}}`, or the error.
fn record_response(id: Value, r: Result<JobRecord, JobError>) -> Response {
    match r {
        Ok(rec) => match record_json(&rec) {
            Ok(v) => Response::ok(id).with("job", v),
            Err(e) => Response::error(id, &e),
        },
        Err(e) => Response::error(id, &e.info()),
    }
}

/// `status`: the job's record.
pub(super) async fn status(h: &Handle, id: Value, job: JobRef) -> Response {
    match job.id() {
        Ok(j) => record_response(id, h.status_async(j).await),
        Err(e) => Response::error(id, &e),
    }
}

/// `cancel`: stop the job; its record.
pub(super) async fn cancel(h: &Handle, id: Value, job: JobRef) -> Response {
    match job.id() {
        Ok(j) => record_response(id, h.cancel_async(j).await),
        Err(e) => Response::error(id, &e),
    }
}

/// `retry`: queue a failed or dead job again; its record.
pub(super) async fn retry(h: &Handle, id: Value, job: JobRef) -> Response {
    match job.id() {
        Ok(j) => record_response(id, h.retry_async(j).await),
        Err(e) => Response::error(id, &e),
    }
}

/// `wait`: the record once the job is final, or `timeout`. A final job
/// answers at once, even with `timeout_ms` 0; the runtime enforces the
/// timeout, so a wait that runs out leaves nothing behind.
pub(super) async fn wait(
    h: &Handle,
    id: Value,
    job: JobRef,
    timeout: Option<Duration>,
) -> Response {
    let j = match job.id() {
        Ok(j) => j,
        Err(e) => return Response::error(id, &e),
    };
    let waited = match timeout {
        None => h.wait_async(j).await,
        Some(t) => h.wait_timeout_async(j, t).await,
    };
    match waited {
        Err(JobError::WaitTimeout { waited_ms, .. }) => Response::error(
            id,
            &ErrorInfo::new(
                code::TIMEOUT,
                format!("job {j} is not final after {waited_ms} ms"),
            ),
        ),
        other => record_response(id, other),
    }
}

/// `list`: one page of records, newest first unless `order` says otherwise.
pub(super) async fn list(h: &Handle, id: Value, q: ListQuery) -> Response {
    match h.list_async(q).await {
        Ok(page) => {
            let mut jobs = Vec::with_capacity(page.jobs.len());
            for rec in &page.jobs {
                match record_json(rec) {
                    Ok(v) => jobs.push(v),
                    Err(e) => return Response::error(id, &e),
                }
            }
            let r = Response::ok(id).with("jobs", Value::Array(jobs));
            match page.cursor {
                Some(c) => r.with("cursor", json!(c.to_string())),
                None => r,
            }
        }
        Err(e) => Response::error(id, &e.info()),
    }
}
