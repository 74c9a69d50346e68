"""PyTorch eager anchor for waypoint's training throughput: the same HF model (transformers, fp32
weights, SDPA attention), the same batch shape, torch.optim.AdamW (PyTorch's default
implementation), on CPU with the same thread count, or on CUDA with bf16 autocast (as waypoint
computes matmuls in bf16 there).

  python train_anchor.py <model_dir> <batch> <seq> <steps> <threads> [cpu|cuda]

Prints one JSON line: {"tokens_per_s": median over the timed steps}.
"""
import json
import statistics
import sys
import time

import torch
import transformers as tf

model_dir, batch, seq, steps, threads = sys.argv[1], *map(int, sys.argv[2:6])
device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
torch.set_num_threads(threads)
torch.manual_seed(0)
model = tf.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device)
model.train()
autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
vocab = model.config.vocab_size
times = []
for step in range(steps):
    ids = torch.randint(0, vocab, (batch, seq + 1)).to(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast:
        out = model(input_ids=ids[:, :-1], labels=None)
    loss = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    loss.item()
    times.append(time.perf_counter() - start)
timed = times[2:] if len(times) > 4 else times
print(json.dumps({"tokens_per_s": batch * seq / statistics.median(timed)}))
