"""Drives `waypoint serve` through the Tinker SDK (tinker==0.38.0), unmodified; prints a JSON
report for tests/serve.rs. The server's URL and key come as the SDK reads them: TINKER_BASE_URL,
TINKER_API_KEY.

  sft <base_name> <model_dir>   a LoRA client: forward_backward (cross_entropy) → optim_step →
                                forward, with transformers' log-probs of the base model as the
                                oracle of the first call (LoRA's B starts at zero); a second
                                client trains at the same time
  train <base_name> <model_dir> <runs_dir> <save_after> <steps>
                                a LoRA client (seed 7): `steps` × (forward_backward, optim_step),
                                its state and sampler weights saved after step `save_after` as
                                "after-<n>"; the losses, the path, and the saved PEFT adapter's
                                log-probs (peft over transformers) against the served model's
  resume <path> <steps>         a client made from that state with its optimizer (as after a
                                server restart), `steps` more steps; the losses and the
                                checkpoints listed for the original model
  rl <base_name> <model_dir>    each policy-gradient loss (importance_sampling, ppo, cispo, dro) of
                                a first `forward` against the same formula in PyTorch over
                                transformers' log-probs; then a ppo step lowers the ppo loss
  rl_loop <base_name>           a small RL loop: sample from the live adapters → score →
                                forward_backward (importance_sampling) → optim_step, 3 times; the
                                sampler's log-probs against the trainer's for the same tokens
  bench <base_name> <steps> <datums> <seq>
                                benches/serve.rs: tokens/s of `steps` × (forward_backward,
                                optim_step) over `datums` random sequences of `seq` tokens, the
                                first two steps left out (warm-up); the median
  sample <base_name> <model_dir> <runs_dir>
                                a client trained 2 steps, its sampler weights saved: greedy
                                samples from them (create_sampling_client) and from the live
                                model (save_weights_and_get_sampling_client) against a greedy
                                loop of peft over the saved adapter; compute_logprobs against
                                peft's; seeded sampling repeats; a sampler over the base model
                                alone (create_sampling_client(base_model)) against transformers;
                                requests sent at once (prompts of different lengths, decoded
                                together) against peft, one seeded against itself alone
  bench_sample <base_name> <requests> <prompt_len> <max_tokens> [<samples>]
                                benches/serve.rs: sampling tokens/s from a client's live adapters
                                (greedy; with samples > 1, that many drawn at temperature 1 per
                                request), the median over the requests after the first
  sft_parity <base_name> <run_dir> <model_dir>
                                `waypoint train`'s LoRA run in <run_dir> replayed through the SDK:
                                the run's settings from its last manifest, its batches rebuilt by
                                docs/continue_in_pytorch.py (the documented sample order), each
                                token weighted 1/(the step's learned tokens) so that `loss:sum` is
                                the step's mean, each step's learning rate from the run's metrics;
                                the served losses beside the run's
  dpo_custom <base_name> <model_dir> <runs_dir>
                                a DPO loss written in the client (forward_backward_custom: the SDK
                                sends -dloss/dlogprobs as cross_entropy weights), reference
                                log-probs from a sampler over the starting weights
                                (compute_logprobs), 2 × (forward_backward_custom, optim_step);
                                PyTorch (peft over the starting adapter, autograd, torch's AdamW)
                                takes the same 2 steps: the losses and the log-probs after, side
                                by side
  save_order <base_name>        a save_state sent without waiting, then a step: the step runs
                                while the save uploads, and a client made from the saved state
                                has the log-probs from before the step
  bench_together <base_name> <rounds> <n> <max_tokens>
                                benches/serve.rs: greedy tokens/s of n requests sent at once
                                (prompts of the lengths benches/anchors/generate_anchor.py's
                                prompt_lengths gives), the median over the rounds after the first
  bench_memory <base_name> <server_pid> <n>
                                benches/serve.rs: the server's resident memory before any client,
                                with one LoRA client, and with n
  leave <base_name>             a client takes 2 steps (no save), makes 3 samplers (the server
                                keeps 2), samples the newest, the second and the oldest, then
                                exits without closing its ServiceClient
  heartbeat <session_id>        a raw heartbeat of the session: its HTTP status
  multi_target <base_name> <model_dir>
                                cross_entropy with 3 weighted targets a position (2-D
                                target_tokens and weights, distillation's form): the log-probs
                                ([positions, 3] a datum) and loss:sum against transformers; a step
                                lowers the loss
  catalog <model_id> <path>     what RestClient lists of the runs and named checkpoints under the
                                server's base (list_training_runs, get_training_run,
                                list_user_checkpoints, a page of each, get_weights_info_by_tinker_path,
                                an unknown run), and what the `tinker` command prints of them
                                (`--format json`: run list, run info, checkpoint list, checkpoint
                                info)
  errors <base_name>            what the SDK raises on a wrong key, an unknown base model, a loss
                                not served, and raw HTTP on malformed and oversized bodies; then
                                the same client goes on
"""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import torch
import tinker
from tinker import types


