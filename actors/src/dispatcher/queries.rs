//! Read-only answers from memory: a page of `list` and the `stats`
//! snapshot. Reads that fall back to the store are in `persist`.

use super::*;

// ----- queries -------------------------------------------------------------

impl Dispatcher {
    pub(super) fn list(&self, q: &ListQuery) -> ListPage {
        list_records(
            self.active
                .values()
                .map(|a| &a.rec)
                .chain(self.finished.values()),
            q,
        )
    }

    pub(super) fn snapshot(&self) -> StatsSnapshot {
        let pools = self
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (kinds, queue_wait_ms, run_time_ms) = pool_breakdown(i, self.kinds.iter());
                (
                    p.cfg.name.clone(),
                    PoolStats {
                        threads: p.cfg.threads,
                        busy: p.cfg.threads.saturating_sub(p.link.idle()),
                        idle: p.link.idle(),
                        retiring: p.retiring(),
                        queued: p.queued,
                        delayed: p.delayed,
                        running: p.running,
                        max_queued: p.cfg.max_queued,
                        paused: p.paused,
                        counters: p.counters,
                        queue_wait_ms,
                        run_time_ms,
                        kinds,
                    },
                )
            })
            .collect();
        let kinds = self
            .kinds
            .iter()
            .map(|(k, t)| (k.clone(), t.stats()))
            .collect();
        StatsSnapshot {
            pools,
            kinds,
            active_jobs: self.active.len(),
            retained_jobs: self.finished.len(),
            store: self.store.as_ref().map(|s| StoreStats {
                bytes: s.size.load(std::sync::atomic::Ordering::Relaxed),
                pending_changes: s.pending.len(),
                committed_changes: s.committed,
                failing: s.failing.clone(),
            }),
        }
    }
}

/// One page of `records` matching `q` (filter, order, cursor, limit).
pub(crate) fn list_records<'a>(
    records: impl Iterator<Item = &'a JobRecord>,
    q: &ListQuery,
) -> ListPage {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let mut page: Vec<&JobRecord> = records
        .filter(|r| q.state.is_none_or(|s| r.state == s))
        .filter(|r| q.pool.as_ref().is_none_or(|p| *r.pool == **p))
        .filter(|r| q.kind.as_ref().is_none_or(|k| *r.kind == **k))
        .filter(|r| match q.cursor {
            None => true,
            Some(c) if q.oldest_first => r.id > c,
            Some(c) => r.id < c,
        })
        .collect();
    if q.oldest_first {
        page.sort_unstable_by_key(|r| r.id);
    } else {
        page.sort_unstable_by_key(|r| std::cmp::Reverse(r.id));
    }
    let more = page.len() > limit;
    page.truncate(limit);
    ListPage {
        cursor: if more {
            page.last().map(|r| r.id)
        } else {
            None
        },
        jobs: page.into_iter().cloned().collect(),
    }
}
