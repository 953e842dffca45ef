//! `Handle`: the way into a running jobd runtime, for plain threads (methods
//! that block with a timeout, on crossbeam channels) and for async code
//! (`*_async` methods: futures that never block a thread). Also the general
//! bridge: `send` a message to any actor of the System, or `run` a future on
//! it, from a plain thread.

use std::borrow::Cow;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, Message};
use actix_rt::ArbiterHandle;
use crossbeam_channel::{RecvTimeoutError, bounded};
use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::{AbortHandle, Abortable};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::dispatcher::{
    Dispatcher, ListPage, ListQuery, Query, Submit, SubmitAck, SubmitBatch, Wait, WaitAny, Wake,
    outcome_of,
};
use crate::error::JobError;
use crate::express::Express;
use crate::job::{JobId, JobOptions, JobRecord, JobSpec};
use crate::pool::{PoolConfig, panic_message};
use crate::reply::{CallWait, DirectReply, Outcome, Reply, call_reply};
use crate::stats::StatsSnapshot;

/// A cheap, cloneable way into the runtime, usable from any thread.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

struct Inner {
    /// The Dispatcher, owner of all job state.
    dispatcher: Addr<Dispatcher>,
    /// Set once a shutdown was asked for: a runtime that cannot be reached
    /// after that was shut down on purpose (`ShuttingDown`), not lost
    /// (`RuntimeGone`).
    closed: AtomicBool,
    /// The System arbiter, where bridged futures run.
    arbiter: ArbiterHandle,
    /// Next job id. Allocated here so a caller knows its job's id without a
    /// round trip (needed to cancel a `call` that timed out).
    next_id: Arc<AtomicU64>,
    /// Where a `call` may start its job itself (see `express`).
    express: Arc<Express>,
}

/// Refuse to block on an actix arbiter thread: the reply would have to be
/// produced by the very event loop we would be blocking.
fn refuse_on_arbiter() -> Result<(), JobError> {
    if actix_rt::Arbiter::try_current().is_some() {
        Err(JobError::OnArbiterThread)
    } else {
        Ok(())
    }
}

fn encode<I: Serialize + ?Sized>(input: &I) -> Result<Value, JobError> {
    serde_json::to_value(input).map_err(|e| JobError::Payload(format!("cannot encode input: {e}")))
}

fn decode<O: DeserializeOwned>(v: Value) -> Result<O, JobError> {
    serde_json::from_value(v).map_err(|e| JobError::Payload(format!("cannot decode result: {e}")))
}

impl Handle {
    pub(crate) fn new(
        dispatcher: Addr<Dispatcher>,
        arbiter: ArbiterHandle,
        next_id: Arc<AtomicU64>,
        express: Arc<Express>,
    ) -> Self {
        Handle {
            inner: Arc::new(Inner {
                dispatcher,
                closed: AtomicBool::new(false),
                arbiter,
                next_id,
                express,
            }),
        }
    }

    /// The error for "the runtime cannot be reached".
    fn gone(&self) -> JobError {
        if self.inner.closed.load(Ordering::Acquire) {
            JobError::ShuttingDown
        } else {
            JobError::RuntimeGone
        }
    }