def data():
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (9, 13)]
    weights = [[1.0] * (len(s) - 1) for s in seqs]
    weights[1][:4] = [0.0] * 4
    return seqs, weights, [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": w},
        )
        for s, w in zip(seqs, weights)
    ]


def target_logprobs(model, seqs):
    """`model`'s log-prob of each sequence's next token, position by position."""
    out = []
    with torch.no_grad():
        for s in seqs:
            lp = model(torch.tensor([s[:-1]])).logits.float().log_softmax(-1)[0]
            out.append(lp.gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1).tolist())
    return out


def oracle(model_dir, seqs, weights):
    """transformers' target log-probs of each sequence, and the weighted loss."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    logprobs = target_logprobs(model, seqs)
    loss = sum(float(-(torch.tensor(lp) * torch.tensor(w)).sum()) for lp, w in zip(logprobs, weights))
    return logprobs, loss


def logprobs_of(out):
    return [o["logprobs"].tolist() for o in out.loss_fn_outputs]


def sft(name, model_dir):
    seqs, weights, batch = data()
    sc = tinker.ServiceClient()
    # The SDK's defaults: attention, MLP and the unembedding.
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=7).result()
    other = sc.create_lora_training_client(
        base_model=name, rank=2, train_unembed=False, train_attn=False
    ).result()
    info = tc.get_info()
    first = tc.forward_backward(batch, "cross_entropy")
    # Sent before the first result is back: the server keeps the order.
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
    other_first = other.forward_backward(batch[:1], "cross_entropy")
    other_step = other.optim_step(types.AdamParams(learning_rate=1e-2))
    first, step = first.result(), step.result()
    after = tc.forward(batch, "cross_entropy").result()
    other_first, other_step = other_first.result(), other_step.result()
    other_after = other.forward(batch[:1], "cross_entropy").result()
    want_lp, want_loss = oracle(model_dir, seqs, weights)
    print(json.dumps({
        "model_name": info.model_data.model_name,
        "lora_rank": info.lora_rank,
        "metric_keys": sorted(first.metrics),
        "loss": first.metrics["loss:sum"],
        "loss_after": after.metrics["loss:sum"],
        "oracle_loss": want_loss,
        "logprobs": logprobs_of(first),
        "oracle_logprobs": want_lp,
        "grad_norm": (step.metrics or {}).get("grad_norm"),
        "other_loss": other_first.metrics["loss:sum"],
        "other_loss_after": other_after.metrics["loss:sum"],
        "other_oracle_loss": oracle(model_dir, seqs[:1], weights[:1])[1],
    }))


def peft_logprobs(model_dir, adapter_dir, seqs):
    """peft's target log-probs of each sequence, the saved adapter over the base model."""
    return target_logprobs(peft_model(model_dir, adapter_dir), seqs)


def steps(tc, batch, n):
    losses = []
    for _ in range(n):
        fb = tc.forward_backward(batch, "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    return losses


def train(name, model_dir, runs_dir, save_after, total):
    seqs, _, batch = data()
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=7).result()
    losses = steps(tc, batch, int(save_after))
    label = f"after-{save_after}"
    path = tc.save_state(label).result().path
    sampler_path = tc.save_weights_for_sampler(label).result().path
    served = logprobs_of(tc.forward(batch, "cross_entropy").result())
    losses += steps(tc, batch, int(total) - int(save_after))
    model_id = tc.model_id
    run = os.path.join(runs_dir, model_id.replace(":", "-"), "framework=waypoint")
    adapter = os.path.join(run, "checkpoints", f"step-{int(save_after):06d}", "sampler")
    theirs = peft_logprobs(model_dir, adapter, seqs)
    diff = max(abs(a - b) for x, y in zip(served, theirs) for a, b in zip(x, y))
    print(json.dumps({
        "losses": losses, "path": path, "sampler_path": sampler_path, "model_id": model_id,
        "run": run, "peft_diff": diff,
    }))


