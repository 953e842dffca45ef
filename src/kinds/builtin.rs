//! The built-in job kinds every daemon has: `echo` (the result is the
//! payload) and `sleep` (`{"ms": N}`; sleeps in short slices and stops
//! early when the job is cancelled or times out). Both run on the
//! `default` pool.

use std::time::{Duration, Instant};

use jobd_actors::{DEFAULT_POOL, JobContext, KindOptions, RuntimeBuilder};
use serde::{Deserialize, Serialize};

/// Longest single sleep between two cancellation checks.
const SLICE: Duration = Duration::from_millis(5);

/// Payload of `sleep`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepInput {
    /// How long to sleep, in milliseconds.
    pub ms: u64,
}

/// Result of `sleep`.
#[derive(Debug, Serialize)]
pub struct SleepOutput {
    /// How long it really slept, in milliseconds.
    pub slept_ms: u64,
    /// True when it stopped early because the job was cancelled.
    pub interrupted: bool,
}

/// The `sleep` handler: sleep `ms`, checking `ctx.is_cancelled()` between
/// short slices.
pub fn sleep(ctx: &JobContext<'_>, input: SleepInput) -> Result<SleepOutput, String> {
    let start = Instant::now();
    let total = Duration::from_millis(input.ms);
    loop {
        let elapsed = start.elapsed();
        if elapsed >= total {
            break;
        }
        if ctx.is_cancelled() {
            return Ok(SleepOutput {
                slept_ms: elapsed.as_millis() as u64,
                interrupted: true,
            });
        }
        std::thread::sleep(SLICE.min(total - elapsed));
    }
    Ok(SleepOutput {
        slept_ms: start.elapsed().as_millis() as u64,
        interrupted: false,
    })
}

/// Register `echo` and `sleep` on the default pool.
pub fn register(b: RuntimeBuilder) -> RuntimeBuilder {
    b.raw_handler(
        "echo",
        DEFAULT_POOL,
        KindOptions::default(),
        |_ctx, payload| Ok(payload.clone()),
    )
    .handler("sleep", DEFAULT_POOL, sleep)
}