    /// Block on a sync reply channel with a timeout.
    fn recv<T>(
        &self,
        rx: &crossbeam_channel::Receiver<T>,
        timeout: Duration,
        id: Option<JobId>,
    ) -> Result<T, JobError> {
        match rx.recv_timeout(timeout) {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => Err(JobError::WaitTimeout {
                id,
                waited_ms: timeout.as_millis() as u64,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(self.gone()),
        }
    }

    /// Block on a `call`'s reply with a timeout.
    fn recv_call(&self, rx: &CallWait, timeout: Duration, id: JobId) -> Result<Outcome, JobError> {
        match rx.recv_timeout(timeout) {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => Err(JobError::WaitTimeout {
                id: Some(id),
                waited_ms: timeout.as_millis() as u64,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(self.gone()),
        }
    }

    /// Await an async reply; a dropped sender means the runtime is gone.
    async fn recv_async<T>(&self, rx: oneshot::Receiver<T>) -> Result<T, JobError> {
        rx.await.map_err(|_| self.gone())
    }

    /// Start job `id` whose outcome goes straight to `reply` (the worker
    /// answers it): on the express lane while it is open for this job (see
    /// `express`), otherwise through the Dispatcher.
    fn start_direct(
        &self,
        id: JobId,
        kind: Cow<'_, str>,
        payload: Value,
        options: JobOptions,
        reply: DirectReply,
    ) {
        if let Some((k, link)) = self.inner.express.claim(&kind, &options) {
            if k.start(id, &link, payload, options, reply) {
                self.inner.dispatcher.do_send(Wake);
            }
        } else {
            let filed = self.inner.express.file_submit(Submit {
                id,
                spec: JobSpec {
                    kind: kind.into_owned(),
                    payload,
                    options,
                },
                ack: None,
                direct: Some(reply),
                waiter: None,
            });
            if filed {
                self.inner.dispatcher.do_send(Wake);
            }
        }
    }

    fn alloc_id(&self) -> JobId {
        JobId(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// A sync request/response with the Dispatcher.
    fn query<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Query,
        timeout: Duration,
    ) -> Result<T, JobError> {
        refuse_on_arbiter()?;
        let (tx, rx) = bounded(1);
        self.inner.dispatcher.do_send(make(Reply::sync(tx)));
        self.recv(&rx, timeout, None)
    }

    /// Send the Dispatcher a message carrying an async reply, and await it.
    async fn ask_async<T, M>(&self, make: impl FnOnce(Reply<T>) -> M) -> Result<T, JobError>
    where
        T: Send + 'static,
        M: Message<Result = ()> + Send + 'static,
        Dispatcher: Handler<M>,
    {
        let (tx, rx) = oneshot::channel();
        self.inner.dispatcher.do_send(make(Reply::future(tx)));
        self.recv_async(rx).await
    }

    // ----- jobs, blocking ----------------------------------------------------

    /// Run a job of `kind` and block until its result, at most `timeout`.
    ///
    /// If the timeout passes first, the job is cancelled (nobody is left to
    /// take its result) and `WaitTimeout` is returned. The worker answers
    /// this call directly, without a hop through the Dispatcher; and while
    /// the kind's pool has an idle worker and nothing queued, the calling
    /// thread hands the job to that worker itself (the express lane, see
    /// the crate docs), so a call costs two thread hops, not three.
    pub fn call<I, O>(&self, kind: &str, input: &I, timeout: Duration) -> Result<O, JobError>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        self.call_with(kind, input, JobOptions::default(), timeout)
    }

    /// `call` with submission options.
    pub fn call_with<I, O>(
        &self,
        kind: &str,
        input: &I,
        options: JobOptions,
        timeout: Duration,
    ) -> Result<O, JobError>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        refuse_on_arbiter()?;
        let payload = encode(input)?;
        let id = self.alloc_id();
        let (reply, rx) = call_reply(id);
        self.start_direct(id, Cow::Borrowed(kind), payload, options, reply);
        match self.recv_call(&rx, timeout, id) {
            Ok(outcome) => decode(outcome?),
            Err(e @ JobError::WaitTimeout { .. }) => {
                self.inner
                    .dispatcher
                    .do_send(Query::Cancel(id, Reply::with(|_| {})));
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Submit a job and return its id once it is admitted (and, with a
    /// durable store, committed).
    pub fn submit<I>(&self, kind: &str, input: &I, options: JobOptions) -> Result<JobId, JobError>
    where
        I: Serialize + ?Sized,
    {
        self.submit_spec(JobSpec {
            kind: kind.to_string(),
            payload: encode(input)?,
            options,
        })
        .map(|ack| ack.id)
    }

    /// Submit a job given as a spec; the full admission answer.
    pub fn submit_spec(&self, spec: JobSpec) -> Result<SubmitAck, JobError> {
        refuse_on_arbiter()?;
        let (tx, rx) = bounded(1);
        self.inner.dispatcher.do_send(Submit {
            id: self.alloc_id(),
            spec,
            ack: Some(Reply::sync(tx)),
            direct: None,
            waiter: None,
        });
        rx.recv().map_err(|_| self.gone())?
    }

    /// Block until job `id` is final, then its typed result (or why not).
    pub fn wait<O: DeserializeOwned>(&self, id: JobId, timeout: Duration) -> Result<O, JobError> {
        let rec = self.wait_record(id, timeout)?;
        decode(outcome_of(&rec)?)
    }

    /// Block until job `id` is final, then its record, whatever the outcome.
    pub fn wait_record(&self, id: JobId, timeout: Duration) -> Result<JobRecord, JobError> {
        refuse_on_arbiter()?;
        let (tx, rx) = bounded(1);
        // The Dispatcher forgets the waiter at the same deadline: a sync
        // reply channel cannot tell it that nobody listens any more.
        self.inner.dispatcher.do_send(Wait {
            id,
            reply: Reply::sync(tx),
            timeout: Some(timeout),
        });
        self.recv(&rx, timeout, Some(id))?
    }

    /// Block until any of `ids` is final; the record of the first one.
    pub fn wait_any(&self, ids: &[JobId], timeout: Duration) -> Result<JobRecord, JobError> {
        refuse_on_arbiter()?;
        if ids.is_empty() {
            return Err(JobError::BadRequest(
                "wait_any needs at least one id".into(),
            ));
        }
        let (tx, rx) = bounded(1);
        self.inner.dispatcher.do_send(WaitAny {
            ids: ids.to_vec(),
            reply: Reply::sync(tx),
            timeout: Some(timeout),
        });
        self.recv(&rx, timeout, None)?
    }

    /// Cancel a job: a queued one never runs, a running one is told to stop
    /// (`ctx.is_cancelled()`) and its waiters are answered at once.
    pub fn cancel(&self, id: JobId) -> Result<JobRecord, JobError> {
        self.query(|r| Query::Cancel(id, r), OP_TIMEOUT)?
    }

    /// A job's record.
    pub fn status(&self, id: JobId) -> Result<JobRecord, JobError> {
        self.query(|r| Query::Status(id, r), OP_TIMEOUT)?
    }

    /// Queue a failed or dead job again with fresh attempts.
    pub fn retry(&self, id: JobId) -> Result<JobRecord, JobError> {
        self.query(|r| Query::Retry(id, r), OP_TIMEOUT)?
    }

    /// Counters, gauges and latency percentiles.
    pub fn stats(&self) -> Result<StatsSnapshot, JobError> {
        self.query(Query::Stats, OP_TIMEOUT)
    }

    /// Jobs matching a filter, one page.
    pub fn list(&self, q: ListQuery) -> Result<ListPage, JobError> {
        self.query(|r| Query::List(q, r), OP_TIMEOUT)
    }

    /// Pause (`true`) or resume (`false`) a pool.
    pub fn set_paused(&self, pool: &str, paused: bool) -> Result<(), JobError> {
        self.query(|r| Query::Pause(pool.to_string(), paused, r), OP_TIMEOUT)?
    }

    /// Change a pool's size and admission limit while it runs, without
    /// dropping a job. `max_queued` applies at once (jobs already waiting
    /// beyond it stay). A new `threads` count starts a new set of workers;
    /// the old workers finish the job they have, take no new one and their
    /// threads exit (`stats` shows them as `retiring` meanwhile). Errors:
    /// `UnknownPool`, `BadRequest` (zero threads or `max_queued`),
    /// `ShuttingDown`, `Internal` when the OS refuses the threads (the pool
    /// then keeps its old size).
    pub fn resize_pool(
        &self,
        pool: &str,
        threads: usize,
        max_queued: usize,
    ) -> Result<(), JobError> {
        let pool = pool.to_string();
        self.query(|r| Query::Resize(pool, threads, max_queued, r), OP_TIMEOUT)?
    }

    /// Start a new pool while the runtime runs. Jobs reach it through
    /// `JobOptions::pool`; kinds keep the pool they were registered with.
    /// `BadRequest` if the name is taken.
    pub fn add_pool(&self, cfg: PoolConfig) -> Result<(), JobError> {
        self.query(|r| Query::AddPool(cfg, r), OP_TIMEOUT)?
    }

    // ----- jobs, async -------------------------------------------------------

    /// Async `call`: resolves with the job's typed result. Dropping the
    /// future does not cancel the job.
    pub async fn call_async<I, O>(
        &self,
        kind: &str,
        input: &I,
        options: JobOptions,
    ) -> Result<O, JobError>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        let payload = encode(input)?;
        let (tx, rx) = oneshot::channel::<Outcome>();
        let id = self.alloc_id();
        self.start_direct(id, Cow::Borrowed(kind), payload, options, Reply::future(tx));
        decode(self.recv_async(rx).await??)
    }

    /// Async `submit_spec`.
    pub async fn submit_async(&self, spec: JobSpec) -> Result<SubmitAck, JobError> {
        let id = self.alloc_id();
        self.ask_async(|r| Submit {
            id,
            spec,
            ack: Some(r),
            direct: None,
            waiter: None,
        })
        .await?
    }

    /// Submit a job and await its outcome, as `call_async` does: the worker
    /// that runs it answers straight (no hop through the Dispatcher, which
    /// it then need not wake). The job's id is known at once. An admission
    /// error (unknown kind, full queue, …) comes as the outcome too; a
    /// caller that must tell it from a failed job asks `status_async(id)`.
    pub fn submit_direct_async(
        &self,
        spec: JobSpec,
    ) -> (
        JobId,
        impl Future<Output = Result<Value, JobError>> + use<'_>,
    ) {
        let id = self.alloc_id();
        let (tx, rx) = oneshot::channel::<Outcome>();
        let JobSpec {
            kind,
            payload,
            options,
        } = spec;
        self.start_direct(id, Cow::Owned(kind), payload, options, Reply::future(tx));
        (id, async move { self.recv_async(rx).await? })
    }

    /// Async submit of several jobs, all or nothing.
    pub async fn submit_batch_async(
        &self,
        specs: Vec<JobSpec>,
    ) -> Result<Vec<SubmitAck>, JobError> {
        let jobs = specs.into_iter().map(|s| (self.alloc_id(), s)).collect();
        self.ask_async(|reply| SubmitBatch { jobs, reply }).await?
    }

    /// Submit several jobs, all or nothing (blocking).
    pub fn submit_batch(&self, specs: Vec<JobSpec>) -> Result<Vec<SubmitAck>, JobError> {
        refuse_on_arbiter()?;
        let (tx, rx) = bounded(1);
        let jobs = specs.into_iter().map(|s| (self.alloc_id(), s)).collect();
        self.inner.dispatcher.do_send(SubmitBatch {
            jobs,
            reply: Reply::sync(tx),
        });
        rx.recv().map_err(|_| self.gone())?
    }

    /// Async `wait_record` without a limit: resolves once the job is
    /// final. Dropping the future withdraws the wait.
    pub async fn wait_async(&self, id: JobId) -> Result<JobRecord, JobError> {
        self.ask_async(|reply| Wait {
            id,
            reply,
            timeout: None,
        })
        .await?
    }

    /// Async `wait_record`: the record once the job is final, or
    /// `WaitTimeout` if it is not final within `timeout` (the job goes on).
    /// A job that is already final answers at once, even with a zero
    /// timeout. The Dispatcher enforces the timeout, so nothing of the
    /// wait is left behind.
    pub async fn wait_timeout_async(
        &self,
        id: JobId,
        timeout: Duration,
    ) -> Result<JobRecord, JobError> {
        self.ask_async(|reply| Wait {
            id,
            reply,
            timeout: Some(timeout),
        })
        .await?
    }

    /// Submit a job and wait for it, in one trip to the Dispatcher: first
    /// the admission answer (the job's id, or the existing job's when
    /// deduplicated), then a [`JobWait`] that resolves to the final record
    /// whatever the outcome. A refused submission is the error.
    pub async fn submit_and_wait_async(
        &self,
        spec: JobSpec,
    ) -> Result<(SubmitAck, JobWait), JobError> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let (tx, rx) = oneshot::channel();
        self.inner.dispatcher.do_send(Submit {
            id: self.alloc_id(),
            spec,
            ack: Some(Reply::future(ack_tx)),
            direct: None,
            waiter: Some(Reply::future(tx)),
        });
        let ack = self.recv_async(ack_rx).await??;
        Ok((
            ack,
            JobWait {
                rx,
                handle: self.clone(),
            },
        ))
    }

    /// Async `wait_any`.
    pub async fn wait_any_async(&self, ids: Vec<JobId>) -> Result<JobRecord, JobError> {
        if ids.is_empty() {
            return Err(JobError::BadRequest(
                "wait_any needs at least one id".into(),
            ));
        }
        self.ask_async(|reply| WaitAny {
            ids,
            reply,
            timeout: None,
        })
        .await?
    }

    /// Async `cancel`.
    pub async fn cancel_async(&self, id: JobId) -> Result<JobRecord, JobError> {
        self.ask_async(|r| Query::Cancel(id, r)).await?
    }

    /// Async `status`.
    pub async fn status_async(&self, id: JobId) -> Result<JobRecord, JobError> {
        self.ask_async(|r| Query::Status(id, r)).await?
    }

    /// Async `retry`.
    pub async fn retry_async(&self, id: JobId) -> Result<JobRecord, JobError> {
        self.ask_async(|r| Query::Retry(id, r)).await?
    }

    /// Async `stats`.
    pub async fn stats_async(&self) -> Result<StatsSnapshot, JobError> {
        self.ask_async(Query::Stats).await
    }

    /// Async `list`.
    pub async fn list_async(&self, q: ListQuery) -> Result<ListPage, JobError> {
        self.ask_async(|r| Query::List(q, r)).await
    }

    /// Async pause (`true`) or resume (`false`).
    pub async fn set_paused_async(&self, pool: &str, paused: bool) -> Result<(), JobError> {
        let pool = pool.to_string();
        self.ask_async(|r| Query::Pause(pool, paused, r)).await?
    }

    /// How many waiters an active job has (0 for any other job).
    #[cfg(test)]
    pub(crate) fn waiter_count(&self, id: JobId) -> usize {
        self.query(|r| Query::Waiters(id, r), OP_TIMEOUT)
            .unwrap_or(usize::MAX)
    }

    /// Async `resize_pool`.
    pub async fn resize_pool_async(
        &self,
        pool: &str,
        threads: usize,
        max_queued: usize,
    ) -> Result<(), JobError> {
        let pool = pool.to_string();
        self.ask_async(|r| Query::Resize(pool, threads, max_queued, r))
            .await?
    }

    /// Async `add_pool`.
    pub async fn add_pool_async(&self, cfg: PoolConfig) -> Result<(), JobError> {
        self.ask_async(|r| Query::AddPool(cfg, r)).await?
    }

    /// Start the shutdown drain; resolves when the System is stopping.
    pub(crate) fn begin_shutdown(&self, deadline: Instant) -> crossbeam_channel::Receiver<()> {
        self.inner.closed.store(true, Ordering::Release);
        let (tx, rx) = bounded(1);
        self.inner
            .dispatcher
            .do_send(Query::Shutdown(deadline, Reply::sync(tx)));
        rx
    }

    /// Async shutdown request, for code that runs on the System itself (the
    /// daemon's signal handler): stop admitting, drain running jobs until
    /// `deadline`, answer every waiter, then stop the System.
    pub async fn shutdown_async(&self, deadline: Instant) {
        self.inner.closed.store(true, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        self.inner
            .dispatcher
            .do_send(Query::Shutdown(deadline, Reply::future(tx)));
        let _ = rx.await;
    }

    // ----- the general bridge ------------------------------------------------

    /// From a plain thread, send `msg` to any actor of the embedded System and
    /// block for its reply, at most `timeout`.
    pub fn send<A, M>(
        &self,
        addr: &Addr<A>,
        msg: M,
        timeout: Duration,
    ) -> Result<M::Result, JobError>
    where
        A: Actor + Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        refuse_on_arbiter()?;
        let (tx, rx) = bounded(1);
        let request = addr.send(msg);
        let spawned = self.inner.arbiter.spawn(async move {
            let _ = tx.send(request.await);
        });
        if !spawned {
            return Err(self.gone());
        }
        self.recv(&rx, timeout, None)?.map_err(|_| self.gone())
    }

    /// From a plain thread, build a future on the System thread with `make`,
    /// run it there and block for its output, at most `timeout`. At the
    /// deadline the future is dropped (never left running) and `WaitTimeout`
    /// returned. If `make` or the future panics, `Internal` carries the
    /// panic message (the System goes on). `make` is `Send`; the future it builds need not be, so it may
    /// use actix actors and `actix_rt` freely.
    pub fn run<F, Fut, T>(&self, make: F, timeout: Duration) -> Result<T, JobError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        refuse_on_arbiter()?;
        let (tx, rx) = bounded(1);
        let (abort, registration) = AbortHandle::new_pair();
        let spawned = self.inner.arbiter.spawn_fn(move || {
            actix_rt::spawn(async move {
                // A panic in `make` or in the future ends this task only;
                // catch it so the caller hears of it, not of a lost runtime.
                let guarded = AssertUnwindSafe(async move { make().await }).catch_unwind();
                if let Ok(out) = Abortable::new(guarded, registration).await {
                    let _ = tx.send(out.map_err(|p| panic_message(p.as_ref())));
                }
            });
        });
        if !spawned {
            return Err(self.gone());
        }
        let out = self.recv(&rx, timeout, None);
        if out.is_err() {
            abort.abort();
        }
        out?.map_err(|m| {
            JobError::Internal(format!("the future given to Handle::run panicked: {m}"))
        })
    }
}

/// The final record of a job submitted with
/// [`Handle::submit_and_wait_async`], once it is final. Dropping it
/// withdraws the wait (the job goes on).
pub struct JobWait {
    /// Answered by the Dispatcher when the job is final.
    rx: oneshot::Receiver<Result<JobRecord, JobError>>,
    /// To tell a lost runtime from a shut-down one.
    handle: Handle,
}

impl Future for JobWait {
    type Output = Result<JobRecord, JobError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match std::pin::Pin::new(&mut self.rx).poll(cx) {
            std::task::Poll::Ready(Ok(r)) => std::task::Poll::Ready(r),
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(Err(self.handle.gone())),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// Upper bound for a simple state query (status, cancel, stats…). The
/// Dispatcher never blocks, so hitting it means the runtime is wedged.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
