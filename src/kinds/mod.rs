//! Job kinds built into the daemon. (Minimal module list on the client
//! branch; the daemon branch owns the real one with `echo`, `sleep` and
//! the registration of every kind.)

pub mod command;
pub mod exec;
