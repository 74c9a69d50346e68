"""transformers' `generate` with its KV cache on CPU: tokens/s, the anchor of the sampling figures
in benches/serve.rs — greedy, or with <samples> > 1 that many sequences drawn (temperature 1, no
top-k) for each prompt (`num_return_sequences`).

  generate_anchor.py <model_dir> <requests> <prompt_len> <max_tokens> <threads> [<samples>]
prints {"tokens_per_s": median over the requests after the first}.

  generate_anchor.py batch <model_dir> <rounds> <n> <max_tokens> <threads>
greedy over n prompts at once, of the lengths `prompt_lengths` gives, padded on the left with
an attention mask (how transformers decodes a batch of prompts); prints {"tokens_per_s": median
over the rounds after the first}.
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


def prompt_lengths(n):
    """The prompt lengths of a round of n requests (16 to 48 tokens; benches/serve.rs's client
    sends the same)."""
    return [16 + (7 * i) % 33 for i in range(n)]


def batch(model_dir, rounds, n, max_tokens, threads):
    torch.set_num_threads(int(threads))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(17)
    lengths = prompt_lengths(int(n))
    longest = max(lengths)
    rates = []
    for _ in range(int(rounds)):
        prompts = [torch.randint(1, 250, (k,), generator=g) for k in lengths]
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = p
            mask[i, longest - len(p):] = 1
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=int(max_tokens),
                min_new_tokens=int(max_tokens),
                use_cache=True,
                pad_token_id=0,
                do_sample=False,
            )
        tokens = out.shape[0] * (out.shape[1] - ids.shape[1])
        rates.append(tokens / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_s": statistics.median(rates[1:])}))


if __name__ == "__main__":
    if sys.argv[1] == "batch":
        batch(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
