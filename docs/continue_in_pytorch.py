"""Continue a waypoint checkpoint in plain PyTorch: the model, AdamW with its state and parameter
group, the learning-rate scheduler, and the sample order, so the steps after the checkpoint are the
ones waypoint would have taken (docs/continue-in-pytorch.md explains each part).

  python docs/continue_in_pytorch.py continue --run RUN_DIR --step N --model_dir HF_DIR --steps K
      Loads RUN_DIR/checkpoints/step-00000N (a local copy of the run folder:
      `<checkpoint_base_uri>/<run_id>/framework=waypoint`), trains K more steps on the run's dataset
      (text rows of a local JSONL file) and prints one JSON line per step: {"step", "loss", "lr"}.
      HF_DIR is the model the run started from (its config.json and tokenizer.json).
  python docs/continue_in_pytorch.py order --seed S --epoch E --n N
      Prints the sample order of epoch E of N samples as a JSON list (what waypoint visits).

Needs torch, transformers and tokenizers (the versions waypoint's set-up pins); runs on CPU.
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader

IGNORE = -100  # labels that carry no loss (padding)
M64 = (1 << 64) - 1


# --- the sample order ------------------------------------------------------------------------------


def splitmix(z: int) -> int:
    """SplitMix64's finalizer, on unsigned 64-bit integers."""
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def permuted(seed: int, epoch: int, n: int, i: int) -> int:
    """The sample visited i-th of n in `epoch`: a four-round Feistel network over the next even
    power of two, keyed by (seed, epoch), cycle-walked until the result is below n."""
    if n == 1:
        return 0
    bits = max((n - 1).bit_length(), 2)
    half = (bits + 1) // 2
    mask = (1 << half) - 1
    key = splitmix(seed ^ splitmix((epoch + 0x5EED) & M64))
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            f = splitmix(key ^ ((r * 0x9E3779B97F4A7C15) & M64) ^ right) & mask
            left, right = right, left ^ f
        x = (left << half) | right
        if x < n:
            return x


