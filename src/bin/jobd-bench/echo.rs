//! The bare NDJSON echo server: a thread per connection that reads what
//! has arrived (up to 64 KiB) and writes every complete line straight back
//! in one `write`. It parses nothing and allocates nothing per line, so it
//! is the most any server can do per request over the same socket with the
//! same client: the ceiling that jobd's pipelined cycle is measured against.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{Context, Result};

/// Serve on `socket` until killed (a stale socket file is replaced).
pub fn serve(socket: &Path) -> Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("cannot bind {}", socket.display()))?;
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                std::thread::spawn(move || {
                    let _ = echo(s);
                });
            }
            Err(e) => eprintln!("accept failed: {e}"),
        }
    }
    Ok(())
}

/// Echo complete lines until the peer hangs up.
fn echo(mut s: UnixStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    loop {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = match s.read(&mut buf[have..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        have += n;
        if let Some(last) = buf[..have].iter().rposition(|&b| b == b'\n') {
            s.write_all(&buf[..=last])?;
            buf.copy_within(last + 1..have, 0);
            have -= last + 1;
        }
    }
}
