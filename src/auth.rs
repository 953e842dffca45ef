//! Who may use the socket: the `[auth]` allow-lists resolved at start-up
//! (group names looked up once), checked against each connection's peer
//! credentials (`SO_PEERCRED`), and `LiveAuth`, the lists in effect, which
//! a configuration reload replaces. Also the group lookup used for
//! `socket_group`.

use std::collections::HashSet;
use std::ffi::CString;

use jobd_actors::Peer;

use crate::config::{AuthConfig, GroupRef};

/// The allow-lists, ready to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// Allowed uids.
    uids: HashSet<u32>,
    /// Allowed primary gids.
    gids: HashSet<u32>,
}

impl Auth {
    /// Resolve group names; an unknown group stops start-up.
    pub fn from_config(cfg: &AuthConfig) -> Result<Auth, String> {
        let mut gids = HashSet::new();
        for g in &cfg.allow_groups {
            gids.insert(resolve_group(g)?);
        }
        Ok(Auth {
            uids: cfg.allow_uids.iter().copied().collect(),
            gids,
        })
    }

    /// True when no allow-list is configured: the socket's mode decides.
    pub fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// May this peer send requests? Unknown credentials pass only when the
    /// lists are empty. Groups are matched against the peer's primary gid
    /// (what `SO_PEERCRED` reports); supplementary groups are not seen.
    pub fn allows(&self, peer: Option<&Peer>) -> bool {
        if self.is_open() {
            return true;
        }
        peer.is_some_and(|p| self.uids.contains(&p.uid) || self.gids.contains(&p.gid))
    }
}

/// The allow-lists in effect, shared by every session and replaced as a
/// whole by a configuration reload (SIGHUP). Sessions check them on every
/// request, so a reload takes effect at once, on open connections too.
#[derive(Debug, Default)]
pub struct LiveAuth(std::sync::RwLock<Auth>);

impl LiveAuth {
    /// Start with these lists.
    pub fn new(auth: Auth) -> LiveAuth {
        LiveAuth(std::sync::RwLock::new(auth))
    }

    /// May this peer send requests (under the lists in effect now)?
    pub fn allows(&self, peer: Option<&Peer>) -> bool {
        // Nobody panics while holding the lock; a poisoned value is whole.
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allows(peer)
    }

    /// Put new lists in effect.
    pub fn set(&self, auth: Auth) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = auth;
    }
}

/// A group by number, or by name through the system's group database.
pub fn resolve_group(g: &GroupRef) -> Result<u32, String> {
    match g {
        GroupRef::Id(n) => Ok(*n),
        GroupRef::Name(name) => match group_id(name) {
            Ok(Some(gid)) => Ok(gid),
            Ok(None) => Err(format!("no group named '{name}'")),
            Err(e) => Err(format!("cannot look up group '{name}': {e}")),
        },
    }
}

/// Look a group name up with `getgrnam_r` (so NSS sources count too).
pub fn group_id(name: &str) -> std::io::Result<Option<u32>> {
    let cname = CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in group name"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: `group` is plain old data that getgrnam_r fills in; all
        // pointers passed are valid for the duration of the call and `buf`
        // is as long as we say. The strings it points into live in `buf`,
        // which we do not read through the struct (only `gr_gid`).
        #[allow(unsafe_code)]
        let (rc, found, gid) = unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut result: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            (rc, !result.is_null(), grp.gr_gid)
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        return Ok(found.then_some(gid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer { uid, gid, pid: 1 }
    }

    #[test]
    fn empty_lists_allow_everyone() {
        let a = Auth::from_config(&AuthConfig::default()).unwrap();
        assert!(a.allows(Some(&peer(5, 5))));
        assert!(a.allows(None));
    }

    #[test]
    fn uid_or_primary_gid_must_match() {
        let a = Auth::from_config(&AuthConfig {
            allow_uids: vec![1000],
            allow_groups: vec![GroupRef::Id(50)],
        })
        .unwrap();
        assert!(a.allows(Some(&peer(1000, 1))));
        assert!(a.allows(Some(&peer(7, 50))));
        assert!(!a.allows(Some(&peer(0, 0))));
        assert!(!a.allows(None));
    }

    #[test]
    fn group_names_resolve() {
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-jobd").unwrap(), None);
        assert!(
            Auth::from_config(&AuthConfig {
                allow_uids: vec![],
                allow_groups: vec![GroupRef::Name("no-such-group-jobd".into())],
            })
            .is_err()
        );
    }
}
