//! Admission: checking a submission (shutdown, store health, kind, pool,
//! limits, dependencies), inserting the job, adopting a job a caller
//! started itself on the express lane, delay timers, and putting ready jobs
//! into their pool's queue. Handing them to workers is in `dispatch`.

use super::*;

// ----- admission -----------------------------------------------------------

impl Dispatcher {
    /// Check a submission and build its record; nothing is changed yet.
    pub(super) fn check(&self, id: JobId, spec: JobSpec) -> Result<(Box<Active>, bool), JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        if let Some(why) = self.store.as_ref().and_then(|s| s.failing.as_ref()) {
            return Err(JobError::Unavailable(format!(
                "cannot persist new jobs: {why}"
            )));
        }
        let kind = self
            .registry
            .kinds
            .get(&spec.kind)
            .ok_or_else(|| JobError::UnknownKind(spec.kind.clone()))?;
        let opts = spec.options;
        let pool_name = opts.pool.as_deref().unwrap_or(&kind.pool);
        let pool = *self
            .pool_names
            .get(pool_name)
            .ok_or_else(|| JobError::UnknownPool(pool_name.to_string()))?;
        let max_attempts = opts.max_attempts.unwrap_or(kind.options.max_attempts);
        if max_attempts == 0 {
            return Err(JobError::BadRequest(
                "max_attempts must be at least 1".into(),
            ));
        }
        let mut deps_left = 0;
        for dep in &opts.after {
            match self.record(*dep) {
                None => return Err(JobError::NotFound(dep.to_string())),
                Some(r) if r.state == JobState::Succeeded => {}
                Some(r) if r.state.is_final() => {
                    return Err(JobError::Cancelled {
                        id,
                        reason: format!("dependency {dep} ended {}", r.state),
                        code: "dependency_failed",
                    });
                }
                Some(_) => deps_left += 1,
            }
        }
        let delay = opts.delay.unwrap_or_default();
        let waits = deps_left > 0 || !delay.is_zero();
        let p = &self.pools[pool];
        let starts_now = !waits && !p.paused && p.link.idle() > 0 && p.queued == 0;
        if !starts_now && p.queued + p.delayed >= p.cfg.max_queued {
            return Err(JobError::QueueFull {
                pool: p.cfg.name.clone(),
                max_queued: p.cfg.max_queued,
            });
        }
        let now = now_ms();
        let rec = JobRecord {
            id,
            kind: kind.name.clone(),
            pool: p.name.clone(),
            state: if waits {
                JobState::Delayed
            } else {
                JobState::Queued
            },
            priority: opts.priority,
            attempt: 0,
            max_attempts,
            payload: Arc::new(spec.payload),
            result: None,
            error: None,
            attempts: Vec::new(),
            timeout_ms: opts
                .timeout
                .or(kind.options.timeout)
                .map(|d| d.as_millis() as u64),
            backoff: opts.backoff.unwrap_or(kind.options.backoff),
            unique_key: opts.unique_key.map(String::into_boxed_str),
            after: opts.after.into_boxed_slice(),
            created_at: now,
            run_at: now + delay.as_millis() as u64,
            started_at: None,
            finished_at: None,
            submitted_by: opts.submitted_by,
        };
        let mut active = Active::new(rec, pool);
        active.deps_left = deps_left;
        Ok((active, !delay.is_zero()))
    }

    /// The active job holding this submission's unique key, if any.
    pub(super) fn duplicate_of(&self, spec: &JobSpec) -> Option<JobId> {
        let key = spec.options.unique_key.as_ref()?;
        self.unique.get(&(spec.kind.clone(), key.clone())).copied()
    }

    /// Insert a checked job and start its life.
    pub(super) fn admit(
        &mut self,
        mut job: Box<Active>,
        delayed: bool,
        ctx: &mut Context<Self>,
    ) -> SubmitAck {
        let id = job.rec.id;
        let pool = job.pool;
        if let Some(key) = &job.rec.unique_key {
            self.unique
                .insert((job.rec.kind.to_string(), key.to_string()), id);
        }
        let mut notified = false;
        for dep in &job.rec.after {
            if let Some(d) = self.active.get(dep) {
                self.dependents.entry(*dep).or_default().push(id);
                // A started dependency must report at once when it ends.
                if let Some(s) = &d.attempt {
                    s.request_notify();
                    notified = true;
                }
            }
        }
        if notified {
            self.recheck(ctx);
        }
        self.pools[pool].counters.submitted += 1;
        self.kind_totals(&job.rec.kind, pool).counters.submitted += 1;
        // With a store, the job waits for its commit before it may run.
        job.held = self.store.is_some() && !job.answer_on_commit;
        let held = job.held;
        if job.deps_left > 0 || delayed {
            self.pools[pool].delayed += 1;
            if job.deps_left == 0 && !held {
                job.timer = Some(self.ready_timer(id, job.rec.run_at, ctx));
            }
            self.active.insert(id, job);
        } else {
            self.active.insert(id, job);
            self.pools[pool].queued += 1;
            if !held {
                self.push_entry(id);
                self.pump(pool, ctx);
            }
        }
        self.persist(id, ctx);
        let state = self
            .active
            .get(&id)
            .map_or(JobState::Queued, |a| a.rec.state);
        SubmitAck {
            id,
            state,
            deduplicated: false,
        }
    }

    /// A job a caller started itself on an idle worker (see `express`):
    /// take it in as running, as if it had been admitted and started here.
    pub(super) fn adopt(&mut self, job: Adopted, ctx: &mut Context<Self>) {
        let Adopted {
            id,
            kind,
            pool,
            payload,
            shared,
            options,
            created_at,
        } = job;
        let Some(k) = self.registry.kinds.get(&*kind) else {
            return;
        };
        let start_ms = shared.started().map_or(created_at, |t| {
            now_ms().saturating_sub(t.elapsed().as_millis() as u64)
        });
        let rec = JobRecord {
            id,
            kind,
            pool: self.pools[pool].name.clone(),
            state: JobState::Running,
            priority: options.priority,
            attempt: 1,
            max_attempts: options.max_attempts.unwrap_or(k.options.max_attempts),
            payload,
            result: None,
            error: None,
            attempts: vec![Attempt {
                start: start_ms,
                end: None,
                error: None,
            }],
            timeout_ms: None,
            backoff: options.backoff.unwrap_or(k.options.backoff),
            unique_key: None,
            after: Box::default(),
            created_at,
            run_at: created_at,
            started_at: Some(start_ms),
            finished_at: None,
            submitted_by: options.submitted_by,
        };
        let mut active = Active::new(rec, pool);
        active.attempt = Some(shared);
        let p = &mut self.pools[pool];
        p.running += 1;
        p.counters.submitted += 1;
        p.counters.started += 1;
        let totals = kind_totals(&mut self.kinds, &active.rec.kind).pool(pool);
        totals.counters.submitted += 1;
        totals.counters.started += 1;
        totals.queue_wait.record(Duration::ZERO);
        self.active.insert(id, active);
        self.persist(id, ctx);
    }

    pub(super) fn ready_timer(
        &mut self,
        id: JobId,
        run_at: u64,
        ctx: &mut Context<Self>,
    ) -> SpawnHandle {
        let wait = Duration::from_millis(run_at.saturating_sub(now_ms()));
        ctx.run_later(wait, move |act, ctx| {
            act.drain(ctx);
            act.make_ready(id, ctx)
        })
    }

    /// A delayed job's time came, or its last dependency succeeded.
    fn make_ready(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        if job.rec.state != JobState::Delayed {
            return;
        }
        job.timer = None;
        job.rec.state = JobState::Queued;
        let pool = job.pool;
        self.pools[pool].delayed -= 1;
        self.enqueue(id);
        self.pump(pool, ctx);
    }

    /// Count a job (already in state queued) as queued in its pool and put
    /// it into the pool's queue.
    pub(super) fn enqueue(&mut self, id: JobId) {
        if let Some(job) = self.active.get(&id) {
            self.pools[job.pool].queued += 1;
            self.push_entry(id);
        }
    }

    /// Put a job (already counted as queued) into its pool's queue.
    pub(super) fn push_entry(&mut self, id: JobId) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        self.seq += 1;
        job.seq = self.seq;
        job.ready_at = Stamp::now();
        let p = &mut self.pools[job.pool];
        p.queue.push(QueueEntry {
            priority: job.rec.priority,
            seq: self.seq,
            id,
        });
    }
}