def sample_at(seed: int, n: int, position: int) -> int:
    """The sample at global position `position` (samples consumed so far, over all epochs)."""
    return permuted(seed, position // n, n, position % n)


# --- the data --------------------------------------------------------------------------------------


def samples(dataset: Path, text_field: str, model_dir: Path, width: int, packing: bool):
    """waypoint's samples of `width` (= max_seq_len + 1) ids and loss masks from text rows: each row is
    the tokenizer's ids (with its special tokens, e.g. BOS) and an EOS, all learned; packed, the rows
    are concatenated and cut into blocks (the remainder dropped); unpacked, one row per sample,
    truncated, padded with the pad id (not learned)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config = json.loads((model_dir / "config.json").read_text())
    first = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
    eos = first(config.get("eos_token_id"))
    if eos is None:
        eos = next(tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<|end_of_text|>")
                   if tok.token_to_id(t) is not None)
    pad = first(config.get("pad_token_id")) if config.get("pad_token_id") is not None else eos
    rows = []
    for line in dataset.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            raise SystemExit("chat rows need the model's chat template; this example reads text rows")
        rows.append(tok.encode(row[text_field], add_special_tokens=True).ids + [eos])
    if packing:
        stream = [t for r in rows for t in r]
        return [(stream[i:i + width], [True] * width)
                for i in range(0, len(stream) - width + 1, width)]
    out = []
    for r in rows:
        r = r[:width]
        out.append((r + [pad] * (width - len(r)), [True] * len(r) + [False] * (width - len(r))))
    return out


def batch(data, indices):
    """Inputs and labels [len(indices), width - 1]: labels are the next ids where learned."""
    ids = torch.tensor([data[i][0][:-1] for i in indices])
    labels = torch.tensor([[t if m else IGNORE for t, m in zip(data[i][0][1:], data[i][1][1:])]
                           for i in indices])
    return ids, labels


# --- the checkpoint --------------------------------------------------------------------------------


def load_checkpoint(run: Path, step: int, model, optimizer):
    """Loads step `step` of a local run folder with DCP into `model` and `optimizer`; returns the
    manifest (its `training` holds every setting that decided the trajectory) and the scheduler
    and train state as plain Python values."""
    name = f"step-{step:06d}"
    manifest = json.loads((run / "checkpoints" / f"{name}.json").read_text())
    path = str(run / "checkpoints" / name / "dcp")
    saved = HuggingFaceStorageReader(path).read_metadata().state_dict_metadata
    params = dict(model.named_parameters())
    state = {
        # Tied weights are one parameter, saved once: load what the checkpoint holds.
        "model": {k: v for k, v in model.state_dict().items() if f"model.{k}" in saved},
        "optim": {"state": {k: {"exp_avg": torch.empty_like(p), "exp_avg_sq": torch.empty_like(p),
                                "step": torch.zeros((), dtype=torch.float32)}
                            for k, p in params.items()}},
        "lr_scheduler": {"last_epoch": torch.zeros((), dtype=torch.int64),
                         "_step_count": torch.zeros((), dtype=torch.int64),
                         "base_lrs": torch.zeros(1, dtype=torch.float64),
                         "_last_lr": torch.zeros(1, dtype=torch.float64)},
        "train_state": {k: torch.zeros((), dtype=torch.int64)
                        for k in ("step", "ntokens_seen", "epoch", "data_consumed")},
    }
    dcp.load(state, storage_reader=HuggingFaceStorageReader(path))
    model.load_state_dict(state["model"], strict=False)
    # AdamW's state per parameter, as torch.optim.AdamW keeps it (step: a float32 scalar).
    for k, p in params.items():
        optimizer.state[p] = state["optim"]["state"][k]
    scheduler = {k: (v.tolist() if v.dim() else v.item()) for k, v in state["lr_scheduler"].items()}
    train_state = {k: v.item() for k, v in state["train_state"].items()}
    assert train_state["step"] == manifest["step"] == scheduler["last_epoch"]
    return manifest, scheduler, train_state


def make_scheduler(optimizer, t):
    """transformers' schedule function for the run's `lr_scheduler` (waypoint's schedules equal
    them step for step; a linear schedule with a floor is LambdaLR over waypoint's formula)."""
    import transformers as tf

    warmup, total, floor = t["warmup_steps"], t["total_steps"], t["min_lr_ratio"]
    kind = t["lr_scheduler"]
    if kind == "constant":
        return tf.get_constant_schedule_with_warmup(optimizer, warmup)
    if kind == "cosine":
        return tf.get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total,
                                                               min_lr_rate=floor)
    if kind == "linear" and floor == 0:
        return tf.get_linear_schedule_with_warmup(optimizer, warmup, total)

    def linear_with_floor(s):
        if s < warmup:
            return s / max(1, warmup)
        left = max(0, total - s) / max(1, total - warmup)
        return max(0.0, left * (1 - floor) + floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_with_floor)


def continue_run(args):
    import transformers as tf

    run, model_dir = Path(args.run), Path(args.model_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    manifest = json.loads((run / "checkpoints" / f"step-{args.step:06d}.json").read_text())
    t = manifest["training"]
    # One parameter group with the run's hyper-parameters; the single-tensor AdamW, as waypoint's.
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"],
                                  betas=(t["adam_beta1"], t["adam_beta2"]), eps=t["adam_epsilon"],
                                  weight_decay=t["weight_decay"], foreach=False)
    scheduler = make_scheduler(optimizer, t)
    _, sched_state, train_state = load_checkpoint(run, args.step, model, optimizer)
    scheduler.load_state_dict({**scheduler.state_dict(), **sched_state})
    # The optimizer's parameter groups hold the lr of the next step (PyTorch saves it with them).
    for group, lr in zip(optimizer.param_groups, sched_state["_last_lr"]):
        group["lr"] = lr
    width = t["max_seq_len"] + 1
    data = samples(Path(t["dataset_uri"]), t["dataset_text_field"], model_dir, width,
                   not t["disable_packing"])
    n, seed = len(data), t["seed"]
    bs, accum, world = t["batch_size"], t["gradient_accumulation"], t["world_size"]
    position = train_state["data_consumed"]
    model.train()
    for step in range(train_state["step"] + 1, train_state["step"] + args.steps + 1):
        # A step's global batch: micro-batch a of rank r is positions (a * world + r) * bs onwards.
        micro = [batch(data, [sample_at(seed, n, position + (a * world + r) * bs + j)
                              for j in range(bs)])
                 for a in range(accum) for r in range(world)]
        units = sum(int((labels != IGNORE).sum()) for _, labels in micro)
        lr = optimizer.param_groups[0]["lr"]
        loss_value = 0.0
        for ids, labels in micro:
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE,
                reduction="sum") / units
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        position += bs * accum * world
        print(json.dumps({"step": step, "loss": loss_value, "lr": lr}), flush=True)
        assert math.isfinite(loss_value)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("continue")
    c.add_argument("--run", required=True)
    c.add_argument("--step", type=int, required=True)
    c.add_argument("--model_dir", required=True)
    c.add_argument("--steps", type=int, default=3)
    o = sub.add_parser("order")
    o.add_argument("--seed", type=int, required=True)
    o.add_argument("--epoch", type=int, required=True)
    o.add_argument("--n", type=int, required=True)
    args = p.parse_args()
    if args.command == "order":
        print(json.dumps([permuted(args.seed, args.epoch, args.n, i) for i in range(args.n)]))
    else:
        continue_run(args)


if __name__ == "__main__":
    main()
