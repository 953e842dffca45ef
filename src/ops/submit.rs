//! `submit` and `submit_batch`, with and without `wait`.

use jobd_actors::{ErrorInfo, Handle, JobId, JobRecord, JobSpec, JobState, SubmitAck};
use serde_json::{Value, json};

use crate::protocol::{Response, code, error_json};

/// The wire error code of a final record that did not succeed.
fn failure_code(rec: &JobRecord) -> &'static str {
    match rec.state {
        JobState::TimedOut => code::TIMED_OUT,
        JobState::Cancelled => {
            if rec
                .error
                .as_ref()
                .is_some_and(|e| e.code == code::DEPENDENCY_FAILED)
            {
                code::DEPENDENCY_FAILED
            } else {
                code::CANCELLED
            }
        }
        _ => code::JOB_FAILED,
    }
}

/// The outcome of a final job as the fields of a response: `job`, `state`,
/// then `result` or `error`. True when it succeeded.
fn outcome_fields(rec: &JobRecord) -> (bool, Vec<(&'static str, Value)>) {
    let mut fields = vec![
        ("job", json!(rec.id.to_string())),
        ("state", json!(rec.state.as_str())),
    ];
    if rec.state == JobState::Succeeded {
        fields.push(("result", rec.result.clone().unwrap_or(Value::Null)));
        return (true, fields);
    }
    let message = rec
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_else(|| format!("job {} ended {}", rec.id, rec.state));
    let error = ErrorInfo::new(failure_code(rec), message);
    fields.push(("error", error_json(&error)));
    (false, fields)
}

fn ack_response(id: Value, ack: &SubmitAck) -> Response {
    let r = Response::ok(id)
        .with("job", json!(ack.id.to_string()))
        .with("state", json!(ack.state.as_str()));
    if ack.deduplicated {
        r.with("deduplicated", json!(true))
    } else {
        r
    }
}

/// `submit`: admit one job; with `wait`, answer with its outcome (the
/// submission and the wait are one trip to the Dispatcher).
pub(super) async fn submit(h: &Handle, id: Value, job: JobSpec, wait: bool) -> Response {
    if !wait {
        return match h.submit_async(job).await {
            Ok(ack) => ack_response(id, &ack),
            Err(e) => Response::error(id, &e.info()),
        };
    }
    let (ack, done) = match h.submit_and_wait_async(job).await {
        Ok(admitted) => admitted,
        Err(e) => return Response::error(id, &e.info()),
    };
    match done.await {
        Ok(rec) => {
            let (ok, fields) = outcome_fields(&rec);
            let mut r = if ok {
                Response::ok(id)
            } else {
                Response::failed(id)
            };
            for (k, v) in fields {
                r = r.with(k, v);
            }
            if ack.deduplicated {
                r = r.with("deduplicated", json!(true));
            }
            r
        }
        // The job was admitted but its outcome cannot be told (shutdown):
        // say which job it was.
        Err(e) => Response::failed(id)
            .with("job", json!(ack.id.to_string()))
            .with("error", error_json(&e.info())),
    }
}

/// `submit_batch`: admit all jobs or none; with `wait`, also every outcome.
pub(super) async fn submit_batch(
    h: &Handle,
    id: Value,
    jobs: Vec<JobSpec>,
    wait: bool,
) -> Response {
    let acks = match h.submit_batch_async(jobs).await {
        Ok(acks) => acks,
        Err(e) => return Response::error(id, &e.info()),
    };
    let ids: Vec<JobId> = acks.iter().map(|a| a.id).collect();
    let id_list = Value::Array(ids.iter().map(|j| json!(j.to_string())).collect());
    if !wait {
        return Response::ok(id).with("jobs", id_list);
    }
    let waited = futures::future::join_all(ids.iter().map(|j| h.wait_async(*j))).await;
    let outcomes = waited
        .into_iter()
        .zip(&ids)
        .map(|(r, j)| match r {
            Ok(rec) => {
                let (_, fields) = outcome_fields(&rec);
                Value::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                )
            }
            Err(e) => json!({"job": j.to_string(), "error": error_json(&e.info())}),
        })
        .collect();
    Response::ok(id)
        .with("jobs", id_list)
        .with("outcomes", Value::Array(outcomes))
}
