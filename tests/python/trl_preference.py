"""TRL 1.16 as the oracle of waypoint's preference recipes (DPO, ORPO).

  make <dir> <llama|qwen3> [--bos] [--chat]   a tiny random model (hf_models.make) loadable by
                                              AutoTokenizer: tokenizer_config.json with EOS/PAD,
                                              a BOS token with --bos, a ChatML-like template with
                                              --chat; config.json's eos_token_id is not the
                                              tokenizer's
  run <cases.json> <out.json>                 trains each case with TRL and writes its per-step
                                              log history; a case is {model, data, recipe, loss,
                                              beta, rpo_alpha, lora, steps, batch, lr, max_len,
                                              seed}
  tokens <model_dir> <data.jsonl> <dpo|orpo> <max_len> <out.json>
                                              the chosen/rejected ids and completion masks TRL
                                              trains on, per row

LoRA cases start from waypoint's own initial adapter (drawn as waypoint draws it, after seeding
torch with seed + 1), so that both sides start from the same weights.
"""
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(dir, arch, bos, chat):
    import hf_models

    sys.argv = [a for a in sys.argv if a not in ("--bos", "--chat")]
    hf_models.make(dir, arch, False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
    }
    if bos:
        config["bos_token"] = "<|endoftext|>"
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    with open(f"{dir}/tokenizer_config.json", "w") as f:
        json.dump(config, f)
    # The model's end-of-text id differs from the tokenizer's (as Llama 3 instruct's config lists
    # <|end_of_text|> first where its tokenizer ends turns with <|eot_id|>): TRL appends the
    # tokenizer's.
    with open(f"{dir}/config.json") as f:
        model_config = json.load(f)
    model_config["eos_token_id"] = 1
    with open(f"{dir}/config.json", "w") as f:
        json.dump(model_config, f)


def rows_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def waypoint_adapter(model, rank, seed):
    """Overwrites peft's lora_A (B is zero) with the draws waypoint makes: after
    manual_seed(seed + 1), per layer and projection in order, U(-1, 1) / sqrt(in)."""
    torch.manual_seed(seed + 1)
    base = model.base_model.model.model
    with torch.no_grad():
        for layer in base.layers:
            for path in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
                module = layer.get_submodule(path)
                a = module.lora_A["default"].weight
                inp = a.shape[1]
                a.copy_((torch.rand(rank, inp) * 2 - 1) / inp**0.5)
                module.lora_B["default"].weight.zero_()


def train(case):
    import transformers as tf
    from datasets import Dataset

    tok = tf.AutoTokenizer.from_pretrained(case["model"])
    model = tf.AutoModelForCausalLM.from_pretrained(case["model"], dtype=torch.float32)
    data = Dataset.from_list(rows_of(case["data"]))
    out = tempfile.mkdtemp()
    common = dict(
        output_dir=out,
        per_device_train_batch_size=case["batch"],
        gradient_accumulation_steps=1,
        max_steps=case["steps"],
        learning_rate=case["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=case["seed"],
        use_cpu=True,
        beta=case["beta"],
        max_length=case["max_len"],
        dataloader_num_workers=0,
        # TRL turns bf16 autocast on by default (even on CPU): the comparison is in fp32.
        bf16=False,
    )
    peft_config = None
    if case["lora"]:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(
            r=case["lora"], lora_alpha=2 * case["lora"], lora_dropout=0.0,
            target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        waypoint_adapter(model, case["lora"], case["seed"])
    if case["recipe"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        loss_type, weights = [case["loss"]], [1.0]
        if case.get("rpo_alpha"):
            loss_type.append("sft")
            weights.append(case["rpo_alpha"])
        args = DPOConfig(**common, loss_type=loss_type, loss_weights=weights)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "step" in h]


def tokens(model_dir, data, recipe, max_len, out):
    """The sequences TRL would train on, through its own dataset preparation."""
    import transformers as tf
    from datasets import Dataset

    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = rows_of(data)
    ds = Dataset.from_list(rows)
    result = []
    if recipe == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=tempfile.mkdtemp(), max_length=max_len, report_to=[], use_cpu=True)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        for ex in trainer.train_dataset:
            p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
            result.append({
                "chosen": (p + c)[:max_len], "chosen_prompt": len(p),
                "rejected": (p + r)[:max_len], "rejected_prompt": len(p),
            })
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(output_dir=tempfile.mkdtemp(), max_length=max_len, report_to=[], use_cpu=True)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        for ex in trainer.train_dataset:
            entry = {}
            for side in ("chosen", "rejected"):
                labels = ex[f"{side}_labels"]
                entry[side] = ex[f"{side}_input_ids"]
                entry[f"{side}_prompt"] = sum(1 for l in labels if l == -100)
            result.append(entry)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], sys.argv[3], "--bos" in sys.argv, "--chat" in sys.argv)
    elif cmd == "run":
        cases = json.load(open(sys.argv[2]))
        json.dump([train(c) for c in cases], open(sys.argv[3], "w"))
    elif cmd == "tokens":
        tokens(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        sys.exit(f"unknown command {cmd}")