def resume(path, n):
    _, _, batch = data()
    sc = tinker.ServiceClient()
    tc = sc.create_training_client_from_state_with_optimizer(path).result()
    losses = steps(tc, batch, int(n))
    model_id = path[len("tinker://"):].split("/")[0]
    listed = sc.create_rest_client().list_checkpoints(model_id).result()
    print(json.dumps({
        "losses": losses,
        "model_id": tc.model_id,
        "listed": sorted((c.checkpoint_id, c.checkpoint_type, c.tinker_path) for c in listed.checkpoints),
    }))


def sft_parity(name, run_dir, model_dir):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "docs"))
    import continue_in_pytorch as example
    from pathlib import Path

    run = Path(run_dir)
    last = max((run / "checkpoints").glob("step-*.json"))
    t = json.loads(last.read_text())["training"]
    metrics = [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m.get("loss") is not None and m.get("lr") is not None]
    targets = set(t["lora_target_modules"].split(","))
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    assert targets - {"lm_head"} in (attn, mlp, attn | mlp, set()), targets
    assert t["lora_alpha"] == t["lora_rank"] and t["lora_dropout"] == 0, t
    sc = tinker.ServiceClient()
    # waypoint train draws the adapters with the run's seed + 1.
    tc = sc.create_lora_training_client(
        base_model=name, rank=t["lora_rank"], seed=t["seed"] + 1,
        train_attn=attn <= targets, train_mlp=mlp <= targets, train_unembed="lm_head" in targets,
    ).result()
    width = t["max_seq_len"] + 1
    data = example.samples(Path(t["dataset_uri"]), t["dataset_text_field"], Path(model_dir), width,
                           not t["disable_packing"])
    n, seed = len(data), t["seed"]
    bs, accum, world = t["batch_size"], t["gradient_accumulation"], t["world_size"]
    position, served = 0, []
    for m in metrics:
        micro = [example.batch(data, [example.sample_at(seed, n, position + (a * world + r) * bs + j)
                                      for j in range(bs)])
                 for a in range(accum) for r in range(world)]
        position += bs * accum * world
        units = sum(int((labels != example.IGNORE).sum()) for _, labels in micro)
        batch = [
            types.Datum(
                model_input=types.ModelInput.from_ints(ids.tolist()),
                loss_fn_inputs={
                    "target_tokens": [max(int(x), 0) for x in labels],
                    "weights": [0.0 if int(x) == example.IGNORE else 1.0 / units for x in labels],
                },
            )
            for ids_rows, labels_rows in micro
            for ids, labels in zip(ids_rows, labels_rows)
        ]
        fb = tc.forward_backward(batch, "cross_entropy")
        step = tc.optim_step(types.AdamParams(
            learning_rate=m["lr"], beta1=t["adam_beta1"], beta2=t["adam_beta2"],
            eps=t["adam_epsilon"], weight_decay=t["weight_decay"], grad_clip_norm=t["max_grad_norm"],
        ))
        served.append(fb.result().metrics["loss:sum"])
        step.result()
    print(json.dumps({
        "steps": [m["step"] for m in metrics],
        "trained": [m["loss"] for m in metrics],
        "served": served,
        "samples_per_step": bs * accum * world,
    }))


