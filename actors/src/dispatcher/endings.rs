//! Endings: a worker's outcome, timeouts, failed attempts (retried or
//! final), cancelling, making a job final (waiters answered, unique key
//! released, dependents settled, record retained and later pruned),
//! retrying a failed job, and what a `call` waiter gets for a final record.

use super::*;

// ----- endings -------------------------------------------------------------

impl Dispatcher {
    /// End the running attempt of `id` with an error; retry or finish.
    fn attempt_failed(
        &mut self,
        id: JobId,
        message: String,
        final_state: JobState,
        code: &str,
        ctx: &mut Context<Self>,
    ) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        let pool = job.pool;
        self.pools[pool].running -= 1;
        if let Some(a) = job.rec.attempts.last_mut() {
            a.end = Some(now_ms());
            a.error = Some(message.clone());
        }
        job.rec.error = Some(Box::new(ErrorInfo::new(code, message.clone())));
        if let Some(t) = job.timer.take() {
            ctx.cancel_future(t);
        }
        let shared = job.attempt.take();
        if job.rec.attempt < job.rec.max_attempts {
            // Retry: back to delayed with backoff; the direct waiter (if the
            // worker did not answer it) comes back with the job.
            if let Some(s) = shared {
                job.direct.set(s.take_direct());
            }
            let delay = job
                .rec
                .backoff
                .delay(job.rec.attempt, id.0 ^ (u64::from(job.rec.attempt) << 48));
            job.rec.run_at = now_ms() + delay.as_millis() as u64;
            job.rec.state = JobState::Delayed;
            let run_at = job.rec.run_at;
            let kind = job.rec.kind.clone();
            self.pools[pool].delayed += 1;
            self.pools[pool].counters.retried += 1;
            self.kind_totals(&kind, pool).counters.retried += 1;
            let timer = self.ready_timer(id, run_at, ctx);
            if let Some(job) = self.active.get_mut(&id) {
                job.timer = Some(timer);
            }
            self.persist(id, ctx);
        } else {
            let state = if job.rec.max_attempts > 1 {
                JobState::Dead
            } else {
                final_state
            };
            if let Some(s) = shared
                && job.direct.is_none()
            {
                job.direct.set(s.take_direct());
            }
            self.finish(id, state, None, ctx);
        }
    }

    /// Make a job final: record, answer every waiter, release its unique key,
    /// settle its dependents, and keep the record for `status`.
    pub(super) fn finish(
        &mut self,
        id: JobId,
        state: JobState,
        result: Option<Value>,
        ctx: &mut Context<Self>,
    ) {
        // Jobs cancelled because a dependency failed; allocated only then.
        let mut cascade = Vec::new();
        let mut next = Some((id, state, result));
        while let Some((id, state, result)) = next.take().or_else(|| cascade.pop()) {
            let Some(mut job) = self.active.remove(&id) else {
                continue;
            };
            if let Some(t) = job.timer.take() {
                ctx.cancel_future(t);
            }
            let now = now_ms();
            job.rec.state = state;
            job.rec.finished_at = Some(now);
            if result.is_some() {
                job.rec.result = result.map(Box::new);
                job.rec.error = None;
            }
            if let Some(a) = job.rec.attempts.last_mut() {
                a.end.get_or_insert(now);
            }
            let pool = &mut self.pools[job.pool];
            let c = &mut pool.counters;
            let k = &mut kind_totals(&mut self.kinds, &job.rec.kind)
                .pool(job.pool)
                .counters;
            match state {
                JobState::Succeeded => {
                    c.succeeded += 1;
                    k.succeeded += 1;
                }
                JobState::Failed => {
                    c.failed += 1;
                    k.failed += 1;
                }
                JobState::Dead => {
                    c.dead += 1;
                    k.dead += 1;
                }
                JobState::Cancelled => {
                    c.cancelled += 1;
                    k.cancelled += 1;
                }
                JobState::TimedOut => {}
                _ => {}
            }
            if let Some(key) = &job.rec.unique_key {
                let k = (job.rec.kind.to_string(), key.to_string());
                if self.unique.get(&k) == Some(&id) {
                    self.unique.remove(&k);
                }
            }
            if let Some(d) = job.direct.take() {
                let outcome = outcome_of(&job.rec);
                if job.answer_on_commit && self.store.is_some() {
                    // Joins the batch that carries the final record below.
                    self.after_commit(Admission::Outcome { reply: d, outcome }, ctx);
                } else {
                    d.send(outcome);
                }
            }
            for w in job.waiters.take() {
                w.send(Ok(job.rec.clone()), ctx);
            }
            for dep in self.dependents.remove(&id).unwrap_or_default() {
                let Some(d) = self.active.get_mut(&dep) else {
                    continue;
                };
                if state == JobState::Succeeded {
                    d.deps_left = d.deps_left.saturating_sub(1);
                    if d.deps_left == 0 {
                        let run_at = d.rec.run_at;
                        let t = self.ready_timer(dep, run_at, ctx);
                        if let Some(d) = self.active.get_mut(&dep) {
                            d.timer = Some(t);
                        }
                    }
                } else {
                    self.pools[d.pool].delayed -= 1;
                    d.rec.error = Some(Box::new(ErrorInfo::new(
                        "dependency_failed",
                        format!("dependency {id} ended {state}"),
                    )));
                    cascade.push((dep, JobState::Cancelled, None));
                }
            }
            self.retain(job.rec);
            self.persist(id, ctx);
        }
    }

    pub(super) fn retain(&mut self, rec: JobRecord) {
        let id = rec.id;
        self.finished_order
            .push_back((rec.finished_at.unwrap_or(0), id));
        self.finished.insert(id, rec);
        while self.finished.len() > self.retention.max_jobs {
            self.prune_one();
        }
    }

    fn prune_one(&mut self) {
        if let Some((at, id)) = self.finished_order.pop_front() {
            // A retried-and-finished-again job has a newer entry; skip stale.
            if self.finished.get(&id).and_then(|r| r.finished_at) == Some(at) {
                self.finished.remove(&id);
            }
        }
    }

    pub(super) fn prune_expired(&mut self, ctx: &mut Context<Self>) {
        let cutoff = now_ms().saturating_sub(self.retention.ttl.as_millis() as u64);
        if self.store.as_ref().is_some_and(|s| s.failing.is_none()) {
            // Small batches: one prune per tick keeps each transaction short.
            self.persist_change(
                Change::Prune {
                    before_ms: cutoff,
                    limit: PRUNE_BATCH,
                },
                ctx,
            );
        }
        while self
            .finished_order
            .front()
            .is_some_and(|(at, _)| *at < cutoff)
        {
            self.prune_one();
        }
    }

    /// A worker's claimed outcome for the current attempt of a job.
    pub(super) fn attempt_done(&mut self, msg: AttemptDone, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&msg.id) else {
            return;
        };
        kind_totals(&mut self.kinds, &job.rec.kind)
            .pool(job.pool)
            .run_time
            .record(msg.run_time);
        match msg.outcome {
            Ok(v) => {
                job.attempt = None;
                if let Some(a) = job.rec.attempts.last_mut() {
                    a.end = Some(now_ms());
                }
                self.pools[job.pool].running -= 1;
                self.finish(msg.id, JobState::Succeeded, Some(v), ctx);
            }
            Err(f) => self.attempt_failed(msg.id, f.message(), JobState::Failed, "job_failed", ctx),
        }
    }

    pub(super) fn on_timeout(&mut self, id: JobId, attempt: u32, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        if job.rec.state != JobState::Running || job.rec.attempt != attempt {
            return;
        }
        job.timer = None;
        let won = job
            .attempt
            .as_ref()
            .is_some_and(|s| s.claim_interrupt(Interrupt::TimedOut));
        if !won {
            // The worker finished first; its report is on its way.
            return;
        }
        let ms = job.rec.timeout_ms.unwrap_or(0);
        let pool = job.pool;
        kind_totals(&mut self.kinds, &job.rec.kind)
            .pool(pool)
            .counters
            .timed_out += 1;
        self.pools[pool].counters.timed_out += 1;
        self.attempt_failed(
            id,
            format!("timed out after {ms} ms"),
            JobState::TimedOut,
            "timed_out",
            ctx,
        );
    }

    pub(super) fn cancel(
        &mut self,
        id: JobId,
        reason: &str,
        ctx: &mut Context<Self>,
    ) -> Result<JobRecord, JobError> {
        // A job offered in its pool's handoff slot is taken back first; if
        // a worker took it already, it is cancelled as a running job. The
        // other offers went back to the queue: offer them again.
        let mut revoked = None;
        if let Some(pool) = self.active.get(&id).map(|j| j.pool)
            && self.pools[pool].offered.iter().any(|o| o.0 == id)
        {
            self.revoke_offers(pool, ctx);
            revoked = Some(pool);
        }
        let result = self.cancel_job(id, reason, ctx);
        if let Some(pool) = revoked {
            self.pump(pool, ctx);
        }
        result
    }

    fn cancel_job(
        &mut self,
        id: JobId,
        reason: &str,
        ctx: &mut Context<Self>,
    ) -> Result<JobRecord, JobError> {
        let Some(job) = self.active.get_mut(&id) else {
            return self
                .finished
                .get(&id)
                .cloned()
                .ok_or_else(|| JobError::NotFound(id.to_string()));
        };
        let pool = job.pool;
        match job.rec.state {
            JobState::Queued => self.pools[pool].queued -= 1,
            JobState::Delayed => self.pools[pool].delayed -= 1,
            JobState::Running => {
                let won = job
                    .attempt
                    .as_ref()
                    .is_some_and(|s| s.claim_interrupt(Interrupt::Cancelled));
                if !won {
                    return Ok(job.rec.clone());
                }
                self.pools[pool].running -= 1;
                if let Some(a) = job.rec.attempts.last_mut() {
                    a.end = Some(now_ms());
                    a.error = Some(reason.to_string());
                }
                if let Some(s) = job.attempt.take() {
                    job.direct.set(s.take_direct());
                }
            }
            _ => return Ok(job.rec.clone()),
        }
        let was_queued = job.rec.state == JobState::Queued;
        job.rec.error = Some(Box::new(ErrorInfo::new("cancelled", reason)));
        self.finish(id, JobState::Cancelled, None, ctx);
        if was_queued {
            self.drop_stale_entries(pool);
        }
        self.record(id)
            .cloned()
            .ok_or_else(|| JobError::Internal("cancelled job vanished".into()))
    }

    /// A cancelled queued job leaves a stale entry in its pool's heap until
    /// it is popped, which never happens while the pool is stuck. Callers
    /// whose `call` times out cancel their job, so without this the heap
    /// would grow without bound behind a stuck pool. Rebuild it once stale
    /// entries outnumber live ones: amortised O(1) per cancel.
    fn drop_stale_entries(&mut self, pool: usize) {
        let p = &mut self.pools[pool];
        if p.queue.len() <= 2 * p.queued + 64 {
            return;
        }
        let active = &self.active;
        p.queue.retain(|e| {
            active
                .get(&e.id)
                .is_some_and(|j| j.rec.state == JobState::Queued && j.seq == e.seq)
        });
    }

    pub(super) fn retry(
        &mut self,
        id: JobId,
        ctx: &mut Context<Self>,
    ) -> Result<JobRecord, JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        if let Some(a) = self.active.get(&id) {
            return Err(JobError::BadRequest(format!(
                "job {id} is {}; only failed and dead jobs can be retried",
                a.rec.state
            )));
        }
        let Some(rec) = self.finished.get(&id) else {
            return Err(JobError::NotFound(id.to_string()));
        };
        if !matches!(rec.state, JobState::Failed | JobState::Dead) {
            return Err(JobError::BadRequest(format!(
                "job {id} is {}; only failed and dead jobs can be retried",
                rec.state
            )));
        }
        let Some(&pool) = self.pool_names.get(&*rec.pool) else {
            return Err(JobError::UnknownPool(rec.pool.to_string()));
        };
        let p = &self.pools[pool];
        if p.queued + p.delayed >= p.cfg.max_queued {
            return Err(JobError::QueueFull {
                pool: p.cfg.name.clone(),
                max_queued: p.cfg.max_queued,
            });
        }
        let Some(mut rec) = self.finished.remove(&id) else {
            return Err(JobError::NotFound(id.to_string()));
        };
        rec.state = JobState::Queued;
        rec.attempt = 0;
        rec.error = None;
        rec.result = None;
        rec.finished_at = None;
        rec.run_at = now_ms();
        if let Some(key) = &rec.unique_key {
            self.unique
                .entry((rec.kind.to_string(), key.to_string()))
                .or_insert(id);
        }
        self.active.insert(id, Active::new(rec, pool));
        self.enqueue(id);
        self.pump(pool, ctx);
        self.persist(id, ctx);
        self.record(id)
            .cloned()
            .ok_or_else(|| JobError::Internal("retried job vanished".into()))
    }
}

