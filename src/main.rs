//! `jobd`, the job daemon. (The socket server lands with the daemon issue.)

fn main() {
    eprintln!("jobd: the daemon is not built yet; see README.md");
    std::process::exit(2);
}
