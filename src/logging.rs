//! Logging set-up: tracing-subscriber with an `EnvFilter` (`JOBD_LOG` first,
//! then the configured `log_level`), text or JSON lines on stderr. No ANSI
//! colours unless stderr is a terminal; no timestamps of our own when
//! stderr is journald's stream (journald stamps every line itself). The
//! filter sits behind a reload layer so that a configuration reload
//! (SIGHUP) can change the level of a running daemon (`set_level`).

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

/// Environment variable with a log filter that wins over the config.
pub const LOG_ENV: &str = "JOBD_LOG";

/// True when `JOURNAL_STREAM` (`"<dev>:<inode>"`, set by systemd) names the
/// file that stderr is: then journald adds timestamps itself.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// The filter: `JOBD_LOG` if set and valid, else `level`.
fn filter(level: &str) -> Result<(EnvFilter, Option<String>), String> {
    if let Ok(spec) = std::env::var(LOG_ENV)
        && !spec.trim().is_empty()
    {
        match EnvFilter::try_new(&spec) {
            Ok(f) => return Ok((f, None)),
            Err(e) => {
                let fallback =
                    EnvFilter::try_new(level).map_err(|e| format!("log_level {level:?}: {e}"))?;
                return Ok((fallback, Some(format!("ignoring {LOG_ENV}={spec:?}: {e}"))));
            }
        }
    }
    EnvFilter::try_new(level)
        .map(|f| (f, None))
        .map_err(|e| format!("log_level {level:?}: {e}"))
}

/// Swaps the installed filter (set once by `init`).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Install the global subscriber. Fails on a bad `log_level`; a bad
/// `JOBD_LOG` falls back to `log_level` with a warning.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let (filter, warning) = filter(level)?;
    let ansi = std::io::stderr().is_terminal();
    let journal = stderr_is_journal();
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    let fmt = match (format, journal) {
        (LogFormat::Text, false) => fmt.boxed(),
        (LogFormat::Text, true) => fmt.without_time().boxed(),
        (LogFormat::Json, false) => fmt.json().boxed(),
        (LogFormat::Json, true) => fmt.json().without_time().boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    let _ = FILTER.set(handle);
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// What `set_level` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChange {
    /// The new filter is in effect.
    Applied,
    /// `JOBD_LOG` is set (and valid): it keeps winning over `log_level`.
    EnvWins,
}

/// Replace the running filter with `level` (a reload), unless `JOBD_LOG`
/// overrides the configured level, as it does at start. An invalid `level`
/// is an error and leaves the filter as it was.
pub fn set_level(level: &str) -> Result<LevelChange, String> {
    let new = EnvFilter::try_new(level).map_err(|e| format!("log_level {level:?}: {e}"))?;
    let env_wins = std::env::var(LOG_ENV)
        .ok()
        .is_some_and(|s| !s.trim().is_empty() && EnvFilter::try_new(&s).is_ok());
    if env_wins {
        return Ok(LevelChange::EnvWins);
    }
    let handle = FILTER
        .get()
        .ok_or_else(|| "the logger is not installed".to_string())?;
    handle
        .reload(new)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    Ok(LevelChange::Applied)
}
