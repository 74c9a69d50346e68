//! The `waypoint` binary. All of it lives in the `waypoint-trainer` crate; this file only hands over,
//! so that the root package's end-to-end tests get a freshly built binary from cargo.
fn main() -> std::process::ExitCode {
    waypoint_trainer::cli::main()
}
