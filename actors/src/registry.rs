//! Job kinds: the handler registered under each name, the pool it runs on,
//! and its defaults (attempts, backoff, timeout). Typed handlers are erased
//! to one JSON-in, JSON-out signature here, once, at registration.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::context::JobContext;
use crate::job::Backoff;

/// A handler after type erasure: payload in, result or error message out.
pub type RawHandler = Arc<dyn Fn(&JobContext<'_>, &Value) -> Result<Value, String> + Send + Sync>;

/// Defaults of a kind, used where a submission does not say otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct KindOptions {
    /// Attempts in all (1 = no retries).
    pub max_attempts: u32,
    /// Retry backoff.
    pub backoff: Backoff,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
}

impl Default for KindOptions {
    fn default() -> Self {
        KindOptions {
            max_attempts: 1,
            backoff: Backoff::default(),
            timeout: None,
        }
    }
}

/// One registered kind.
#[derive(Clone)]
pub(crate) struct Kind {
    /// Its name, shared by the records of all of its jobs.
    pub(crate) name: Arc<str>,
    /// The pool its jobs run on unless a submission names another.
    pub(crate) pool: String,
    /// Defaults for its jobs.
    pub(crate) options: KindOptions,
    /// The code that runs a job.
    pub(crate) handler: RawHandler,
}

/// All kinds by name. Built once by the runtime builder, then shared
/// read-only by the Dispatcher and the Handle.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    pub(crate) kinds: HashMap<String, Kind>,
}

/// Wrap a typed handler into a raw one: decode the payload into `I`, run,
/// encode `O`. Decoding errors fail the job with a message saying so.
pub(crate) fn erase<I, O, E, F>(f: F) -> RawHandler
where
    I: DeserializeOwned,
    O: Serialize,
    E: Display,
    F: Fn(&JobContext<'_>, I) -> Result<O, E> + Send + Sync + 'static,
{
    Arc::new(move |ctx, payload| {
        let input = I::deserialize(payload).map_err(|e| format!("invalid payload: {e}"))?;
        let out = f(ctx, input).map_err(|e| e.to_string())?;
        serde_json::to_value(out).map_err(|e| format!("cannot encode result: {e}"))
    })
}
