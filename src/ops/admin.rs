//! `hello`, `stats`, `pause` and `resume`.

use jobd_actors::Handle;
use serde_json::{Value, json};

use crate::protocol::{PROTOCOL_VERSION, Response, SERVER_NAME, SERVER_VERSION};

/// `hello`: who is there and which protocol it speaks.
pub(super) fn hello(id: Value) -> Response {
    Response::ok(id)
        .with("server", json!(SERVER_NAME))
        .with("version", json!(SERVER_VERSION))
        .with("protocol", json!(PROTOCOL_VERSION))
}

/// `stats`: per pool and per kind counters, gauges and latencies.
pub(super) async fn stats(h: &Handle, id: Value) -> Response {
    match h.stats_async().await {
        Ok(s) => Response::ok(id)
            .with("pools", json!(s.pools))
            .with("kinds", json!(s.kinds))
            .with("active_jobs", json!(s.active_jobs))
            .with("retained_jobs", json!(s.retained_jobs)),
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
