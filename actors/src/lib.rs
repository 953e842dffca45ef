//! # jobd-actors: the embeddable actor runtime of jobd
//!
//! Async actix actors receive jobs and hand the blocking work to
//! `SyncArbiter` thread pools; a synchronous [`Handle`] lets plain threads
//! submit jobs and block, with a timeout, until the reply arrives.
//!
//! ```
//! use std::time::Duration;
//! use jobd_actors::{JobOptions, Runtime};
//!
//! let rt = Runtime::builder()
//!     .pool("cpu", 2)
//!     .handler("add_one", "cpu", |_ctx, x: u64| Ok::<u64, String>(x + 1))
//!     .start()?;
//! let h = rt.handle();
//! let y: u64 = h.call("add_one", &41u64, Duration::from_secs(5))?;
//! assert_eq!(y, 42);
//! let id = h.submit("add_one", &1u64, JobOptions::default())?;
//! let v: u64 = h.wait(id, Duration::from_secs(5))?;
//! assert_eq!(v, 2);
//! rt.shutdown(Duration::from_secs(5))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Pieces
//! - [`Runtime`] / [`RuntimeBuilder`]: pools, handlers, start and shutdown.
//! - `dispatcher`: the single owner of all job state (queues, priorities,
//!   delays, timeouts, retries, waiters, stats). No locks around job state.
//! - `pool`: `SyncArbiter` workers. A pool is handed at most as many jobs
//!   as it has idle workers (credit-based dispatch), so queued jobs stay in
//!   the Dispatcher where they can be reordered and cancelled. While all
//!   workers are busy, a few of the best queued jobs wait in a handoff slot
//!   that a finishing worker takes from at once; the Dispatcher can take
//!   them back until then.
//! - [`Handle`]: blocking and async operations, and the general bridge
//!   ([`Handle::send`], [`Handle::run`]).
//!
//! ## Timeouts, honestly
//! A synchronous handler cannot be preempted. When a job passes its timeout
//! (or is cancelled), its waiters are answered at once (`TimedOut`,
//! `Cancelled`) and [`JobContext::is_cancelled`] turns true, but the worker
//! thread stays busy until the handler returns; `stats` shows that thread
//! as busy. Handlers that may run long should poll `is_cancelled()`.
//!
//! ## Panics
//! Handlers run under `catch_unwind`: a panic fails the job with
//! [`JobError::Panicked`] carrying the panic message, and the pool keeps all
//! of its threads.
//!
//! ## Blocking on an arbiter thread
//! Blocking `Handle` methods called on an actix arbiter thread return
//! [`JobError::OnArbiterThread`] instead of deadlocking; use the `*_async`
//! methods there.
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![warn(unreachable_pub)]

mod context;
mod dispatcher;
mod error;
mod express;
mod handle;
mod job;
mod pool;
mod registry;
mod reply;
mod runtime;
mod stats;
mod store;
#[cfg(test)]
mod waiter_tests;

pub use context::JobContext;
pub use dispatcher::{Heartbeat, ListPage, ListQuery, Retention, SubmitAck};
pub use error::{JobError, ShutdownError, StartError};
pub use handle::{Handle, JobWait};
pub use job::{
    Attempt, Backoff, ErrorInfo, JobId, JobOptions, JobRecord, JobSpec, JobState, Peer, now_ms,
};
pub use pool::PoolConfig;
pub use registry::{KindOptions, RawHandler};
pub use runtime::{DEFAULT_POOL, Runtime, RuntimeBuilder};
pub use stats::{
    Counters, Distribution, KindStats, LATENCY_BUCKETS_SECONDS, Percentiles, PoolKindStats,
    PoolStats, StatsSnapshot, StoreStats,
};
pub use store::{Change, MemoryStore, Recovered, SqliteStore, SqliteSync, Store, StoreError};

/// The Dispatcher actor type, for code that names it (it is not public API
/// beyond its name).
pub use dispatcher::Dispatcher;
