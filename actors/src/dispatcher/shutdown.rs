//! The end of the shutdown drain (it starts with `Query::Shutdown` in
//! `messages`): once every worker is idle or the deadline passed, answer
//! everyone still waiting and stop the System when the store is flushed.

use super::*;

// ----- shutdown ------------------------------------------------------------

impl Dispatcher {
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
