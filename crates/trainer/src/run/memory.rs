//! The memory plan: what one rank will hold while training — parameters, gradients, optimizer
//! state, activations, the host copy of a checkpoint — estimated from the model's config and the
//! flags before anything is loaded, and checked against the memory the rank can have (free device
//! memory on CUDA, available RAM on CPU, shared by the ranks of a node). A plan that does not fit is
//! refused before any work, with the figures and what to change; a job the kernel would kill with
//! no word (exit 137, `status.json` left at `RUNNING`) ends as `FAILED` with exit 2 instead.
//!
//! [`MemoryPlan::estimate`] is the policy (a pure function); [`available`] reads the machine.

use std::fmt;

use tch::Device;

use crate::model::ModelConfig;

/// A plan that does not fit: refused before any work (exit 2, recorded in `status.json`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MemoryPlanError(pub String);

pub use waypoint_config::MemoryCheck;

/// What the estimate depends on besides the model's config.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInputs {
    /// Trained weights: the LoRA adapters' count, or `None` for full-parameter training.
    pub lora_parameters: Option<u128>,
    /// `batch_size × max_seq_len`: tokens of one micro-batch on one rank.
    pub micro_batch_tokens: u64,
    /// Micro-batches per step (gradients of the earlier ones are kept while the next runs).
    pub gradient_accumulation: u64,
    /// Ranks in the job (each holds its share of a checkpoint's host copy).
    pub world_size: u64,
    /// Compute on a GPU (bf16 matmuls: weight copies and narrower activations).
    pub cuda: bool,
    /// Keep only each decoder layer's input through the forward pass and recompute the rest.
    pub activation_checkpointing: bool,
    /// AdamW's state sharded over the ranks (`--sharding optimizer`).
    pub sharded_optimizer: bool,
    /// Weights, gradients and AdamW's state sharded (`--sharding full`; implies recomputation).
    pub sharded_weights: bool,
    /// The node's memory tier saves too, its copy split over this many ranks of the node (`None`:
    /// no tier): a second saver, with a host copy of its own.
    pub memory_tier: Option<u64>,
}

/// Bytes one rank will hold while training, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Weights (fp32; a LoRA run's frozen base included, in bf16 on CUDA).
    pub parameters: u64,
    /// Gradients of the trained weights (two sets with gradient accumulation).
    pub gradients: u64,
    /// AdamW's two moments of the trained weights.
    pub optimizer: u64,
    /// Activations kept for the backward pass of one micro-batch, and the logits.
    pub activations: u64,
    /// bf16 copies of the weights made for the matmuls (CUDA), or the whole weights (and their
    /// gradients) of the part running on gathered weights (`--sharding full`).
    pub compute_copies: u64,
    /// This rank's share of a checkpoint's host copy (host memory: counted on CPU only). One copy
    /// per saver (the durable tier's, the memory tier's): a save copies nothing until the one
    /// before it is written.
    pub checkpoint_copy: u64,
    /// The step's passing buffers over the gradients: with other ranks (weights not sharded), the
    /// gradients flattened into one buffer, its sum and the ring's receive buffer; alone, the
    /// clipping's and AdamW's temporaries.
    pub step_buffers: u64,
    /// libtorch and the process itself while training (its code and data paged in, the tokenizer,
    /// the data's pages, the threads), measured.
    pub runtime: u64,
    /// What the runtime grows by at exit, when libtorch's static destructors page its code back in
    /// (the state is freed by then, so this is a floor under the total, not a term of it).
    pub teardown: u64,
}

const F32: u64 = 4;
const BF16: u64 = 2;
const MIB: u64 = 1 << 20;

