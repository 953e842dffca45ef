//! One-shot reply slots that work for both kinds of caller: a plain thread
//! blocked on a crossbeam channel, or a future awaiting a oneshot. The
//! Dispatcher and the workers answer through these and never know which.

use futures::channel::oneshot;
use serde_json::Value;

use crate::error::JobError;

/// Answers one request once.
pub(crate) struct Reply<T>(Slot<T>);

/// Where a reply goes.
enum Slot<T> {
    /// A future awaits it; it can tell when that future was dropped.
    Future(oneshot::Sender<T>),
    /// Any closure, with an optional probe that says when nobody wants the
    /// answer any more (without one, it is wanted until sent).
    With {
        send: Box<dyn FnOnce(T) + Send>,
        gone: Option<Box<dyn Fn() -> bool + Send>>,
    },
}

impl<T: Send + 'static> Reply<T> {
    /// A reply into a crossbeam channel (sync callers use `recv_timeout`).
    /// A crossbeam sender cannot tell whether its receiver is still there,
    /// so sync waits carry their own expiry instead (see `Wait`).
    pub(crate) fn sync(tx: crossbeam_channel::Sender<T>) -> Self {
        // A send error only means the caller stopped waiting: nothing to do.
        Reply::with(move |v| {
            let _ = tx.send(v);
        })
    }

    /// A reply into a oneshot channel (async callers await it). It knows
    /// when its future was dropped.
    pub(crate) fn future(tx: oneshot::Sender<T>) -> Self {
        Reply(Slot::Future(tx))
    }

    /// A reply handled by any closure.
    pub(crate) fn with(f: impl FnOnce(T) + Send + 'static) -> Self {
        Reply(Slot::With {
            send: Box::new(f),
            gone: None,
        })
    }

    /// A reply handled by a closure, with a probe that says when nobody
    /// wants the answer any more.
    pub(crate) fn with_probe(
        f: impl FnOnce(T) + Send + 'static,
        gone: impl Fn() -> bool + Send + 'static,
    ) -> Self {
        Reply(Slot::With {
            send: Box::new(f),
            gone: Some(Box::new(gone)),
        })
    }

    /// Deliver the answer.
    pub(crate) fn send(self, v: T) {
        match self.0 {
            // A send error only means the future was dropped.
            Slot::Future(tx) => {
                let _ = tx.send(v);
            }
            Slot::With { send, .. } => send(v),
        }
    }

    /// True when it is known that nobody will read the answer (the future
    /// waiting for it was dropped). Such a reply can be thrown away.
    pub(crate) fn is_gone(&self) -> bool {
        match &self.0 {
            Slot::Future(tx) => tx.is_canceled(),
            Slot::With { gone, .. } => gone.as_ref().is_some_and(|g| g()),
        }
    }
}

/// The outcome of a job as a caller of `call` sees it.
pub(crate) type Outcome = Result<Value, JobError>;

/// A waiter answered with the job's outcome, possibly straight from the
/// worker thread that ran it.
pub(crate) type DirectReply = Reply<Outcome>;
