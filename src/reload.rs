//! Configuration reload on SIGHUP (`systemctl reload jobd`): read the
//! configuration again, the same way as at start (file, environment, the
//! original command-line flags), and apply what can change while jobs run:
//!
//! - `log_level` (unless `JOBD_LOG` overrides it, as at start);
//! - `[auth]` allow-lists (checked on every request, so open connections
//!   follow at once);
//! - `[pools.*]` `threads` and `max_queued` (`Handle::resize_pool`: running
//!   jobs finish on the old workers, nothing is dropped), and new pools
//!   (`Handle::add_pool`; jobs reach them with an explicit `pool`).
//!
//! Everything else (socket, its mode and group, state directory,
//! durability, log format, connection limits, kinds, exec, removing a pool,
//! ...) needs a restart: it is named in the log and in systemd's `STATUS=`,
//! and the running value is kept, so the next reload names it again. A
//! configuration that does not load is reported and the old one kept.
//! systemd hears `RELOADING=1` (with `MONOTONIC_USEC=`) first and
//! `READY=1` once done.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use jobd_actors::{Handle, PoolConfig};
use serde_json::Value;

use crate::auth::{Auth, LiveAuth};
use crate::config::{Config, Overrides, PoolSettings};
use crate::logging::{self, LevelChange};
use crate::systemd::{Notifier, StatusNote};

/// What one reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Changes now in effect, e.g. `pools.default: threads 1 -> 3`.
    pub applied: Vec<String>,
    /// Changes not in effect, each with why (most: a restart is needed).
    pub not_applied: Vec<String>,
    /// Keys (for the status line) of the changes not in effect.
    pub not_applied_keys: Vec<String>,
}

/// Reloads the configuration of a running daemon. Cheap to clone; lives on
/// the server's System (not `Send`).
#[derive(Clone)]
pub struct Reloader {
    inner: Rc<Inner>,
}

struct Inner {
    /// The command-line layer, applied again on every reload.
    over: Overrides,
    /// The configuration in effect: what was loaded, minus the changes a
    /// reload could not apply.
    running: RefCell<Config>,
    /// The allow-lists the sessions check.
    auth: Arc<LiveAuth>,
    /// The runtime, for pool changes.
    handle: Handle,
    /// `RELOADING=1` / `READY=1`.
    notifier: Notifier,
    /// What the status line says about the last reload.
    note: StatusNote,
}

impl Reloader {
    /// A reloader for a daemon started with `running` (loaded with `over`).
    pub fn new(
        running: Config,
        over: Overrides,
        auth: Arc<LiveAuth>,
        handle: Handle,
        notifier: Notifier,
        note: StatusNote,
    ) -> Reloader {
        Reloader {
            inner: Rc::new(Inner {
                over,
                running: RefCell::new(running),
                auth,
                handle,
                notifier,
                note,
            }),
        }
    }

    /// Reload once: tell systemd, load, apply, log, tell systemd again.
    /// Err when the configuration did not load (nothing changed then).
    pub async fn reload(&self) -> Result<Report, String> {
        let me = &self.inner;
        me.notifier.reloading();
        let over = me.over.clone();
        // Reading the file and resolving group names (NSS) may block: not
        // on the event loop.
        let loaded = tokio::task::spawn_blocking(move || -> Result<(Config, Auth), String> {
            let cfg = Config::load(&over).map_err(|e| e.to_string())?.config;
            let auth = Auth::from_config(&cfg.auth).map_err(|e| format!("[auth]: {e}"))?;
            Ok((cfg, auth))
        })
        .await
        .map_err(|e| format!("the reload task failed: {e}"))
        .and_then(|r| r);
        let result = match loaded {
            Err(e) => {
                tracing::error!("reload failed, keeping the previous configuration: {e}");
                me.note
                    .set(format!("reload failed, old configuration kept: {e}"));
                Err(e)
            }
            Ok((new, auth)) => {
                let report = self.apply(new, auth).await;
                log(&report);
                me.note.set(if report.not_applied_keys.is_empty() {
                    String::new()
                } else {
                    format!(
                        "reload: restart needed for {}",
                        report.not_applied_keys.join(", ")
                    )
                });
                Ok(report)
            }
        };
        let note = me.note.get();
        me.notifier.ready(if note.is_empty() {
            "configuration reloaded"
        } else {
            &note
        });
        result
    }

