"""The learning rate of every optimizer step under transformers' schedule functions, the oracle of
waypoint's schedule (tests/schedule_parity.rs).

  schedules.py <lr> <warmup> <total> <min_lr_ratio>

Prints JSON {"constant": [...], "linear": [...], "cosine": [...]}: the lr each of `total` optimizer
steps runs with, read from the optimizer before each `optimizer.step()` and advanced by
`scheduler.step()` after it, as a PyTorch/transformers loop does. `cosine` is
get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=min_lr_ratio); `linear` decays to 0
(transformers has no floor for it).
"""
import json
import sys

import torch
import transformers as tf

lr, warmup, total, min_ratio = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])


def trace(make):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


print(
    json.dumps(
        {
            "constant": trace(lambda o: tf.get_constant_schedule_with_warmup(o, warmup)),
            "linear": trace(lambda o: tf.get_linear_schedule_with_warmup(o, warmup, total)),
            "cosine": trace(
                lambda o: tf.get_cosine_with_min_lr_schedule_with_warmup(
                    o, warmup, total, min_lr_rate=min_ratio
                )
            ),
        }
    )
)
