//! Who may use the socket: the `[auth]` allow-lists resolved at start-up
//! (group names looked up once), checked against each connection's peer
//! credentials, and `LiveAuth`, the lists in effect, which a configuration
//! reload replaces. Also the group lookup used for `socket_group`.
//!
//! A connection's `Credentials` are read once, when it is accepted: uid,
//! primary gid and pid from `SO_PEERCRED`, and the supplementary groups
//! from `SO_PEERGROUPS` (Linux 4.13 and later). Both describe the peer as it
//! was when it called `connect`, so a process that changes its ids later
//! cannot gain access. When `SO_PEERGROUPS` is not available the groups come
//! from the `Groups:` line of `/proc/PID/status`, read only if that
//! process's effective uid and gid still match (a weaker check: the pid may
//! have changed hands or the process its groups since it connected). If
//! neither works, only the primary gid counts, and a warning is logged.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use jobd_actors::Peer;

use crate::config::{AuthConfig, GroupRef};

/// The allow-lists, ready to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// Allowed uids.
    uids: HashSet<u32>,
    /// Allowed gids, matched against the primary and supplementary groups.
    gids: HashSet<u32>,
}

/// Who is at the other end of a connection, as the kernel saw it when the
/// peer connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Effective uid, effective (primary) gid and pid (`SO_PEERCRED`); what
    /// jobs submitted on the connection record as their submitter.
    pub peer: Peer,
    /// Supplementary group ids; empty when they could not be read (then
    /// only `peer.gid` is matched against `allow_groups`).
    pub groups: Vec<u32>,
}

impl Credentials {
    /// The credentials of the process at the other end of the connected
    /// Unix socket `sock`. Fails only when `SO_PEERCRED` does; trouble
    /// reading the supplementary groups is logged and leaves them empty.
    pub fn of(sock: impl AsFd) -> io::Result<Credentials> {
        let fd = sock.as_fd();
        let peer = peer_cred(fd)?;
        let groups = match peer_groups(fd) {
            Ok(g) => g,
            Err(e) => match proc_groups(&peer) {
                Ok(g) => {
                    tracing::debug!("SO_PEERGROUPS failed ({e}); groups read from /proc");
                    g
                }
                Err(e2) => {
                    tracing::warn!(
                        uid = peer.uid,
                        pid = peer.pid,
                        "cannot read the peer's supplementary groups (SO_PEERGROUPS: {e}; \
                         /proc: {e2}); only its primary gid is matched against allow_groups"
                    );
                    Vec::new()
                }
            },
        };
        Ok(Credentials { peer, groups })
    }
}

/// `SO_PEERCRED`: the peer's pid, effective uid and effective gid.
fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<Peer> {
    // SAFETY: all-zero bytes are a valid `ucred` (three integers).
    #[allow(unsafe_code)]
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live and exclusively borrowed for the
    // call, and `len` says how many bytes `cred` has.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        uid: cred.uid,
        gid: cred.gid,
        pid: cred.pid,
    })
}

/// `SO_PEERGROUPS` (Linux ≥ 4.13); the kernel answers `ERANGE` with the
/// size it needs when the buffer is too small.
fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: the buffer is live, exclusively borrowed and `len` bytes
        // long; the kernel writes at most `len` bytes and updates `len`.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // NGROUPS_MAX is 65536: a bigger answer is not worth believing.
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
}

/// The fallback: supplementary groups of `peer.pid` from /proc.
fn proc_groups(peer: &Peer) -> io::Result<Vec<u32>> {
    if peer.pid <= 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no peer pid"));
    }
    let text = std::fs::read_to_string(format!("/proc/{}/status", peer.pid))?;
    groups_from_status(&text, peer).map_err(io::Error::other)
}

