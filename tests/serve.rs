//! `waypoint serve` driven by the Tinker SDK (`tinker==0.38.0` from the venv), unmodified
//! (`tests/python/tinker_client.py`): a LoRA client's first `forward_backward` against
//! transformers' log-probs of the same base model, its `optim_step` lowering the loss, two clients
//! at once, and the errors a client meets, after which the server goes on serving.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const KEY: &str = "tml-waypoint-serve-test";

/// A `waypoint serve` on a loopback port over a tiny random Llama named `tiny`, its runs under
/// `runs`; killed when dropped.
struct Server {
    child: Child,
    url: String,
    port: u16,
    model: std::path::PathBuf,
    runs: std::path::PathBuf,
    log: std::path::PathBuf,
    dir: std::sync::Arc<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    start_with(&[])
}

/// [`start`] with more `waypoint serve` flags.
fn start_with(flags: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    common::root_python_script("hf_models.py", &["make", model.to_str().unwrap(), "llama"]);
    std::fs::write(dir.path().join("key"), format!("{KEY}\n")).unwrap();
    serve(std::sync::Arc::new(dir), common::free_port(), flags)
}

/// `waypoint serve` over the model, key and runs of `dir`, on `port`, with `flags`.
fn serve(dir: std::sync::Arc<tempfile::TempDir>, port: u16, flags: &[&str]) -> Server {
    let model = dir.path().join("tiny");
    let runs = dir.path().join("runs");
    let log = dir
        .path()
        .join(format!("serve-{}.log", common::unique("log")));
    let child = common::waypoint()
        // (Each trainer job in the log: what the tests look for.)
        .env("RUST_LOG", "info,waypoint_serve::engine=debug")
        .args(["serve", "--port", &port.to_string(), "--api_key_file"])
        .arg(dir.path().join("key"))
        .arg("--base_model")
        .arg(format!("tiny={}", model.display()))
        .arg("--checkpoint_base_uri")
        .arg(&runs)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start waypoint serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "waypoint serve did not listen in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        port,
        model,
        runs,
        log,
        dir,
    }
}

