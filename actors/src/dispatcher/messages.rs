//! The Dispatcher's messages and their handlers: worker reports, submit,
//! submit_batch, and the simple queries (status, cancel, retry, list,
//! stats, pause, resize, shutdown). The waiting ones (`wait`, `wait_any`)
//! are in `waits`.

use super::*;

// ----- messages ------------------------------------------------------------

/// A worker finished an attempt (filed in its pool's report inbox).
pub(crate) struct AttemptDone {
    pub(crate) id: JobId,
    pub(crate) attempt: u32,
    pub(crate) pool: usize,
    pub(crate) outcome: Result<Value, Failure>,
    /// False when the Dispatcher had already ended the attempt (timeout,
    /// cancel): then only the worker's credit comes back.
    pub(crate) claimed: bool,
    pub(crate) run_time: Duration,
    /// The job (and attempt) the worker took from the handoff slot to run
    /// next, if any: the worker stays busy.
    pub(crate) took: Option<(JobId, u32)>,
    /// The link was retired: the worker leaves the pool after this report.
    pub(crate) leaving: bool,
}

/// A worker filed a report that someone waits for (see `pool`): read the
/// report inboxes. Also sent to ourselves by `recheck`.
pub(crate) struct Wake;

impl Message for Wake {
    type Result = ();
}

impl Handler<Wake> for Dispatcher {
    type Result = ();

    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.recheck_queued = false;
        self.drain(ctx);
    }
}

impl Dispatcher {
    /// A worker's report of a finished attempt, read from its pool's inbox.
    pub(super) fn on_report(&mut self, msg: AttemptDone, ctx: &mut Context<Self>) {
        let pool = msg.pool;
        if let Some(took) = msg.took {
            self.offer_taken(pool, took, ctx);
        }
        self.settle(msg, ctx);
    }

    /// A report read from the inbox of an earlier size of `pool` (the
    /// retired link number `k`): filed before the resize, it counts as any
    /// other; filed after it, by a worker counted busy then, that worker
    /// now leaves.
    pub(super) fn on_retired_report(
        &mut self,
        pool: usize,
        k: usize,
        msg: AttemptDone,
        ctx: &mut Context<Self>,
    ) {
        if msg.leaving {
            let busy = &mut self.pools[pool].retired[k].1;
            *busy = busy.saturating_sub(1);
        }
        self.on_report(msg, ctx);
    }

    /// What a report means for its job, then for the pool and a shutdown.
    pub(super) fn settle(&mut self, msg: AttemptDone, ctx: &mut Context<Self>) {
        let pool = msg.pool;
        let current = self
            .active
            .get(&msg.id)
            .is_some_and(|j| j.rec.state == JobState::Running && j.rec.attempt == msg.attempt);
        if msg.claimed && current {
            self.attempt_done(msg, ctx);
        } else if current {
            // The handler returned past its deadline (see `claim_finished`):
            // time the attempt out now instead of when the timer fires.
            self.on_timeout(msg.id, msg.attempt, ctx);
        }
        if self.closing.is_some() {
            if self.all_idle() {
                self.close_now(ctx);
            }
            return;
        }
        self.pump(pool, ctx);
    }
}

/// Submit one job. `direct` is answered with the outcome (the `call` path);
/// `ack` with the admission.
pub(crate) struct Submit {
    pub(crate) id: JobId,
    pub(crate) spec: JobSpec,
    pub(crate) ack: Option<Reply<Result<SubmitAck, JobError>>>,
    pub(crate) direct: Option<DirectReply>,
    /// Answered with the final record of the job (of the existing job when
    /// deduplicated): a submit that also waits, in one trip.
    pub(crate) waiter: Option<RecordWaiter>,
}

impl Message for Submit {
    type Result = ();
}

impl Handler<Submit> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        self.drain(ctx);
        self.submit(msg, ctx);
    }
}

