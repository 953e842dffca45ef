//! One-shot reply slots that work for both kinds of caller: a plain thread
//! blocked on a crossbeam channel, or a future awaiting a oneshot. The
//! Dispatcher and the workers answer through these and never know which.

use std::marker::PhantomData;
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, unbounded};
use futures::channel::oneshot;
use serde_json::Value;

use crate::error::JobError;
use crate::job::JobId;

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

/// A `call`'s answer as it travels: the job it answers, and the outcome
/// (None: the reply was dropped unanswered, the runtime is gone).
type CallAnswer = (JobId, Option<Outcome>);

thread_local! {
    /// Each calling thread's reply channel, made once and used by all of
    /// its `call`s (a thread waits for one call at a time). A channel per
    /// call cost more than the rest of `call` on the caller's side.
    static CALL_REPLIES: (Sender<CallAnswer>, Receiver<CallAnswer>) = unbounded();
}

/// The reply slot of a `call` of job `id` made by the current thread: the
/// Dispatcher's or the worker's answer goes into this thread's reply
/// channel, and then the thread is unparked.
pub(crate) fn call_reply(id: JobId) -> (DirectReply, CallWait) {
    let (tx, rx) = CALL_REPLIES.with(|(tx, rx)| (tx.clone(), rx.clone()));
    let answer = CallAnswerSender {
        tx: Some(tx),
        id,
        waiter: thread::current(),
    };
    let reply = Reply::with(move |v| answer.send(v));
    let wait = CallWait {
        rx,
        id,
        _same_thread: PhantomData,
    };
    (reply, wait)
}

/// The answering side of a [`call_reply`]. Dropping it, answered or not,
/// unparks the waiter; unanswered, it first says so.
struct CallAnswerSender {
    /// None once the answer was sent.
    tx: Option<Sender<CallAnswer>>,
    id: JobId,
    waiter: Thread,
}

impl CallAnswerSender {
    fn send(mut self, v: Outcome) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.id, Some(v)));
        }
        // Dropped here: the waiter is unparked.
    }
}

impl Drop for CallAnswerSender {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.id, None));
        }
        self.waiter.unpark();
    }
}

/// The waiting side of a [`call_reply`]; only the thread that made it may
/// wait (it is not `Send`).
pub(crate) struct CallWait {
    rx: Receiver<CallAnswer>,
    id: JobId,
    /// The answer unparks the creating thread, so only it may wait.
    _same_thread: PhantomData<*const ()>,
}

impl CallWait {
    /// Block until the answer arrives, the reply is dropped, or `timeout`.
    ///
    /// Parks at once instead of spinning and yielding first as crossbeam's
    /// `recv_timeout` does: with many blocked callers on a small machine,
    /// that spinning takes the CPU the Dispatcher and the workers need (see
    /// docs/benchmarks.md).
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<Outcome, RecvTimeoutError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            match self.rx.try_recv() {
                Ok((id, answer)) if id == self.id => {
                    return answer.ok_or(RecvTimeoutError::Disconnected);
                }
                // A late answer to an earlier call of this thread that timed
                // out: nobody wants it any more.
                Ok(_) => continue,
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            // Wake-ups may be spurious (or left over from an earlier
            // answer): look at the channel again each time.
            match deadline {
                None => thread::park(),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(RecvTimeoutError::Timeout);
                    }
                    thread::park_timeout(left);
                }
            }
        }
    }
}
