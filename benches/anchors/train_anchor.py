"""PyTorch eager anchor for waypoint's training throughput: the same HF model (transformers, fp32,
SDPA attention), the same batch shape, torch.optim.AdamW, on CPU with the same thread count.

  python train_anchor.py <model_dir> <batch> <seq> <steps> <threads>

Prints one JSON line: {"tokens_per_s": median over the timed steps}.
"""
import json
import statistics
import sys
import time

import torch
import transformers as tf

model_dir, batch, seq, steps, threads = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = tf.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
vocab = model.config.vocab_size
times = []
for step in range(steps):
    ids = torch.randint(0, vocab, (batch, seq + 1))
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
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
