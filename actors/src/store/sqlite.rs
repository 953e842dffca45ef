//! `SqliteStore`: the embedded durable store. One file in WAL mode, written
//! only by the store thread. Each job is a row with the columns that queries
//! filter on plus the whole record as JSON. Schema changes are numbered
//! migrations, applied in order at open.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{Change, Recovered, Store, StoreError};
use crate::dispatcher::{ListPage, ListQuery};
use crate::job::{JobId, JobRecord};

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// `synchronous=NORMAL` in WAL mode: a commit survives a crash of the
    /// process, not necessarily a power loss.
    Os,
    /// `synchronous=FULL`: a commit is on disk (fsync) before it returns.
    Fsync,
}

/// Migrations, in order; `MIGRATIONS[i]` takes the schema from version `i`
/// to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: jobs, paused pools.
    "CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        state TEXT NOT NULL,
        kind TEXT NOT NULL,
        pool TEXT NOT NULL,
        finished_at INTEGER,
        record TEXT NOT NULL
     );
     CREATE INDEX jobs_unfinished ON jobs(id) WHERE finished_at IS NULL;
     CREATE INDEX jobs_finished_at ON jobs(finished_at) WHERE finished_at IS NOT NULL;
     CREATE TABLE pools (name TEXT PRIMARY KEY, paused INTEGER NOT NULL);",
    // 2: no index of unfinished jobs. Only start-up recovery reads them (one
    // scan), while every job's admission and ending had to update it.
    "DROP INDEX IF EXISTS jobs_unfinished;",
];

/// A SQLite file holding jobs.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{}: {what}: {e}", path.display()))
}

impl SqliteStore {
    /// Open (creating if needed) the store file at `path` and bring its
    /// schema up to date. The directory must exist. Errors name the path and
    /// the cause (not a database, permission denied, …).
    pub fn open(path: &Path, sync: Sync) -> Result<Self, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(path, flags).map_err(|e| err(path, "cannot open", e))?;
        let sync_pragma = match sync {
            Sync::Os => "NORMAL",
            Sync::Fsync => "FULL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync_pragma}; PRAGMA foreign_keys=OFF;"
        ))
        .map_err(|e| err(path, "cannot set up", e))?;
        // Wait a little instead of failing when a backup tool holds a lock.
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| err(path, "cannot set up", e))?;
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| err(&path, "cannot start migration", e))?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")
            .map_err(|e| err(&path, "cannot read schema", e))?;
        let version: Option<i64> = tx
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()
            .map_err(|e| err(&path, "cannot read schema version", e))?;
        let version = version.unwrap_or(0);
        if version as usize > MIGRATIONS.len() {
            return Err(err(
                &path,
                "unsupported schema",
                format!(
                    "version {version} is newer than this jobd ({})",
                    MIGRATIONS.len()
                ),
            ));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql)
                .map_err(|e| err(&path, &format!("migration {}", i + 1), e))?;
        }
        tx.execute("DELETE FROM schema_version", [])
            .and_then(|_| {
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    params![MIGRATIONS.len() as i64],
                )
            })
            .map_err(|e| err(&path, "cannot write schema version", e))?;
        tx.commit()
            .map_err(|e| err(&path, "cannot commit migration", e))
    }

    fn decode(path: &Path, json: &str) -> Result<JobRecord, StoreError> {
        serde_json::from_str(json).map_err(|e| err(path, "corrupt job record", e))
    }

    fn query_records(
        &self,
        sql: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<JobRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(sql)
            .map_err(|e| err(&self.path, "cannot query", e))?;
        let rows = stmt
            .query_map(args, |r| r.get::<_, String>(0))
            .map_err(|e| err(&self.path, "cannot query", e))?;
        let mut out = Vec::new();
        for row in rows {
            let json = row.map_err(|e| err(&self.path, "cannot read row", e))?;
            out.push(Self::decode(&self.path, &json)?);
        }
        Ok(out)
    }
}

