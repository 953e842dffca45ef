//! Default locations shared by `jobd` and `jobctl`, so both agree on where
//! the socket is without configuration.
//!
//! Socket: `--socket`, else `JOBD_SOCKET`, else
//! `$XDG_RUNTIME_DIR/jobd/jobd.sock`, else `/run/jobd/jobd.sock` for root,
//! else `<state dir>/jobd.sock`. `jobctl` falls back to the system-wide
//! `/run/jobd/jobd.sock` when its default does not exist but that one does.
//! State dir: `--state-dir`, else (config) , else `/var/lib/jobd` for root,
//! else `$XDG_STATE_HOME/jobd`, else `~/.local/state/jobd`.

use std::path::PathBuf;

/// Environment variable naming the socket, read by both binaries.
pub const SOCKET_ENV: &str = "JOBD_SOCKET";

/// True when running as uid 0.
pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::getuid() == 0
    }
}

fn non_empty_env(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The default state directory (store, and the socket as a last resort).
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/jobd");
    }
    if let Some(d) = non_empty_env("XDG_STATE_HOME") {
        return d.join("jobd");
    }
    match non_empty_env("HOME") {
        Some(h) => h.join(".local/state/jobd"),
        None => std::env::temp_dir().join(format!("jobd-{}", uid())),
    }
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::getuid()
    }
}

/// The socket path when neither `--socket` nor a config file names one.
/// `state_dir` is the daemon's state directory (for `jobctl`, the default).
pub fn default_socket_path(state_dir: Option<&std::path::Path>) -> PathBuf {
    if let Some(p) = non_empty_env(SOCKET_ENV) {
        return p;
    }
    if let Some(d) = non_empty_env("XDG_RUNTIME_DIR") {
        return d.join("jobd/jobd.sock");
    }
    if is_root() {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    state_dir
        .map(PathBuf::from)
        .unwrap_or_else(default_state_dir)
        .join("jobd.sock")
}

/// The system-wide socket of a jobd run by systemd (`jobd.socket`).
pub const SYSTEM_SOCKET: &str = "/run/jobd/jobd.sock";

/// The socket `jobctl` talks to when none is named: the same default as
/// the daemon's, except that when that socket does not exist but the
/// system-wide one does (a user in the `jobd` group, the daemon run by
/// systemd), the system-wide one.
pub fn client_socket_path() -> PathBuf {
    let own = default_socket_path(None);
    if own.exists() || std::env::var_os(SOCKET_ENV).is_some_and(|v| !v.is_empty()) {
        return own;
    }
    let system = PathBuf::from(SYSTEM_SOCKET);
    if system.exists() { system } else { own }
}
