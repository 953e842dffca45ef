//! The daemon's configuration: the `Config` struct with its built-in
//! defaults, and loading it in layers with config-rs, lowest to highest:
//! defaults → TOML file (`--config FILE`, else `/etc/jobd/jobd.toml` when it
//! exists) → environment `JOBD__SECTION__KEY` → command-line flags.
//!
//! An unknown key or a value of the wrong type stops start-up with a message
//! that names the key and where it came from (the file or the environment).
//! `config/jobd.toml` documents every key. Nothing here touches the socket or
//! the runtime; `main` and `server` use the result.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::kinds::command::CommandKind;
use crate::kinds::exec::ExecConfig;

/// The configuration file read when `--config` is not given, if it exists.
pub const SYSTEM_CONFIG_FILE: &str = "/etc/jobd/jobd.toml";

/// Prefix of configuration environment variables (`JOBD__POOLS__IO__THREADS`).
pub const ENV_PREFIX: &str = "JOBD";

/// Separator between the prefix and the sections of an environment key.
pub const ENV_SEPARATOR: &str = "__";

/// The fewest requests a connection may have in flight (DESIGN.md: at least
/// 64 before the daemon stops reading from it).
pub const MIN_IN_FLIGHT: usize = 64;

/// Longest time any `*_secs` setting may name: ten years.
pub const MAX_SECS: u64 = 10 * 365 * 24 * 3600;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` names a file that cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not parse, has an unknown key or a wrongly typed value.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A `JOBD__…` environment variable is unknown or has a bad value.
    #[error("environment (JOBD__SECTION__KEY variables): {0}")]
    Env(String),
    /// The values parse but do not make sense together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How safely jobs are kept: `fsync` and `os` use the SQLite store in the
/// state directory, `memory` keeps nothing across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Survive power loss: fsync every commit.
    Fsync,
    /// Survive a process crash: leave flushing to the OS.
    #[default]
    Os,
    /// Keep nothing across restarts.
    Memory,
}

impl Durability {
    /// The config and flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Os => "os",
            Durability::Memory => "memory",
        }
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A file mode written in octal (`"0660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(0o660)
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl SocketMode {
    /// Parse octal digits, with an optional `0o` prefix.
    pub fn parse(s: &str) -> Result<SocketMode, String> {
        let digits = s.trim().trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(SocketMode(m)),
            _ => Err(format!(
                "socket_mode must be octal digits up to 0777, like \"0660\" (got {s:?})"
            )),
        }
    }
}

impl Serialize for SocketMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ModeVisitor;
        impl Visitor<'_> for ModeVisitor {
            type Value = SocketMode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an octal mode as a string, like \"0660\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketMode, E> {
                SocketMode::parse(v).map_err(E::custom)
            }
            // The environment layer turns `0660` into the number 660: read
            // its decimal digits as the octal digits the user typed.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SocketMode, E> {
                SocketMode::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SocketMode, E> {
                SocketMode::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(ModeVisitor)
    }
}

/// A group named by name or by number in `[auth] allow_groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum GroupRef {
    /// A numeric gid.
    Id(u32),
    /// A group name, looked up in the group database at start-up.
    Name(String),
}

/// The `[auth]` table: who may use the socket beyond its file mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Peer uids allowed. Both lists empty: anyone who can open the socket.
    #[serde(deserialize_with = "one_or_many_uids")]
    pub allow_uids: Vec<u32>,
    /// Groups allowed (names or gids), matched against the peer's primary
    /// gid and its supplementary groups (see `auth`).
    #[serde(deserialize_with = "one_or_many_groups")]
    pub allow_groups: Vec<GroupRef>,
}

impl AuthConfig {
    /// True when both lists are empty: the socket's mode alone decides.
    pub fn is_open(&self) -> bool {
        self.allow_uids.is_empty() && self.allow_groups.is_empty()
    }
}

/// One `[pools.NAME]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Worker threads; default: the number of CPUs.
    pub threads: Option<usize>,
    /// Jobs that may wait (queued or delayed) before submits get
    /// `queue_full`; default 10,000.
    pub max_queued: Option<usize>,
}

/// Default `max_queued` of a pool.
pub const DEFAULT_MAX_QUEUED: usize = 10_000;