impl Dispatcher {
    /// Admit one submission (from the mailbox, or from the submission
    /// inbox while draining).
    pub(super) fn submit(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        let Submit {
            id,
            spec,
            ack,
            direct,
            waiter,
        } = msg;
        if let Some(existing) = self.duplicate_of(&spec) {
            if let Some(d) = direct {
                self.add_waiter(
                    existing,
                    Reply::with(move |r: Result<JobRecord, JobError>| {
                        d.send(r.and_then(|rec| outcome_of(&rec)))
                    }),
                    None,
                    ctx,
                );
            }
            if let Some(w) = waiter {
                self.add_waiter(existing, w, None, ctx);
            }
            if let Some(a) = ack {
                let state = self.record(existing).map_or(JobState::Queued, |r| r.state);
                a.send(Ok(SubmitAck {
                    id: existing,
                    state,
                    deduplicated: true,
                }));
            }
            return;
        }
        match self.check(id, spec) {
            Ok((mut job, delayed)) => {
                // A submitter that only waits for the outcome (`call`, a
                // waiting socket submit) is acknowledged by that outcome
                // alone. With a store, such a plain job need not wait for its
                // insert to commit before it runs: its outcome is held until
                // its final record commits instead. A crash before that loses
                // a job nobody was told of (its submitter sees the runtime
                // gone), and its submission and ending are written once.
                job.answer_on_commit = self.store.is_some()
                    && direct.is_some()
                    && ack.is_none()
                    && waiter.is_none()
                    && !delayed
                    && job.deps_left == 0
                    && job.rec.unique_key.is_none();
                job.direct.set(direct);
                if let Some(w) = waiter {
                    job.waiters.push(Waiter {
                        token: 0,
                        reply: w,
                        timer: None,
                    });
                }
                let early = job.answer_on_commit;
                let answer = self.admit(job, delayed, ctx);
                if early {
                    // Nothing to acknowledge or release on this commit.
                } else if self.store.is_some() {
                    let id = answer.id;
                    self.after_commit(Admission::One { id, ack, answer }, ctx);
                } else if let Some(a) = ack {
                    a.send(Ok(answer));
                }
            }
            Err(e) => {
                if let Some(d) = direct {
                    d.send(Err(e.clone()));
                }
                if let Some(w) = waiter {
                    w.send(Err(e.clone()));
                }
                if let Some(a) = ack {
                    a.send(Err(e));
                }
            }
        }
    }
}

/// Submit several jobs, all or nothing.
pub(crate) struct SubmitBatch {
    pub(crate) jobs: Vec<(JobId, JobSpec)>,
    pub(crate) reply: Reply<Result<Vec<SubmitAck>, JobError>>,
}

impl Message for SubmitBatch {
    type Result = ();
}

impl Handler<SubmitBatch> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: SubmitBatch, ctx: &mut Context<Self>) {
        self.drain(ctx);
        // Check everything first, counting what the batch itself adds to
        // each pool, so a batch cannot overflow max_queued half-way.
        let mut checked = Vec::with_capacity(msg.jobs.len());
        let mut extra: HashMap<usize, usize> = HashMap::new();
        for (i, (id, spec)) in msg.jobs.into_iter().enumerate() {
            if let Some(existing) = self.duplicate_of(&spec) {
                checked.push(Err(existing));
                continue;
            }
            match self.check(id, spec) {
                Ok((job, delayed)) => {
                    let n = extra.entry(job.pool).or_default();
                    *n += 1;
                    let p = &self.pools[job.pool];
                    if p.queued + p.delayed + *n > p.cfg.max_queued + p.link.idle() {
                        msg.reply.send(Err(JobError::QueueFull {
                            pool: p.cfg.name.clone(),
                            max_queued: p.cfg.max_queued,
                        }));
                        return;
                    }
                    checked.push(Ok((job, delayed)));
                }
                // Not the job's fault: the same answer a single submit gets,
                // so the client knows to retry later.
                Err(e @ (JobError::QueueFull { .. } | JobError::ShuttingDown)) => {
                    msg.reply.send(Err(e));
                    return;
                }
                Err(e) => {
                    msg.reply
                        .send(Err(JobError::BadRequest(format!("job {i}: {e}"))));
                    return;
                }
            }
        }
        let mut new_ids = Vec::new();
        let acks = checked
            .into_iter()
            .map(|c| match c {
                Ok((job, delayed)) => {
                    let ack = self.admit(job, delayed, ctx);
                    new_ids.push(ack.id);
                    ack
                }
                Err(existing) => SubmitAck {
                    id: existing,
                    state: self.record(existing).map_or(JobState::Queued, |r| r.state),
                    deduplicated: true,
                },
            })
            .collect();
        if self.store.is_some() {
            self.after_commit(
                Admission::Batch {
                    ids: new_ids,
                    reply: msg.reply,
                    answer: acks,
                },
                ctx,
            );
        } else {
            msg.reply.send(Ok(acks));
        }
    }
}

