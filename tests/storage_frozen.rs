//! An S3 endpoint that freezes mid-run (the server SIGSTOPped: connections accepted, nothing
//! answered) ends the job with a clear failure within the storage retry budget, instead of hanging.
//! Runs its own s3s-fs so that freezing it disturbs no other test.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An s3s-fs of our own on a free port, with bucket `frozen-bucket`; killed on drop.
struct Server {
    child: Child,
    port: u16,
    _root: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = common::send_signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Option<Server> {
    let bin = match std::env::var("WAYPOINT_S3S_BIN") {
        Ok(b) if std::path::Path::new(&b).exists() => b,
        _ => {
            assert!(
                std::env::var_os("WAYPOINT_REQUIRE_S3").is_none(),
                "WAYPOINT_REQUIRE_S3 is set but WAYPOINT_S3S_BIN is not an s3s-fs binary"
            );
            eprintln!(
                "note: no s3s-fs (WAYPOINT_S3S_BIN); run scripts/test.sh to include this test"
            );
            return None;
        }
    };
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("frozen-bucket")).unwrap();
    let port = common::free_port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "k", "--secret-key", "s"])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        port,
        _root: root,
    };
    common::wait_for(
        "s3s-fs did not start",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    Some(server)
}

#[test]
fn a_frozen_endpoint_fails_the_job_within_the_retry_budget() {
    let Some(server) = start_server() else {
        return;
    };
    let flags = ["--max_steps", "100000", "--save_steps", "5"];
    let mut child = common::spawn_logged(
        common::waypoint()
            .args(common::runs::train_args(
                "cpu",
                1,
                &flags,
                "frozen",
                "s3://frozen-bucket/runs",
            ))
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", server.port),
            )
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "k")
            .env("AWS_SECRET_ACCESS_KEY", "s")
            .env("AWS_REGION", "us-east-1")
            // The budget, small for the test: 2 s per request, no retry later than 3 s after the first try.
            .env("WAYPOINT_STORAGE_TIMEOUT_SECS", "2")
            .env("WAYPOINT_STORAGE_RETRY_SECS", "3"),
    );
    let (_, rest) = common::runs::read_until(&mut child, |l| l.contains("checkpoint committed"));
    common::send_signal(server.child.id(), "STOP").unwrap();
    let frozen_at = Instant::now();
    // Bounded wait: the job must end by itself well within this.
    let limit = Duration::from_secs(90);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if frozen_at.elapsed() > limit {
            let _ = child.kill();
            panic!("still running {limit:?} after the endpoint froze");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = frozen_at.elapsed();
    let log = rest.join().unwrap();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("error:"), "no clear error: {log}");
    let said = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    eprintln!("the job failed {took:?} after the endpoint froze: {said}");
    // Once the endpoint is back, the run resumes from what was committed.
    common::send_signal(server.child.id(), "CONT").unwrap();
}
