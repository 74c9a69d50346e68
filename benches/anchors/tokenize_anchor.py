"""Anchor of the data_cache bench: the same JSONL through the Hugging Face `tokenizers` Python
batch encoder (Rust underneath, all cores), with the same tokenizer.json.

  tokenize_anchor.py <tokenizer.json> <data.jsonl> <text_field>

Prints `seconds tokens`: the time to read, parse and tokenize every row (with special tokens, as
waypoint does for text rows), and the number of ids produced.
"""
import json
import sys
import time

from tokenizers import Tokenizer


def main():
    tok = Tokenizer.from_file(sys.argv[1])
    field = sys.argv[3]
    start = time.perf_counter()
    tokens = 0
    batch = []
    with open(sys.argv[2], encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            batch.append(json.loads(line)[field])
            if len(batch) == 1000:
                tokens += sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=True))
                batch = []
    if batch:
        tokens += sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=True))
    print(f"{time.perf_counter() - start} {tokens}")


if __name__ == "__main__":
    main()
