//! `waypoint launch` as torchrun for local workers: the worker environment, the store PyTorch clients
//! join, restarts after a failure, the failing rank's exit code and error file, and SIGTERM forwarded.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn launch(args: &[&str], script: &str, dir: &Path) -> Output {
    common::waypoint()
        .arg("launch")
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("OUT", dir)
        .output()
        .unwrap()
}

/// Each worker records its torchrun environment in `$OUT/env-$RANK`, joins the launcher's store with
/// PyTorch's client, and (once all have joined, as rank 0 sees it) records rank 0's `go` key.
fn env_and_store_script() -> String {
    let py = common::python();
    format!(
        "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $GROUP_RANK $TORCHELASTIC_RESTART_COUNT \
         $TORCHELASTIC_USE_AGENT_STORE\" > $OUT/env-$RANK && {py} -c \"
import os, datetime, time, torch.distributed as d
s = d.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), None, False, datetime.timedelta(seconds=30))
s.add('joined', 1)
if os.environ['RANK'] == '0':
    while int(s.add('joined', 0)) < int(os.environ['WORLD_SIZE']): time.sleep(0.05)
    s.set('go', 'yes')
open(os.environ['OUT'] + '/store-' + os.environ['RANK'], 'w').write(s.get('go').decode())
\""
    )
}

#[test]
fn workers_get_the_torchrun_environment_and_join_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let script = env_and_store_script();
    let out = launch(
        &["--nproc_per_node", "3", "--master_port", "0"],
        &script,
        dir.path(),
    );
    common::ok(&out);
    for rank in 0..3 {
        let env = std::fs::read_to_string(dir.path().join(format!("env-{rank}"))).unwrap();
        assert_eq!(env.trim(), format!("{rank} {rank} 3 3 0 0 True"));
        let seen = std::fs::read_to_string(dir.path().join(format!("store-{rank}"))).unwrap();
        assert_eq!(seen, "yes");
    }
}

#[test]
fn a_failed_worker_restarts_the_group_then_the_launcher_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    // Rank 1 fails on the first round only.
    let flaky = "echo $TORCHELASTIC_RESTART_COUNT >> $OUT/rounds-$RANK; \
                 if [ $RANK = 1 ] && [ $TORCHELASTIC_RESTART_COUNT = 0 ]; then exit 3; fi; sleep 0.2";
    let out = launch(
        &[
            "--nproc_per_node",
            "2",
            "--master_port",
            "0",
            "--max_restarts",
            "2",
        ],
        flaky,
        dir.path(),
    );
    common::ok(&out);
    let rounds = std::fs::read_to_string(dir.path().join("rounds-0")).unwrap();
    assert_eq!(rounds.split_whitespace().collect::<Vec<_>>(), ["0", "1"]);

    // Always failing: the launcher ends with that rank's code and error file, after the restarts.
    let failing = "if [ $RANK = 1 ]; then echo '{\"message\": \"disk on fire\"}' > $TORCHELASTIC_ERROR_FILE; \
                   exit 7; fi; sleep 30";
    let started = Instant::now();
    let error_file = dir.path().join("agent-error.json");
    let out = common::waypoint()
        .args([
            "launch",
            "--nproc_per_node",
            "2",
            "--master_port",
            "0",
            "--max_restarts",
            "1",
        ])
        .args(["--term_grace_secs", "5", "--", "sh", "-c", failing])
        .env("TORCHELASTIC_ERROR_FILE", &error_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 1 failed with exit code 7 after 1 restart(s)"),
        "{err}"
    );
    assert!(err.contains("disk on fire"), "{err}");
    assert!(std::fs::read_to_string(&error_file)
        .unwrap()
        .contains("disk on fire"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the healthy rank was stopped, not waited for"
    );
}

#[test]
fn sigterm_is_forwarded_to_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let script = "trap 'echo term > $OUT/term-$RANK; exit 0' TERM; touch $OUT/up-$RANK; \
                  while true; do sleep 0.05; done";
    let mut child = common::waypoint()
        .args([
            "launch",
            "--nproc_per_node",
            "2",
            "--master_port",
            "0",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("OUT", dir.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(dir.path().join("up-0").exists() && dir.path().join("up-1").exists()) {
        assert!(Instant::now() < deadline, "workers did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let code = child.wait().unwrap();
    assert_eq!(code.code(), Some(143));
    for rank in 0..2 {
        assert!(
            dir.path().join(format!("term-{rank}")).exists(),
            "rank {rank} got SIGTERM"
        );
    }
}

#[test]
fn pet_variables_are_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::waypoint()
        .args([
            "launch",
            "--master_port",
            "0",
            "--",
            "sh",
            "-c",
            "echo $WORLD_SIZE > $OUT/w-$RANK",
        ])
        .env("PET_NPROC_PER_NODE", "2")
        .env("OUT", dir.path())
        .output()
        .unwrap();
    common::ok(&out);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("w-1"))
            .unwrap()
            .trim(),
        "2"
    );
}

#[test]
fn two_nodes_make_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port().to_string();
    let script = env_and_store_script();
    let nodes: Vec<_> = ["0", "1"]
        .iter()
        .map(|node| {
            common::waypoint()
                .args([
                    "launch",
                    "--nnodes",
                    "2",
                    "--node_rank",
                    node,
                    "--nproc_per_node",
                    "2",
                ])
                .args(["--master_addr", "127.0.0.1", "--master_port", &port])
                .args(["--", "sh", "-c", &script])
                .env("OUT", dir.path())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for node in nodes {
        let out = node.wait_with_output().unwrap();
        common::ok(&out);
    }
    for rank in 0..4 {
        let env = std::fs::read_to_string(dir.path().join(format!("env-{rank}"))).unwrap();
        let (local, node) = (rank % 2, rank / 2);
        assert_eq!(env.trim(), format!("{rank} {local} 4 2 {node} 0 True"));
        let seen = std::fs::read_to_string(dir.path().join(format!("store-{rank}"))).unwrap();
        assert_eq!(seen, "yes");
    }
}