def dpo_custom(name, model_dir, runs_dir):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 4)]
    seqs, masks = [], []
    for p in prompts:
        for _ in ("chosen", "rejected"):
            completion = torch.randint(0, 300, (5,), generator=g).tolist()
            seqs.append(p + completion)
            # Only the completion's tokens count.
            masks.append([0.0] * (len(p) - 1) + [1.0] * len(completion))
    batch = [
        types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                    loss_fn_inputs={"target_tokens": s[1:], "weights": m})
        for s, m in zip(seqs, masks)
    ]
    beta, adam = 0.5, dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)

    def dpo(reference):
        def loss_fn(data, logprobs):
            seq = [(lp * torch.tensor(m)).sum() for lp, m in zip(logprobs, masks)]
            ref = [(torch.tensor(r) * torch.tensor(m)).sum() for r, m in zip(reference, masks)]
            margins = torch.stack([
                beta * ((seq[i] - ref[i]) - (seq[i + 1] - ref[i + 1])) for i in range(0, len(seq), 2)
            ])
            return -torch.nn.functional.logsigmoid(margins).mean(), {"margin:mean": float(margins.mean())}
        return loss_fn

    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=3).result()
    tc.save_state("start").result()
    reference_sampler = tc.save_weights_and_get_sampling_client().result()
    # compute_logprobs gives each prompt token's log-prob (None for the first).
    reference = [reference_sampler.compute_logprobs(types.ModelInput.from_ints(s)).result()[1:]
                 for s in seqs]
    losses, margins = [], []
    for _ in range(2):
        fb = tc.forward_backward_custom(batch, dpo(reference))
        step = tc.optim_step(types.AdamParams(**adam))
        out = fb.result()
        losses.append(out.metrics["loss:sum"])
        margins.append(out.metrics["margin:mean"])
        step.result()
    served_after = logprobs_of(tc.forward(batch, "cross_entropy").result())

    # PyTorch takes the same steps from the same starting adapter.
    run = os.path.join(runs_dir, tc.model_id.replace(":", "-"), "framework=waypoint")
    model = peft_model(model_dir, os.path.join(run, "checkpoints", "step-000000", "sampler"),
                       trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=adam["learning_rate"], betas=(adam["beta1"], adam["beta2"]),
                            eps=adam["eps"], weight_decay=0.0, foreach=False)
    with torch.no_grad():
        torch_reference = target_logprobs(model, seqs)
    torch_losses = []
    for _ in range(2):
        lp = []
        for s in seqs:
            out = model(torch.tensor([s[:-1]])).logits.float().log_softmax(-1)[0]
            lp.append(out.gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1))
        loss, _ = dpo(torch_reference)(None, lp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_losses.append(float(loss))
    torch_after = target_logprobs(model, seqs)
    print(json.dumps({
        "losses": losses, "torch_losses": torch_losses, "margins": margins,
        "reference": reference, "torch_reference": torch_reference,
        "after": served_after, "torch_after": torch_after,
    }))


def save_order(name):
    _, _, batch = data()
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=7).result()
    steps(tc, batch, 2)
    before = logprobs_of(tc.forward(batch, "cross_entropy").result())
    saving = tc.save_state("mid")
    fb = tc.forward_backward(batch, "cross_entropy")
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
    path = saving.result().path
    fb.result(), step.result()
    trained = logprobs_of(tc.forward(batch, "cross_entropy").result())
    restored = sc.create_training_client_from_state(path).result()
    print(json.dumps({
        "before": before, "restored": logprobs_of(restored.forward(batch, "cross_entropy").result()),
        "trained": trained, "path": path,
    }))


def leave(name):
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=2, seed=1).result()
    # 2 steps, never saved: the run's status.json says so while the client lives.
    steps(tc, data()[2], 2)
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=3, top_k=1, stop=[])
    samplers = [tc.save_weights_and_get_sampling_client().result() for _ in range(3)]
    newest = samplers[-1].sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    second = samplers[1].sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    print(json.dumps({
        "model_id": tc.model_id,
        "newest_sampled": len(newest.sequences[0].tokens),
        "second_sampled": len(second.sequences[0].tokens),
        "evicted": raised(lambda: samplers[0].sample(
            prompt=prompt, num_samples=1, sampling_params=params).result()),
    }))
    # Gone without closing the ServiceClient: its heartbeats stop.
    sys.stdout.flush()
    os._exit(0)


def heartbeat(session):
    """A raw heartbeat of `session`: the HTTP status."""
    body = json.dumps({"session_id": session}).encode()
    print(json.dumps({"status": raw("session_heartbeat", body, os.environ["TINKER_API_KEY"])[0]}))


