//! One-shot reply slots that work for both kinds of caller: a plain thread
//! blocked on a crossbeam channel, or a future awaiting a oneshot. The
//! Dispatcher and the workers answer through these and never know which.

use futures::channel::oneshot;
use serde_json::Value;

use crate::error::JobError;

/// Answers one request once.
pub(crate) struct Reply<T>(Box<dyn FnOnce(T) + Send>);

impl<T: Send + 'static> Reply<T> {
    /// A reply into a crossbeam channel (sync callers use `recv_timeout`).
    pub(crate) fn sync(tx: crossbeam_channel::Sender<T>) -> Self {
        // A send error only means the caller stopped waiting: nothing to do.
        Reply(Box::new(move |v| {
            let _ = tx.send(v);
        }))
    }

    /// A reply into a oneshot channel (async callers await it).
    pub(crate) fn future(tx: oneshot::Sender<T>) -> Self {
        Reply(Box::new(move |v| {
            let _ = tx.send(v);
        }))
    }

    /// A reply handled by any closure.
    pub(crate) fn with(f: impl FnOnce(T) + Send + 'static) -> Self {
        Reply(Box::new(f))
    }

    /// Deliver the answer.
    pub(crate) fn send(self, v: T) {
        (self.0)(v)
    }
}

/// The outcome of a job as a caller of `call` sees it.
pub(crate) type Outcome = Result<Value, JobError>;

/// A waiter answered with the job's outcome, possibly straight from the
/// worker thread that ran it.
pub(crate) type DirectReply = Reply<Outcome>;
