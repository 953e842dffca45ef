//! Reads that fall back to the store: a record no longer in memory
//! (`status`, `wait`), `list` pages merged from memory and the store, and
//! `retry` of a job known only to the store.

use super::*;

impl Dispatcher {
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
