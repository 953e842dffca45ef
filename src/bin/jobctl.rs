//! `jobctl`, the jobd client. (Lands with the daemon issue.)

fn main() {
    eprintln!("jobctl: not built yet; see README.md");
    std::process::exit(2);
}