impl MemoryPlan {
    /// The estimate for `model` under `inputs`. Activations count what autograd keeps per token of
    /// a decoder layer (the residual stream, the norms' outputs, q/k/v and their rotated copies, the
    /// attention output, the MLP's four intermediate products) plus the logits' three vocabulary-wide
    /// buffers of the loss and its gradient. Measured on CPU (peak resident set, `VmHWM`, with
    /// background saves, sharding none/optimizer/full at 1-3 ranks) the plan is at or above the peak
    /// and within 15% of it — see the `sharding` bench and `tests/train_memory.rs`.
    pub fn estimate(model: &ModelConfig, inputs: &PlanInputs) -> Self {
        let c = model;
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let q = (c.num_attention_heads * c.head_dim) as u64;
        let kv = (c.num_key_value_heads * c.head_dim) as u64;
        let layers = c.num_hidden_layers as u64;
        let tokens = inputs.micro_batch_tokens;
        let base = sat(c.parameter_count());
        let trained = inputs.lora_parameters.map(sat).unwrap_or(base);
        let all = base.saturating_add(if inputs.lora_parameters.is_some() {
            trained
        } else {
            0
        });
        // Per token of one layer: fp32 norm-side tensors, and matmul-side ones in the compute dtype.
        let qk_norm = if c.qk_norm { 2 * (q + kv) } else { 0 };
        let fp32_elems = 6 * h + qk_norm;
        let (compute_bytes, casts) = if inputs.cuda {
            (BF16, 2 * h + q + i)
        } else {
            (F32, 0)
        };
        let layer_bytes = F32 * fp32_elems + compute_bytes * (4 * q + 4 * kv + 4 * i + casts);
        let recompute = inputs.activation_checkpointing || inputs.sharded_weights;
        let per_token_layer_stack = if recompute {
            // Each layer's input, plus one layer's full activations (twice: recomputed, and its
            // gradients) while it is recomputed.
            F32 * h * layers + 2 * layer_bytes
        } else {
            // Every layer's activations (the backward pass frees each layer's as it goes).
            layer_bytes * layers
        };
        let vocab = c.vocab_size as u64;
        let logits_per_token = 3 * F32 * vocab + if inputs.cuda { BF16 * vocab } else { 0 };
        let activations = tokens
            .saturating_mul(per_token_layer_stack.saturating_add(logits_per_token + 2 * F32 * h));
        let per_layer_weights = base / layers.max(1);
        let lora = inputs.lora_parameters.is_some();
        let compute_copies = if inputs.sharded_weights {
            // One part's whole weights gathered at a time (the projections in bf16 on CUDA; the
            // collective's buffer and the tensors cut from it live together for a moment) and,
            // when they are trained, their whole gradients: on CPU staged into one fp32 buffer as
            // they go; on CUDA bf16, copied into one padded fp32 buffer for NCCL. Two parts' worth:
            // the next part's gather and the last one's gradients are still held while one runs
            // (measured on CPU: 1.9-2x one part's weights and gradients).
            let part = per_layer_weights.max(vocab * h);
            2 * match (lora, inputs.cuda) {
                (true, true) => 2 * BF16 * part,
                (true, false) => 2 * F32 * part,
                (false, true) => (BF16 + 2 * F32) * part,
                (false, false) => 2 * F32 * part,
            }
        } else {
            match (inputs.cuda && inputs.lora_parameters.is_none(), recompute) {
                // On CPU there are none; under LoRA on CUDA the base is already bf16.
                (false, _) => 0,
                // Every layer's bf16 weights are kept for the backward pass…
                (true, false) => BF16 * base,
                // …or only those of the layer being recomputed (and the embedding for the head).
                (true, true) => BF16 * (2 * per_layer_weights + vocab * h),
            }
        };
        let gradient_sets = if inputs.gradient_accumulation > 1 {
            2
        } else {
            1
        };
        let weight_shards = if inputs.sharded_weights {
            inputs.world_size.max(1)
        } else {
            1
        };
        let optimizer_shards = if inputs.sharded_optimizer || inputs.sharded_weights {
            inputs.world_size.max(1)
        } else {
            1
        };
        // This rank's share of the weights and AdamW's two moments, copied to host memory while the
        // next steps run; one save's at a time (the saver waits for the previous write first). The
        // memory tier's saver adds its own copy of the node's share and its writes' buffers:
        // measured at 1.7 copies on one CPU rank (12M weights), counted as 2 (a durable save of
        // the same step shares the tier's copy).
        let state = (3 * F32).saturating_mul(trained);
        let checkpoint_copy = if inputs.cuda {
            0
        } else {
            // The tier's copy is the node's part split over its ranks: this rank's rows of what
            // is sharded over the job, a share of what is replicated.
            let world = inputs.world_size.max(1);
            let tier = inputs.memory_tier.map_or(0, |node_ranks| {
                let node_ranks = node_ranks.max(1);
                let weights = F32.saturating_mul(trained);
                let moments = 2 * weights;
                let weights = weights
                    / if inputs.sharded_weights {
                        world
                    } else {
                        node_ranks
                    };
                let sharded_moments = inputs.sharded_optimizer || inputs.sharded_weights;
                let moments = moments / if sharded_moments { world } else { node_ranks };
                2 * (weights + moments)
            });
            state / inputs.world_size.max(1) + tier
        };
        // The gradients' sum over the ranks (replicated weights) flattens them into one buffer,
        // sums it into another and receives into a third: three sets of gradients while the step's
        // other buffers are gone. Alone, the clipping's and AdamW's temporaries: measured on CPU at
        // 0.65-0.8x the gradients (their size, their squares, the update's denominator). With
        // sharded weights the gradients are summed part by part (see the weight copies) and AdamW
        // runs over this rank's rows: a quarter of them, measured within the two parts' slack.
        let trained_grads = F32.saturating_mul(trained);
        let step_buffers = if inputs.sharded_weights {
            trained_grads / 4 / inputs.world_size.max(1)
        } else if inputs.world_size > 1 {
            3 * trained_grads
        } else {
            trained_grads / 4 * 3
        };
        // Under LoRA on CUDA the frozen base is held in bf16; sharded, the base is cut over the
        // ranks and the adapters (and their gradients) stay whole.
        let base_bytes = if lora && inputs.cuda { BF16 } else { F32 }.saturating_mul(base);
        let (parameters, gradients) = if lora {
            (
                (base_bytes / weight_shards).saturating_add(F32.saturating_mul(trained)),
                (gradient_sets * F32).saturating_mul(trained),
            )
        } else {
            (
                F32.saturating_mul(all) / weight_shards,
                (gradient_sets * F32).saturating_mul(trained) / weight_shards,
            )
        };
        Self {
            parameters,
            gradients,
            optimizer: (2 * F32).saturating_mul(trained) / optimizer_shards,
            activations,
            compute_copies,
            checkpoint_copy,
            step_buffers,
            // CUDA: the context and the kernels' workspace on the device. CPU: measured as what a
            // run's peak resident set holds beyond the other terms: 410-415 MiB for the built-in
            // tiny model (whose state is a few MiB) in a release build, ~435 MiB in a debug one
            // (a bigger binary paged in), 1 to 3 ranks, with saves; and 460-520 MiB for random
            // Llamas of 12-47 M weights (the buffers' slack grows with the model). 490 MiB.
            runtime: if inputs.cuda { 1024 * MIB } else { 490 * MIB },
            // CPU: the tiny model's runs peak at 520-536 MiB as the process exits.
            teardown: if inputs.cuda { 0 } else { 70 * MIB },
        }
    }