impl PoolSettings {
    /// Threads, defaulting to the number of CPUs.
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// `max_queued`, defaulted.
    pub fn max_queued(&self) -> usize {
        self.max_queued.unwrap_or(DEFAULT_MAX_QUEUED)
    }
}

/// The `[metrics]` table: the optional HTTP endpoint for Prometheus.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics`: a loopback `ADDRESS:PORT`
    /// (`127.0.0.1:9464`, `[::1]:9464`, `localhost:9464`) or an absolute
    /// Unix socket path. Unset (the default): no endpoint; the `metrics` op
    /// on the job socket works either way.
    pub listen: Option<String>,
}

/// Where the metrics endpoint listens, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// A loopback TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix stream socket.
    Unix(PathBuf),
}

impl MetricsConfig {
    /// The endpoint's address, if one is configured: only loopback
    /// addresses and absolute Unix socket paths are accepted, so the
    /// endpoint is never reachable from another machine by accident.
    pub fn endpoint(&self) -> Result<Option<MetricsListen>, ConfigError> {
        let Some(raw) = self.listen.as_deref() else {
            return Ok(None);
        };
        let s = raw.trim();
        if s.starts_with('/') {
            return Ok(Some(MetricsListen::Unix(PathBuf::from(s))));
        }
        let bad = |why: &str| {
            ConfigError::Invalid(format!(
                "metrics.listen = {raw:?}: {why}; use a loopback address such as \
                 \"127.0.0.1:9464\" or \"[::1]:9464\", or an absolute Unix socket path"
            ))
        };
        let addr: std::net::SocketAddr = match s.strip_prefix("localhost:") {
            Some(port) => {
                let port: u16 = port.parse().map_err(|_| bad("not a port number"))?;
                (std::net::Ipv4Addr::LOCALHOST, port).into()
            }
            None => s
                .parse()
                .map_err(|_| bad("not an IP address with a port"))?,
        };
        if !addr.ip().is_loopback() {
            return Err(bad(
                "only loopback addresses are allowed (metrics carry no authentication)",
            ));
        }
        Ok(Some(MetricsListen::Tcp(addr)))
    }
}

/// One `[kinds.NAME]` table. With `argv` it declares a command kind (see
/// `kinds::command`); without `argv` it sets the defaults of a built-in
/// kind (`echo`, `sleep`, `exec`): `max_attempts`, `backoff` and (except
/// for `exec`, whose timeout is `[exec] timeout_secs`) `timeout_secs`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KindSettings {
    /// Command kinds: the program (absolute path) and its arguments.
    pub argv: Option<Vec<String>>,
    /// Command kinds: the pool they run on (default `default`).
    pub pool: Option<String>,
    /// Per-attempt timeout in seconds, 0 for none. Command kinds default to
    /// `[exec] timeout_secs`, built-in kinds to none.
    pub timeout_secs: Option<u64>,
    /// Attempts in all when a submission does not say (default 1).
    pub max_attempts: Option<u32>,
    /// Command kinds: also write the payload as JSON to stdin.
    pub stdin_payload: Option<bool>,
    /// Retry backoff when a submission does not say.
    pub backoff: Option<BackoffSettings>,
}

/// `backoff = { base_ms = 1000, factor = 2, max_ms = 300000 }` of a kind;
/// missing members take these defaults (as on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffSettings {
    /// Delay before the first retry, in milliseconds.
    pub base_ms: Option<u64>,
    /// Growth per further retry (1 to 100).
    pub factor: Option<f64>,
    /// Longest single delay, in milliseconds.
    pub max_ms: Option<u64>,
}

impl BackoffSettings {
    /// The backoff, defaults filled in.
    pub fn to_backoff(self) -> jobd_actors::Backoff {
        let d = jobd_actors::Backoff::default();
        jobd_actors::Backoff {
            base_ms: self.base_ms.unwrap_or(d.base_ms),
            factor: self.factor.unwrap_or(d.factor),
            max_ms: self.max_ms.unwrap_or(d.max_ms),
        }
    }
}

impl KindSettings {
    /// The command kind this table declares, if it has `argv`.
    pub fn command(&self) -> Option<CommandKind> {
        Some(CommandKind {
            argv: self.argv.clone()?,
            pool: self
                .pool
                .clone()
                .unwrap_or_else(|| jobd_actors::DEFAULT_POOL.to_string()),
            timeout_secs: self.timeout_secs,
            max_attempts: self.max_attempts,
            stdin_payload: self.stdin_payload.unwrap_or(false),
        })
    }

