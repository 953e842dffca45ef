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
        fields.push((
            "result",
            rec.result.as_deref().cloned().unwrap_or(Value::Null),
        ));
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

/// The answer to a waiting submit of a job that is final.
fn outcome_response(id: Value, rec: &JobRecord, deduplicated: bool) -> Response {
    let (ok, fields) = outcome_fields(rec);
    let mut r = if ok {
        Response::ok(id)
    } else {
        Response::failed(id)
    };
    for (k, v) in fields {
        r = r.with(k, v);
    }
    if deduplicated {
        r = r.with("deduplicated", json!(true));
    }
    r
}

/// A waiting submit through the direct path: one message to the
/// Dispatcher, and the worker answers a success straight (see
/// `Handle::submit_direct_async`). Anything else is rare, and is answered
/// exactly as the waiting path would: from the job's final record, or as
/// an admission error when the job does not exist.
async fn submit_direct(h: &Handle, id: Value, job: JobSpec) -> Response {
    let (job_id, outcome) = h.submit_direct_async(job);
    let e = match outcome.await {
        Ok(result) => {
            return Response::ok(id)
                .with("job", json!(job_id.to_string()))
                .with("state", json!(JobState::Succeeded.as_str()))
                .with("result", result);
        }
        Err(e) => e,
    };
    match h.status_async(job_id).await {
        Ok(rec) if rec.state.is_final() => outcome_response(id, &rec, false),
        // Admitted, but its outcome cannot be told (shutdown).
        Ok(_) => Response::failed(id)
            .with("job", json!(job_id.to_string()))
            .with("error", error_json(&e.info())),
        // Never admitted.
        Err(_) => Response::error(id, &e.info()),
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
    // A job with a unique key may be answered by another job (deduplicated),
    // which only the acknowledgement tells.
    if job.options.unique_key.is_none() {
        return submit_direct(h, id, job).await;
    }
    let (ack, done) = match h.submit_and_wait_async(job).await {
        Ok(admitted) => admitted,
        Err(e) => return Response::error(id, &e.info()),
    };
    match done.await {
        Ok(rec) => outcome_response(id, &rec, ack.deduplicated),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::executor::block_on;
    use jobd_actors::{JobOptions, Runtime};

    use super::*;

    fn runtime() -> Runtime {
        Runtime::builder()
            .pool("default", 1)
            .handler("echo", "default", |_, v: Value| Ok::<_, String>(v))
            .handler("fail", "default", |_, _: Value| {
                Err::<Value, _>("no luck".to_string())
            })
            .start()
            .expect("runtime starts")
    }

    fn spec(kind: &str, unique_key: Option<&str>) -> JobSpec {
        JobSpec {
            kind: kind.into(),
            payload: json!({"x": 1}),
            options: JobOptions {
                unique_key: unique_key.map(str::to_string),
                ..JobOptions::default()
            },
        }
    }

    /// The answer as JSON, without the job id (it differs per job).
    fn answer(r: &Response) -> Value {
        let mut v: Value = serde_json::from_str(&r.to_line()).expect("answers are JSON");
        if let Some(o) = v.as_object_mut() {
            o.remove("job");
        }
        v
    }

    #[test]
    fn the_direct_path_answers_as_the_acknowledged_path() {
        let rt = runtime();
        let h = rt.handle();
        for (i, kind) in ["echo", "fail", "nope"].into_iter().enumerate() {
            // Without a unique key: the direct path; with one: the
            // acknowledged waiting path.
            let direct = block_on(submit(&h, json!(i), spec(kind, None), true));
            let key = format!("k{i}");
            let acked = block_on(submit(&h, json!(i), spec(kind, Some(&key)), true));
            assert_eq!(answer(&direct), answer(&acked), "kind {kind}");
        }
        let ok = block_on(submit(&h, json!(1), spec("echo", None), true));
        assert_eq!(answer(&ok)["result"], json!({"x": 1}));
        assert!(ok.to_line().contains("\"job\":\""), "{}", ok.to_line());
        let failed = block_on(submit(&h, json!(2), spec("fail", None), true));
        let v = answer(&failed);
        assert_eq!(
            (v["state"].clone(), v["error"]["code"].clone()),
            (json!("failed"), json!("job_failed"))
        );
        // A refused submission names no job.
        let refused = block_on(submit(&h, json!(3), spec("nope", None), true));
        assert_eq!(refused.error_code(), Some("unknown_kind"));
        assert!(
            !refused.to_line().contains("\"job\""),
            "{}",
            refused.to_line()
        );
        rt.shutdown(Duration::from_secs(5)).expect("clean shutdown");
    }
}
