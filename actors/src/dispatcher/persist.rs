//! The Dispatcher's side of the durable store: queueing changes, group
//! commit, acknowledging submissions once committed, refusing them while
//! writes fail, recovery at start, and reads that fall back to the store.

use super::*;

// ----- persistence -----------------------------------------------------------

/// Finished jobs deleted from the store per retention tick.
pub(super) const PRUNE_BATCH: usize = 1000;

/// How long to wait before writing again after a failed commit.
pub(super) const STORE_RETRY: Duration = Duration::from_secs(1);

/// The error attached to a job that was running when the process died.
pub(crate) const INTERRUPTED: &str = "interrupted: daemon stopped while running";

impl Dispatcher {
    /// Queue the current record of `id` for the next commit.
    pub(super) fn persist(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let Some(store) = &mut self.store else {
            return;
        };
        let rec = match self.active.get(&id) {
            // Written once, when it ends (see `Active::answer_on_commit`):
            // until then nobody was told of it.
            Some(a) if a.answer_on_commit => return,
            Some(a) => &a.rec,
            None => match self.finished.get(&id) {
                Some(r) => r,
                None => return,
            },
        };
        let change = Change::Put(Box::new(rec.clone()));
        match store.slot.get(&id) {
            Some(&i) => store.pending[i] = change,
            None => {
                store.slot.insert(id, store.pending.len());
                store.pending.push(change);
            }
        }
        self.schedule_flush(ctx);
    }

    /// Queue a change that is not a job record.
    pub(super) fn persist_change(&mut self, change: Change, ctx: &mut Context<Self>) {
        if let Some(store) = &mut self.store {
            store.pending.push(change);
            self.schedule_flush(ctx);
        }
    }

    /// Register submissions to acknowledge once their records commit.
    pub(super) fn after_commit(&mut self, a: Admission, ctx: &mut Context<Self>) {
        if let Some(store) = &mut self.store {
            store.admissions.push(a);
            self.schedule_flush(ctx);
        }
    }