    /// Check the values of table `kinds.NAME`.
    fn validate(&self, name: &str) -> Result<(), String> {
        use crate::kinds::command::RESERVED_KINDS;
        use crate::protocol::{MAX_ATTEMPTS, MAX_DURATION_MS};
        let at = format!("kinds.{name}");
        if name.is_empty() {
            return Err("a [kinds] table needs a non-empty name".into());
        }
        if self.argv.is_none() {
            if !RESERVED_KINDS.contains(&name) {
                return Err(format!(
                    "{at}: argv is missing (a command kind needs argv; a table without \
                     argv sets the defaults of a built-in kind: {})",
                    RESERVED_KINDS.join(", ")
                ));
            }
            for (key, set) in [
                ("pool", self.pool.is_some()),
                ("stdin_payload", self.stdin_payload.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "{at}: {key} is for command kinds (with argv), not for the built-in kind '{name}'"
                    ));
                }
            }
            if name == crate::kinds::exec::EXEC_KIND && self.timeout_secs.is_some() {
                return Err(format!(
                    "{at}: the exec kind's timeout is [exec] timeout_secs"
                ));
            }
        }
        if let Some(n) = self.max_attempts
            && (n == 0 || u64::from(n) > MAX_ATTEMPTS)
        {
            return Err(format!(
                "{at}.max_attempts must be between 1 and {MAX_ATTEMPTS} (got {n})"
            ));
        }
        if self.timeout_secs.is_some_and(|t| t > MAX_SECS) {
            return Err(format!(
                "{at}.timeout_secs must be at most {MAX_SECS} (ten years)"
            ));
        }
        if let Some(b) = self.backoff {
            let b = b.to_backoff();
            for (key, ms) in [("base_ms", b.base_ms), ("max_ms", b.max_ms)] {
                if ms > MAX_DURATION_MS {
                    return Err(format!(
                        "{at}.backoff.{key} must be at most {MAX_DURATION_MS} (one year)"
                    ));
                }
            }
            if !(1.0..=100.0).contains(&b.factor) {
                return Err(format!(
                    "{at}.backoff.factor must be between 1 and 100 (got {})",
                    b.factor
                ));
            }
        }
        Ok(())
    }
}

/// Everything the daemon can be configured with. Field names are the TOML
/// keys; `config/jobd.toml` documents each.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The Unix socket to listen on; default from `paths`.
    pub socket: Option<PathBuf>,
    /// Where the store keeps its files; default from `paths`.
    pub state_dir: Option<PathBuf>,
    /// `fsync`, `os` or `memory`.
    pub durability: Durability,
    /// How long finished jobs are kept for `status`, in seconds.
    pub result_ttl_secs: u64,
    /// How long a shutdown lets running jobs finish, in seconds.
    pub shutdown_timeout_secs: u64,
    /// Longest request line, in bytes; longer ones get `too_large` and a
    /// close.
    pub max_frame_bytes: usize,
    /// Connections served at once; more get `unavailable` and a close.
    pub max_connections: usize,
    /// Close a connection with nothing in flight and no traffic for this
    /// many seconds (0 = never). Also how long a write may stall.
    pub idle_timeout_secs: u64,
    /// Requests one connection may have in flight before the daemon stops
    /// reading from it (at least 64).
    pub max_in_flight: usize,
    /// File mode of the socket, octal.
    pub socket_mode: SocketMode,
    /// Group owning the socket (name or number), if set.
    pub socket_group: Option<String>,
    /// Log filter when `JOBD_LOG` is not set (`info`, `debug`,
    /// `jobd=debug,warn`, …).
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Who may use the socket.
    pub auth: AuthConfig,
    /// Worker pools by name; `default` always exists.
    pub pools: BTreeMap<String, PoolSettings>,
    /// The `exec` kind.
    pub exec: ExecConfig,
    /// Command kinds, and defaults of built-in kinds, by name.
    pub kinds: BTreeMap<String, KindSettings>,
    /// The optional Prometheus endpoint.
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: None,
            state_dir: None,
            durability: Durability::default(),
            result_ttl_secs: 86_400,
            shutdown_timeout_secs: 30,
            max_frame_bytes: 1 << 20,
            max_connections: 1024,
            idle_timeout_secs: 300,
            max_in_flight: MIN_IN_FLIGHT,
            socket_mode: SocketMode::default(),
            socket_group: None,
            log_level: "info".to_string(),
            log_format: LogFormat::default(),
            auth: AuthConfig::default(),
            pools: BTreeMap::new(),
            exec: ExecConfig::default(),
            kinds: BTreeMap::new(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// What the command line overrides (the highest layer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--config FILE`.
    pub config_file: Option<PathBuf>,
    /// `--socket PATH` (or `JOBD_SOCKET`).
    pub socket: Option<PathBuf>,
    /// `--state-dir DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--durability`.
    pub durability: Option<Durability>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
}

