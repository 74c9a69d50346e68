"""PyTorch's own TCPStore facing waypoint's, for the wire-compatibility tests.

  server <port>   host a TCPStore (PyTorch's) for 2 workers (itself and waypoint's client, counted in
                  init/); set py_key; wait for rust_done; print what waypoint's client wrote
  client <port>   join a TCPStore (waypoint's) as PyTorch's client; read from_rust; write keys back;
                  print what it saw
"""
import json
import sys
from datetime import timedelta

import torch.distributed as dist

T = timedelta(seconds=30)

if sys.argv[1] == "server":
    store = dist.TCPStore("127.0.0.1", int(sys.argv[2]), 2, True, T, wait_for_workers=True)
    store.set("py_key", "hello from python")
    store.wait(["rust_done"], T)
    out = {
        "rust_key": store.get("rust_key").decode(),
        "counter": store.add("counter", 0),
        "multi": [v.decode() for v in store.multi_get(["m1", "m2"])],
        "appended": store.get("log").decode(),
        "deleted_gone": not store.check(["to_delete"]),
        "num_keys": store.num_keys(),
    }
    print(json.dumps(out), flush=True)
else:
    port = int(sys.argv[2])
    store = dist.TCPStore("127.0.0.1", port, None, False, T)
    out = {"from_rust": store.get("from_rust").decode()}
    store.set("from_python", "hello from python")
    out["counter"] = store.add("counter", 10)
    out["cas"] = store.compare_set("cas", "r", "p").decode()
    out["check"] = store.check(["from_rust", "nope"])
    try:
        store.wait(["never"], timedelta(milliseconds=200))
        out["wait_timed_out"] = False
    except Exception:
        out["wait_timed_out"] = True
    store.multi_set(["pm1", "pm2"], ["a", "b"])
    store.append("from_rust", "+py")
    out["after_append"] = store.get("from_rust").decode()
    store.set("python_done", "1")
    print(json.dumps(out), flush=True)