    /// Everything, in bytes: the sum of what is held while training, or the runtime at exit if
    /// that is more (a small model's).
    pub fn total(&self) -> u64 {
        [
            self.parameters,
            self.gradients,
            self.optimizer,
            self.activations,
            self.compute_copies,
            self.checkpoint_copy,
            self.step_buffers,
            self.runtime,
        ]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
        .max(self.runtime.saturating_add(self.teardown))
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} per rank: parameters {}, gradients {}, optimizer state {}, activations {}",
            gib(self.total()),
            gib(self.parameters),
            gib(self.gradients),
            gib(self.optimizer),
            gib(self.activations),
        )?;
        if self.compute_copies > 0 {
            write!(f, ", weight copies {}", gib(self.compute_copies))?;
        }
        if self.checkpoint_copy > 0 {
            write!(f, ", checkpoint host copy {}", gib(self.checkpoint_copy))?;
        }
        if self.step_buffers > 0 {
            write!(f, ", step buffers {}", gib(self.step_buffers))?;
        }
        write!(f, ", runtime {}", gib(self.runtime))
    }
}

/// Memory one rank can have: on CUDA, what is free on its GPU; on CPU, the RAM available to the
/// process (the lower of the system's and its cgroup's) shared among `local_ranks` ranks. `None`
/// when it cannot be read. Also says where the figure comes from.
pub fn available(device: Device, local_ranks: u64) -> Option<(u64, String)> {
    match device {
        Device::Cuda(gpu) => crate::collective::cuda::free_memory(gpu)
            .ok()
            .map(|free| (free, format!("free on GPU {gpu}"))),
        _ => {
            let mut sys = sysinfo::System::new();
            sys.refresh_memory();
            let mut bytes = sys.available_memory();
            let mut source = "available RAM".to_string();
            // A container's limit, when it has one below the machine's memory: what its processes'
            // own (non-cache) memory leaves of it — the page cache is reclaimed before the limit
            // kills anything.
            if let Some(limits) = sys.cgroup_limits() {
                let free = limits.total_memory.saturating_sub(limits.rss);
                if limits.total_memory < sys.total_memory() && free < bytes {
                    bytes = free;
                    source = "free under the container's memory limit".into();
                }
            }
            if bytes == 0 {
                return None;
            }
            let share = bytes / local_ranks.max(1);
            if local_ranks > 1 {
                source = format!("{source}, shared by {local_ranks} ranks on this machine");
            }
            Some((share, source))
        }
    }
}