/// Where the configuration came from, for the start-up log line.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The file read, if any.
    pub file: Option<PathBuf>,
}

impl Config {
    /// Load the layered configuration from the real environment.
    pub fn load(over: &Overrides) -> Result<Loaded, ConfigError> {
        let file = match &over.config_file {
            Some(f) => Some(f.clone()),
            None => Some(PathBuf::from(SYSTEM_CONFIG_FILE)).filter(|p| p.exists()),
        };
        Config::load_from(file.as_deref(), None, over).map(|config| Loaded { config, file })
    }

    /// Load from an optional file, the given environment (None: the
    /// process's), and overrides. Used directly by tests.
    pub fn load_from(
        file: Option<&Path>,
        env: Option<config::Map<String, String>>,
        over: &Overrides,
    ) -> Result<Config, ConfigError> {
        let file_source = match file {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
                        path: path.to_path_buf(),
                        source,
                    })?;
                // The file alone first: any error found here is the file's,
                // and the message says so.
                let source = config::File::from_str(&text, config::FileFormat::Toml);
                config::Config::builder()
                    .add_source(source.clone())
                    .build()
                    .and_then(|c| c.try_deserialize::<Config>())
                    .map_err(|e| ConfigError::File {
                        path: path.to_path_buf(),
                        message: e.to_string(),
                    })?;
                Some(source)
            }
        };
        let mut builder = config::Config::builder();
        if let Some(s) = file_source {
            builder = builder.add_source(s);
        }
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("auth.allow_uids")
            .with_list_parse_key("auth.allow_groups")
            .with_list_parse_key("exec.allow")
            .with_list_parse_key("exec.env")
            .source(env);
        let mut cfg: Config = builder
            .add_source(environment)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Env(e.to_string()))?;
        cfg.apply(over);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Apply the command-line layer.
    fn apply(&mut self, over: &Overrides) {
        if let Some(s) = &over.socket {
            self.socket = Some(s.clone());
        }
        if let Some(d) = &over.state_dir {
            self.state_dir = Some(d.clone());
        }
        if let Some(d) = over.durability {
            self.durability = d;
        }
        if let Some(l) = &over.log_level {
            self.log_level = l.clone();
        }
        if let Some(f) = over.log_format {
            self.log_format = f;
        }
    }

    /// Check values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.max_in_flight < MIN_IN_FLIGHT {
            return bad(format!(
                "max_in_flight must be at least {MIN_IN_FLIGHT} (got {})",
                self.max_in_flight
            ));
        }
        if self.max_in_flight > 1_000_000 {
            return bad(format!(
                "max_in_flight is absurdly large ({})",
                self.max_in_flight
            ));
        }
        if self.max_frame_bytes < 1024 {
            return bad(format!(
                "max_frame_bytes must be at least 1024 (got {})",
                self.max_frame_bytes
            ));
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return bad(format!(
                "max_connections must be between 1 and 1000000 (got {})",
                self.max_connections
            ));
        }
        for (key, secs) in [
            ("result_ttl_secs", self.result_ttl_secs),
            ("shutdown_timeout_secs", self.shutdown_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
        ] {
            if secs > MAX_SECS {
                return bad(format!("{key} must be at most {MAX_SECS} (ten years)"));
            }
        }
        for (name, p) in &self.pools {
            if name.is_empty() {
                return bad("a pool needs a non-empty name".into());
            }
            if p.threads == Some(0) {
                return bad(format!("pools.{name}.threads must be at least 1"));
            }
            if p.threads.is_some_and(|t| t > 4096) {
                return bad(format!("pools.{name}.threads is absurdly large"));
            }
            if p.max_queued == Some(0) {
                return bad(format!("pools.{name}.max_queued must be at least 1"));
            }
        }
        for (name, k) in &self.kinds {
            k.validate(name).map_err(ConfigError::Invalid)?;
        }
        if let Some(g) = &self.socket_group
            && g.is_empty()
        {
            return bad("socket_group must not be empty (leave it out instead)".into());
        }
        self.metrics.endpoint()?;
        Ok(())
    }

    /// The pools to build: every `[pools.NAME]`, plus `default` if missing.
    pub fn pool_list(&self) -> Vec<(String, PoolSettings)> {
        let mut pools: Vec<(String, PoolSettings)> = self
            .pools
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        if !self.pools.contains_key(jobd_actors::DEFAULT_POOL) {
            pools.push((
                jobd_actors::DEFAULT_POOL.to_string(),
                PoolSettings::default(),
            ));
        }
        pools
    }

    /// The command kinds: every `[kinds.NAME]` table with `argv`.
    pub fn command_kinds(&self) -> BTreeMap<String, CommandKind> {
        self.kinds
            .iter()
            .filter_map(|(n, k)| Some((n.clone(), k.command()?)))
            .collect()
    }

    /// The idle timeout, None for never.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }
}

