//! Recovery at start: what the store held becomes the Dispatcher's state
//! again (queued jobs in their order, delay timers, finished results,
//! paused pools), and jobs that were running when the process died are
//! settled (the attempt counts; retried if attempts remain).

use super::persist::INTERRUPTED;
use super::*;

impl Dispatcher {
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
}
