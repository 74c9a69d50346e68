"""Tiny random Hugging Face models for waypoint's parity tests (transformers and peft, no hub).

  make <dir> <llama|qwen2|qwen3> [--tied] [--shard] [--hidden H --inter I --layers L]
                                            config.json, model.safetensors, tokenizer.json, and
                                            reference.safetensors: fixed `ids` and fp32 `logits`
  peft <base_dir> <adapter_dir> <out>       logits of base + the PEFT adapter for the same ids
  state <model_dir>                         sha256 of each weight's bytes as transformers loads it
  tokenize <model_dir> <text> <out>         AutoTokenizer's ids of <text> (with BOS), its decoding
                                            of them, and the model's fp32 logits for them
"""
import sys

import torch
from safetensors.torch import save_file, load_file

SEQ = 12


def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 250, (2, SEQ), generator=g)


def tokenizer(dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "the trainer writes the weights and the optimizer state",
        "a checkpoint is real once its manifest exists",
        "resume continues from the newest complete checkpoint",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(f"{dir}/tokenizer.json")
    return tok.get_vocab_size()


def option(name, default):
    if name in sys.argv:
        return int(sys.argv[sys.argv.index(name) + 1])
    return default


def make(dir, arch, tied):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(
        vocab_size=320,
        hidden_size=option("--hidden", 64),
        intermediate_size=option("--inter", 96),
        num_hidden_layers=option("--layers", 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        eos_token_id=0,
        bos_token_id=0,
    )
    if arch == "llama":
        config = tf.LlamaConfig(**common, rope_theta=50000.0)
        model = tf.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = tf.Qwen2Config(**common, rope_theta=1000000.0)
        model = tf.Qwen2ForCausalLM(config)
    elif arch == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)
        model = tf.Qwen3ForCausalLM(config)
    else:
        sys.exit(f"unknown arch {arch}")
    model = model.float().eval()
    # Non-trivial norms and biases, so that a missing one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    if "--shard" in sys.argv:
        # Several files and model.safetensors.index.json, as large checkpoints come.
        model.save_pretrained(dir, safe_serialization=True, max_shard_size="100KB")
    else:
        model.save_pretrained(dir, safe_serialization=True)
    tokenizer(dir)
    x = ids()
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    save_file({"ids": x, "logits": logits.contiguous()}, f"{dir}/reference.safetensors")


def peft_logits(base_dir, adapter_dir, out):
    import transformers as tf
    from peft import PeftModel

    base = tf.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    x = ids()
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    save_file({"ids": x, "logits": logits.contiguous()}, out)


def tokenize(model_dir, text, out):
    import json
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    x = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    save_file({"ids": x, "logits": logits.contiguous()}, out)
    decoded = tok.decode(x[0], skip_special_tokens=True)
    print(json.dumps({"ids": x[0].tolist(), "decoded": decoded, "eos": tok.eos_token_id}))


def state(model_dir):
    """Loads a model directory with transformers in the dtype its config.json states (`dtype="auto"`,
    transformers 5's spelling, which reads the config's `dtype`); prints the sha256 and dtype of each
    weight by name (JSON, one line)."""
    import hashlib
    import json
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    out = {}
    for name, t in model.state_dict().items():
        data = t.detach().contiguous().view(torch.uint8).numpy().tobytes()
        out[name] = {"sha256": hashlib.sha256(data).hexdigest(), "dtype": str(t.dtype)}
    print(json.dumps(out))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], sys.argv[3], "--tied" in sys.argv)
    elif cmd == "peft":
        peft_logits(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "state":
        state(sys.argv[2])
    elif cmd == "tokenize":
        tokenize(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
