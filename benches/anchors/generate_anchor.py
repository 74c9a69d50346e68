"""transformers' `generate` with its KV cache on CPU: greedy tokens/s, the anchor of the sampling
figure in benches/serve.rs.

  generate_anchor.py <model_dir> <requests> <prompt_len> <max_tokens> <threads>
prints {"tokens_per_s": median over the requests after the first}.
"""
import json
import statistics
import sys
import time

import torch
import transformers


def main(model_dir, requests, prompt_len, max_tokens, threads):
    torch.set_num_threads(int(threads))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(13)
    rates = []
    for _ in range(int(requests)):
        ids = torch.randint(0, 250, (1, int(prompt_len)), generator=g)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=int(max_tokens),
                min_new_tokens=int(max_tokens),
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_s": statistics.median(rates[1:])}))


if __name__ == "__main__":
    main(*sys.argv[1:])