/// Runs `tinker_client.py` against `server`; its JSON report.
fn sdk(server: &Server, args: &[&str]) -> Value {
    let script = format!(
        "{}/tests/python/tinker_client.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let env = [
        ("TINKER_BASE_URL", server.url.as_str()),
        ("TINKER_API_KEY", KEY),
        ("TINKER_TELEMETRY", "0"),
    ];
    let stdout = waypoint_testkit::python_script_with(&script, args, &env);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The numbers of `v`, nested lists flattened.
fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

/// The largest difference between two equally long lists of numbers (nested lists flattened).
fn max_diff(a: &Value, b: &Value) -> f64 {
    let (a, b) = (floats(a), floats(b));
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn the_sdk_trains_a_lora_client_whose_first_step_matches_transformers() {
    let server = start();
    let model = server.model.to_str().unwrap().to_string();
    let r = sdk(&server, &["sft", "tiny", &model]);
    assert_eq!(r["model_name"], "tiny", "{r}");
    assert_eq!(r["lora_rank"], 4, "{r}");
    assert_eq!(r["metric_keys"], serde_json::json!(["loss:sum"]), "{r}");
    // LoRA's B starts at zero: the first call sees the base model, as transformers computes it.
    assert_eq!(
        floats(&r["logprobs"]).len(),
        8 + 12,
        "one log-prob a target: {r}"
    );
    let diff = max_diff(&r["logprobs"], &r["oracle_logprobs"]);
    assert!(
        diff < 1e-4,
        "log-probs differ from transformers' by {diff}: {r}"
    );
    let (loss, oracle) = (
        r["loss"].as_f64().unwrap(),
        r["oracle_loss"].as_f64().unwrap(),
    );
    assert!(
        (loss - oracle).abs() < 1e-3 * oracle.abs(),
        "loss:sum {loss} vs {oracle}"
    );
    // One Adam step on that batch lowers its loss; the other client trained its own adapters.
    let after = r["loss_after"].as_f64().unwrap();
    assert!(after < loss, "loss {loss} → {after} after a step: {r}");
    assert!(r["grad_norm"].as_f64().unwrap() > 0.0, "{r}");
    let (o, oo) = (
        r["other_loss"].as_f64().unwrap(),
        r["other_oracle_loss"].as_f64().unwrap(),
    );
    assert!(
        (o - oo).abs() < 1e-3 * oo.abs(),
        "the second client: {o} vs {oo}"
    );
    assert!(r["other_loss_after"].as_f64().unwrap() < o, "{r}");
}

/// One implementation: a LoRA run of `waypoint train` (gradient accumulation, clipping, weight
/// decay, a warmup) replayed through the SDK on the same batches (rebuilt by the documented sample
/// order), with the same base, adapter seed and AdamW settings, loses the same at every step.
#[test]
fn an_sft_loop_through_the_sdk_loses_what_waypoint_train_loses() {
    let server = start();
    let data = server.dir.path().join("train.jsonl");
    let rows: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "{{\"text\": \"row {}: a served step is the batch step\"}}",
                i % 2
            )
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let base = server.dir.path().join("batch-runs");
    let flags = [
        "--model_id",
        server.model.to_str().unwrap(),
        "--dataset_uri",
        data.to_str().unwrap(),
        "--max_steps",
        "5",
        "--save_steps",
        "5",
        "--logging_steps",
        "1",
        "--max_seq_len",
        "16",
        "--batch_size",
        "2",
        "--gradient_accumulation",
        "2",
        "--lr",
        "2e-2",
        "--warmup_steps",
        "2",
        "--lr_scheduler",
        "linear",
        "--weight_decay",
        "0.01",
        "--max_grad_norm",
        "0.5",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "4",
        "--lora_dropout",
        "0",
        "--lora_target_modules",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
        "--seed",
        "11",
    ];
    let args = common::runs::train_args("cpu", 1, &flags, "batch", base.to_str().unwrap());
    let out = common::waypoint().args(&args).output().unwrap();
    common::train_log(&out);
    let run = base.join("batch/framework=waypoint");
    let r = sdk(
        &server,
        &[
            "sft_parity",
            "tiny",
            run.to_str().unwrap(),
            server.model.to_str().unwrap(),
        ],
    );
    let (trained, served) = (floats(&r["trained"]), floats(&r["served"]));
    assert_eq!(r["steps"], serde_json::json!([1, 2, 3, 4, 5]), "{r}");
    assert_eq!(served.len(), trained.len(), "{r}");
    for (step, (t, s)) in trained.iter().zip(&served).enumerate() {
        assert!(
            (t - s).abs() <= 1e-6,
            "step {}: waypoint train lost {t}, the served client {s} ({:e} apart)",
            step + 1,
            (t - s).abs()
        );
    }
    // The steps learned: the replay is not of a flat curve.
    assert!(trained[4] < trained[0], "{r}");
    eprintln!("waypoint train: {trained:?}\nserved:         {served:?}");
}

/// The README's example — the SDK's quickstart loop: create a LoRA client, train, save, sample,
/// make a client again from the state — runs as it is (its `key.txt` beside it, the server's URL
/// from `TINKER_BASE_URL`).
#[test]
fn the_readme_example_runs() {
    let server = start();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let serve = &readme[readme.find("## `waypoint serve`").unwrap()..];
    let start_at = serve.find("```python\n").unwrap() + "```python\n".len();
    let example = &serve[start_at..start_at + serve[start_at..].find("```").unwrap()];
    assert!(example.contains("create_lora_training_client"), "{example}");
    let dir = server.dir.path();
    std::fs::write(dir.join("key.txt"), format!("{KEY}\n")).unwrap();
    std::fs::write(dir.join("example.py"), example).unwrap();
    let out = Command::new(common::python())
        .arg("example.py")
        .current_dir(dir)
        .env("TINKER_BASE_URL", &server.url)
        .env("TINKER_TELEMETRY", "0")
        .env_remove("TINKER_API_KEY")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Three losses and metrics, then the two samples' tokens.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[3].starts_with("[["), "{stdout}");
}

/// Several weighted targets a position (2-D `target_tokens` and `weights`, as distillation sends
/// a teacher's top tokens): each target's log-prob comes back `[positions, 3]` a datum, equal to
/// transformers', and `loss:sum` is their weighted sum; a step lowers it.
#[test]
fn cross_entropy_takes_several_targets_a_position() {
    let server = start();
    let r = sdk(
        &server,
        &["multi_target", "tiny", server.model.to_str().unwrap()],
    );
    assert_eq!(r["shapes"], serde_json::json!([[7, 3], [10, 3]]), "{r}");
    let diff = max_diff(&r["logprobs"], &r["oracle_logprobs"]);
    assert!(diff < 1e-4, "log-probs {diff} from transformers': {r}");
    let (loss, oracle) = (
        r["loss"].as_f64().unwrap(),
        r["oracle_loss"].as_f64().unwrap(),
    );
    assert!(
        (loss - oracle).abs() < 1e-4 * oracle.abs(),
        "loss:sum {loss} vs {oracle}"
    );
    assert!(r["loss_after"].as_f64().unwrap() < loss, "{r}");
}

/// A loss written in the client — DPO, as preference loops write it — goes through
/// `forward_backward_custom` (forward, the client's autograd, then a backward with its gradients
/// as weights); the reference log-probs come from a sampler over the starting weights. PyTorch
/// (peft over the starting adapter, autograd, torch's AdamW) taking the same two steps is the
/// oracle.
#[test]
fn a_dpo_loss_written_in_the_client_trains_as_pytorch_does() {
    let server = start();
    let r = sdk(
        &server,
        &[
            "dpo_custom",
            "tiny",
            server.model.to_str().unwrap(),
            server.runs.to_str().unwrap(),
        ],
    );
    let reference = max_diff(&r["reference"], &r["torch_reference"]);
    assert!(
        reference < 1e-4,
        "reference log-probs {reference} apart: {r}"
    );
    // Policy = reference at the start: the first loss is log 2.
    let first = r["losses"][0].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "{r}");
    let losses = max_diff(&r["losses"], &r["torch_losses"]);
    assert!(losses < 1e-4, "losses {losses} apart: {r}");
    let after = max_diff(&r["after"], &r["torch_after"]);
    assert!(after < 1e-4, "log-probs after two steps {after} apart: {r}");
    // The steps moved the policy (else the comparison above would be of nothing).
    let moved = max_diff(&r["after"], &r["reference"]);
    assert!(
        moved > 1e-2,
        "two steps changed the log-probs by {moved} only: {r}"
    );
    assert!(r["margins"][1].as_f64().unwrap() > 0.0, "{r}");
    eprintln!(
        "DPO through the SDK: losses {}, PyTorch's {}; log-probs after {after:e} apart",
        r["losses"], r["torch_losses"]
    );
}

