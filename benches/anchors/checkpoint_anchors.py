"""Anchors for benches/checkpoint_io.rs: save and load the same state with PyTorch's own tools.

usage: checkpoint_anchors.py SPEC.json DIR REPEATS
SPEC.json lists the tensors ([[name, dtype, [shape...]], ...]) waypoint saves. Each anchor saves the
state to DIR (fsync'd, as waypoint's saves are) and loads it back; the median seconds of each are
printed as one JSON object on the last line.
"""
import json
import os
import shutil
import statistics
import sys
import time

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import (
    FileSystemReader,
    FileSystemWriter,
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
)

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(sd, d):
    p = os.path.join(d, "state.pt")
    with open(p, "wb") as f:
        torch.save(sd, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(sd, d):
    return torch.load(os.path.join(d, "state.pt"), weights_only=True)


def st_save(sd, d):
    p = os.path.join(d, "state.safetensors")
    save_file(sd, p, metadata={"format": "pt"})
    fsync_path(p)


def st_load(sd, d):
    return load_file(os.path.join(d, "state.safetensors"))


def dcp_fs_save(sd, d):
    dcp.save(sd, storage_writer=FileSystemWriter(d, sync_files=True))


def dcp_fs_load(sd, d):
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    dcp.load(target, storage_reader=FileSystemReader(d))
    return target


def dcp_hf_save(sd, d):
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(d))
    for name in os.listdir(d):
        fsync_path(os.path.join(d, name))


def dcp_hf_load(sd, d):
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    dcp.load(target, storage_reader=HuggingFaceStorageReader(d))
    return target


ANCHORS = {
    "torch.save": (torch_save, torch_load),
    "safetensors": (st_save, st_load),
    "dcp.FileSystemWriter": (dcp_fs_save, dcp_fs_load),
    "dcp.HuggingFaceStorageWriter": (dcp_hf_save, dcp_hf_load),
}


def main():
    import warnings

    warnings.filterwarnings("ignore")
    spec_path, root, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = json.load(open(spec_path))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, dtype, shape in spec:
        sd[name] = torch.randn(*shape, generator=g).to(DTYPES[dtype]) if shape else torch.tensor(1.0)
    torch.set_num_threads(2)
    out = {}
    for label, (save, load) in ANCHORS.items():
        saves, loads = [], []
        for _ in range(repeats):
            d = os.path.join(root, label)
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            t = time.perf_counter()
            save(sd, d)
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            loaded = load(sd, d)
            loads.append(time.perf_counter() - t)
            del loaded
            shutil.rmtree(d, ignore_errors=True)
        out[label] = {"save": statistics.median(saves), "load": statistics.median(loads)}
        print(f"{label}: save {out[label]['save']:.3f}s load {out[label]['load']:.3f}s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
