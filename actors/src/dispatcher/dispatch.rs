//! Dispatch: handing queued jobs to idle workers or offering the best ones
//! in the pool's handoff slot, telling the workers whether jobs wait for
//! them and whether the express gate is open, taking offers back, and
//! marking jobs started.

use super::*;

// ----- dispatch ------------------------------------------------------------

impl Dispatcher {
    /// Hand queued jobs to the pool while it has idle workers; while it has
    /// none, offer the best queued ones in its handoff slot, where a worker
    /// that finishes takes the next without waiting for us. Nothing new
    /// starts once a shutdown began: those jobs' waiters were already told.
    pub(super) fn pump(&mut self, pool: usize, ctx: &mut Context<Self>) {
        self.pump_jobs(pool, ctx);
        self.update_starving(pool, ctx);
    }

    fn pump_jobs(&mut self, pool: usize, ctx: &mut Context<Self>) {
        if self.closing.is_some() {
            return;
        }
        let p = &self.pools[pool];
        if let Some(&(_, worst)) = p.offered.last() {
            // Offers must stay the best queued jobs, and an idle worker gets
            // its job the ordinary way.
            let outranked = p.queue.peek().is_some_and(|top| top.priority > worst);
            if p.link.idle() > 0 || p.paused || outranked {
                self.revoke_offers(pool, ctx);
            }
        }
        // The pool's link does not change while we pump.
        let link = self.pools[pool].link.clone();
        loop {
            let p = &self.pools[pool];
            if p.paused || (p.offered.len() >= OFFER_DEPTH && link.idle() == 0) {
                return;
            }
            let Some(id) = self.pop_ready(pool) else {
                return;
            };
            let Some(mut run) = self.prepare(id) else {
                continue;
            };
            // An idle worker gets it now; with none, it is offered. A
            // worker that goes idle meanwhile refuses the offer (see
            // `PoolLink::offer`): then it gets the job.
            loop {
                if link.claim(false) {
                    let started = run.shared.start();
                    link.send(run);
                    self.mark_started(id, started, ctx);
                    break;
                }
                match link.offer(run) {
                    Ok(()) => {
                        let priority = self.active.get(&id).map_or(0, |j| j.rec.priority);
                        self.pools[pool].offered.push((id, priority));
                        break;
                    }
                    Err(back) => run = back,
                }
            }
        }
    }

    /// Tell the pool's workers whether jobs wait for one of them, and open
    /// the express gate only while nothing waits in its queue (nor could:
    /// no store, not paused, not shutting down).
    pub(super) fn update_starving(&mut self, pool: usize, ctx: &mut Context<Self>) {
        let express_ok = self.store.is_none() && self.closing.is_none();
        let p = &mut self.pools[pool];
        let express = express_ok && p.queued == 0 && !p.paused;
        if express != p.express {
            p.express = express;
            p.link.set_express(express);
        }
        let starving = p.queued > p.offered.len() && !p.paused && self.closing.is_none();
        if starving != p.starving {
            p.starving = starving;
            p.link.set_starving(starving);
            if starving {
                self.recheck(ctx);
            }
        }
    }

    /// Read the report inboxes once more soon, after raising a flag that
    /// workers read after filing a report: a worker that read it before it
    /// was raised did not wake us, but its report is in the inbox by now.
    pub(super) fn recheck(&mut self, ctx: &mut Context<Self>) {
        if !self.recheck_queued {
            self.recheck_queued = true;
            ctx.notify(Wake);
        }
    }

    /// The best queued job of a pool, off its heap (stale entries skipped).
    fn pop_ready(&mut self, pool: usize) -> Option<JobId> {
        let p = &mut self.pools[pool];
        while let Some(entry) = p.queue.pop() {
            if self
                .active
                .get(&entry.id)
                .is_some_and(|j| j.rec.state == JobState::Queued && j.seq == entry.seq)
            {
                return Some(entry.id);
            }
        }
        None
    }