def multi_target(name, model_dir):
    import transformers

    g = torch.Generator().manual_seed(21)
    seqs = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (7, 10)]
    k = 3
    targets = [torch.randint(0, 300, (len(s), k), generator=g) for s in seqs]
    weights = [torch.rand((len(s), k), generator=g) for s in seqs]
    batch = [
        types.Datum(model_input=types.ModelInput.from_ints(s), loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch(t),
            "weights": types.TensorData.from_torch(w),
        })
        for s, t, w in zip(seqs, targets, weights)
    ]
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=7).result()
    first = tc.forward_backward(batch, "cross_entropy")
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
    first, _ = first.result(), step.result()
    after = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = [model(torch.tensor([s])).logits.float().log_softmax(-1)[0].gather(-1, t)
                for s, t in zip(seqs, targets)]
    print(json.dumps({
        "shapes": [list(o["logprobs"].to_torch().shape) for o in first.loss_fn_outputs],
        "logprobs": [o["logprobs"].to_torch().tolist() for o in first.loss_fn_outputs],
        "oracle_logprobs": [lp.tolist() for lp in want],
        "loss": first.metrics["loss:sum"],
        "oracle_loss": float(sum(-(lp * w).sum() for lp, w in zip(want, weights))),
        "loss_after": after,
    }))


def rl_oracle(loss, lp, q, a, config):
    """The Tinker losses as the SDK's documentation defines them: sums over positions."""
    r = (lp - q).exp()
    if loss == "importance_sampling":
        return -(r * a).sum()
    if loss == "ppo":
        lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
        return -torch.minimum(r * a, torch.clamp(r, lo, hi) * a).sum()
    if loss == "cispo":
        lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
        return -(torch.clamp(r, lo, hi).detach() * lp * a).sum()
    if loss == "dro":
        return -(lp * a - 0.5 * config["beta"] * (lp - q) ** 2).sum()
    raise ValueError(loss)


def rl(name, model_dir):
    seqs, weights, _ = data()
    want_lp, _ = oracle(model_dir, seqs, weights)
    g = torch.Generator().manual_seed(5)
    batch, inputs = [], []
    for s, lp in zip(seqs, want_lp):
        n = len(s) - 1
        # A sampler a little off the model, and advantages of both signs.
        q = (torch.tensor(lp) + 0.3 * torch.randn(n, generator=g)).tolist()
        a = torch.randn(n, generator=g).tolist()
        inputs.append((torch.tensor(lp), torch.tensor(q), torch.tensor(a)))
        batch.append(types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "logprobs": q, "advantages": a},
        ))
    configs = {
        "importance_sampling": {},
        "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
        "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
        "dro": {"beta": 0.05},
    }
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=7).result()
    report = {}
    for loss, config in configs.items():
        got = tc.forward(batch, loss, config or None).result().metrics["loss:sum"]
        want = float(sum(rl_oracle(loss, lp, q, a, config) for lp, q, a in inputs))
        report[loss] = [got, want]
    # Clip bounds of each position's own (per-token loss_fn_inputs) override the call's.
    bounds = []
    for datum, (lp, q, a) in zip(batch, inputs):
        n = len(lp)
        low = (0.8 + 0.15 * torch.rand(n, generator=g)).tolist()
        high = (1.05 + 0.15 * torch.rand(n, generator=g)).tolist()
        datum.loss_fn_inputs["clip_low_threshold"] = types.TensorData(data=low, dtype="float32", shape=[n])
        datum.loss_fn_inputs["clip_high_threshold"] = types.TensorData(data=high, dtype="float32", shape=[n])
        bounds.append({"clip_low_threshold": torch.tensor(low), "clip_high_threshold": torch.tensor(high)})
    for loss in ("ppo", "cispo"):
        got = tc.forward(batch, loss, configs[loss]).result().metrics["loss:sum"]
        want = float(sum(rl_oracle(loss, lp, q, a, b) for (lp, q, a), b in zip(inputs, bounds)))
        report[f"{loss}_per_token"] = [got, want]
    for datum in batch:
        del datum.loss_fn_inputs["clip_low_threshold"], datum.loss_fn_inputs["clip_high_threshold"]
    before = report["ppo"][0]
    tc.forward_backward(batch, "ppo", configs["ppo"]).result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    report["ppo_after_step"] = tc.forward(batch, "ppo", configs["ppo"]).result().metrics["loss:sum"]
    report["ppo_before_step"] = before
    print(json.dumps(report))


