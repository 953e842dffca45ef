//! `Runtime`: declare pools and handlers with the builder, `start()` the
//! actix System on its own thread, get a `Handle`, and `shutdown()` with a
//! deadline (also on drop). The runtime joins every thread it started.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::AsyncContext;
use crossbeam_channel::bounded;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::context::JobContext;
use crate::dispatcher::{Dispatcher, Heartbeat, HeartbeatFn, PoolState, Retention, StoreLink};
use crate::error::{ShutdownError, StartError};
use crate::handle::Handle;
use crate::pool::{PoolConfig, THREAD_EXIT_GRACE, ThreadCount, start_pool};
use crate::registry::{Kind, KindOptions, RawHandler, Registry, erase};
use crate::store::{Store, start_store};

/// Name of the pool that always exists.
pub const DEFAULT_POOL: &str = "default";

/// Declares pools and handlers, then starts the runtime.
pub struct RuntimeBuilder {
    pools: Vec<PoolConfig>,
    kinds: HashMap<String, Kind>,
    retention: Retention,
    heartbeat: Option<(Duration, HeartbeatFn)>,
    store: Option<Box<dyn Store>>,
    errors: Vec<String>,
}

impl RuntimeBuilder {
    fn new() -> Self {
        RuntimeBuilder {
            pools: Vec::new(),
            kinds: HashMap::new(),
            retention: Retention::default(),
            heartbeat: None,
            store: None,
            errors: Vec::new(),
        }
    }

    /// Declare a pool of `threads` workers (default `max_queued`).
    pub fn pool(self, name: &str, threads: usize) -> Self {
        self.pool_config(PoolConfig::new(name, threads))
    }

    /// Declare a pool with every setting. Declaring a name twice replaces
    /// the earlier declaration.
    pub fn pool_config(mut self, cfg: PoolConfig) -> Self {
        if cfg.threads == 0 {
            self.errors
                .push(format!("pool '{}' needs at least one thread", cfg.name));
        }
        self.pools.retain(|p| p.name != cfg.name);
        self.pools.push(cfg);
        self
    }

