//! The `exec` job kind (placeholder on the daemon branch). The real kind
//! (argv without a shell, allow-list, cleared environment, capped output,
//! process-group kill) lands from the jobctl/exec branch; this file only
//! fixes the shared interface so the daemon compiles against it. It
//! registers nothing.

use std::path::PathBuf;

use jobd_actors::RuntimeBuilder;
use serde::{Deserialize, Serialize};

/// The `[exec]` table of the configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// `exec` is off unless this is true.
    pub enabled: bool,
    /// Programs that may be run (absolute paths).
    pub allow: Vec<PathBuf>,
    /// Names of daemon environment variables passed through to children.
    pub env: Vec<String>,
    /// Output kept per stream, in bytes.
    pub max_output_bytes: usize,
    /// Default timeout of an `exec` job, in seconds.
    pub timeout_secs: u64,
    /// The pool `exec` jobs run on.
    pub pool: String,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            enabled: false,
            allow: Vec::new(),
            env: vec!["PATH".to_string()],
            max_output_bytes: 1 << 20,
            timeout_secs: 60,
            pool: "default".to_string(),
        }
    }
}

/// Register the `exec` kind when enabled (placeholder: registers nothing).
pub fn register(b: RuntimeBuilder, _cfg: &ExecConfig) -> RuntimeBuilder {
    b
}