/// What a `call` waiter gets for a final record.
pub(crate) fn outcome_of(rec: &JobRecord) -> Outcome {
    let message = || {
        rec.error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default()
    };
    match rec.state {
        JobState::Succeeded => Ok(rec.result.as_deref().cloned().unwrap_or(Value::Null)),
        JobState::TimedOut => Err(JobError::TimedOut { id: rec.id }),
        JobState::Cancelled => Err(JobError::Cancelled {
            id: rec.id,
            reason: message(),
            code: if rec
                .error
                .as_ref()
                .is_some_and(|e| e.code == "dependency_failed")
            {
                "dependency_failed"
            } else {
                "cancelled"
            },
        }),
        JobState::Failed | JobState::Dead => {
            let message = message();
            // The worker's direct answer says Panicked; a waiter reading the
            // record must get the same.
            match message.strip_prefix(PANIC_PREFIX) {
                Some(m) if rec.error.as_ref().is_some_and(|e| e.code == "job_failed") => {
                    Err(JobError::Panicked {
                        id: rec.id,
                        message: m.to_string(),
                    })
                }
                _ => Err(JobError::Failed {
                    id: rec.id,
                    message,
                    state: rec.state,
                }),
            }
        }
        JobState::Queued | JobState::Delayed | JobState::Running => {
            Err(JobError::Internal(format!("job {} is not final", rec.id)))
        }
    }
}
