//! Job kinds the daemon registers: the built-ins (`echo`, `sleep`), the
//! `exec` kind (off unless configured) and the operator's command kinds from
//! `[kinds.NAME]` tables; `exec_groups` records the process groups of
//! running exec children and reaps what a killed daemon left of them.

pub mod builtin;
pub mod command;
pub mod exec;
pub mod exec_groups;

use jobd_actors::RuntimeBuilder;

use crate::config::Config;

/// Register every kind the configuration asks for: `echo`, `sleep`, then
/// `exec` and the command kinds; then apply each `[kinds.NAME]` table's
/// defaults (attempts, backoff, timeout) to its kind.
pub fn register_all(b: RuntimeBuilder, cfg: &Config) -> Result<RuntimeBuilder, String> {
    let b = builtin::register(b);
    let b = exec::register(b, &cfg.exec);
    let b = command::register(b, &cfg.command_kinds(), &cfg.exec)?;
    Ok(apply_defaults(b, cfg))
}

/// Set the defaults the `[kinds.NAME]` tables give. Command kinds already
/// took `max_attempts` and `timeout_secs` at registration; `[kinds.exec]`
/// is ignored while exec is off (the kind does not exist then).
fn apply_defaults(mut b: RuntimeBuilder, cfg: &Config) -> RuntimeBuilder {
    for (name, k) in &cfg.kinds {
        if name == exec::EXEC_KIND && !cfg.exec.enabled {
            continue;
        }
        let builtin = k.argv.is_none();
        b = b.kind_defaults(name, |o| {
            if let Some(n) = k.max_attempts {
                o.max_attempts = n;
            }
            if let Some(backoff) = k.backoff {
                o.backoff = backoff.to_backoff();
            }
            if builtin && let Some(t) = k.timeout_secs {
                o.timeout = (t > 0).then(|| std::time::Duration::from_secs(t));
            }
        });
    }
    b
}