/// [`judge`] for a plan with the memory tier's host copies, and whether the tier stays on: when
/// the plan does not fit but the plan without the tier does, the tier goes off and that plan's
/// verdict stands (a start is not refused for what the tier would add).
pub fn judge_with_tier(
    plan: &MemoryPlan,
    available: u64,
    source: &str,
    other: &OtherPlans,
    micro_batch_tokens: u64,
) -> (Result<String, String>, bool) {
    let verdict = judge(plan, available, source, other, micro_batch_tokens);
    let Some(without) = other
        .without_memory_tier
        .as_ref()
        .filter(|_| verdict.is_err())
    else {
        return (verdict, true);
    };
    let none = OtherPlans::default();
    match judge(without, available, source, &none, micro_batch_tokens) {
        Ok(line) => (Ok(line), false),
        Err(_) => (verdict, true),
    }
}

/// The plans of the same run with one setting changed, for a refusal's advice.
#[derive(Debug, Clone, Default)]
pub struct OtherPlans {
    /// With `--activation_checkpointing`, when that would hold fewer activations.
    pub with_checkpointing: Option<MemoryPlan>,
    /// Without the memory tier, when it is on.
    pub without_memory_tier: Option<MemoryPlan>,
}

/// The verdict on `plan` given `available` bytes: `Ok` with a line to log when it fits, `Err` with
/// the figures and what to change when it does not. `with_checkpointing` is the plan with
/// `--activation_checkpointing`, offered when it would help.
pub fn judge(
    plan: &MemoryPlan,
    available: u64,
    source: &str,
    other: &OtherPlans,
    micro_batch_tokens: u64,
) -> Result<String, String> {
    let total = plan.total();
    if total <= available {
        return Ok(format!("memory plan: {plan} ({} {source})", gib(available)));
    }
    let mut advice = Vec::new();
    // Activations scale with the tokens of a micro-batch: the largest fraction of them that fits.
    let fixed = total - plan.activations;
    if plan.activations > 0 && fixed < available {
        let fraction = (available - fixed) as f64 / plan.activations as f64;
        let tokens = (micro_batch_tokens as f64 * fraction) as u64;
        advice.push(format!(
            "lower --batch_size or --max_seq_len: about {tokens} tokens per micro-batch fit \
             (now {micro_batch_tokens}); keep the global batch with --gradient_accumulation"
        ));
    }
    if let Some(without) = &other.without_memory_tier {
        advice.push(format!(
            "turn the memory tier off with --memory_save_steps 0 (its host copy: plan {} \
             instead of {})",
            gib(without.total()),
            gib(plan.total())
        ));
    }
    if let Some(ac) = &other.with_checkpointing {
        advice.push(format!(
            "add --activation_checkpointing (activations {} instead of {}; plan {})",
            gib(ac.activations),
            gib(plan.activations),
            gib(ac.total())
        ));
    }
    if plan.optimizer > plan.activations {
        advice.push(
            "train LoRA adapters (--lora_rank) instead of every weight, or spread the job over \
             more GPUs/nodes"
                .into(),
        );
    }
    advice.push(
        "or pass --memory_check warn to start anyway (the plan is at or above the measured peak, \
             by under 15%)"
            .into(),
    );
    Err(format!(
        "the memory plan does not fit: {plan}, but only {} is {source}. To fit: {}",
        gib(available),
        advice.join("; ")
    ))
}

