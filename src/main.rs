//! The `waypoint` binary: the command line in this package's library ([`waypoint::cli`]).
fn main() -> std::process::ExitCode {
    waypoint::cli::main()
}
