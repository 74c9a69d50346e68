"""PyTorch's side of the DCP interoperability tests (driven by tests/pytorch_interop.rs).

  load DIR         load a folder with torch.distributed.checkpoint + HuggingFaceStorageReader; print
                   {fqn: {dtype, shape, sha256 of the bytes}} as JSON
  save DIR [N]     save a deterministic state with HuggingFaceStorageWriter (N > 1: N gloo ranks,
                   DTensors sharded over dim 0, save_distributed=True); print the same JSON of the
                   whole tensors
"""
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter


def digest(t: torch.Tensor) -> dict:
    t = t.detach().contiguous()
    raw = t.view(torch.uint8) if t.dim() > 0 else t.reshape(1).view(torch.uint8)
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
    }


def state() -> dict:
    g = torch.Generator().manual_seed(1234)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "optim.state.layers.0.self_attn.q_proj.weight.exp_avg": torch.randn(8, 8, generator=g),
        "optim.state.layers.0.self_attn.q_proj.weight.step": torch.tensor(3.0),
        "model.norm.weight": torch.randn(6, generator=g).to(torch.float16),
        "rng.cpu": torch.randint(0, 255, (32,), generator=g, dtype=torch.uint8),
        "counters.data_consumed": torch.tensor([6400], dtype=torch.int64),
    }


def load(path: str) -> None:
    reader = HuggingFaceStorageReader(path)
    meta = reader.read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    dcp.load(sd, storage_reader=HuggingFaceStorageReader(path))
    print(json.dumps({k: digest(v) for k, v in sd.items()}))


def save_rank(rank: int, world: int, path: str, port: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    sd = {}
    for k, v in state().items():
        sd[k] = distribute_tensor(v, mesh, [Shard(0)]) if v.dim() > 0 and v.shape[0] % world == 0 else v
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(path, save_distributed=True))
    dist.destroy_process_group()


def save(path: str, world: int) -> None:
    if world <= 1:
        dcp.save(state(), storage_writer=HuggingFaceStorageWriter(path))
    else:
        import socket
        import torch.multiprocessing as mp

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(save_rank, args=(world, path, port), nprocs=world, join=True)
    print(json.dumps({k: digest(v) for k, v in state().items()}))


if __name__ == "__main__":
    cmd, path = sys.argv[1], sys.argv[2]
    if cmd == "load":
        load(path)
    elif cmd == "save":
        save(path, int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    else:
        sys.exit(f"unknown command {cmd}")
