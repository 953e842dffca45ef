//! The `jobd` crate: everything the daemon (`jobd`) and the client
//! (`jobctl`) share or need beyond the embeddable runtime in `jobd-actors`:
//! default paths, configuration, the wire protocol, the socket server and
//! the built-in job kinds. The binaries are thin `main`s over this.

pub mod client;
pub mod kinds;
pub mod paths;
