//! The servers `compare` starts and stops itself: jobd daemons, beanstalkd
//! (the binary run directly, on 127.0.0.1 and a free port, never as a
//! system service), and the echo server (this binary in `serve-echo`
//! mode). Each is killed when its `Server` is dropped. Also: resident
//! memory of a process, from `/proc/PID/status`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a server gets to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Make a server die with this process, even when this one is killed
/// before it can stop it (Ctrl-C, `kill`): nothing is left running.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe, touches no
    // memory of ours, and runs in the child between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// A child process that is killed on drop.
pub struct Server {
    /// The process.
    child: Child,
}

impl Server {
    /// Poll `ready` until it says yes, the child exits, or the time is up.
    fn wait(&mut self, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{what} exited during start-up: {status}");
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what} did not start within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True once a jobd on `socket` answers `hello`.
pub fn says_hello(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"{\"id\":0,\"op\":\"hello\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.contains("\"ok\":true")
}

/// Start a jobd with `durability` and the config text `config`, its files
/// in `dir/name.*`; ready once it answers `hello`.
pub fn jobd(
    bin: &Path,
    dir: &Path,
    name: &str,
    durability: &str,
    config: &str,
) -> Result<(Server, PathBuf)> {
    let state = dir.join(format!("{name}.state"));
    std::fs::create_dir_all(&state)?;
    let socket = dir.join(format!("{name}.sock"));
    let conf = dir.join(format!("{name}.toml"));
    std::fs::write(&conf, config)?;
    let child = die_with_parent(&mut Command::new(bin))
        .arg("--config")
        .arg(&conf)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .args(["--durability", durability])
        .env("JOBD_LOG", "error")
        .env_remove("JOBD_SOCKET")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut s = Server { child };
    s.wait(&format!("jobd ({name})"), || says_hello(&socket))?;
    Ok((s, socket))
}

/// A TCP port on 127.0.0.1 that nobody listens on right now.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Start beanstalkd on 127.0.0.1 and a free port with `args`; its address.
pub fn beanstalkd(bin: &Path, args: &[&str]) -> Result<(Server, String)> {
    let port = free_port()?;
    let child = die_with_parent(&mut Command::new(bin))
        .args(["-l", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let addr = format!("127.0.0.1:{port}");
    let mut s = Server { child };
    s.wait(&format!("beanstalkd {}", args.join(" ")), || {
        TcpStream::connect(&addr).is_ok()
    })?;
    Ok((s, addr))
}

/// Start this binary's echo server on `socket`.
pub fn echo_server(socket: &Path) -> Result<Server> {
    let me = std::env::current_exe()?;
    let child = die_with_parent(&mut Command::new(me))
        .args(["--mode", "serve-echo", "--socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .spawn()?;
    let mut s = Server { child };
    s.wait("the echo server", || UnixStream::connect(socket).is_ok())?;
    Ok(s)
}

/// Resident memory of process `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            let kb = v.trim().trim_end_matches("kB").trim();
            return Ok(kb.parse()?);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

/// The pid of the process at the other end of a Unix socket.
pub fn peer_pid(s: &UnixStream) -> Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into
    // `cred`, a local of that size; the fd is open while `s` is borrowed.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 || cred.pid <= 0 {
        bail!(
            "cannot tell the server's pid: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(cred.pid as u32)
}
