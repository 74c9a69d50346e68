//! `waypoint launch` as torchrun for local workers: the worker environment, the store PyTorch clients
//! join, restarts after a failure, the failing rank's exit code and error file, and SIGTERM forwarded.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
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
        .args(common::runs::launch_flags(
            2,
            &[
                "--max_restarts",
                "1",
                "--term_grace_secs",
                "5",
                "--",
                "sh",
                "-c",
                failing,
            ],
        ))
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
        .args(common::runs::launch_flags(2, &["--", "sh", "-c", script]))
        .env("OUT", dir.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for(
        "workers did not start",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || dir.path().join("up-0").exists() && dir.path().join("up-1").exists(),
    );
    common::send_signal(child.id(), "TERM").unwrap();
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

/// The `waypoint-launch-*` folders left in `tmp`.
fn launch_folders(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("waypoint-launch-"))
        .collect()
}

#[test]
fn bad_launch_flags_exit_2_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let limit = std::thread::available_parallelism().map_or(1, |n| n.get()) * 4;
    let too_many = (limit.max(8) + 1).to_string();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--term_grace_secs", "18446744073709551615"],
            "--term_grace_secs 18446744073709551615 is out of range: use 0 to 86400".into(),
        ),
        (
            vec!["--nproc_per_node", "10000"],
            "--nproc_per_node 10000 is more than this machine runs well".into(),
        ),
        (
            vec!["--nproc_per_node", &too_many],
            "pass --oversubscribe to start them anyway".into(),
        ),
        (
            vec!["--nproc_per_node", "0"],
            "--nproc_per_node must be at least 1".into(),
        ),
        (
            vec![
                "--nnodes",
                "2",
                "--node_rank",
                "2",
                "--master_port",
                "29999",
            ],
            "--node_rank 2 is not below --nnodes 2".into(),
        ),
        (
            vec!["--nnodes", "2", "--master_port", "0"],
            "--master_port 0 only works on one node".into(),
        ),
        (
            vec![
                "--nproc_per_node",
                "4",
                "--nnodes",
                "2000000000",
                "--oversubscribe",
            ],
            "more than a job can have".into(),
        ),
    ];
    for (args, expect) in cases {
        let out = common::waypoint()
            .arg("launch")
            .args(&args)
            .args(["--", "sh", "-c", "touch $OUT/started-$RANK"])
            .env("OUT", dir.path())
            .env("TMPDIR", dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "something started or was written: {left:?}"
    );
}

#[test]
fn oversubscribe_starts_more_workers_than_the_default_limit() {
    let limit = std::thread::available_parallelism().map_or(1, |n| n.get()) * 4;
    let n = limit.max(8) + 1;
    if n > 72 {
        eprintln!("note: {n} workers is too many to start in a test on this machine; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = launch(
        &[
            "--nproc_per_node",
            &n.to_string(),
            "--master_port",
            "0",
            "--oversubscribe",
        ],
        "touch $OUT/w-$RANK",
        dir.path(),
    );
    common::ok(&out);
    for rank in 0..n {
        assert!(dir.path().join(format!("w-{rank}")).exists(), "rank {rank}");
    }
}

#[test]
fn the_launchers_temp_folder_is_removed_however_it_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    // A folder left by a launcher that was killed outright (no such process) is cleaned up too.
    std::fs::create_dir(tmp.path().join("waypoint-launch-999999999")).unwrap();
    let run = |args: &[&str], script: &str| -> Output {
        common::waypoint()
            .arg("launch")
            .args(["--master_port", "0"])
            .args(args)
            .args(["--", "sh", "-c", script])
            .env("OUT", out_dir.path())
            .env("TMPDIR", tmp.path())
            .output()
            .unwrap()
    };
    // Success.
    common::ok(&run(&["--nproc_per_node", "2"], "true"));
    assert_eq!(launch_folders(tmp.path()), Vec::<String>::new());
    // Failure after a restart, with an error file in the folder.
    let out = run(
        &["--nproc_per_node", "2", "--max_restarts", "1"],
        "echo '{}' > $TORCHELASTIC_ERROR_FILE; exit 4",
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(launch_folders(tmp.path()), Vec::<String>::new());

    // Stopped by a signal: SIGTERM, SIGINT, and SIGHUP (a closed terminal).
    for (signal, code) in [("TERM", 143), ("INT", 130), ("HUP", 129)] {
        let up = out_dir.path().join(format!("up-{signal}"));
        let script = format!("touch {}; while true; do sleep 0.05; done", up.display());
        let mut child = common::waypoint()
            .args(["launch", "--master_port", "0", "--term_grace_secs", "5"])
            .args(["--", "sh", "-c", &script])
            .env("TMPDIR", tmp.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_for(
            "the worker did not start",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || up.exists(),
        );
        assert_eq!(
            launch_folders(tmp.path()).len(),
            1,
            "the folder exists meanwhile"
        );
        common::send_signal(child.id(), signal).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(code), "SIG{signal}");
        assert_eq!(
            launch_folders(tmp.path()),
            Vec::<String>::new(),
            "after SIG{signal}"
        );
    }
}