/// The `Groups:` line of a `/proc/PID/status` text, provided its `Uid:` and
/// `Gid:` lines show the peer's effective uid and gid (the second field):
/// otherwise the pid names another process now, or one whose ids changed.
fn groups_from_status(text: &str, peer: &Peer) -> Result<Vec<u32>, String> {
    let line = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .ok_or_else(|| format!("no {name}: line"))
    };
    let ids = |name: &str| -> Result<Vec<u32>, String> {
        line(name)?
            .split_whitespace()
            .map(|t| t.parse().map_err(|_| format!("bad {name}: entry '{t}'")))
            .collect()
    };
    let effective = |name: &str| -> Result<u32, String> {
        ids(name)?
            .get(1)
            .copied()
            .ok_or_else(|| format!("short {name}: line"))
    };
    if effective("Uid")? != peer.uid || effective("Gid")? != peer.gid {
        return Err(format!(
            "process {} no longer has the credentials it connected with",
            peer.pid
        ));
    }
    ids("Groups")
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

    /// May this peer send requests? Its uid must be listed, or its primary
    /// gid or one of its supplementary groups. Unknown credentials pass only
    /// when the lists are empty.
    pub fn allows(&self, creds: Option<&Credentials>) -> bool {
        if self.is_open() {
            return true;
        }
        creds.is_some_and(|c| {
            self.uids.contains(&c.peer.uid)
                || self.gids.contains(&c.peer.gid)
                || c.groups.iter().any(|g| self.gids.contains(g))
        })
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
    pub fn allows(&self, creds: Option<&Credentials>) -> bool {
        // Nobody panics while holding the lock; a poisoned value is whole.
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allows(creds)
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

    fn creds(uid: u32, gid: u32, groups: &[u32]) -> Credentials {
        Credentials {
            peer: Peer { uid, gid, pid: 1 },
            groups: groups.to_vec(),
        }
    }

    fn lists(uids: &[u32], gids: &[u32]) -> Auth {
        Auth::from_config(&AuthConfig {
            allow_uids: uids.to_vec(),
            allow_groups: gids.iter().map(|g| GroupRef::Id(*g)).collect(),
        })
        .unwrap()
    }

    /// This process's supplementary groups, from getgroups(2).
    fn own_groups() -> Vec<u32> {
        let mut g: Vec<libc::gid_t> = vec![0; 65536];
        // SAFETY: the buffer holds as many gids as we say.
        #[allow(unsafe_code)]
        let n = unsafe { libc::getgroups(g.len() as libc::c_int, g.as_mut_ptr()) };
        assert!(n >= 0);
        g.truncate(n as usize);
        g.sort_unstable();
        g
    }

    #[test]
    fn empty_lists_allow_everyone() {
        let a = Auth::from_config(&AuthConfig::default()).unwrap();
        assert!(a.allows(Some(&creds(5, 5, &[]))));
        assert!(a.allows(None));
    }

    #[test]
    fn uid_primary_gid_or_a_supplementary_group_must_match() {
        let a = lists(&[1000], &[50]);
        assert!(a.allows(Some(&creds(1000, 1, &[]))));
        assert!(a.allows(Some(&creds(7, 50, &[]))));
        assert!(a.allows(Some(&creds(7, 8, &[3, 50, 9]))));
        assert!(!a.allows(Some(&creds(7, 8, &[3, 9]))));
        assert!(!a.allows(Some(&creds(0, 0, &[]))));
        assert!(!a.allows(None));
        // A supplementary group never stands in for a uid.
        assert!(!lists(&[50], &[]).allows(Some(&creds(7, 8, &[50]))));
    }

    const STATUS: &str = "Name:\tjobctl\nUmask:\t0022\nState:\tS (sleeping)\n\
        Tgid:\t4242\nPid:\t4242\nPPid:\t1\n\
        Uid:\t1000\t1001\t1001\t1001\nGid:\t100\t101\t101\t101\n\
        FDSize:\t64\nGroups:\t4 24 27 1001 \nNStgid:\t4242\n";

    fn peer_of(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: 4242,
        }
    }

    #[test]
    fn proc_status_groups_are_read_when_the_effective_ids_match() {
        assert_eq!(
            groups_from_status(STATUS, &peer_of(1001, 101)).unwrap(),
            [4, 24, 27, 1001]
        );
        let empty = STATUS.replace("Groups:\t4 24 27 1001 ", "Groups:\t");
        assert_eq!(
            groups_from_status(&empty, &peer_of(1001, 101)).unwrap(),
            Vec::<u32>::new()
        );
        // Real ids (first field) are not what SO_PEERCRED reports.
        for p in [peer_of(1000, 101), peer_of(1001, 100), peer_of(0, 0)] {
            let e = groups_from_status(STATUS, &p).unwrap_err();
            assert!(e.contains("no longer"), "{e}");
        }
    }

    #[test]
    fn malformed_proc_status_is_an_error() {
        let p = peer_of(1001, 101);
        let no_groups = STATUS.replace("Groups:", "Grps:");
        assert!(groups_from_status(&no_groups, &p).is_err());
        let bad = STATUS.replace("27", "x7");
        assert!(groups_from_status(&bad, &p).unwrap_err().contains("x7"));
        let short = STATUS.replace("Uid:\t1000\t1001\t1001\t1001", "Uid:\t1001");
        assert!(groups_from_status(&short, &p).is_err());
        assert!(groups_from_status("", &p).is_err());
    }

    #[test]
    fn a_socket_peer_has_our_ids_and_our_supplementary_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = Credentials::of(&a).unwrap();
        // SAFETY: these cannot fail.
        #[allow(unsafe_code)]
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!(c.peer.uid, uid);
        assert_eq!(c.peer.gid, gid);
        assert_eq!(c.peer.pid as u32, std::process::id());
        let mut g = c.groups.clone();
        g.sort_unstable();
        assert_eq!(g, own_groups());
        // The fallback agrees.
        let mut g = proc_groups(&c.peer).unwrap();
        g.sort_unstable();
        assert_eq!(g, own_groups());
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