// ----- lenient list fields --------------------------------------------------
//
// In the environment a list is written `JOBD__AUTH__ALLOW_UIDS=1000,1001`;
// config-rs turns a single number into a number, not a list. These accept a
// list, a single value, or a comma-separated string.

fn one_or_many<'de, D, T>(d: D, what: &'static str) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw<T> {
        Many(Vec<T>),
        Number(u64),
        Text(String),
    }
    let parse = |s: &str| -> Result<Vec<T>, D::Error> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<T>()
                    .map_err(|e| de::Error::custom(format!("{what}: {p:?}: {e}")))
            })
            .collect()
    };
    match Raw::<T>::deserialize(d) {
        Ok(Raw::Many(v)) => Ok(v),
        Ok(Raw::Number(n)) => parse(&n.to_string()),
        Ok(Raw::Text(s)) => parse(&s),
        Err(_) => Err(de::Error::custom(format!("{what} must be a list"))),
    }
}

fn one_or_many_uids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    one_or_many(d, "allow_uids (a list of numeric uids)")
}

impl std::str::FromStr for GroupRef {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<u32>() {
            Ok(n) => GroupRef::Id(n),
            Err(_) => GroupRef::Name(s.to_string()),
        })
    }
}

impl<'de> Deserialize<'de> for GroupRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Id(u32),
            Name(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Id(n) => GroupRef::Id(n),
            Raw::Name(s) => s.parse().unwrap_or(GroupRef::Name(s)),
        })
    }
}

