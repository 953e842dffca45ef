//! The Dispatcher's side of the durable store: queueing changes, group
//! commit, acknowledging submissions (and answering jobs that answer on
//! commit) once committed, refusing them while writes fail. Recovery at
//! start is in `recovery`, reads that fall back to the store in
//! `store_reads`.

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