    /// Send the pending changes as one batch, after the messages already in
    /// the mailbox (so that they join the batch: group commit).
    pub(super) fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        if let Some(s) = &mut self.store
            && !s.flush_scheduled
        {
            s.flush_scheduled = true;
            ctx.notify(Flush);
        }
    }

    pub(super) fn flush(&mut self) {
        let Some(store) = &mut self.store else {
            return;
        };
        if store.in_flight.is_some() || (store.pending.is_empty() && store.admissions.is_empty()) {
            return;
        }
        store.seq += 1;
        let batch = std::mem::take(&mut store.pending);
        store.slot.clear();
        let admissions = std::mem::take(&mut store.admissions);
        store.in_flight = Some((store.seq, admissions));
        store.addr.do_send(Commit {
            seq: store.seq,
            batch,
        });
    }

    /// A held job's record is committed: let it run.
    pub(super) fn release(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        if !job.held {
            return;
        }
        job.held = false;
        let pool = job.pool;
        match job.rec.state {
            JobState::Queued => {
                self.push_entry(id);
                if self.closing.is_none() {
                    self.pump(pool, ctx);
                }
            }
            JobState::Delayed if job.deps_left == 0 => {
                let run_at = job.rec.run_at;
                let t = self.ready_timer(id, run_at, ctx);
                if let Some(job) = self.active.get_mut(&id) {
                    job.timer = Some(t);
                }
            }
            _ => {}
        }
    }

    /// A held job's record could not be committed: forget the job, as if it
    /// had never been submitted, and tell whoever waits.
    pub(super) fn unadmit(&mut self, id: JobId, why: &str, ctx: &mut Context<Self>) {
        let held = self.active.get(&id).is_some_and(|j| j.held);
        if !held {
            return;
        }
        let Some(mut job) = self.active.remove(&id) else {
            return;
        };
        if let Some(t) = job.timer.take() {
            ctx.cancel_future(t);
        }
        let p = &mut self.pools[job.pool];
        match job.rec.state {
            JobState::Queued => p.queued -= 1,
            JobState::Delayed => p.delayed -= 1,
            _ => {}
        }
        p.counters.submitted = p.counters.submitted.saturating_sub(1);
        let k = self.kind_totals(&job.rec.kind, job.pool);
        k.counters.submitted = k.counters.submitted.saturating_sub(1);
        if let Some(key) = &job.rec.unique_key {
            let k = (job.rec.kind.to_string(), key.to_string());
            if self.unique.get(&k) == Some(&id) {
                self.unique.remove(&k);
            }
        }
        let err = JobError::Unavailable(format!("job not stored: {why}"));
        if let Some(d) = job.direct.take() {
            d.send(Err(err.clone()));
        }
        for w in job.waiters.take() {
            w.send(Err(err.clone()), ctx);
        }
        // Jobs that were admitted after it and wait for it stay waiting for
        // a job that never comes: cancel them the same way a failed
        // dependency would.
        for dep in self.dependents.remove(&id).unwrap_or_default() {
            if self.active.get(&dep).is_some_and(|d| !d.held) {
                if let Some(d) = self.active.get_mut(&dep) {
                    d.rec.error = Some(Box::new(ErrorInfo::new(
                        "dependency_failed",
                        format!("dependency {id} could not be stored"),
                    )));
                    let pool = d.pool;
                    self.pools[pool].delayed -= 1;
                }
                self.finish(dep, JobState::Cancelled, None, ctx);
            } else {
                self.unadmit(dep, why, ctx);
            }
        }
    }

    /// Resume from what the store held: requeue queued jobs in their order,
    /// re-arm delay timers, and settle jobs that were running when the
    /// process died (the attempt counts; retry if attempts remain).
    pub(super) fn restore(&mut self, r: Recovered, ctx: &mut Context<Self>) {
        for name in &r.paused {
            if let Some(&i) = self.pool_names.get(name) {
                self.pools[i].paused = true;
            }
        }
        let mut finished = r.finished;
        finished.sort_by_key(|rec| rec.finished_at.unwrap_or(0));
        for rec in finished {
            self.retain(rec);
        }
        let now = now_ms();
        let mut settle = Vec::new();
        for mut rec in r.active {
            let id = rec.id;
            let problem = if !self.registry.kinds.contains_key(&*rec.kind) {
                Some(Box::new(ErrorInfo::new(
                    "unknown_kind",
                    format!("no job kind named '{}' after restart", rec.kind),
                )))
            } else if !self.pool_names.contains_key(&*rec.pool) {
                Some(Box::new(ErrorInfo::new(
                    "unknown_pool",
                    format!("no pool named '{}' after restart", rec.pool),
                )))
            } else {
                None
            };
            if rec.state == JobState::Running {
                if let Some(a) = rec.attempts.last_mut() {
                    a.end.get_or_insert(now);
                    a.error = Some(INTERRUPTED.to_string());
                }
                rec.error = Some(Box::new(ErrorInfo::new("job_failed", INTERRUPTED)));
                if rec.attempt < rec.max_attempts {
                    rec.state = JobState::Queued;
                    rec.run_at = now;
                } else {
                    settle.push((id, None));
                    rec.state = JobState::Queued;
                }
            }
            if let Some(p) = problem {
                rec.error = Some(p.clone());
                settle.push((id, Some(p)));
            }
            let Some(&pool) = self
                .pool_names
                .get(&*rec.pool)
                .or(self.pool_names.get(crate::runtime::DEFAULT_POOL))
            else {
                continue;
            };
            // Share the names, as for jobs submitted now.
            if let Some(k) = self.registry.kinds.get(&*rec.kind) {
                rec.kind = k.name.clone();
            }
            if *rec.pool == *self.pools[pool].name {
                rec.pool = self.pools[pool].name.clone();
            }
            if let Some(key) = &rec.unique_key {
                self.unique
                    .insert((rec.kind.to_string(), key.to_string()), id);
            }
            let state = rec.state;
            self.active.insert(id, Active::new(rec, pool));
            match state {
                JobState::Queued => self.pools[pool].queued += 1,
                _ => self.pools[pool].delayed += 1,
            }
        }
        // Jobs that cannot run any more end now, as a failed last attempt.
        for (id, problem) in settle {
            let Some(job) = self.active.get_mut(&id) else {
                continue;
            };
            self.pools[job.pool].queued -= usize::from(job.rec.state == JobState::Queued);
            self.pools[job.pool].delayed -= usize::from(job.rec.state == JobState::Delayed);
            let state = match (&problem, job.rec.max_attempts) {
                (Some(_), _) | (None, 1) => JobState::Failed,
                (None, _) => JobState::Dead,
            };
            self.finish(id, state, None, ctx);
        }
        // Dependencies, then queues and timers, in id (= submission) order.
        let mut ids: Vec<JobId> = self.active.keys().copied().collect();
        ids.sort_unstable();
        for &id in &ids {
            let after = self
                .active
                .get(&id)
                .map(|j| j.rec.after.clone())
                .unwrap_or_default();
            let mut left = 0;
            let mut failed = None;
            for dep in after {
                if self.active.contains_key(&dep) {
                    left += 1;
                    self.dependents.entry(dep).or_default().push(id);
                } else if let Some(r) = self.finished.get(&dep)
                    && r.state != JobState::Succeeded
                {
                    failed = Some((dep, r.state));
                }
                // Not in memory: pruned long ago, so it had finished; the
                // store only keeps ids, so treat it as satisfied.
            }
            if let Some((dep, st)) = failed {
                if let Some(j) = self.active.get_mut(&id) {
                    j.rec.error = Some(Box::new(ErrorInfo::new(
                        "dependency_failed",
                        format!("dependency {dep} ended {st}"),
                    )));
                    let pool = j.pool;
                    match j.rec.state {
                        JobState::Queued => self.pools[pool].queued -= 1,
                        _ => self.pools[pool].delayed -= 1,
                    }
                }
                self.finish(id, JobState::Cancelled, None, ctx);
                continue;
            }
            if let Some(j) = self.active.get_mut(&id) {
                j.deps_left = left;
                if left > 0 && j.rec.state == JobState::Queued {
                    // Waiting for dependencies counts as delayed.
                    j.rec.state = JobState::Delayed;
                    let pool = j.pool;
                    self.pools[pool].queued -= 1;
                    self.pools[pool].delayed += 1;
                }
            }
        }
        for &id in &ids {
            let Some(j) = self.active.get(&id) else {
                continue;
            };
            match j.rec.state {
                JobState::Queued => self.push_entry(id),
                JobState::Delayed if j.deps_left == 0 => {
                    let run_at = j.rec.run_at;
                    let t = self.ready_timer(id, run_at, ctx);
                    if let Some(j) = self.active.get_mut(&id) {
                        j.timer = Some(t);
                    }
                }
                _ => {}
            }
            self.persist(id, ctx);
        }
        for pool in 0..self.pools.len() {
            self.pump(pool, ctx);
        }
    }

    /// Answer with a job's record from memory, else from the store.
    pub(super) fn lookup(&mut self, id: JobId, reply: RecordWaiter) {
        if let Some(rec) = self.record(id) {
            reply.send(Ok(rec.clone()));
            return;
        }
        match &self.store {
            None => reply.send(Err(JobError::NotFound(id.to_string()))),
            Some(s) => s.addr.do_send(StoreRead::Get(
                id,
                Reply::with(move |r: Result<Option<JobRecord>, StoreError>| {
                    reply.send(match r {
                        Ok(Some(rec)) => Ok(rec),
                        Ok(None) => Err(JobError::NotFound(id.to_string())),
                        Err(e) => Err(JobError::Unavailable(e.0)),
                    })
                }),
            )),
        }
    }
}

