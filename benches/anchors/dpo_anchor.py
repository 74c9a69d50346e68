"""TRL anchor for waypoint's DPO throughput: TRL 1.16's DPOTrainer on the same HF model and pairs,
LoRA (the reference is the base with the adapters off, on both sides), fp32 on CPU (TRL's bf16
autocast turned off, as waypoint computes in fp32 there), the same thread count, every sequence cut
to the same length.

  python dpo_anchor.py <model_dir> <pairs.jsonl> <batch> <seq> <steps> <threads> <lora_rank>

Prints one JSON line: {"pairs_per_s": batch / the median time of the timed steps}.
"""
import json
import statistics
import sys
import tempfile
import time

import torch
import transformers as tf
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

model_dir, data = sys.argv[1], sys.argv[2]
batch, seq, steps, threads, rank = map(int, sys.argv[3:8])
torch.set_num_threads(threads)
tok = tf.AutoTokenizer.from_pretrained(model_dir)
model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
rows = [json.loads(l) for l in open(data) if l.strip()]


class Timer(tf.TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.start)


timer = Timer()
args = DPOConfig(
    output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
    learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
    report_to=[], use_cpu=True, bf16=False, max_length=seq, dataloader_num_workers=0,
    gradient_checkpointing=False,
)
peft = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=tok, peft_config=peft, callbacks=[timer])
trainer.train()
timed = timer.times[2:] if len(timer.times) > 4 else timer.times
print(json.dumps({"pairs_per_s": batch / statistics.median(timed)}))
