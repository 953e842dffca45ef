//! Live pool changes: pausing and resuming a pool, resizing it (new
//! workers, the old ones retired once their job is done) and adding a pool
//! while running.

use super::*;

// ----- live pool changes ---------------------------------------------------

impl Dispatcher {
    /// Change a pool's admission limit at once and, when `threads` differs,
    /// its size: a new SyncArbiter of `threads` workers with a new link
    /// becomes the pool. The old link's offered jobs are taken back (those
    /// a worker took first are running), so the old workers find nothing
    /// more to take: each finishes the job it has (counted as `retiring`,
    /// its report read from the retired link) and its thread exits once
    /// the old address is dropped and its queue is empty. Queued jobs stay
    /// queued and go to the new workers.
    pub(super) fn resize(
        &mut self,
        name: &str,
        threads: usize,
        max_queued: usize,
        ctx: &mut Context<Self>,
    ) -> Result<(), JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        check_pool_shape(name, threads, max_queued)?;
        let i = *self
            .pool_names
            .get(name)
            .ok_or_else(|| JobError::UnknownPool(name.to_string()))?;
        if threads != self.pools[i].cfg.threads {
            let cfg = PoolConfig {
                threads,
                ..self.pools[i].cfg.clone()
            };
            let link = Arc::new(PoolLink::new(threads));
            let addr = start_pool(&cfg, i, ctx.address(), self.threads.clone(), link.clone())
                .map_err(JobError::Internal)?;
            self.revoke_offers(i, ctx);
            self.express.set_link(i, link.clone());
            let p = &mut self.pools[i];
            let old = std::mem::replace(&mut p.link, link);
            let old_threads = p.cfg.threads;
            p.starving = false;
            p.express = false;
            p.cfg.threads = threads;
            // Dropping the old address retires the old SyncArbiter.
            p.addr = Some(addr);
            // Reports of the old workers must not wait for an unrelated
            // message.
            old.set_eager();
            // Workers busy now each file one report saying they leave
            // (see `PoolLink::retire`); the link is read until then.
            let busy = old_threads.saturating_sub(old.retire());
            self.pools[i].retired.push((old, busy));
            self.recheck(ctx);
        }
        self.pools[i].cfg.max_queued = max_queued;
        self.pump(i, ctx);
        Ok(())
    }

    /// Pause or resume a pool: a paused pool starts nothing (its offered
    /// jobs are taken back); resumed, it starts its queued jobs again
    /// (unless a shutdown began).
    pub(super) fn pause(
        &mut self,
        pool: String,
        paused: bool,
        r: Reply<Result<(), JobError>>,
        ctx: &mut Context<Self>,
    ) {
        match self.pool_names.get(&pool).copied() {
            None => r.send(Err(JobError::UnknownPool(pool))),
            Some(i) => {
                self.pools[i].paused = paused;
                self.persist_change(Change::Paused(pool.clone(), paused), ctx);
                if paused {
                    self.revoke_offers(i, ctx);
                    self.update_starving(i, ctx);
                } else if self.closing.is_none() {
                    self.pump(i, ctx);
                }
                r.send(Ok(()));
            }
        }
    }

    /// Start a new pool while running. Jobs reach it through
    /// `JobOptions::pool` (kinds keep the pool they were registered with).
    pub(super) fn add_pool(
        &mut self,
        cfg: PoolConfig,
        ctx: &mut Context<Self>,
    ) -> Result<(), JobError> {
        if self.closing.is_some() {
            return Err(JobError::ShuttingDown);
        }
        check_pool_shape(&cfg.name, cfg.threads, cfg.max_queued)?;
        if self.pool_names.contains_key(&cfg.name) {
            return Err(JobError::BadRequest(format!(
                "pool '{}' already exists",
                cfg.name
            )));
        }
        let i = self.pools.len();
        let mut state = PoolState::new(cfg);
        let addr = start_pool(
            &state.cfg,
            i,
            ctx.address(),
            self.threads.clone(),
            state.link.clone(),
        )
        .map_err(JobError::Internal)?;
        state.addr = Some(addr);
        self.express.set_link(i, state.link.clone());
        self.pool_names.insert(state.cfg.name.clone(), i);
        self.pools.push(state);
        self.update_starving(i, ctx);
        Ok(())
    }
}

/// A pool needs a name, a thread and room for one queued job.
fn check_pool_shape(name: &str, threads: usize, max_queued: usize) -> Result<(), JobError> {
    if name.is_empty() {
        return Err(JobError::BadRequest("a pool needs a name".into()));
    }
    if threads == 0 {
        return Err(JobError::BadRequest(format!(
            "pool '{name}' needs at least one thread"
        )));
    }
    if max_queued == 0 {
        return Err(JobError::BadRequest(format!(
            "pool '{name}': max_queued must be at least 1"
        )));
    }
    Ok(())
}
