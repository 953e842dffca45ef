//! Command kinds from `[kinds.NAME]` tables (placeholder on the daemon
//! branch). The real implementation (placeholder substitution, stdin
//! payload) lands from the jobctl/exec branch; this file only fixes the
//! shared interface so the daemon compiles against it. It registers nothing.

use std::collections::BTreeMap;

use jobd_actors::RuntimeBuilder;
use serde::{Deserialize, Serialize};

use super::exec::ExecConfig;

fn default_pool() -> String {
    "default".to_string()
}

/// One `[kinds.NAME]` table: a named command operators expose as a job kind.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandKind {
    /// Program and arguments; `{field}` placeholders take payload fields.
    pub argv: Vec<String>,
    /// The pool its jobs run on.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Per-attempt timeout in seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Attempts in all.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Also pass the payload as JSON on stdin.
    #[serde(default)]
    pub stdin_payload: bool,
}

/// Register every command kind (placeholder: registers nothing).
pub fn register(
    b: RuntimeBuilder,
    _kinds: &BTreeMap<String, CommandKind>,
    _exec: &ExecConfig,
) -> Result<RuntimeBuilder, String> {
    Ok(b)
}
