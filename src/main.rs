//! `jobd`, the job daemon: parse flags, load the layered configuration,
//! set up logging, then run (see `jobd::daemon`). Exit status: 0 after a
//! clean shutdown, 1 when the daemon failed, 2 for a configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use jobd::config::{Config, Durability, LogFormat, Overrides};
use jobd::{daemon, logging, systemd};

/// jobd: an actor-based job daemon serving a Unix socket.
///
/// Configuration, lowest to highest: built-in defaults, the TOML file
/// (--config, else /etc/jobd/jobd.toml when present), JOBD__SECTION__KEY
/// environment variables, these flags. JOBD_LOG overrides the log filter.
#[derive(Debug, Parser)]
#[command(name = "jobd", version)]
struct Args {
    /// Configuration file (TOML; see config/jobd.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH", env = "JOBD_SOCKET")]
    socket: Option<PathBuf>,
    /// State directory.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// How safely jobs are stored.
    #[arg(long, value_enum)]
    durability: Option<Durability>,
    /// Log filter (info, debug, jobd=debug,warn, ...).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log line format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    // SAFETY: the first thing main does, before any thread exists: it reads
    // and removes the LISTEN_* and WATCHDOG_* variables.
    #[allow(unsafe_code)]
    let service = unsafe { systemd::take_service_env() };
    let args = Args::parse();
    let over = Overrides {
        config_file: args.config,
        socket: args.socket.filter(|p| !p.as_os_str().is_empty()),
        state_dir: args.state_dir,
        durability: args.durability,
        log_level: args.log_level,
        log_format: args.log_format,
    };
    let loaded = match Config::load(&over) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("jobd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init(&loaded.config.log_level, loaded.config.log_format) {
        eprintln!("jobd: {e}");
        return ExitCode::from(2);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %loaded.file.as_ref().map_or("(none)".into(), |f| f.display().to_string()),
        durability = loaded.config.durability.as_str(),
        "jobd starting"
    );
    match daemon::run(loaded.config, over, service) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobd: {e}");
            ExitCode::from(1)
        }
    }
}