    /// Register a typed handler for `kind`, run on `pool`. Input and output
    /// go through serde; a payload that does not decode fails the job.
    pub fn handler<I, O, E, F>(self, kind: &str, pool: &str, f: F) -> Self
    where
        I: DeserializeOwned,
        O: Serialize,
        E: Display,
        F: Fn(&JobContext<'_>, I) -> Result<O, E> + Send + Sync + 'static,
    {
        self.kind(kind, pool, KindOptions::default(), erase(f))
    }

    /// Register a JSON handler for `kind` with its defaults.
    pub fn kind(
        mut self,
        kind: &str,
        pool: &str,
        options: KindOptions,
        handler: RawHandler,
    ) -> Self {
        if options.max_attempts == 0 {
            self.errors
                .push(format!("kind '{kind}': max_attempts must be at least 1"));
        }
        self.kinds.insert(
            kind.to_string(),
            Kind {
                name: Arc::from(kind),
                pool: pool.to_string(),
                options,
                handler,
            },
        );
        self
    }

    /// Change the defaults (attempts, backoff, timeout) of a kind
    /// registered earlier, e.g. from a configuration file that names kinds
    /// registered by code it does not own. A kind not registered yet makes
    /// `start` fail, naming it.
    pub fn kind_defaults(mut self, kind: &str, change: impl FnOnce(&mut KindOptions)) -> Self {
        match self.kinds.get_mut(kind) {
            None => self.errors.push(format!(
                "defaults for kind '{kind}', which is not registered"
            )),
            Some(k) => {
                change(&mut k.options);
                if k.options.max_attempts == 0 {
                    self.errors
                        .push(format!("kind '{kind}': max_attempts must be at least 1"));
                }
            }
        }
        self
    }

    /// Like `kind`, from a closure over JSON values.
    pub fn raw_handler<F>(self, kind: &str, pool: &str, options: KindOptions, f: F) -> Self
    where
        F: Fn(&JobContext<'_>, &Value) -> Result<Value, String> + Send + Sync + 'static,
    {
        self.kind(kind, pool, options, Arc::new(f))
    }

    /// Persist jobs in this store and resume from what it holds. Without
    /// one, jobs live in memory only. A submission is acknowledged only once
    /// its job is committed.
    pub fn store(mut self, store: Box<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// How long and how many finished jobs are kept.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Run `f` every `every` on the Dispatcher's own event loop (for
    /// watchdogs and status lines: a stalled loop stops the calls).
    pub fn heartbeat(mut self, every: Duration, f: impl FnMut(Heartbeat) + Send + 'static) -> Self {
        self.heartbeat = Some((every, Box::new(f)));
        self
    }

    /// Start the actix System on its own thread, start every pool and the
    /// Dispatcher, and return once they are ready.
    pub fn start(mut self) -> Result<Runtime, StartError> {
        if !self.pools.iter().any(|p| p.name == DEFAULT_POOL) {
            let n = std::thread::available_parallelism().map_or(2, |n| n.get());
            self.pools.push(PoolConfig::new(DEFAULT_POOL, n));
        }
        for (name, k) in &self.kinds {
            if !self.pools.iter().any(|p| p.name == k.pool) {
                self.errors.push(format!(
                    "kind '{name}' names pool '{}', which is not declared",
                    k.pool
                ));
            }
        }
        if !self.errors.is_empty() {
            return Err(StartError::Config(self.errors.join("; ")));
        }
        let registry = Arc::new(Registry { kinds: self.kinds });
        let threads = ThreadCount::default();
        // Recover before anything starts, so a broken store stops start-up
        // with its own error.
        let mut store = self.store;
        let recovered = match &mut store {
            Some(s) => Some(
                s.recover(self.retention.max_jobs)
                    .map_err(|e| StartError::Store(e.0))?,
            ),
            None => None,
        };
        let first_id = recovered.as_ref().map_or(0, |r| r.max_id) + 1;
        let next_id = Arc::new(AtomicU64::new(first_id));
        let (ready_tx, ready_rx) = bounded(1);
        let pools = self.pools;
        let retention = self.retention;
        let heartbeat = self.heartbeat;
        let worker_threads = threads.clone();
        let ids = next_id.clone();
        let system_thread = std::thread::Builder::new()
            .name("jobd-system".into())
            .spawn(move || {
                let sys = actix_rt::System::new();
                sys.block_on(async move {
                    let states: Vec<PoolState> =
                        pools.iter().cloned().map(PoolState::new).collect();
                    // Start the Dispatcher first so the pools can know its
                    // address, then hand it theirs before any job exists.
                    let ctx = actix::Context::<Dispatcher>::new();
                    let addr = ctx.address();
                    let addrs: Result<Vec<_>, String> = states
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let link = p.link.clone();
                            start_pool(&p.cfg, i, addr.clone(), worker_threads.clone(), link)
                        })
                        .collect();
                    let addrs = match addrs {
                        Ok(a) => a,
                        Err(e) => {
                            // The pools started so far go with their
                            // addresses; their threads exit.
                            let _ = ready_tx.send(Err(StartError::Spawn {
                                what: "pool threads".into(),
                                source: std::io::Error::other(e),
                            }));
                            actix::System::current().stop();
                            return;
                        }
                    };
                    let dispatcher = Dispatcher::new(
                        registry,
                        states,
                        retention,
                        heartbeat,
                        worker_threads.clone(),
                    );
                    let mut dispatcher = dispatcher;
                    dispatcher.set_pool_addrs(addrs);
                    if let (Some(store), Some(recovered)) = (store, recovered) {
                        let size = Arc::new(AtomicU64::new(0));
                        let failing = Arc::new(AtomicBool::new(false));
                        let store_addr = start_store(
                            store,
                            addr.clone(),
                            size.clone(),
                            failing,
                            worker_threads.clone(),
                        );
                        dispatcher.set_store(StoreLink::new(store_addr, size), recovered);
                    }
                    let express = dispatcher.express();
                    let addr = ctx.run(dispatcher);
                    let handle = Handle::new(addr, actix_rt::Arbiter::current(), ids, express);
                    let _ = ready_tx.send(Ok(handle));
                });
                // Runs until the Dispatcher stops the System.
                let _ = sys.run();
            })
            .map_err(|source| StartError::Spawn {
                what: "the jobd-system thread".into(),
                source,
            })?;
        let handle = match ready_rx.recv() {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let _ = system_thread.join();
                return Err(e);
            }
            Err(_) => return Err(StartError::Died),
        };
        Ok(Runtime {
            handle,
            system_thread: Some(system_thread),
            threads,
            _next_id: next_id,
        })
    }
}

