//! The express lane of `Handle::call`: while a pool has an idle worker and
//! nothing queued (see `pool` for when its gate is open), the calling
//! thread takes the worker's credit and hands the job over itself. The job
//! then costs two thread hops (caller → worker → caller) instead of three
//! (caller → Dispatcher → worker → caller); the Dispatcher adopts it from
//! the pool's report inbox before it reads the job's report or answers
//! anything about it, so status, stats, cancel, wait and retries see the
//! job as usual.
//!
//! Only plain calls take the lane: no delay, timeout, unique key,
//! dependencies or other pool, a kind without a default timeout, and a
//! runtime without a durable store (with one, a call is answered by the
//! Dispatcher once the job's ending is committed, not by its worker).
//! Everything else goes through the Dispatcher.
//!
//! Calls that do go through the Dispatcher are filed in its submission
//! inbox rather than sent as actix messages one by one: only the first
//! one filed while no wake-up is pending sends a `Wake`, and the
//! Dispatcher admits all that piled up meanwhile in one go, first thing
//! whenever it runs. Under load, many calls share one wake-up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crossbeam_channel::{Receiver, Sender, unbounded};

use serde_json::Value;

use crate::context::AttemptShared;
use crate::dispatcher::Submit;
use crate::job::{JobId, JobOptions, now_ms};
use crate::pool::{Adopted, PoolLink, Report, RunJob};
use crate::registry::{RawHandler, Registry};
use crate::reply::DirectReply;

/// A kind that may take the lane.
pub(crate) struct ExpressKind {
    name: Arc<str>,
    /// Index of its pool.
    pool: usize,
    handler: RawHandler,
    max_attempts: u32,
}

/// The kinds that may take the lane, and every pool's current link.
pub(crate) struct Express {
    kinds: HashMap<String, ExpressKind>,
    /// Replaced when a pool is resized (a new link), grown when one is
    /// added; read once per call.
    links: RwLock<Vec<Arc<PoolLink>>>,
    /// The Dispatcher's submission inbox.
    submits: (Sender<Submit>, Receiver<Submit>),
    /// A `Wake` is on its way to the Dispatcher, or it is draining.
    wake_pending: AtomicBool,
    /// The Dispatcher is gone: nobody reads the inbox any more.
    closed: AtomicBool,
}

impl Express {
    /// The lane for these kinds and pools (`pools`: name and link by index).
    pub(crate) fn new(registry: &Registry, pools: &[(&str, Arc<PoolLink>)]) -> Self {
        let kinds = registry
            .kinds
            .iter()
            .filter(|(_, k)| k.options.timeout.is_none())
            .filter_map(|(name, k)| {
                let pool = pools.iter().position(|(p, _)| *p == k.pool)?;
                Some((
                    name.clone(),
                    ExpressKind {
                        name: k.name.clone(),
                        pool,
                        handler: k.handler.clone(),
                        max_attempts: k.options.max_attempts,
                    },
                ))
            })
            .collect();
        Express {
            kinds,
            links: RwLock::new(pools.iter().map(|(_, l)| l.clone()).collect()),
            submits: unbounded(),
            wake_pending: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// File a submission for the Dispatcher; true when the caller must
    /// send it a `Wake` (none is pending). Once the Dispatcher is gone the
    /// submission is dropped, which answers its caller that the runtime is
    /// gone.
    pub(crate) fn file_submit(&self, s: Submit) -> bool {
        // The receiver lives here too: sending cannot fail.
        let _ = self.submits.0.send(s);
        // Pairs with `close`: either its last drain finds this submission,
        // or this sees the flag and drops it.
        if self.closed.load(Ordering::SeqCst) {
            while self.submits.1.try_recv().is_ok() {}
            return false;
        }
        !self.wake_pending.swap(true, Ordering::SeqCst)
    }

    /// The Dispatcher is gone (its `Drop`): drop what is filed and all
    /// that will be.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        while self.submits.1.try_recv().is_ok() {}
    }

    /// The Dispatcher is about to read the submission inbox: the next
    /// submission filed must wake it again.
    pub(crate) fn woken(&self) {
        self.wake_pending.store(false, Ordering::SeqCst);
    }

    /// The next filed submission (the Dispatcher).
    pub(crate) fn next_submit(&self) -> Option<Submit> {
        self.submits.1.try_recv().ok()
    }

    /// Pool `pool` has a new link (resize), or is new (added).
    pub(crate) fn set_link(&self, pool: usize, link: Arc<PoolLink>) {
        // Nothing panics while holding this lock, so a poisoned one still
        // holds a consistent table.
        let mut links = match self.links.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if pool < links.len() {
            links[pool] = link;
        } else {
            links.push(link);
        }
    }

    /// Take the credit of an idle worker for a `call` of `kind` with
    /// `options`, if the lane is open for it.
    pub(crate) fn claim(
        &self,
        kind: &str,
        options: &JobOptions,
    ) -> Option<(&ExpressKind, Arc<PoolLink>)> {
        let plain = options.pool.is_none()
            && options.delay.is_none_or(|d| d.is_zero())
            && options.timeout.is_none()
            && options.unique_key.is_none()
            && options.after.is_empty()
            && options.max_attempts != Some(0);
        if !plain {
            return None;
        }
        let k = self.kinds.get(kind)?;
        let link = {
            let links = match self.links.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            links.get(k.pool)?.clone()
        };
        link.claim(true).then_some((k, link))
    }
}

impl ExpressKind {
    /// Start job `id` on the idle worker whose credit was claimed on
    /// `link`: file it for the Dispatcher, then hand it over. True when the
    /// Dispatcher should be woken to read its inbox.
    pub(crate) fn start(
        &self,
        id: JobId,
        link: &PoolLink,
        payload: Value,
        options: JobOptions,
        reply: DirectReply,
    ) -> bool {
        let max_attempts = options.max_attempts.unwrap_or(self.max_attempts);
        let shared = Arc::new(AttemptShared::new(
            id,
            1,
            max_attempts <= 1,
            None,
            Some(reply),
        ));
        let payload = Arc::new(payload);
        // Filed before the job is handed over: the job's own report comes
        // after this in the same inbox.
        let wake = link.file(Report::Adopt(Box::new(Adopted {
            id,
            kind: self.name.clone(),
            pool: self.pool,
            payload: payload.clone(),
            shared: shared.clone(),
            options,
            created_at: now_ms(),
        })));
        link.send(RunJob {
            shared,
            handler: self.handler.clone(),
            payload,
        });
        wake
    }
}
