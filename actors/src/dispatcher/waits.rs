//! Waiting for jobs: the `wait` and `wait_any` messages, and the waiters
//! they leave on active jobs (timed ones expire, abandoned ones are thrown
//! away). Waiters are answered when their job ends (see `endings`).

use super::*;

// ----- waits ---------------------------------------------------------------

/// Wait until a job is final; answered with its record.
pub(crate) struct Wait {
    pub(crate) id: JobId,
    pub(crate) reply: RecordWaiter,
    /// Answer `WaitTimeout` (and forget the waiter) if the job is not final
    /// by then.
    pub(crate) timeout: Option<Duration>,
}

impl Message for Wait {
    type Result = ();
}

impl Handler<Wait> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Wait, ctx: &mut Context<Self>) {
        self.drain(ctx);
        self.add_waiter(msg.id, msg.reply, msg.timeout, ctx);
    }
}

/// Wait until any of several jobs is final.
pub(crate) struct WaitAny {
    pub(crate) ids: Vec<JobId>,
    pub(crate) reply: RecordWaiter,
    /// As for `Wait`.
    pub(crate) timeout: Option<Duration>,
}

impl Message for WaitAny {
    type Result = ();
}

impl Handler<WaitAny> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: WaitAny, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let missing: Vec<JobId> = msg
            .ids
            .iter()
            .copied()
            .filter(|id| self.record(*id).is_none())
            .collect();
        let Some(&first_missing) = missing.first() else {
            self.wait_any(msg.ids, msg.reply, msg.timeout, ctx);
            return;
        };
        let Some(s) = &self.store else {
            msg.reply
                .send(Err(JobError::NotFound(first_missing.to_string())));
            return;
        };
        // Not in memory: every one of them must be in the store (then it
        // is final: the store's unfinished jobs are all in memory).
        let me = ctx.address();
        let WaitAny {
            ids,
            reply,
            timeout,
        } = msg;
        s.addr.do_send(StoreRead::GetMany(
            missing.clone(),
            Reply::with(move |found| {
                me.do_send(WaitAnyLoaded {
                    ids,
                    missing,
                    found,
                    reply,
                    timeout,
                })
            }),
        ));
    }
}

/// The ids of a `WaitAny` that only the store may know, read back.
pub(super) struct WaitAnyLoaded {
    /// Every id of the `WaitAny`.
    pub(super) ids: Vec<JobId>,
    /// The ids that were not in memory, in the order read.
    pub(super) missing: Vec<JobId>,
    /// What the store holds for each of `missing`.
    pub(super) found: Result<Vec<Option<JobRecord>>, StoreError>,
    /// The waiter.
    pub(super) reply: RecordWaiter,
    /// The wait's timeout, started once the ids are known to exist.
    pub(super) timeout: Option<Duration>,
}

impl Message for WaitAnyLoaded {
    type Result = ();
}

impl Handler<WaitAnyLoaded> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: WaitAnyLoaded, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let found = match msg.found {
            Ok(f) => f,
            Err(e) => return msg.reply.send(Err(JobError::Unavailable(e.0))),
        };
        let mut done = None;
        for (id, rec) in msg.missing.iter().zip(found) {
            match rec {
                // Known in memory by now (retried meanwhile): fine.
                None if self.record(*id).is_some() => {}
                None => return msg.reply.send(Err(JobError::NotFound(id.to_string()))),
                Some(r) if r.state.is_final() && self.record(*id).is_none() => {
                    done.get_or_insert(r);
                }
                Some(_) => {}
            }
        }
        match done {
            Some(rec) => msg.reply.send(Ok(rec)),
            None => self.wait_any(msg.ids, msg.reply, msg.timeout, ctx),
        }
    }
}