/// Send the pending store changes (sent to itself, see `schedule_flush`).
pub(super) struct Flush;

impl Message for Flush {
    type Result = ();
}

impl Handler<Flush> for Dispatcher {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        // Finished jobs not read yet join this batch.
        self.drain(ctx);
        if let Some(s) = &mut self.store {
            s.flush_scheduled = false;
        }
        self.flush();
    }
}

/// The store committed a batch (or failed to).
pub(crate) struct Committed {
    pub(crate) seq: u64,
    pub(crate) batch: Vec<Change>,
    pub(crate) result: Result<(), StoreError>,
}

impl Message for Committed {
    type Result = ();
}

impl Handler<Committed> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let Some(store) = &mut self.store else {
            return;
        };
        let admissions = match store.in_flight.take() {
            Some((seq, a)) if seq == msg.seq => a,
            other => {
                store.in_flight = other;
                return;
            }
        };
        match msg.result {
            Ok(()) => {
                if store.failing.take().is_some() {
                    tracing::warn!("store writes succeed again");
                }
                store.committed += msg.batch.len() as u64;
                // Keep the store busy: what piled up during this commit goes
                // out now, before the admissions are settled (their jobs'
                // next changes join the batch after).
                self.flush();
                for a in admissions {
                    match a {
                        Admission::One { id, ack, answer } => {
                            self.release(id, ctx);
                            if let Some(ack) = ack {
                                ack.send(Ok(answer));
                            }
                        }
                        Admission::Batch { ids, reply, answer } => {
                            for id in ids {
                                self.release(id, ctx);
                            }
                            reply.send(Ok(answer));
                        }
                        Admission::Outcome { reply, outcome } => reply.send(outcome),
                    }
                }
                // If nothing was pending above, what the admissions queued
                // goes out now.
                self.flush();
            }
            Err(e) => {
                if store.failing.is_none() {
                    tracing::error!(
                        "store write failed, new submissions are refused until it works again: {e}"
                    );
                }
                store.failing = Some(e.0.clone());
                // Submissions of this batch are refused; every other change
                // is written again later (a newer pending record of the same
                // job supersedes it).
                let mut refused = std::collections::HashSet::new();
                for a in admissions {
                    match a {
                        Admission::One { id, ack, .. } => {
                            refused.insert(id);
                            if let Some(ack) = ack {
                                ack.send(Err(JobError::Unavailable(e.0.clone())));
                            }
                        }
                        Admission::Batch { ids, reply, .. } => {
                            refused.extend(ids.iter().copied());
                            reply.send(Err(JobError::Unavailable(e.0.clone())));
                        }
                        // The job ended, but its ending could not be made
                        // durable: the submitter hears so (the record is
                        // written again later).
                        Admission::Outcome { reply, .. } => {
                            reply.send(Err(JobError::Unavailable(e.0.clone())));
                        }
                    }
                }
                let store = self.store.as_mut().expect("checked above: store is set");
                let newer = std::mem::take(&mut store.pending);
                let mut kept: Vec<Change> = msg
                    .batch
                    .into_iter()
                    .filter(|c| match c {
                        Change::Put(r) => {
                            !refused.contains(&r.id) && !store.slot.contains_key(&r.id)
                        }
                        Change::Paused(..) => true,
                        Change::Prune { .. } => false,
                    })
                    .collect();
                kept.extend(newer);
                store.slot = kept
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| match c {
                        Change::Put(r) => Some((r.id, i)),
                        _ => None,
                    })
                    .collect();
                store.pending = kept;
                let first_pool = self.pools.first().map(|p| (p.cfg.name.clone(), p.paused));
                for id in refused {
                    self.unadmit(id, &e.0, ctx);
                }
                // Try again in a while; with nothing to write, write a tiny
                // row so that recovery is noticed.
                ctx.run_later(STORE_RETRY, move |act, ctx| {
                    act.drain(ctx);
                    if let Some(s) = &mut act.store
                        && s.pending.is_empty()
                        && let Some((name, paused)) = first_pool.clone()
                    {
                        s.pending.push(Change::Paused(name, paused));
                    }
                    act.flush();
                    act.stop_when_flushed(ctx);
                });
            }
        }
        self.stop_when_flushed(ctx);
    }
}