/// The host allocator's policy for buffers of 4 MiB or more — a weight, its gradient or AdamW state,
/// a gathered part, a save's host copy: each is mapped on its own and handed back to the system
/// when freed. glibc's default raises its mmap threshold (up to 32 MiB) each time such a buffer is
/// freed, after which buffers below it come from the allocating thread's arena and stay there when
/// freed: the training threads, the collective's and the save's threads would each keep their own
/// dead copies, and the process would grow past what it holds by an amount that depends on timing
/// (measured: 5-10% of the peak with sharded weights), which no plan can count. Call once, first
/// thing in `main`; nothing elsewhere than glibc.
pub fn settle_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt sets a parameter of glibc's allocator; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// The most resident memory this process has held so far, in bytes: the kernel's high-water mark
/// of its resident set (`VmHWM` in `/proc/self/status`), or `getrusage`'s `ru_maxrss` where there
/// is no `/proc`.
pub fn peak_rss() -> Option<u64> {
    if let Some(kb) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(vm_hwm_kb)
    {
        return Some(kb * 1024);
    }
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` into the zeroed buffer it is given.
    let code = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if code != 0 {
        return None;
    }
    // SAFETY: getrusage succeeded, so it filled the struct (and zeroed was already valid).
    let usage = unsafe { usage.assume_init() };
    // Linux reports kilobytes.
    u64::try_from(usage.ru_maxrss).ok().map(|kb| kb * 1024)
}

/// The `VmHWM:` line of a `/proc/<pid>/status`, in kB.
pub fn vm_hwm_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}

fn sat(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// Bytes as GiB (MiB below one GiB), for people.
fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(tokens: u64) -> PlanInputs {
        PlanInputs {
            lora_parameters: None,
            micro_batch_tokens: tokens,
            gradient_accumulation: 1,
            world_size: 1,
            cuda: false,
            activation_checkpointing: false,
            sharded_optimizer: false,
            sharded_weights: false,
            memory_tier: None,
        }
    }

    fn qwen3_8b() -> ModelConfig {
        ModelConfig::from_json(
            "qwen3-8b",
            serde_json::json!({
                "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
                "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": false,
            }),
        )
        .unwrap()
    }

    #[test]
    fn state_is_sixteen_bytes_a_weight_and_lora_trains_few() {
        let c = qwen3_8b();
        let n = c.parameter_count() as u64;
        assert!((8_100_000_000..8_300_000_000).contains(&n), "{n}");
        let full = MemoryPlan::estimate(&c, &inputs(4096));
        assert_eq!(full.parameters + full.gradients + full.optimizer, 16 * n);
        let lora_n = c.lora_parameter_count(16, &["q_proj".into(), "v_proj".into()]);
        let lora = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                lora_parameters: Some(lora_n),
                ..inputs(4096)
            },
        );
        // The base is held, but only the adapters have gradients and optimizer state.
        assert_eq!(lora.parameters, 4 * (n + lora_n as u64));
        assert_eq!(lora.optimizer, 8 * lora_n as u64);
        // q (4096 → 4096) and v (4096 → 1024) at rank 16, 36 layers.
        assert_eq!(lora_n, 36 * 16 * ((4096 + 4096) + (1024 + 4096)));
        // The unembedding's adapter is one, not one a layer: vocabulary 151,936 × hidden 4096.
        let with_head =
            c.lora_parameter_count(16, &["q_proj".into(), "v_proj".into(), "lm_head".into()]);
        assert_eq!(with_head - lora_n, 16 * (151_936 + 4096));
    }

    #[test]
    fn activations_scale_with_tokens_and_checkpointing_cuts_them() {
        let c = qwen3_8b();
        let a = MemoryPlan::estimate(&c, &inputs(4096)).activations;
        let b = MemoryPlan::estimate(&c, &inputs(8192)).activations;
        assert_eq!(b, 2 * a);
        let ac = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                activation_checkpointing: true,
                ..inputs(4096)
            },
        );
        assert!(ac.activations * 4 < a, "{} vs {a}", ac.activations);
        // On CUDA, bf16 copies of every weight unless checkpointing keeps one layer's.
        let cuda = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                cuda: true,
                ..inputs(4096)
            },
        );
        assert_eq!(cuda.compute_copies, 2 * c.parameter_count() as u64);
        assert_eq!(cuda.checkpoint_copy, 0);
        // LoRA on CUDA: the frozen base in bf16, no copies of it.
        let lora_n = c.lora_parameter_count(16, &["q_proj".into()]);
        let lora_cuda = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                cuda: true,
                lora_parameters: Some(lora_n),
                ..inputs(4096)
            },
        );
        let n = c.parameter_count() as u64;
        assert_eq!(lora_cuda.parameters, 2 * n + 4 * lora_n as u64);
        assert_eq!(lora_cuda.compute_copies, 0);
        // Sharded over 8 ranks, AdamW's state is an eighth.
        let sharded = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                sharded_optimizer: true,
                world_size: 8,
                ..inputs(4096)
            },
        );
        assert_eq!(sharded.optimizer * 8, 8 * c.parameter_count() as u64);
        // Fully sharded over 8 ranks: 16 bytes a weight / 8, plus one part's whole weights.
        let full = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                sharded_weights: true,
                world_size: 8,
                ..inputs(4096)
            },
        );
        let n = c.parameter_count() as u64;
        assert_eq!(full.parameters + full.gradients + full.optimizer, 2 * n);
        // Two parts' whole weights and gradients (here the 151936 × 4096 embedding, fp32).
        assert_eq!(full.compute_copies, 2 * 2 * 4 * 151_936 * 4096);
    }

    #[test]
    fn a_plan_that_does_not_fit_says_what_to_change() {
        // The new user: the tiny model with 20000 × 4096 tokens per micro-batch.
        let c = ModelConfig::tiny();
        let tokens = 20_000 * 4096;
        let plan = MemoryPlan::estimate(&c, &inputs(tokens));
        let ac = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                activation_checkpointing: true,
                ..inputs(tokens)
            },
        );
        let ram = 24u64 << 30;
        let err = judge(
            &plan,
            ram,
            "available RAM",
            &OtherPlans {
                with_checkpointing: Some(ac),
                without_memory_tier: None,
            },
            tokens,
        )
        .unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
        assert!(err.contains("24.0 GiB is available RAM"), "{err}");
        assert!(err.contains("--batch_size"), "{err}");
        assert!(err.contains("--activation_checkpointing"), "{err}");
        // The advised token count fits.
        let advised: u64 = err
            .split("about ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!(advised > 0 && advised < tokens);
        let smaller = MemoryPlan::estimate(&c, &inputs(advised));
        assert!(smaller.total() <= ram, "{smaller}");
        let ok = judge(
            &smaller,
            ram,
            "available RAM",
            &OtherPlans::default(),
            advised,
        )
        .unwrap();
        assert!(ok.starts_with("memory plan: "), "{ok}");
    }

    #[test]
    fn the_memory_tier_is_counted_and_its_cost_named_when_the_plan_does_not_fit() {
        // A full-parameter 8B model on one CPU rank: the tier adds two copies of the state.
        let c = qwen3_8b();
        let without = MemoryPlan::estimate(&c, &inputs(512));
        let with = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                memory_tier: Some(1),
                ..inputs(512)
            },
        );
        let state = 3 * 4 * c.parameter_count() as u64;
        assert_eq!(with.checkpoint_copy, without.checkpoint_copy + 2 * state);
        // Split over a node's 4 ranks, each holds a quarter of the tier's copy.
        let shared = MemoryPlan::estimate(
            &c,
            &PlanInputs {
                memory_tier: Some(4),
                ..inputs(512)
            },
        );
        assert_eq!(shared.checkpoint_copy, without.checkpoint_copy + state / 2);
        let err = judge(
            &with,
            without.total(),
            "available RAM",
            &OtherPlans {
                with_checkpointing: None,
                without_memory_tier: Some(without),
            },
            512,
        )
        .unwrap_err();
        assert!(err.contains("--memory_save_steps 0"), "{err}");
        // What only the tier would add turns the tier off instead of refusing the start.
        let other = OtherPlans {
            with_checkpointing: None,
            without_memory_tier: Some(without),
        };
        let (verdict, tier_on) = judge_with_tier(&with, without.total(), "RAM", &other, 512);
        assert!(!tier_on && verdict.is_ok(), "{verdict:?}");
        let (verdict, tier_on) = judge_with_tier(&with, with.total(), "RAM", &other, 512);
        assert!(tier_on && verdict.is_ok(), "it fits with the tier");
        let (verdict, tier_on) = judge_with_tier(&with, without.total() - 1, "RAM", &other, 512);
        assert!(
            tier_on && verdict.is_err(),
            "fits neither way: refused as it is"
        );
    }

    #[test]
    fn the_peak_grows_with_what_was_held() {
        let before = peak_rss().unwrap();
        let big = vec![1u8; 64 << 20];
        assert!(big.iter().all(|&b| b == 1));
        assert!(peak_rss().unwrap() >= before.max(64 << 20));
    }

    #[test]
    fn the_machine_reports_some_memory() {
        let (bytes, source) = available(Device::Cpu, 2).unwrap();
        assert!(
            bytes > 0 && source.contains("shared by 2 ranks"),
            "{source}"
        );
    }
}