impl Dispatcher {
    /// Answer `w` once job `id` is final. A final (or unknown) job is
    /// answered at once, from memory or the store. With a `timeout`, the
    /// waiter is answered `WaitTimeout` and dropped when the job is not
    /// final by then, so a client polling a job that never ends does not
    /// pile up waiters.
    pub(super) fn add_waiter(
        &mut self,
        id: JobId,
        w: RecordWaiter,
        timeout: Option<Duration>,
        ctx: &mut Context<Self>,
    ) {
        if !self.active.contains_key(&id) {
            // Final (in memory or only in the store), or unknown.
            self.lookup(id, w);
            return;
        }
        let (token, timer) = match timeout {
            None => (0, None),
            Some(t) if t.is_zero() => {
                w.send(Err(JobError::WaitTimeout {
                    id: Some(id),
                    waited_ms: 0,
                }));
                return;
            }
            Some(t) => {
                let token = self.next_wait_token();
                let err = JobError::WaitTimeout {
                    id: Some(id),
                    waited_ms: t.as_millis() as u64,
                };
                let timer = ctx.run_later(t, move |act, _| act.expire_wait(token, &[id], err));
                (token, Some(timer))
            }
        };
        self.push_waiter(id, w, token, timer, ctx);
    }

    pub(super) fn next_wait_token(&mut self) -> u64 {
        self.wait_tokens += 1;
        self.wait_tokens
    }

    /// Add a waiter to an active job (or answer it from `lookup` when the
    /// job is not active).
    pub(super) fn push_waiter(
        &mut self,
        id: JobId,
        reply: RecordWaiter,
        token: u64,
        timer: Option<SpawnHandle>,
        ctx: &mut Context<Self>,
    ) {
        let Some(job) = self.active.get_mut(&id) else {
            if let Some(t) = timer {
                ctx.cancel_future(t);
            }
            self.lookup(id, reply);
            return;
        };
        // Throw away waiters nobody listens to any more (dropped futures),
        // each time the list reaches a power of two: amortised O(1) per
        // wait, and bounded however often a client gives up and waits again.
        let n = job.waiters.len();
        if n >= 8 && n.is_power_of_two() {
            for w in std::mem::take(&mut job.waiters) {
                if w.reply.is_gone() {
                    if let Some(t) = w.timer {
                        ctx.cancel_future(t);
                    }
                } else {
                    job.waiters.push(w);
                }
            }
        }
        job.waiters.push(Waiter {
            token,
            reply,
            timer,
        });
        // A started attempt must now report at once when it ends.
        if let Some(a) = &job.attempt {
            a.request_notify();
            self.recheck(ctx);
        }
    }

    /// A timed wait ran out: answer and remove its waiter from each job
    /// that still has it.
    pub(super) fn expire_wait(&mut self, token: u64, ids: &[JobId], err: JobError) {
        for id in ids {
            let Some(job) = self.active.get_mut(id) else {
                continue;
            };
            if let Some(i) = job.waiters.iter().position(|w| w.token == token)
                && let Some(w) = job.waiters.swap_remove(i)
            {
                w.reply.send(Err(err.clone()));
            }
        }
    }

    /// `WaitAny` once every id is known to exist: a final one answers at
    /// once, else one shared reply waits on all of them.
    pub(super) fn wait_any(
        &mut self,
        ids: Vec<JobId>,
        reply: RecordWaiter,
        timeout: Option<Duration>,
        ctx: &mut Context<Self>,
    ) {
        if let Some(rec) = ids.iter().find_map(|id| self.finished.get(id)) {
            reply.send(Ok(rec.clone()));
            return;
        }
        if timeout.is_some_and(|t| t.is_zero()) {
            reply.send(Err(JobError::WaitTimeout {
                id: None,
                waited_ms: 0,
            }));
            return;
        }
        let token = if timeout.is_some() {
            self.next_wait_token()
        } else {
            0
        };
        // One reply shared by all: the first job to finish takes it; the
        // other waiters then count as gone and are pruned.
        let slot = Arc::new(std::sync::Mutex::new(Some(reply)));
        for &id in &ids {
            let (take, probe) = (slot.clone(), slot.clone());
            let w = Reply::with_probe(
                move |r| {
                    let taken = take.lock().ok().and_then(|mut s| s.take());
                    if let Some(reply) = taken {
                        reply.send(r);
                    }
                },
                move || {
                    probe
                        .lock()
                        .map(|s| s.as_ref().is_none_or(|r| r.is_gone()))
                        .unwrap_or(false)
                },
            );
            self.push_waiter(id, w, token, None, ctx);
        }
        if let Some(t) = timeout {
            let err = JobError::WaitTimeout {
                id: None,
                waited_ms: t.as_millis() as u64,
            };
            ctx.run_later(t, move |act, _| act.expire_wait(token, &ids, err));
        }
    }
}