/// A page read from the store, to be merged with what only memory knows.
pub(super) struct ListLoaded {
    pub(super) q: ListQuery,
    pub(super) page: Result<ListPage, StoreError>,
    pub(super) reply: Reply<ListPage>,
}

impl Message for ListLoaded {
    type Result = ();
}

impl Handler<ListLoaded> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: ListLoaded, ctx: &mut Context<Self>) {
        self.drain(ctx);
        let mem = self.list(&msg.q);
        let Ok(stored) = msg.page else {
            msg.reply.send(mem);
            return;
        };
        let limit = msg.q.limit.unwrap_or(100).clamp(1, 10_000);
        let more = stored.cursor.is_some() || mem.cursor.is_some();
        let mut jobs: Vec<JobRecord> = stored
            .jobs
            .into_iter()
            .filter(|r| self.record(r.id).is_none())
            .chain(mem.jobs)
            .collect();
        if msg.q.oldest_first {
            jobs.sort_unstable_by_key(|r| r.id);
        } else {
            jobs.sort_unstable_by_key(|r| std::cmp::Reverse(r.id));
        }
        jobs.dedup_by_key(|r| r.id);
        let more = more || jobs.len() > limit;
        jobs.truncate(limit);
        msg.reply.send(ListPage {
            cursor: if more {
                jobs.last().map(|r| r.id)
            } else {
                None
            },
            jobs,
        });
    }
}

/// A job to retry, read back from the store.
pub(super) struct RetryLoaded {
    pub(super) id: JobId,
    pub(super) found: Result<Option<JobRecord>, StoreError>,
    pub(super) reply: Reply<Result<JobRecord, JobError>>,
}

impl Message for RetryLoaded {
    type Result = ();
}

impl Handler<RetryLoaded> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: RetryLoaded, ctx: &mut Context<Self>) {
        self.drain(ctx);
        match msg.found {
            Err(e) => msg.reply.send(Err(JobError::Unavailable(e.0))),
            Ok(None) => msg.reply.send(Err(JobError::NotFound(msg.id.to_string()))),
            Ok(Some(rec)) => {
                if self.record(msg.id).is_none() && rec.state.is_final() {
                    self.retain(rec);
                }
                msg.reply.send(self.retry(msg.id, ctx));
            }
        }
    }
}
