//! Logging set-up: tracing-subscriber with an `EnvFilter` (`JOBD_LOG` first,
//! then the configured `log_level`), text or JSON lines on stderr. No ANSI
//! colours unless stderr is a terminal; no timestamps of our own when
//! stderr is journald's stream (journald stamps every line itself).

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;

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

/// Install the global subscriber. Fails on a bad `log_level`; a bad
/// `JOBD_LOG` falls back to `log_level` with a warning.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let (filter, warning) = filter(level)?;
    let ansi = std::io::stderr().is_terminal();
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    let installed = match (format, journal) {
        (LogFormat::Text, false) => builder.try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Json, false) => builder.json().try_init(),
        (LogFormat::Json, true) => builder.json().without_time().try_init(),
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Ok(())
}
