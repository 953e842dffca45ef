//! `hello`, `stats`, `metrics`, `pause` and `resume`.

use jobd_actors::{ErrorInfo, Handle};
use serde_json::{Value, json};

use crate::protocol::{PROTOCOL_VERSION, Response, SERVER_NAME, SERVER_VERSION, code};

/// `hello`: who is there and which protocol it speaks.
pub(super) fn hello(id: Value) -> Response {
    Response::ok(id)
        .with("server", json!(SERVER_NAME))
        .with("version", json!(SERVER_VERSION))
        .with("protocol", json!(PROTOCOL_VERSION))
}

/// `stats`: per pool and per kind counters, gauges and latencies.
pub(super) async fn stats(h: &Handle, id: Value) -> Response {
    let snapshot = match h.stats_async().await {
        Ok(s) => s,
        Err(e) => return Response::error(id, &e.info()),
    };
    // Every field of the snapshot, at the top level of the answer.
    match serde_json::to_value(&snapshot) {
        Ok(Value::Object(fields)) => fields
            .into_iter()
            .fold(Response::ok(id), |r, (k, v)| r.with(k, v)),
        Ok(_) | Err(_) => Response::error(
            id,
            &ErrorInfo::new(code::INTERNAL, "cannot encode the statistics"),
        ),
    }
}

/// `metrics`: the statistics as Prometheus text exposition, in `text`.
pub(super) async fn metrics(h: &Handle, id: Value) -> Response {
    match h.stats_async().await {
        Ok(snapshot) => match crate::metrics::exposition(&snapshot) {
            Ok(text) => Response::ok(id).with("text", json!(text)),
            Err(e) => Response::error(id, &ErrorInfo::new(code::INTERNAL, e.to_string())),
        },
        Err(e) => Response::error(id, &e.info()),
    }
}

/// `pause` / `resume`.
pub(super) async fn set_paused(h: &Handle, id: Value, pool: String, paused: bool) -> Response {
    match h.set_paused_async(&pool, paused).await {
        Ok(()) => Response::ok(id)
            .with("pool", json!(pool))
            .with("paused", json!(paused)),
        Err(e) => Response::error(id, &e.info()),
    }
}