    /// The next attempt of a queued job, ready for a worker. The job stays
    /// queued until `mark_started`.
    fn prepare(&mut self, id: JobId) -> Option<RunJob> {
        let job = self.active.get_mut(&id)?;
        // Invariant: admission checked the kind exists.
        let kind = self.registry.kinds.get(&*job.rec.kind)?;
        let attempt = job.rec.attempt + 1;
        // A job that answers on commit keeps its reply: the Dispatcher
        // answers it, once the final record is committed.
        let direct = if job.answer_on_commit {
            None
        } else {
            job.direct.take()
        };
        let shared = Arc::new(AttemptShared::new(
            id,
            attempt,
            attempt >= job.rec.max_attempts,
            job.rec.timeout_ms.map(Duration::from_millis),
            direct,
        ));
        if !job.waiters.is_empty() || job.answer_on_commit || self.dependents.contains_key(&id) {
            shared.request_notify();
        }
        job.attempt = Some(shared.clone());
        Some(RunJob {
            shared,
            handler: kind.handler.clone(),
            payload: job.rec.payload.clone(),
        })
    }

    /// A worker started the prepared attempt of a queued job at `started`:
    /// the job is running. The caller settles the pool's idle count.
    fn mark_started(&mut self, id: JobId, started: Instant, ctx: &mut Context<Self>) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        let p = &mut self.pools[job.pool];
        p.queued -= 1;
        p.running += 1;
        p.counters.started += 1;
        job.rec.state = JobState::Running;
        job.rec.attempt += 1;
        let ago = started.elapsed();
        let start_ms = now_ms().saturating_sub(ago.as_millis() as u64);
        job.rec.started_at = Some(start_ms);
        job.rec.attempts.push(Attempt {
            start: start_ms,
            end: None,
            error: None,
        });
        let attempt = job.rec.attempt;
        if let Some(t) = job.rec.timeout_ms.map(Duration::from_millis) {
            job.timer = Some(ctx.run_later(t.saturating_sub(ago), move |act, ctx| {
                act.drain(ctx);
                act.on_timeout(id, attempt, ctx)
            }));
        }
        let queue_wait = job.ready_at.until(started);
        let totals = kind_totals(&mut self.kinds, &job.rec.kind).pool(job.pool);
        totals.counters.started += 1;
        totals.queue_wait.record(queue_wait);
        self.persist(id, ctx);
    }

    /// Take back the jobs offered in a pool's handoff slot: they go back to
    /// the queue at their old places. Those a worker took first are running
    /// (the workers' reports will say so).
    pub(super) fn revoke_offers(&mut self, pool: usize, ctx: &mut Context<Self>) {
        let p = &mut self.pools[pool];
        if p.offered.is_empty() {
            return;
        }
        let offered = std::mem::take(&mut p.offered);
        let back = p.link.revoke();
        let mut returned = Vec::with_capacity(back.len());
        for run in back {
            let id = run.shared.id;
            returned.push(id);
            let Some(job) = self.active.get_mut(&id) else {
                continue;
            };
            job.attempt = None;
            job.direct.set(run.shared.take_direct());
            p.queue.push(QueueEntry {
                priority: job.rec.priority,
                seq: job.seq,
                id,
            });
        }
        for (id, _) in offered {
            if !returned.contains(&id) {
                let started = self
                    .active
                    .get(&id)
                    .and_then(|j| j.attempt.as_ref())
                    .map_or_else(Instant::now, |s| s.start());
                self.mark_started(id, started, ctx);
            }
        }
    }

    /// A worker's report says it took an offered job: it stays busy.
    pub(super) fn offer_taken(&mut self, pool: usize, took: (JobId, u32), ctx: &mut Context<Self>) {
        let p = &mut self.pools[pool];
        if let Some(i) = p.offered.iter().position(|o| o.0 == took.0) {
            p.offered.remove(i);
            let started = self
                .active
                .get(&took.0)
                .and_then(|j| j.attempt.as_ref())
                .map_or_else(Instant::now, |s| s.start());
            self.mark_started(took.0, started, ctx);
        }
        // Otherwise a revoke found it taken already and marked it started.
    }
}