fn one_or_many_groups<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<GroupRef>, D::Error> {
    one_or_many(d, "allow_groups (a list of group names or gids)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn load(toml: &str, e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobd.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load_from(Some(&path), env(e), &Overrides::default())
    }

    #[test]
    fn defaults_without_file_or_env() {
        let c = Config::load_from(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.socket_mode, SocketMode(0o660));
        assert_eq!(c.max_in_flight, 64);
        let pools = c.pool_list();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].0, "default");
        assert_eq!(pools[0].1.max_queued(), 10_000);
    }

    #[test]
    fn file_then_env_then_flags() {
        let toml = r#"
            socket = "/tmp/from-file.sock"
            max_connections = 10
            socket_mode = "0600"
            [pools.default]
            threads = 2
            max_queued = 5
            [pools.io]
            threads = 3
            [auth]
            allow_uids = [1, 2]
        "#;
        let c = load(
            toml,
            &[
                ("JOBD__POOLS__DEFAULT__MAX_QUEUED", "1000"),
                ("JOBD__MAX_CONNECTIONS", "20"),
                ("JOBD__SOCKET_MODE", "0640"),
                ("JOBD__AUTH__ALLOW_GROUPS", "wheel,100"),
                ("JOBD_SOCKET", "/ignored/not/a/config/key"),
                ("JOBD_LOG", "debug"),
            ],
        )
        .unwrap();
        assert_eq!(c.socket.as_deref(), Some(Path::new("/tmp/from-file.sock")));
        assert_eq!(c.max_connections, 20);
        assert_eq!(c.socket_mode, SocketMode(0o640));
        assert_eq!(c.pools["default"].threads, Some(2));
        assert_eq!(c.pools["default"].max_queued, Some(1000));
        assert_eq!(c.pools["io"].threads(), 3);
        assert_eq!(c.auth.allow_uids, vec![1, 2]);
        assert_eq!(
            c.auth.allow_groups,
            vec![GroupRef::Name("wheel".into()), GroupRef::Id(100)]
        );

        let over = Overrides {
            socket: Some("/tmp/flag.sock".into()),
            durability: Some(Durability::Memory),
            ..Default::default()
        };
        let c = Config::load_from(None, env(&[("JOBD__SOCKET", "/tmp/env.sock")]), &over).unwrap();
        assert_eq!(c.socket.as_deref(), Some(Path::new("/tmp/flag.sock")));
        assert_eq!(c.durability, Durability::Memory);
    }

    #[test]
    fn single_uid_from_env_is_a_list() {
        let c = load("", &[("JOBD__AUTH__ALLOW_UIDS", "1000")]).unwrap();
        assert_eq!(c.auth.allow_uids, vec![1000]);
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let e = load("max_conections = 3\n", &[]).unwrap_err().to_string();
        assert!(e.contains("max_conections"), "{e}");
        assert!(e.contains("jobd.toml"), "{e}");

        let e = load("[pools.io]\nthread = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("thread"), "{e}");
        assert!(e.contains("pools.io"), "{e}");
        assert!(e.contains("jobd.toml"), "{e}");
    }

    #[test]
    fn wrong_types_are_named() {
        let e = load("max_connections = \"many\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connections"), "{e}");
        assert!(e.contains("jobd.toml"), "{e}");
        let e = load("durability = \"sometimes\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("durability") || e.contains("sometimes"), "{e}");

        let e = load("", &[("JOBD__MAX_CONNECTIONS", "lots")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connections"), "{e}");
        assert!(e.contains("environment"), "{e}");
        let e = load("", &[("JOBD__NOPE", "1")]).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    const SHIPPED: &str = include_str!("../config/jobd.toml");

    #[test]
    fn the_shipped_file_loads_to_the_defaults() {
        let c = load(SHIPPED, &[]).unwrap();
        assert_eq!(c.pool_list(), Config::default().pool_list());
        assert_eq!(
            Config {
                pools: BTreeMap::new(),
                ..c
            },
            Config::default()
        );
    }

    #[test]
    fn every_key_the_shipped_file_documents_exists() {
        // Uncomment every `#key = value` and `#[table]` line: still valid.
        let all: String = SHIPPED
            .lines()
            .map(|l| {
                let starts_key = l.strip_prefix('#').is_some_and(|r| {
                    r.starts_with('[') || r.split(" = ").count() > 1 && !r.starts_with(' ')
                });
                if starts_key { &l[1..] } else { l }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = load(&all, &[]).unwrap_or_else(|e| panic!("{e}\n{all}"));
        assert_eq!(c.socket_group.as_deref(), Some("jobd"));
        assert_eq!(c.pools["io"].threads, Some(8));
        assert_eq!(c.command_kinds()["thumbnail"].argv.len(), 5);
        assert_eq!(c.kinds["sleep"].max_attempts, Some(3));
        assert_eq!(c.kinds["thumbnail"].backoff.unwrap().factor, Some(2.0));
        assert_eq!(c.auth.allow_uids, Vec::<u32>::new());
    }

    #[test]
    fn metrics_listen_takes_loopback_or_a_unix_path_only() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.metrics.endpoint().unwrap(), None);
        let c = load("[metrics]\nlisten = \"127.0.0.1:9464\"\n", &[]).unwrap();
        assert_eq!(
            c.metrics.endpoint().unwrap(),
            Some(MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        let c = load("", &[("JOBD__METRICS__LISTEN", "[::1]:9")]).unwrap();
        assert_eq!(
            c.metrics.endpoint().unwrap(),
            Some(MetricsListen::Tcp("[::1]:9".parse().unwrap()))
        );
        let c = load("[metrics]\nlisten = \"localhost:80\"\n", &[]).unwrap();
        assert_eq!(
            c.metrics.endpoint().unwrap(),
            Some(MetricsListen::Tcp("127.0.0.1:80".parse().unwrap()))
        );
        let c = load("[metrics]\nlisten = \"/run/jobd/metrics.sock\"\n", &[]).unwrap();
        assert_eq!(
            c.metrics.endpoint().unwrap(),
            Some(MetricsListen::Unix("/run/jobd/metrics.sock".into()))
        );
        for bad in [
            "0.0.0.0:9464",
            "192.168.1.5:9464",
            "[::]:1",
            "example.com:80",
            "9464",
            "rel/path",
        ] {
            let e = load(&format!("[metrics]\nlisten = \"{bad}\"\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("metrics.listen") && e.contains("loopback"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(load("max_in_flight = 10\n", &[]).is_err());
        assert!(load("socket_mode = \"0999\"\n", &[]).is_err());
        assert!(load("[pools.x]\nthreads = 0\n", &[]).is_err());
        assert!(load("not toml at all [", &[]).is_err());
        assert!(load("shutdown_timeout_secs = 999999999999\n", &[]).is_err());
        assert!(load("max_connections = 0\n", &[]).is_err());
    }

    #[test]
    fn kind_tables_set_defaults_of_builtin_and_command_kinds() {
        let c = load(
            "[kinds.sleep]\nmax_attempts = 4\ntimeout_secs = 9\nbackoff = { base_ms = 250, factor = 3 }\n\
             [kinds.cmd]\nargv = [\"/bin/true\"]\nbackoff = { max_ms = 10 }\n",
            &[],
        )
        .unwrap();
        let sleep = &c.kinds["sleep"];
        assert_eq!(sleep.max_attempts, Some(4));
        assert_eq!(sleep.timeout_secs, Some(9));
        let b = sleep.backoff.unwrap().to_backoff();
        assert_eq!((b.base_ms, b.factor, b.max_ms), (250, 3.0, 300_000));
        assert!(sleep.command().is_none());
        let cmds = c.command_kinds();
        assert_eq!(cmds.keys().collect::<Vec<_>>(), ["cmd"]);
        assert_eq!(cmds["cmd"].pool, "default");
        assert_eq!(c.kinds["cmd"].backoff.unwrap().to_backoff().max_ms, 10);

        // The environment reaches the same keys, numbers as numbers.
        let c = load(
            "",
            &[
                ("JOBD__KINDS__ECHO__MAX_ATTEMPTS", "3"),
                ("JOBD__KINDS__ECHO__BACKOFF__FACTOR", "1.5"),
                ("JOBD__KINDS__ECHO__BACKOFF__BASE_MS", "20"),
            ],
        )
        .unwrap();
        let echo = &c.kinds["echo"];
        assert_eq!(echo.max_attempts, Some(3));
        let b = echo.backoff.unwrap().to_backoff();
        assert_eq!((b.base_ms, b.factor), (20, 1.5));
    }

    #[test]
    fn bad_kind_tables_are_refused_naming_the_key() {
        for (toml, want) in [
            ("[kinds.nope]\nmax_attempts = 2\n", "argv is missing"),
            ("[kinds.echo]\npool = \"io\"\n", "pool"),
            ("[kinds.sleep]\nstdin_payload = true\n", "stdin_payload"),
            ("[kinds.exec]\ntimeout_secs = 5\n", "[exec] timeout_secs"),
            (
                "[kinds.echo]\nmax_attempts = 0\n",
                "kinds.echo.max_attempts",
            ),
            (
                "[kinds.echo]\nmax_attempts = 1001\n",
                "kinds.echo.max_attempts",
            ),
            (
                "[kinds.echo]\nbackoff = { factor = 0.5 }\n",
                "kinds.echo.backoff.factor",
            ),
            (
                "[kinds.echo]\nbackoff = { base_ms = 99999999999999 }\n",
                "kinds.echo.backoff.base_ms",
            ),
            ("[kinds.echo]\nbackoff = { base = 1 }\n", "base"),
            ("[kinds.echo]\nretries = 3\n", "retries"),
        ] {
            let e = load(toml, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{toml}: {e}");
        }
    }
}
