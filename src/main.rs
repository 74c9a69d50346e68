//! The `waypoint` binary: the command line in this package's library ([`waypoint::cli`]).
fn main() -> std::process::ExitCode {
    waypoint_observe::goodput::mark_process_start();
    waypoint_trainer::run::memory::settle_host_allocator();
    waypoint::cli::main()
}
