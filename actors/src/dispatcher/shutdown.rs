//! The shutdown drain: its start (new work refused, offers taken back,
//! waiters of jobs that will not start answered), and its end once every
//! worker is idle or the deadline passed (everyone still waiting answered,
//! the System stopped when the store is flushed).

use super::*;

// ----- shutdown ------------------------------------------------------------

impl Dispatcher {
    /// Begin the shutdown drain (`Query::Shutdown`): no new job starts or
    /// is admitted, offered jobs go back to the queue, the waiters of jobs
    /// that will not start are answered, and the drain closes once every
    /// worker is idle or at `deadline`. A second request just waits too.
    pub(super) fn start_shutdown(
        &mut self,
        deadline: Instant,
        r: Reply<()>,
        ctx: &mut Context<Self>,
    ) {
        if let Some(c) = &mut self.closing {
            c.replies.push(r);
            return;
        }
        self.closing = Some(Closing {
            replies: vec![r],
            stop_requested: false,
        });
        // Offered jobs go back to the queue, and from now on every
        // report wakes us: the drain ends when the last worker is
        // idle.
        for i in 0..self.pools.len() {
            self.revoke_offers(i, ctx);
            self.pools[i].link.set_eager();
            self.update_starving(i, ctx);
        }
        self.recheck(ctx);
        // Jobs that have not started will not start: answer their
        // waiters now. Running ones finish up to the deadline.
        for job in self.active.values_mut() {
            if job.rec.state != JobState::Running {
                if let Some(d) = job.direct.take() {
                    d.send(Err(JobError::ShuttingDown));
                }
                for w in job.waiters.take() {
                    w.send(Err(JobError::ShuttingDown), ctx);
                }
            }
        }
        if self.all_idle() {
            self.close_now(ctx);
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            ctx.run_later(left, |act, ctx| {
                act.drain(ctx);
                act.close_now(ctx)
            });
        }
    }

    pub(super) fn all_idle(&self) -> bool {
        self.pools
            .iter()
            .all(|p| p.link.idle() == p.cfg.threads && p.retiring() == 0)
    }

    /// The drain is over (all workers idle, or the deadline passed): answer
    /// everyone still waiting and stop the System.
    pub(super) fn close_now(&mut self, ctx: &mut Context<Self>) {
        let Some(closing) = self.closing.as_mut() else {
            return;
        };
        let replies = std::mem::take(&mut closing.replies);
        for job in self.active.values_mut() {
            if let Some(s) = job.attempt.take() {
                // Handlers still running past the deadline see is_cancelled().
                if s.claim_interrupt(Interrupt::Abandoned) {
                    job.direct.set(s.take_direct());
                }
            }
            if let Some(d) = job.direct.take() {
                d.send(Err(JobError::ShuttingDown));
            }
            for w in job.waiters.take() {
                w.send(Err(JobError::ShuttingDown), ctx);
            }
        }
        if let Some(c) = &mut self.closing {
            c.replies.extend(replies);
            c.stop_requested = true;
        }
        self.stop_when_flushed(ctx);
    }

    /// Stop once the store has nothing left to write (or cannot write).
    pub(super) fn stop_when_flushed(&mut self, ctx: &mut Context<Self>) {
        if !self.closing.as_ref().is_some_and(|c| c.stop_requested) {
            return;
        }
        let busy = self.store.as_ref().is_some_and(|s| {
            s.in_flight.is_some() || (!s.pending.is_empty() && s.failing.is_none())
        });
        if busy {
            self.schedule_flush(ctx);
            return;
        }
        if let Some(c) = &mut self.closing {
            for r in std::mem::take(&mut c.replies) {
                r.send(());
            }
        }
        ctx.stop();
        actix::System::current().stop();
    }
}