/// Simple request/response operations on one job or on the whole state.
pub(crate) enum Query {
    Status(JobId, Reply<Result<JobRecord, JobError>>),
    Cancel(JobId, Reply<Result<JobRecord, JobError>>),
    Retry(JobId, Reply<Result<JobRecord, JobError>>),
    List(ListQuery, Reply<ListPage>),
    Stats(Reply<StatsSnapshot>),
    Pause(String, bool, Reply<Result<(), JobError>>),
    Resize(String, usize, usize, Reply<Result<(), JobError>>),
    AddPool(PoolConfig, Reply<Result<(), JobError>>),
    Shutdown(Instant, Reply<()>),
    /// How many waiters an active job has (tests of waiter clean-up).
    #[cfg(test)]
    Waiters(JobId, Reply<usize>),
}

impl Message for Query {
    type Result = ();
}

impl Handler<Query> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Query, ctx: &mut Context<Self>) {
        self.drain(ctx);
        match msg {
            Query::Status(id, r) => self.lookup(id, r),
            Query::Cancel(id, r) if !self.active.contains_key(&id) => self.lookup(id, r),
            Query::Cancel(id, r) => r.send(self.cancel(id, "cancelled by request", ctx)),
            Query::Retry(id, r) if self.record(id).is_none() && self.store.is_some() => {
                // Finished long ago: fetch it from the store, then retry.
                let me = ctx.address();
                if let Some(s) = &self.store {
                    s.addr.do_send(StoreRead::Get(
                        id,
                        Reply::with(move |found| {
                            me.do_send(RetryLoaded {
                                id,
                                found,
                                reply: r,
                            })
                        }),
                    ));
                }
            }
            Query::Retry(id, r) => r.send(self.retry(id, ctx)),
            Query::List(q, r) => match &self.store {
                None => r.send(self.list(&q)),
                Some(s) => {
                    let me = ctx.address();
                    let query = q.clone();
                    s.addr.do_send(StoreRead::List(
                        q,
                        Reply::with(move |page| {
                            me.do_send(ListLoaded {
                                q: query,
                                page,
                                reply: r,
                            })
                        }),
                    ));
                }
            },
            Query::Stats(r) => r.send(self.snapshot()),
            #[cfg(test)]
            Query::Waiters(id, r) => r.send(self.active.get(&id).map_or(0, |j| j.waiters.len())),
            Query::Pause(pool, paused, r) => self.pause(pool, paused, r, ctx),
            Query::Resize(pool, threads, max_queued, r) => {
                r.send(self.resize(&pool, threads, max_queued, ctx))
            }
            Query::AddPool(cfg, r) => r.send(self.add_pool(cfg, ctx)),
            Query::Shutdown(deadline, r) => self.start_shutdown(deadline, r, ctx),
        }
    }
}