    /// Apply what can change live; record the rest.
    async fn apply(&self, new: Config, auth: Auth) -> Report {
        let me = &self.inner;
        let old = me.running.borrow().clone();
        let mut now = old.clone();
        let mut r = Report::default();

        if new.log_level != old.log_level {
            match logging::set_level(&new.log_level) {
                Ok(LevelChange::Applied) => {
                    r.applied.push(format!(
                        "log_level: {:?} -> {:?}",
                        old.log_level, new.log_level
                    ));
                    now.log_level = new.log_level.clone();
                }
                Ok(LevelChange::EnvWins) => {
                    r.applied.push(format!(
                        "log_level: {:?} (JOBD_LOG is set and still decides)",
                        new.log_level
                    ));
                    now.log_level = new.log_level.clone();
                }
                Err(e) => not_applied(&mut r, "log_level", e),
            }
        }

        if new.auth != old.auth {
            me.auth.set(auth);
            r.applied.push("auth: new allow-lists".into());
            now.auth = new.auth.clone();
        }

        self.apply_pools(&old, &new, &mut now, &mut r).await;

        // Whatever still differs could not be applied live.
        let mut rest = new.clone();
        rest.log_level = now.log_level.clone();
        rest.auth = now.auth.clone();
        rest.pools = now.pools.clone();
        for key in changed_keys(&now, &rest) {
            not_applied(&mut r, &key, "needs a restart".into());
        }
        *me.running.borrow_mut() = now;
        r
    }

    /// Resize changed pools, add new ones; removed pools need a restart.
    async fn apply_pools(&self, old: &Config, new: &Config, now: &mut Config, r: &mut Report) {
        let handle = &self.inner.handle;
        let before: BTreeMap<String, PoolSettings> = old.pool_list().into_iter().collect();
        let after: BTreeMap<String, PoolSettings> = new.pool_list().into_iter().collect();
        for (name, p) in &after {
            let key = format!("pools.{name}");
            let (threads, max_queued) = (p.threads(), p.max_queued());
            let done = match before.get(name) {
                Some(o) if (o.threads(), o.max_queued()) == (threads, max_queued) => Ok(None),
                Some(o) => handle
                    .resize_pool_async(name, threads, max_queued)
                    .await
                    .map(|()| {
                        Some(format!(
                            "{key}: threads {} -> {threads}, max_queued {} -> {max_queued}",
                            o.threads(),
                            o.max_queued()
                        ))
                    }),
                None => handle
                    .add_pool_async(PoolConfig {
                        name: name.clone(),
                        threads,
                        max_queued,
                    })
                    .await
                    .map(|()| {
                        Some(format!(
                            "{key}: added ({threads} threads, max_queued {max_queued}; \
                             jobs reach it with an explicit pool)"
                        ))
                    }),
            };
            match done {
                Ok(applied) => {
                    r.applied.extend(applied);
                    // In effect now: the new table, exactly as written.
                    match new.pools.get(name) {
                        Some(t) => now.pools.insert(name.clone(), t.clone()),
                        None => now.pools.remove(name),
                    };
                }
                Err(e) => not_applied(r, &key, e.to_string()),
            }
        }
        for name in before.keys().filter(|n| !after.contains_key(*n)) {
            not_applied(
                r,
                &format!("pools.{name}"),
                "removed from the configuration; a pool is removed only by a restart".into(),
            );
        }
    }
}

fn not_applied(r: &mut Report, key: &str, why: String) {
    r.not_applied.push(format!("{key}: {why}"));
    r.not_applied_keys.push(key.to_string());
}

fn log(r: &Report) {
    if r.applied.is_empty() && r.not_applied.is_empty() {
        tracing::info!("configuration reloaded: no changes");
        return;
    }
    for a in &r.applied {
        tracing::info!("reload applied {a}");
    }
    for n in &r.not_applied {
        tracing::warn!("reload could not apply {n}");
    }
    tracing::info!(
        applied = r.applied.len(),
        not_applied = r.not_applied.len(),
        "configuration reloaded"
    );
}

/// Keys whose values differ between two configurations: top-level keys,
/// and one level deeper for tables (`exec.allow`, `kinds.thumbnail`).
/// Works from the serialized form, so keys added later are covered too.
fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["(configuration)".into()];
    };
    let mut keys = Vec::new();
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in names {
        let (x, y) = (a.get(k), b.get(k));
        if x == y {
            continue;
        }
        match (x, y) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => {
                let sub: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                keys.extend(
                    sub.into_iter()
                        .filter(|s| x.get(*s) != y.get(*s))
                        .map(|s| format!("{k}.{s}")),
                );
            }
            _ => keys.push(k.clone()),
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_top_level_and_table_entries() {
        let a = Config::default();
        assert!(changed_keys(&a, &a).is_empty());
        let mut b = a.clone();
        b.socket = Some("/tmp/other.sock".into());
        b.max_connections = 7;
        b.exec.enabled = true;
        b.pools.insert("io".into(), PoolSettings::default());
        assert_eq!(
            changed_keys(&a, &b),
            vec!["exec.enabled", "max_connections", "pools.io", "socket"]
        );
    }
}