def rl_loop(name):
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=7).result()
    prompt = [11, 42, 7, 99]
    rewards, gaps = [], []
    for it in range(3):
        sampler = tc.save_weights_and_get_sampling_client().result()
        params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=it, stop=[])
        out = sampler.sample(
            prompt=types.ModelInput.from_ints(prompt), num_samples=4, sampling_params=params
        ).result()
        # The reward: how many sampled tokens are below 160.
        scores = [sum(t < 160 for t in s.tokens) / len(s.tokens) for s in out.sequences]
        mean = sum(scores) / len(scores)
        rewards.append(mean)
        batch = []
        for s, score in zip(out.sequences, scores):
            full = prompt + s.tokens
            n_prompt = len(prompt) - 1
            batch.append(types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={
                    "target_tokens": full[1:],
                    "logprobs": [0.0] * n_prompt + list(s.logprobs),
                    "advantages": [0.0] * n_prompt + [score - mean] * len(s.tokens),
                },
            ))
        fb = tc.forward_backward(batch, "importance_sampling").result()
        # The trainer's log-probs of the sampled tokens, under the weights they were sampled
        # with: the sampler's.
        for o, s in zip(fb.loss_fn_outputs, out.sequences):
            trained = o["logprobs"].tolist()[len(prompt) - 1:]
            gaps.append(max(abs(a - b) for a, b in zip(trained, s.logprobs)))
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    print(json.dumps({"rewards": rewards, "max_logprob_gap": max(gaps)}))


