//! Job kinds the daemon registers: the built-ins (`echo`, `sleep`), the
//! `exec` kind (off unless configured) and the operator's command kinds from
//! `[kinds.NAME]` tables.

pub mod builtin;
pub mod command;
pub mod exec;

use jobd_actors::RuntimeBuilder;

use crate::config::Config;

/// Register every kind the configuration asks for: `echo`, `sleep`, then
/// `exec` and the command kinds.
pub fn register_all(b: RuntimeBuilder, cfg: &Config) -> Result<RuntimeBuilder, String> {
    let b = builtin::register(b);
    let b = exec::register(b, &cfg.exec);
    command::register(b, &cfg.kinds, &cfg.exec)
}
