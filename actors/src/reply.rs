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
    let reply = Reply(Box::new(move |v| answer.send(v)));
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
