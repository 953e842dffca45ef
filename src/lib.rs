//! The `jobd` crate: everything the daemon (`jobd`) and the client
//! (`jobctl`) share or need beyond the embeddable runtime in `jobd-actors`:
//! default paths, configuration, the wire protocol, the socket server and
//! the built-in job kinds. The binaries are thin `main`s over this.
//!
//! Where things are: `config` (layered configuration), `logging`,
//! `protocol` (request parsing, response lines), `metrics` (Prometheus
//! text and the optional HTTP endpoint), `ops` (running requests
//! against the runtime), `session` (one actor per connection), `server`
//! (socket, accept loop, shutdown), `auth` (allow-lists), `client` (the
//! blocking client `jobctl` uses), `progress` and `top` (`jobctl`'s
//! progress bars and dashboard), `kinds` (job kinds), `daemon` (start-up:
//! config to running server), `systemd` (sd_notify, watchdog, socket
//! activation), `reload` (SIGHUP: apply a new configuration live).

pub mod auth;
pub mod client;
pub mod config;
pub mod daemon;
pub mod kinds;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod paths;
pub mod progress;
pub mod protocol;
pub mod reload;
pub mod server;
pub mod session;
pub mod systemd;
pub mod top;