def bench(name, n_steps, datums, seq):
    import statistics
    import time

    g = torch.Generator().manual_seed(11)
    batch = []
    for _ in range(int(datums)):
        s = torch.randint(0, 250, (int(seq) + 1,), generator=g).tolist()
        batch.append(types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * int(seq)},
        ))
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=8, seed=7).result()
    rates = []
    for _ in range(int(n_steps)):
        start = time.perf_counter()
        fb = tc.forward_backward(batch, "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=1e-4))
        fb.result()
        step.result()
        rates.append(int(datums) * int(seq) / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_s": statistics.median(rates[2:])}))


def peft_model(model_dir, adapter_dir, trainable=False):
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
    model.eval()
    return model


def greedy_loop(model, prompt, n):
    """`n` tokens after `prompt`, each the most likely."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def sample(name, model_dir, runs_dir):
    seqs, _, batch = data()
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=7).result()
    steps(tc, batch, 2)
    path = tc.save_weights_for_sampler("after-2").result().path
    prompt = types.ModelInput.from_ints(seqs[0][:5])
    greedy = types.SamplingParams(max_tokens=8, top_k=1, stop=[])
    saved = sc.create_sampling_client(model_path=path)
    from_saved = saved.sample(prompt=prompt, num_samples=2, sampling_params=greedy).result()
    live = tc.save_weights_and_get_sampling_client().result()
    from_live = live.sample(prompt=prompt, num_samples=1, sampling_params=greedy).result()
    logprobs = saved.compute_logprobs(types.ModelInput.from_ints(seqs[0])).result()
    seeded = types.SamplingParams(max_tokens=8, temperature=1.5, seed=3, stop=[])
    draws = [
        [s.tokens for s in saved.sample(prompt=prompt, num_samples=2, sampling_params=seeded).result().sequences]
        for _ in range(2)
    ]
    # Requests sent at once (decoded together): prompts of 2 to 13 tokens, greedy, and a seeded
    # one, which draws as it does alone.
    # (24 tokens each: decoding outlasts the gaps between the requests' arrivals on a busy machine.)
    prompts = [seqs[1][:13], seqs[0][:2], seqs[1][3:9], seqs[0][:7]]
    longer = types.SamplingParams(max_tokens=24, top_k=1, stop=[])
    sent = [
        saved.sample(prompt=types.ModelInput.from_ints(p), num_samples=1, sampling_params=longer)
        for p in prompts
    ] + [saved.sample(prompt=prompt, num_samples=2, sampling_params=seeded)]
    together = [[s.tokens for s in f.result().sequences] for f in sent]
    base = sc.create_sampling_client(base_model=name)
    from_base = base.sample(prompt=prompt, num_samples=1, sampling_params=greedy).result()
    base_logprobs = base.compute_logprobs(types.ModelInput.from_ints(seqs[0])).result()
    run = os.path.join(runs_dir, tc.model_id.replace(":", "-"), "framework=waypoint")
    model = peft_model(model_dir, os.path.join(run, "checkpoints", "step-000002", "sampler"))
    want_lp = target_logprobs(model, [seqs[0]])[0]
    import transformers

    base_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Stop strings, looked for in the text the model's own tokenizer decodes (special tokens kept);
    # the end-of-sequence token stops too.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    text = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    free = from_base.sequences[0].tokens
    stop_string = text(free[:3])
    want_stopped = []
    for t in free:
        want_stopped.append(t)
        if t == 0 or stop_string in text(want_stopped):
            break
    stopped = base.sample(prompt=prompt, num_samples=1, sampling_params=types.SamplingParams(
        max_tokens=8, top_k=1, stop=["never said", stop_string])).result().sequences[0]
    print(json.dumps({
        "stop_string": stop_string,
        "stopped": stopped.tokens,
        "stopped_reason": stopped.stop_reason,
        "want_stopped": want_stopped,
        "base": from_base.sequences[0].tokens,
        "transformers": greedy_loop(base_model, seqs[0][:5], 8),
        "base_logprobs": base_logprobs,
        "transformers_logprobs": target_logprobs(base_model, [seqs[0]])[0],
        "saved": [s.tokens for s in from_saved.sequences],
        "saved_logprobs": from_saved.sequences[0].logprobs,
        "stop_reasons": [s.stop_reason for s in from_saved.sequences],
        "live": [s.tokens for s in from_live.sequences],
        "peft": greedy_loop(model, seqs[0][:5], 8),
        "logprobs": logprobs,
        "peft_logprobs": want_lp,
        "draws": draws,
        "together": together,
        "together_peft": [[greedy_loop(model, p, 24)] for p in prompts],
    }))


def bench_sample(name, requests, prompt_len, max_tokens, samples="1"):
    import statistics
    import time

    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=8, seed=7).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    g = torch.Generator().manual_seed(13)
    n = int(samples)
    # Greedy, or n drawn at temperature 1 (as benches/anchors/generate_anchor.py does).
    params = types.SamplingParams(max_tokens=int(max_tokens), stop=[],
                                  **(dict(temperature=1.0, seed=5) if n > 1 else dict(top_k=1)))
    rates = []
    for _ in range(int(requests)):
        prompt = types.ModelInput.from_ints(torch.randint(0, 250, (int(prompt_len),), generator=g).tolist())
        start = time.perf_counter()
        out = sampler.sample(prompt=prompt, num_samples=n, sampling_params=params).result()
        rates.append(sum(len(s.tokens) for s in out.sequences) / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_s": statistics.median(rates[1:])}))


def bench_together(name, rounds, n, max_tokens):
    import statistics
    import time

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benches", "anchors"))
    from generate_anchor import prompt_lengths

    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=name, rank=8, seed=7).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    g = torch.Generator().manual_seed(17)
    params = types.SamplingParams(max_tokens=int(max_tokens), stop=[], top_k=1)
    rates = []
    for _ in range(int(rounds)):
        prompts = [torch.randint(1, 250, (k,), generator=g).tolist() for k in prompt_lengths(int(n))]
        start = time.perf_counter()
        sent = [
            sampler.sample(prompt=types.ModelInput.from_ints(p), num_samples=1, sampling_params=params)
            for p in prompts
        ]
        tokens = sum(len(s.tokens) for f in sent for s in f.result().sequences)
        rates.append(tokens / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_s": statistics.median(rates[1:])}))


def bench_memory(name, pid, n):
    """benches/serve.rs: the server's resident memory (VmRSS of process `pid`) before any client,
    with one LoRA client, and with `n`."""

    def rss_mb():
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    sc = tinker.ServiceClient()
    before = rss_mb()
    clients = [sc.create_lora_training_client(base_model=name, rank=8, seed=7).result()]
    one = rss_mb()
    clients += [sc.create_lora_training_client(base_model=name, rank=8, seed=7 + i).result()
                for i in range(1, int(n))]
    report = {"before_mb": before, "one_mb": one, "all_mb": rss_mb()}
    # The session ends: its clients are freed for the next benchmark.
    sc.close("success").result()
    print(json.dumps(report))


def raised(work):
    try:
        work()
    except Exception as e:  # noqa: BLE001 - the report names the class and message
        return {"class": type(e).__name__, "message": str(e)}
    return None


def raw(path, body, key, content_type="application/json"):
    """POST body to the server without the SDK: (status, JSON body)."""
    url = os.environ["TINKER_BASE_URL"].rstrip("/") + "/api/v1/" + path
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", content_type)
    if key is not None:
        req.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text.decode(errors="replace")


def catalog(model_id, path):
    rc = tinker.ServiceClient().create_rest_client()
    runs = rc.list_training_runs(limit=100).result()
    every = rc.list_user_checkpoints(limit=100).result()
    cli_bin = os.path.join(os.path.dirname(sys.executable), "tinker")

    def cli(*args):
        done = subprocess.run(
            [cli_bin, "--format", "json", *args], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise SystemExit(f"tinker {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}")
        return json.loads(done.stdout)

    print(json.dumps({
        # (each with its time as seconds, `t`, to compare)
        "runs": [dict(r.model_dump(mode="json"), t=r.last_request_time.timestamp())
                 for r in runs.training_runs],
        "runs_cursor": runs.cursor.model_dump(mode="json"),
        "first_run": [r.training_run_id for r in rc.list_training_runs(limit=1).result().training_runs],
        "run": rc.get_training_run(model_id).result().model_dump(mode="json"),
        "checkpoints": [dict(c.model_dump(mode="json"), t=c.time.timestamp())
                        for c in every.checkpoints],
        "checkpoints_cursor": every.cursor.model_dump(mode="json"),
        "second_checkpoint": [
            c.tinker_path for c in rc.list_user_checkpoints(limit=1, offset=1).result().checkpoints
        ],
        "weights_info": rc.get_weights_info_by_tinker_path(path).result().model_dump(mode="json"),
        "unknown_run": raised(lambda: rc.get_training_run("s0:train:9").result()),
        "cli_runs": cli("run", "list"),
        "cli_run_info": cli("run", "info", model_id),
        "cli_checkpoints": cli("checkpoint", "list"),
        "cli_checkpoint_info": cli("checkpoint", "info", path),
    }))


def errors(name):
    key = os.environ["TINKER_API_KEY"]
    report = {}
    report["wrong_key"] = raised(
        lambda: tinker.ServiceClient(api_key="tml-not-the-key")
        .create_lora_training_client(base_model=name, rank=2, train_unembed=False)
        .result()
    )
    sc = tinker.ServiceClient()
    report["unknown_base"] = raised(
        lambda: sc.create_lora_training_client(
            base_model="no/such-model", rank=2, train_unembed=False
        ).result()
    )
    tc = sc.create_lora_training_client(base_model=name, rank=2, train_unembed=False).result()
    _, _, batch = data()
    report["loss_not_served"] = raised(lambda: tc.forward_backward(batch, "gspo").result())
    outside = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 100000]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    report["outside_vocab"] = raised(lambda: tc.forward_backward([outside], "cross_entropy").result())
    # The refused request used its number: the next ones run.
    report["after_refusal"] = tc.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"]
    tc.save_state("dup").result()
    report["duplicate_name"] = raised(lambda: tc.save_state("dup").result())
    report["unknown_checkpoint"] = raised(
        lambda: tc.load_state(f"tinker://{tc.model_id}/weights/none").result()
    )
    report["malformed"] = raw("create_model", b"{", key)
    report["no_key"] = raw("create_session", b"{}", None)
    report["unknown_route"] = raw("copy_weights", b"{}", key)
    report["oversized"] = raw("forward_backward", b"\0" * (65 << 20), key, "application/x-protobuf")
    report["unknown_future"] = raw("retrieve_future", json.dumps({"request_id": "req-0"}).encode(), key)
    report["still_serving"] = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    print(json.dumps(report))


if __name__ == "__main__":
    commands = {
        "sft": sft, "train": train, "resume": resume, "rl": rl, "rl_loop": rl_loop, "sample": sample,
        "bench": bench,
        "bench_sample": bench_sample, "errors": errors, "sft_parity": sft_parity,
        "dpo_custom": dpo_custom, "save_order": save_order, "leave": leave,
        "multi_target": multi_target,
        "heartbeat": heartbeat,
        "catalog": catalog,
        "bench_memory": bench_memory,
        "bench_together": bench_together,
    }
    commands[sys.argv[1]](*sys.argv[2:])
