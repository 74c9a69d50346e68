"""transformers' `generate` with its KV cache on CPU: tokens/s, the anchor of the sampling figures
in benches/serve.rs — greedy, or with <samples> > 1 that many sequences drawn (temperature 1, no
top-k) for each prompt (`num_return_sequences`).

  generate_anchor.py <model_dir> <requests> <prompt_len> <max_tokens> <threads> [<samples>]
prints {"tokens_per_s": median over the requests after the first}.
"""
import json
import statistics
import sys
import time

import torch
import transformers


def main(model_dir, requests, prompt_len, max_tokens, threads, samples="1"):
    torch.set_num_threads(int(threads))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(13)
    samples = int(samples)
    drawn = dict(do_sample=True, num_return_sequences=samples, top_k=0, temperature=1.0)
    how = drawn if samples > 1 else dict(do_sample=False)
    rates = []
    for _ in range(int(requests)):
        ids = torch.randint(0, 250, (1, int(prompt_len)), generator=g)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=int(max_tokens),
                min_new_tokens=int(max_tokens),
                use_cache=True,
                pad_token_id=0,
                **how,
            )
        tokens = out.shape[0] * (out.shape[1] - ids.shape[1])
        rates.append(tokens / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_s": statistics.median(rates[1:])}))


if __name__ == "__main__":
    main(*sys.argv[1:])