/// A save uploads in the background while the model trains on; what it holds is the state at its
/// place in the client's order, not the state the upload finished beside.
#[test]
fn a_save_holds_the_state_at_its_place_in_the_order_while_training_goes_on() {
    let server = start();
    let r = sdk(&server, &["save_order", "tiny"]);
    assert_eq!(
        r["restored"], r["before"],
        "a client from the saved state has the log-probs from before the later step: {r}"
    );
    assert!(
        max_diff(&r["trained"], &r["before"]) > 1e-4,
        "the step after the save changed the model: {r}"
    );
}

/// What a client that went away held is freed: a session without heartbeats or requests is
/// finished (its run `FINISHED`, its slot of `--max_models` free again, a late heartbeat 410), and
/// a session's samplers beyond `--max_samplers_per_session` go least recently used first. Every
/// client and sampler over the base model shares one copy of it, loaded once.
#[test]
fn a_gone_clients_models_and_old_samplers_are_freed() {
    let server = start_with(&[
        "--max_models",
        "1",
        "--session_timeout_secs",
        "8",
        "--max_samplers_per_session",
        "2",
        "--status_every_secs",
        "1",
    ]);
    // A client that leaves without closing its ServiceClient.
    let r = sdk(&server, &["leave", "tiny"]);
    let model_id = r["model_id"].as_str().unwrap();
    let run = server
        .runs
        .join(model_id.replace(':', "-"))
        .join("framework=waypoint");
    // While it lives, its run's status.json is written again (--status_every_secs): its 2
    // steps, never saved, are there, and `waypoint status` sees it alive.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = common::read_json(run.join("status.json"));
        if status["step"] == 2 {
            assert_eq!(status["state"], "RUNNING", "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "not refreshed: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let shown = common::waypoint()
        .args(["status", "--json"])
        .arg(&run)
        .output()
        .unwrap();
    let shown: Value = serde_json::from_str(&common::ok(&shown)).unwrap();
    assert_eq!(
        (&shown["step"], &shown["stale"]),
        (&2.into(), &false.into()),
        "{shown}"
    );
    assert_eq!(r["evicted"]["class"], "NotFoundError", "{r}");
    assert!(
        r["evicted"]["message"]
            .as_str()
            .unwrap()
            .contains("--max_samplers_per_session"),
        "{r}"
    );
    assert_eq!(
        (&r["newest_sampled"], &r["second_sampled"]),
        (&3.into(), &3.into()),
        "the two most recent samplers are kept: {r}"
    );
    // Its session ends once 8 s pass without a heartbeat or a request.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = std::fs::read_to_string(run.join("status.json")).unwrap_or_default();
        if status.contains("FINISHED") {
            break;
        }
        assert!(Instant::now() < deadline, "the gone client's run: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // ... and no refresh written after its end says otherwise.
    std::thread::sleep(Duration::from_millis(2500));
    let status = common::read_json(run.join("status.json"));
    assert_eq!(
        (&status["state"], &status["step"]),
        (&"FINISHED".into(), &2.into()),
        "{status}"
    );
    let session = model_id.split(':').next().unwrap();
    let late = sdk(&server, &["heartbeat", session]);
    assert_eq!(late["status"], 410, "a late heartbeat: {late}");
    // The one slot of --max_models is free again: another client is made (else `leave` fails).
    sdk(&server, &["leave", "tiny"]);
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains("no heartbeat: the session is finished"),
        "{log}"
    );
    assert_eq!(
        log.matches("base model loaded").count(),
        1,
        "two clients and their samplers over one base load it once: {log}"
    );
}

#[test]
fn a_client_meets_clear_errors_and_the_server_goes_on() {
    let server = start();
    let r = sdk(&server, &["errors", "tiny"]);
    let says = |case: &str, class: &str, text: &str| {
        let e = &r[case];
        assert_eq!(e["class"], class, "{case}: {r}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(text), "{case}: {message}");
    };
    says("wrong_key", "AuthenticationError", "not this server's key");
    says(
        "unknown_base",
        "BadRequestError",
        "\"no/such-model\" is not served here",
    );
    says(
        "outside_vocab",
        "RequestFailedError",
        "datum 0: token 100000 is outside",
    );
    says(
        "loss_not_served",
        "BadRequestError",
        "\"gspo\" is not served yet",
    );
    assert!(r["after_refusal"].as_f64().unwrap() > 0.0, "{r}");
    says(
        "duplicate_name",
        "RequestFailedError",
        "weights/dup exists already",
    );
    says(
        "unknown_checkpoint",
        "RequestFailedError",
        "no checkpoint is named",
    );
    let status = |case: &str, code: u64, text: &str| {
        let (got, body) = (&r[case][0], &r[case][1]);
        assert_eq!(got, code, "{case}: {r}");
        assert!(body.to_string().contains(text), "{case}: {body}");
    };
    status(
        "malformed",
        400,
        "create_model: the body is not a valid request",
    );
    status("no_key", 401, "no X-API-Key header");
    status("unknown_route", 404, "is not served by waypoint serve");
    status("oversized", 413, "");
    status("unknown_future", 404, "is unknown");
    assert!(r["still_serving"].as_f64().unwrap() > 0.0, "{r}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("session created"), "{log}");
    assert!(!log.contains(KEY), "the key is never logged:\n{log}");

    // SIGTERM: no new requests, the work taken finished, each client's run says CANCELLED.
    let mut server = server;
    common::send_signal(server.child.id(), "TERM").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "waypoint serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(log.contains("waypoint serve: stopped"), "{log}");
    let runs: Vec<_> = std::fs::read_dir(&server.runs).unwrap().flatten().collect();
    assert!(!runs.is_empty());
    for run in runs {
        let s = common::read_json(run.path().join("framework=waypoint/status.json"));
        assert_eq!(s["state"], "CANCELLED", "{}: {s}", run.path().display());
    }
}

/// Each policy-gradient loss of a first `forward` (LoRA's B is zero: the base model) equals the
/// same formula in PyTorch over transformers' log-probs; a `ppo` step lowers the `ppo` loss.
#[test]
fn the_policy_gradient_losses_are_pytorchs() {
    let server = start();
    let r = sdk(&server, &["rl", "tiny", server.model.to_str().unwrap()]);
    let losses = ["importance_sampling", "ppo", "cispo", "dro"];
    for loss in losses
        .into_iter()
        .chain(["ppo_per_token", "cispo_per_token"])
    {
        let (got, want) = (r[loss][0].as_f64().unwrap(), r[loss][1].as_f64().unwrap());
        assert!(
            (got - want).abs() < 1e-4 * want.abs().max(1.0),
            "{loss}: {got} vs PyTorch's {want}: {r}"
        );
    }
    // The positions' own bounds changed the losses (else they were not read).
    for loss in ["ppo", "cispo"] {
        let (call, own) = (&r[loss][0], &r[format!("{loss}_per_token")][0]);
        assert_ne!(
            call, own,
            "{loss}: per-token bounds made no difference: {r}"
        );
    }
    let (before, after) = (
        r["ppo_before_step"].as_f64().unwrap(),
        r["ppo_after_step"].as_f64().unwrap(),
    );
    assert!(
        after < before,
        "ppo loss {before} → {after} after a step: {r}"
    );
}

/// A small RL loop through the SDK — sample from the live adapters, score, `forward_backward` with
/// `importance_sampling`, `optim_step` — runs end to end, and the trainer's log-probs of the
/// sampled tokens are the sampler's (the same weights: an importance ratio of 1).
#[test]
fn an_rl_loop_samples_scores_and_trains() {
    let server = start();
    let r = sdk(&server, &["rl_loop", "tiny"]);
    assert_eq!(r["rewards"].as_array().unwrap().len(), 3, "{r}");
    let gap = r["max_logprob_gap"].as_f64().unwrap();
    assert!(
        gap < 1e-4,
        "sampler vs trainer log-probs of the same tokens: {gap}: {r}"
    );
}

/// Sampling: greedy samples from saved sampler weights (`create_sampling_client`) and from the
/// live model (`save_weights_and_get_sampling_client`) are the tokens a greedy loop of `peft` over
/// the saved adapter makes; `compute_logprobs` gives `peft`'s log-probs; a seeded draw repeats;
/// requests sent at once (decoded together) are each what it is alone.
#[test]
fn samples_are_those_of_peft_over_the_saved_adapter() {
    let server = start();
    let (model, runs) = (
        server.model.to_str().unwrap(),
        server.runs.to_str().unwrap(),
    );
    let r = sdk(&server, &["sample", "tiny", model, runs]);
    assert_eq!(
        r["saved"][0], r["peft"],
        "greedy from the saved weights vs peft: {r}"
    );
    assert_eq!(r["saved"][1], r["peft"], "every greedy sample alike: {r}");
    assert_eq!(
        r["live"][0], r["peft"],
        "greedy from the live model vs peft: {r}"
    );
    assert_eq!(r["stop_reasons"][0], "length", "{r}");
    assert_eq!(r["saved_logprobs"].as_array().unwrap().len(), 8, "{r}");
    let got = r["logprobs"].as_array().unwrap();
    assert!(
        got[0].is_null(),
        "the first prompt token has no log-prob: {r}"
    );
    let diff = max_diff(&Value::from(&got[1..]), &r["peft_logprobs"]);
    assert!(diff < 1e-4, "compute_logprobs vs peft: {diff}: {r}");
    // A sampler over the base model alone is transformers' base model.
    assert_eq!(
        r["base"], r["transformers"],
        "greedy from the base model: {r}"
    );
    assert_ne!(
        r["base"], r["peft"],
        "the trained adapters changed the samples: {r}"
    );
    let base = r["base_logprobs"].as_array().unwrap();
    let diff = max_diff(&Value::from(&base[1..]), &r["transformers_logprobs"]);
    assert!(
        diff < 1e-4,
        "the base model's compute_logprobs vs transformers: {diff}: {r}"
    );
    // A stop string ends the sample where the tokenizer's text of it first holds the string.
    assert_eq!(r["stopped"], r["want_stopped"], "stop strings: {r}");
    assert!(r["stopped"].as_array().unwrap().len() < 8, "{r}");
    assert_eq!(r["stopped_reason"], "stop", "{r}");
    assert_eq!(r["draws"][0], r["draws"][1], "a seeded draw repeats: {r}");
    assert_ne!(
        r["draws"][0][0], r["draws"][0][1],
        "its samples differ: {r}"
    );
    // Requests sent at once, decoded together: each as peft makes it alone; the seeded one as
    // it draws alone.
    let together = r["together"].as_array().unwrap();
    assert_eq!(
        Value::from(&together[..4]),
        r["together_peft"],
        "requests decoded together vs peft: {r}"
    );
    assert_eq!(
        together[4], r["draws"][0],
        "a seeded request beside others: {r}"
    );
    // ... and they were decoded together: a sampling job answered several requests.
    let log = std::fs::read_to_string(&server.log).unwrap();
    let joined = log
        .lines()
        .filter(|l| l.contains("job=\"sample\""))
        .filter_map(|l| {
            l.split("requests=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .max();
    assert!(joined >= Some(2), "no sampling job joined requests:\n{log}");
}

/// A client's state and sampler weights saved after step 3: the sampler weights are a PEFT
/// adapter that `peft` loads to the served model's log-probs; the server SIGKILLed and started
/// again over the same storage lists them, and a client made from the state with its optimizer
/// continues bit for bit as the uninterrupted client did. The run is `waypoint ckpt`'s as a batch
/// run's.
#[test]
fn a_killed_server_comes_back_with_its_checkpoints_and_a_client_continues_exactly() {
    let server = start();
    let (model, runs) = (
        server.model.to_str().unwrap(),
        server.runs.to_str().unwrap(),
    );
    let whole = sdk(&server, &["train", "tiny", model, runs, "3", "6"]);
    let diff = whole["peft_diff"].as_f64().unwrap();
    assert!(
        diff < 1e-4,
        "peft over the saved adapter vs the served model: {diff}"
    );

    let part = sdk(&server, &["train", "tiny", model, runs, "3", "3"]);
    assert_eq!(
        part["losses"],
        Value::from(whole["losses"].as_array().unwrap()[..3].to_vec())
    );
    common::send_signal(server.child.id(), "KILL").unwrap();
    let again = serve(server.dir.clone(), server.port, &[]);
    let path = part["path"].as_str().unwrap();
    let resumed = sdk(&again, &["resume", path, "3"]);
    assert_eq!(
        resumed["losses"],
        Value::from(whole["losses"].as_array().unwrap()[3..].to_vec()),
        "the resumed client's losses are the uninterrupted one's"
    );
    let model_id = part["model_id"].as_str().unwrap();
    let listed = resumed["listed"].to_string();
    for (id, kind) in [
        ("weights/after-3", "training"),
        ("sampler_weights/after-3", "sampler"),
    ] {
        assert!(
            listed.contains(id) && listed.contains(kind) && listed.contains(model_id),
            "{listed}"
        );
    }
    // What RestClient and the `tinker` command list after the restart: every client's run and
    // every named checkpoint, read back from storage.
    let catalog = sdk(&again, &["catalog", model_id, path]);
    let runs = [&whole, &part, &resumed].map(|r| r["model_id"].as_str().unwrap());
    let paths = [&whole, &part].map(|r| [r["path"].clone(), r["sampler_path"].clone()]);
    lists_the_runs_and_checkpoints(
        &catalog,
        &runs,
        &paths.concat(),
        part["sampler_path"].clone(),
    );
    let list = common::waypoint()
        .args(["ckpt", "list"])
        .arg(part["run"].as_str().unwrap())
        .output()
        .unwrap();
    let list = common::ok(&list);
    assert!(
        list.contains("step-000003") && list.contains("TRAINING_LORA,INFERENCE_LORA"),
        "{list}"
    );
    // Each client's run says where it stands, as a batch run does.
    let status = common::waypoint()
        .args(["status"])
        .arg(part["run"].as_str().unwrap())
        .output()
        .unwrap();
    let status = common::ok(&status);
    assert!(status.contains("step-000003"), "{status}");
    let resumed_run = server
        .runs
        .join(resumed["model_id"].as_str().unwrap().replace(':', "-"))
        .join("framework=waypoint");
    let s = common::read_json(resumed_run.join("status.json"));
    assert_eq!(s["state"], "RUNNING", "{s}");
    let from = s["resumed_from"]["checkpoint"].as_str().unwrap();
    assert!(
        from.ends_with(":step-000003") && from.starts_with(&model_id.replace(':', "-")),
        "{s}"
    );
}

/// `catalog`'s report (tinker_client.py) lists the runs of `runs` (the newest request first: the
/// last of them) and the checkpoints at `paths` (newest first), each page as asked; the run of
/// `runs[1]` has `paths[2]` as its last state and `sampler` as its last sampler weights; the
/// `tinker` command prints the same.
fn lists_the_runs_and_checkpoints(c: &Value, runs: &[&str], paths: &[Value], sampler: Value) {
    let ids = |list: &Value, field: &str| -> Vec<String> {
        let mut ids: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[field].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let sorted = |v: Vec<String>| {
        let mut v = v;
        v.sort();
        v
    };
    let times_fall = |list: &Value| {
        let times: Vec<f64> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["t"].as_f64().unwrap())
            .collect();
        times.windows(2).all(|w| w[0] >= w[1])
    };
    let want_runs = sorted(runs.iter().map(|r| r.to_string()).collect());
    let want_paths = sorted(
        paths
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect(),
    );
    assert_eq!(ids(&c["runs"], "training_run_id"), want_runs, "{c:#}");
    assert_eq!(c["runs_cursor"]["total_count"], runs.len(), "{c:#}");
    assert!(times_fall(&c["runs"]), "{c:#}");
    assert_eq!(c["first_run"], serde_json::json!([runs[2]]), "{c:#}");
    for run in c["runs"].as_array().unwrap() {
        assert_eq!(
            (&run["base_model"], &run["lora_rank"]),
            (&"tiny".into(), &4.into())
        );
    }
    let run = &c["run"];
    assert_eq!(run["last_checkpoint"]["tinker_path"], paths[2], "{c:#}");
    assert_eq!(
        run["last_sampler_checkpoint"]["tinker_path"], sampler,
        "{c:#}"
    );
    assert_eq!(ids(&c["checkpoints"], "tinker_path"), want_paths, "{c:#}");
    assert_eq!(c["checkpoints_cursor"]["total_count"], paths.len(), "{c:#}");
    assert!(times_fall(&c["checkpoints"]), "{c:#}");
    let second = &c["checkpoints"][1]["tinker_path"];
    assert_eq!(c["second_checkpoint"], serde_json::json!([second]), "{c:#}");
    let info = &c["weights_info"];
    assert_eq!(
        (&info["base_model"], &info["lora_rank"], &info["is_lora"]),
        (&"tiny".into(), &4.into(), &true.into()),
        "{c:#}"
    );
    for part in ["train_attn", "train_mlp", "train_unembed"] {
        assert_eq!(info[part], true, "{c:#}");
    }
    assert_eq!(c["unknown_run"]["class"], "NotFoundError", "{c:#}");
    let message = c["unknown_run"]["message"].as_str().unwrap();
    assert!(message.contains("no training run"), "{message}");
    // The `tinker` command, over the same routes.
    assert_eq!(ids(&c["cli_runs"]["runs"], "training_run_id"), want_runs);
    assert_eq!(
        ids(&c["cli_checkpoints"]["checkpoints"], "tinker_path"),
        want_paths
    );
    assert_eq!(c["cli_run_info"]["training_run_id"], runs[1], "{c:#}");
    assert_eq!(c["cli_checkpoint_info"]["tinker_path"], paths[2], "{c:#}");
    assert_eq!(c["cli_checkpoint_info"]["lora_rank"], 4, "{c:#}");
}