/// A running jobd actor system.
pub struct Runtime {
    handle: Handle,
    system_thread: Option<JoinHandle<()>>,
    threads: ThreadCount,
    _next_id: Arc<AtomicU64>,
}

impl Runtime {
    /// Start declaring a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::new()
    }

    /// A handle for submitting jobs from any thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Stop admitting (new submits get `ShuttingDown`), let running jobs
    /// finish up to `deadline`, answer every waiter, stop the System, and
    /// join its thread and every pool thread.
    ///
    /// Handlers that are still running at the deadline are told to stop
    /// (`is_cancelled()`); if one of them ignores it, its thread cannot be
    /// joined and `WorkersBusy` says how many were left.
    pub fn shutdown(mut self, deadline: Duration) -> Result<(), ShutdownError> {
        self.stop(deadline)
    }

    /// Block until the System stopped by itself (e.g. the daemon's signal
    /// handler called `Handle::shutdown_async`), then join every thread.
    pub fn wait_stopped(mut self, grace: Duration) -> Result<(), ShutdownError> {
        let Some(t) = self.system_thread.take() else {
            return Ok(());
        };
        t.join().map_err(|_| ShutdownError::Panicked)?;
        match self.threads.wait_zero(Instant::now() + grace) {
            0 => Ok(()),
            n => Err(ShutdownError::WorkersBusy(n)),
        }
    }

    fn stop(&mut self, deadline: Duration) -> Result<(), ShutdownError> {
        let Some(t) = self.system_thread.take() else {
            return Ok(());
        };
        let until = Instant::now() + deadline;
        if actix_rt::Arbiter::try_current().is_none() {
            // Wait for the drain to finish; a closed channel means the
            // System is already gone, which is what we wanted too.
            let _ = self.handle.begin_shutdown(until).recv();
        } else {
            // Dropped on an arbiter thread: ask, but do not block here.
            let _ = self.handle.begin_shutdown(until);
            return Ok(());
        }
        t.join().map_err(|_| ShutdownError::Panicked)?;
        match self
            .threads
            .wait_zero(until.max(Instant::now()) + THREAD_EXIT_GRACE)
        {
            0 => Ok(()),
            n => Err(ShutdownError::WorkersBusy(n)),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backoff, JobOptions, JobState};

    #[test]
    fn kind_defaults_change_a_registered_kind_and_refuse_unknown_ones() {
        let b = Runtime::builder()
            .pool("p", 1)
            .handler("fail", "p", |_ctx, _: ()| Err::<(), _>("no"));
        let e = b
            .kind_defaults("nope", |o| o.max_attempts = 2)
            .start()
            .err()
            .unwrap();
        assert!(e.to_string().contains("'nope'"), "{e}");
        let e = Runtime::builder()
            .pool("p", 1)
            .handler("fail", "p", |_ctx, _: ()| Err::<(), _>("no"))
            .kind_defaults("fail", |o| o.max_attempts = 0)
            .start()
            .err()
            .unwrap();
        assert!(e.to_string().contains("max_attempts"), "{e}");

        let backoff = Backoff {
            base_ms: 1,
            factor: 1.0,
            max_ms: 1,
        };
        let rt = Runtime::builder()
            .pool("p", 1)
            .handler("fail", "p", |_ctx, _: ()| Err::<(), _>("no"))
            .kind_defaults("fail", |o| {
                o.max_attempts = 3;
                o.backoff = backoff;
                o.timeout = Some(Duration::from_secs(7));
            })
            .start()
            .unwrap();
        let h = rt.handle();
        let id = h.submit("fail", &(), JobOptions::default()).unwrap();
        let rec = h.wait_record(id, Duration::from_secs(10)).unwrap();
        assert_eq!((rec.state, rec.attempt), (JobState::Dead, 3));
        assert_eq!(rec.backoff, backoff);
        assert_eq!(rec.timeout_ms, Some(7000));
        rt.shutdown(Duration::from_secs(10)).unwrap();
    }
}