impl Store for SqliteStore {
    fn recover(&mut self, finished_limit: usize) -> Result<Recovered, StoreError> {
        let active = self.query_records(
            "SELECT record FROM jobs WHERE finished_at IS NULL ORDER BY id",
            &[],
        )?;
        let finished = self.query_records(
            "SELECT record FROM jobs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT ?1",
            &[&(finished_limit as i64)],
        )?;
        let paused = {
            let mut stmt = self
                .conn
                .prepare("SELECT name FROM pools WHERE paused != 0")
                .map_err(|e| err(&self.path, "cannot query", e))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(|e| err(&self.path, "cannot query", e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(&self.path, "cannot read row", e))?
        };
        let max_id: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM jobs", [], |r| r.get(0))
            .map_err(|e| err(&self.path, "cannot query", e))?;
        Ok(Recovered {
            active,
            finished,
            paused,
            max_id: max_id.max(0) as u64,
        })
    }

    fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| err(&path, "cannot begin", e))?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO jobs (id, state, kind, pool, finished_at, record)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (id) DO UPDATE SET state = excluded.state,
                       pool = excluded.pool, finished_at = excluded.finished_at,
                       record = excluded.record",
                )
                .map_err(|e| err(&path, "cannot write", e))?;
            for change in batch {
                match change {
                    Change::Put(r) => {
                        let json =
                            serde_json::to_string(r).map_err(|e| err(&path, "cannot encode", e))?;
                        put.execute(params![
                            r.id.0 as i64,
                            r.state.as_str(),
                            r.kind,
                            r.pool,
                            r.finished_at.map(|f| f as i64),
                            json
                        ])
                        .map_err(|e| err(&path, "cannot write", e))?;
                    }
                    Change::Paused(pool, paused) => {
                        tx.execute(
                            "INSERT OR REPLACE INTO pools (name, paused) VALUES (?1, ?2)",
                            params![pool, *paused as i64],
                        )
                        .map_err(|e| err(&path, "cannot write", e))?;
                    }
                    Change::Prune { before_ms, limit } => {
                        tx.execute(
                            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs
                              WHERE finished_at IS NOT NULL AND finished_at < ?1 LIMIT ?2)",
                            params![*before_ms as i64, *limit as i64],
                        )
                        .map_err(|e| err(&path, "cannot prune", e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| err(&path, "cannot commit", e))
    }

    fn get(&mut self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self
            .query_records("SELECT record FROM jobs WHERE id = ?1", &[&(id.0 as i64)])?
            .pop())
    }

    fn list(&mut self, q: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let mut sql = String::from("SELECT record FROM jobs WHERE 1=1");
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if let Some(s) = q.state {
            args.push(Box::new(s.as_str()));
            sql += &format!(" AND state = ?{}", args.len());
        }
        if let Some(p) = &q.pool {
            args.push(Box::new(p.clone()));
            sql += &format!(" AND pool = ?{}", args.len());
        }
        if let Some(k) = &q.kind {
            args.push(Box::new(k.clone()));
            sql += &format!(" AND kind = ?{}", args.len());
        }
        if let Some(c) = q.cursor {
            args.push(Box::new(c.0 as i64));
            let op = if q.oldest_first { ">" } else { "<" };
            sql += &format!(" AND id {op} ?{}", args.len());
        }
        sql += if q.oldest_first {
            " ORDER BY id ASC"
        } else {
            " ORDER BY id DESC"
        };
        args.push(Box::new(limit as i64 + 1));
        sql += &format!(" LIMIT ?{}", args.len());
        let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
        let mut jobs = self.query_records(&sql, &refs)?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        Ok(ListPage {
            cursor: if more {
                jobs.last().map(|r| r.id)
            } else {
                None
            },
            jobs,
        })
    }

    fn size_bytes(&mut self) -> Option<u64> {
        let pages: i64 = self
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .ok()?;
        let size: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .ok()?;
        let wal = std::fs::metadata(self.path.with_extension("db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
        Some((pages * size).max(0) as u64 + wal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Backoff, JobState};
    use std::sync::Arc;

    fn rec(id: u64, state: JobState, finished_at: Option<u64>) -> JobRecord {
        JobRecord {
            id: JobId(id),
            kind: "echo".into(),
            pool: "default".into(),
            state,
            priority: 0,
            attempt: 0,
            max_attempts: 1,
            payload: Arc::new(serde_json::json!({"n": id})),
            result: None,
            error: None,
            attempts: vec![],
            timeout_ms: None,
            backoff: Backoff::default(),
            unique_key: None,
            after: Box::default(),
            created_at: 1,
            run_at: 1,
            started_at: None,
            finished_at,
            submitted_by: None,
        }
    }

    #[test]
    fn commits_recovers_lists_and_prunes() {
        let dir = tempdir();
        let path = dir.join("jobs.db");
        {
            let mut s = SqliteStore::open(&path, Sync::Os).unwrap();
            s.commit(&[
                Change::Put(Box::new(rec(1, JobState::Queued, None))),
                Change::Put(Box::new(rec(2, JobState::Succeeded, Some(100)))),
                Change::Put(Box::new(rec(3, JobState::Succeeded, Some(200)))),
                Change::Paused("io".into(), true),
            ])
            .unwrap();
        }
        let mut s = SqliteStore::open(&path, Sync::Fsync).unwrap();
        let r = s.recover(10).unwrap();
        assert_eq!(r.active.iter().map(|r| r.id.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            r.finished.iter().map(|r| r.id.0).collect::<Vec<_>>(),
            vec![3, 2]
        );
        assert_eq!(r.paused, vec!["io".to_string()]);
        assert_eq!(r.max_id, 3);
        let page = s
            .list(&ListQuery {
                limit: Some(2),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            page.jobs.iter().map(|r| r.id.0).collect::<Vec<_>>(),
            vec![3, 2]
        );
        assert_eq!(page.cursor, Some(JobId(2)));
        s.commit(&[Change::Prune {
            before_ms: 150,
            limit: 10,
        }])
        .unwrap();
        assert!(s.get(JobId(2)).unwrap().is_none());
        assert!(s.get(JobId(3)).unwrap().is_some());
        assert!(s.size_bytes().unwrap() > 0);
    }

    #[test]
    fn a_corrupt_file_is_refused_with_its_path() {
        let dir = tempdir();
        let path = dir.join("jobs.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let e = SqliteStore::open(&path, Sync::Os).unwrap_err();
        assert!(e.0.contains("jobs.db"), "{e}");
        assert!(e.0.contains("not a database"), "{e}");
    }

    fn tempdir() -> PathBuf {
        // Leaked on purpose: the directory must outlive the store in the test.
        tempfile::tempdir().unwrap().keep()
    }
}
