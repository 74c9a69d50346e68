//! The service-mode trainer's model (`waypoint serve`): a LoRA training client that a remote loop
//! drives one call at a time — `forward_backward` accumulates the gradients of a loss over the
//! datums it is given, `optim_step` applies them with the Adam parameters the call carries —
//! instead of the batch loop's fused step. Same model code, LoRA and AdamW as `waypoint train`.
//!
//! Its interface holds no libtorch types (tokens, weights and log-probs are plain vectors): the
//! HTTP side (`waypoint-serve`) never sees a tensor. Every call runs behind the libtorch
//! boundary, so a libtorch error comes back as an error, never a panic.
//!
//! Checkpoints are a batch run's: [`TrainingModel::begin_save`] copies `step-N`'s resumable state
//! (adapters and AdamW state under DCP's names) and promotable PEFT adapter to the host, for the
//! checkpoint crate's one save protocol to commit (in the background, while the model trains on);
//! [`TrainingModel::load`] restores it as a resume does. Each
//! manifest records the model's [`Identity`] (`training`), so a checkpoint alone makes the model
//! again ([`identity_of`]).

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use tokio::runtime::Handle;
use waypoint_checkpoint::{CheckpointManager, SaveRequest, StepName};
use waypoint_config::{LoraConfig, SamplerDtype};

use crate::checkpointing::state::{
    copy_to_host, restore_state, sampler_part, state_items, SaveContext,
};
use crate::model::Model;
use crate::optim::{accumulate, clip_grad_norm, gradients, AdamW, AdamWConfig};
use crate::step::libtorch_boundary;

mod sampling;

use sampling::check_tokens;
pub use sampling::{BaseModel, Request, SampleParams, Sampled, Sampling, TextStop};

/// Which projections a LoRA client trains, as the Tinker SDK's `LoraConfig` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank r.
    pub rank: i64,
    /// The attention projections (q, k, v, o).
    pub attn: bool,
    /// The MLP projections (gate, up, down).
    pub mlp: bool,
    /// The unembedding (`lm_head`).
    pub unembed: bool,
    /// The seed of the adapters' initialisation.
    pub seed: i64,
}

impl LoraSpec {
    /// The adapters' configuration: alpha = r (a scale of 1), no dropout.
    fn config(&self) -> LoraConfig {
        let attn = ["q_proj", "k_proj", "v_proj", "o_proj"];
        let mlp = ["gate_proj", "up_proj", "down_proj"];
        let targets = attn
            .iter()
            .filter(|_| self.attn)
            .chain(mlp.iter().filter(|_| self.mlp))
            .chain(["lm_head"].iter().filter(|_| self.unembed))
            .map(|t| t.to_string())
            .collect();
        LoraConfig {
            rank: self.rank,
            alpha: self.rank as f64,
            dropout: 0.0,
            targets,
        }
    }
}

/// One sequence of a `forward`/`forward_backward` call: position i of `tokens` predicts
/// `targets[i]`; the loss reads the per-position inputs it needs (the others are empty).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Datum {
    /// The model's input.
    pub tokens: Vec<i64>,
    /// The token each position should predict — or, with a `width` over 1, that many tokens a
    /// position, row-major (`[positions, width]`: distillation's several targets).
    pub targets: Vec<i64>,
    /// Each target's weight (cross-entropy), laid out as `targets`.
    pub weights: Vec<f32>,
    /// The sampler's log-prob of each target (the policy-gradient losses).
    pub sampler_logprobs: Vec<f32>,
    /// Each position's advantage (the policy-gradient losses).
    pub advantages: Vec<f32>,
    /// Each position's clip bounds (`ppo`, `cispo`), when the datum gives its own; else the
    /// call's.
    pub clip_low: Vec<f32>,
    /// See `clip_low`.
    pub clip_high: Vec<f32>,
    /// Targets a position (0 or 1: one; more only with cross-entropy).
    pub width: usize,
}

impl Datum {
    /// Targets a position.
    pub fn width(&self) -> usize {
        self.width.max(1)
    }
}

/// The losses served, as the Tinker SDK names them; each a sum over datums and positions, with
/// `lp` the target's log-prob under the model, `q` the sampler's, `r = exp(lp − q)`, `A` the
/// advantage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// `cross_entropy`: −Σ lp · weight.
    CrossEntropy,
    /// `importance_sampling`: −Σ r · A.
    ImportanceSampling,
    /// `ppo`: −Σ min(r · A, clip(r, low, high) · A).
    Ppo {
        /// The clip's lower bound (`clip_low_threshold`).
        low: f64,
        /// Its upper bound (`clip_high_threshold`).
        high: f64,
    },
    /// `cispo`: −Σ sg(clip(r, low, high)) · lp · A (sg: no gradient through it).
    Cispo {
        /// The clip's lower bound.
        low: f64,
        /// Its upper bound.
        high: f64,
    },
    /// `dro`: −Σ (lp · A − ½ β (lp − q)²).
    Dro {
        /// β, the quadratic penalty's weight.
        beta: f64,
    },
}

impl Loss {
    /// Whether it reads the sampler's log-probs and the advantages (else the weights).
    pub fn is_policy_gradient(&self) -> bool {
        !matches!(self, Loss::CrossEntropy)
    }

    /// The call's clip bounds (`ppo`, `cispo`).
    pub fn clip(&self) -> Option<(f64, f64)> {
        match *self {
            Loss::Ppo { low, high } | Loss::Cispo { low, high } => Some((low, high)),
            _ => None,
        }
    }

    /// Each position's term of the loss (the loss is minus their sum) from the target log-probs
    /// `lp` and the inputs, all of one shape; `low` and `high` are each position's clip bounds
    /// (`ppo`, `cispo`: the datum's own or the call's).
    fn terms(&self, lp: &Tensor, inputs: &LossInputs) -> Tensor {
        let LossInputs {
            weights,
            q,
            a,
            low,
            high,
        } = inputs;
        let ratio = || (lp - q).exp();
        match *self {
            Loss::CrossEntropy => lp * weights,
            Loss::ImportanceSampling => ratio() * a,
            Loss::Ppo { .. } => {
                let r = ratio();
                let clipped = r.clamp_tensor(Some(low), Some(high)) * a;
                (r * a).minimum(&clipped)
            }
            Loss::Cispo { .. } => ratio().clamp_tensor(Some(low), Some(high)).detach() * lp * a,
            Loss::Dro { beta } => lp * a - (lp - q).square() * (0.5 * beta),
        }
    }
}

/// A group's per-position inputs of the loss, all of one shape.
struct LossInputs {
    /// Cross-entropy's weights.
    weights: Tensor,
    /// The sampler's log-probs.
    q: Tensor,
    /// The advantages.
    a: Tensor,
    /// The clip's bounds.
    low: Tensor,
    high: Tensor,
}

/// What a `forward`/`forward_backward` call gives back.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Each datum's target log-probs under the model as it was before the call (laid out as its
    /// targets).
    pub logprobs: Vec<Vec<f32>>,
    /// Targets a position, in every datum of the call.
    pub width: usize,
    /// The loss: the sum over datums and positions of `-logprob × weight`.
    pub loss_sum: f64,
}

/// The Adam parameters of one `optim_step` (decoupled weight decay, as `torch.optim.AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    /// Learning rate.
    pub learning_rate: f64,
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the gradients' global L2 norm to this (0: no clipping).
    pub grad_clip_norm: f64,
}

/// What an `optim_step` did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stepped {
    /// The gradients' global L2 norm before clipping (0 when there were none).
    pub grad_norm: f64,
    /// Optimizer steps taken so far.
    pub steps: u64,
}

/// What a served model is — its base model's name and its LoRA — as every checkpoint it saves
/// records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The base model's name (`--base_model NAME=…`).
    pub base_model: String,
    /// Its adapters.
    pub lora: LoraSpec,
}

/// The identity recorded in checkpoint `step` of `manager`'s run.
pub fn identity_of(manager: &CheckpointManager, rt: &Handle, step: StepName) -> Result<Identity> {
    let m = rt.block_on(manager.manifest(step))?;
    let training = m
        .training
        .with_context(|| format!("{}: no record of the model that saved it", m.name))?;
    serde_json::from_value(training["service"].clone()).with_context(|| {
        format!(
            "{}: not saved by waypoint serve (its manifest names no served model)",
            m.name
        )
    })
}

/// AdamW's state before any step, with the SDK's default parameters (each step brings its own).
fn fresh_optimizer(model: &Model) -> AdamW {
    AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.0,
        },
        model.trainable(),
    )
}

/// A LoRA model being trained by calls.
pub struct TrainingModel {
    model: Model,
    opt: AdamW,
    /// The gradients accumulated since the last `optim_step`.
    grads: Option<Vec<Tensor>>,
    /// The number of the model's state: optimizer steps taken (a save whose number its run has
    /// taken already, after a load, takes the next free one).
    steps: u64,
    /// Tokens the model knows (`vocab_size`).
    vocab: i64,
    identity: Identity,
    /// The checkpoint of this run that holds the model exactly as it is, if one does.
    saved: Option<u64>,
    /// Set when a call failed inside libtorch midway through changing the state (an optimizer
    /// step, or adding gradients): the state is no longer one the client made, and only a load
    /// makes it whole again.
    broken: Option<String>,
}

impl TrainingModel {
    /// LoRA adapters as `identity` asks over `base`, whose weights it shares (no copy: many
    /// clients train over one base model in memory).
    pub fn lora(base: &BaseModel, identity: Identity) -> Result<Self> {
        let spec = identity.lora;
        ensure!(
            spec.rank > 0,
            "the LoRA rank must be positive, not {}",
            spec.rank
        );
        ensure!(
            spec.attn || spec.mlp || spec.unembed,
            "a LoRA client must train something: train_attn, train_mlp or train_unembed"
        );
        libtorch_boundary("adding the adapters", || {
            let mut model = base.sampled_model().sharing_base()?;
            model.add_lora(spec.config(), spec.seed)?;
            let opt = fresh_optimizer(&model);
            let vocab = model.config.vocab_size;
            Ok(Self {
                model,
                opt,
                grads: None,
                steps: 0,
                vocab,
                identity,
                saved: None,
                broken: None,
            })
        })
    }

    /// The number of the model's state (optimizer steps taken; see [`TrainingModel::begin_save`]).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// What this model is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Starts committing the model as it is to `manager`'s run (whose attempt it holds): `step-N`,
    /// N its number, resumable (the adapters and their AdamW state) and promotable (a PEFT
    /// adapter, fp32). The state is copied to the host here; the upload and the commit are the
    /// caller's ([`Saving::Upload`], in the background while the model trains on), who reports a
    /// failed one with [`TrainingModel::save_failed`]. A checkpoint of this run holding exactly
    /// this state (committed, or being uploaded) is [`Saving::Done`]. Gradients accumulated and
    /// not yet applied are not part of a checkpoint.
    ///
    /// Uploads of a run must commit before the next `begin_save` of it (the next step number is
    /// chosen from the committed ones).
    pub fn begin_save(&mut self, manager: &CheckpointManager, rt: &Handle) -> Result<Saving> {
        self.whole()?;
        if let Some(n) = self.saved {
            return Ok(Saving::Done(StepName::new(n).to_string()));
        }
        let committed = rt.block_on(manager.committed_steps())?;
        if committed.iter().any(|s| s.step() == self.steps) {
            self.steps = committed.iter().map(StepName::step).max().unwrap_or(0) + 1;
        }
        let training = serde_json::json!({ "service": self.identity });
        let ctx = SaveContext {
            fingerprint: hex::encode(Sha256::digest(training.to_string())),
            sampler_dtype: SamplerDtype::Fp32,
            tokenizer_files: Vec::new(),
            model_id: self.identity.base_model.clone(),
            n_samples: 1,
            sampler_base_every: 0,
            training,
        };
        let (blobs, sampler) = libtorch_boundary("saving", || {
            let blobs = copy_to_host(&state_items(&self.model, &self.opt))?;
            Ok((blobs, sampler_part(&self.model, None, &ctx, None)?))
        })?;
        let request = SaveRequest {
            commit: ctx.commit(self.steps, 0, 1),
            dcp: Some(blobs),
            sampler: Some(sampler),
        };
        self.saved = Some(self.steps);
        Ok(Saving::Upload {
            request: Box::new(request),
            step: self.steps,
        })
    }

    /// The upload of `step` (from [`TrainingModel::begin_save`]) failed: the state is not saved.
    pub fn save_failed(&mut self, step: u64) {
        if self.saved == Some(step) {
            self.saved = None;
        }
    }

    /// Restores checkpoint `step` of `manager`'s run (saved by a model of this identity): the
    /// adapters, and with `optimizer` their AdamW state too (else AdamW starts afresh); every blob's
    /// digest is checked as it is read. Gradients not yet applied are dropped.
    pub fn load(
        &mut self,
        manager: &CheckpointManager,
        rt: &Handle,
        step: StepName,
        optimizer: bool,
    ) -> Result<()> {
        let saved_by = identity_of(manager, rt, step)?;
        // The same base and adapters; the seed they were first drawn with does not matter.
        let fits = |i: &Identity| {
            let l = i.lora;
            (i.base_model.clone(), l.rank, l.attn, l.mlp, l.unembed)
        };
        ensure!(
            fits(&saved_by) == fits(&self.identity),
            "{step} was saved by another model ({saved_by:?}), not this one ({:?})",
            self.identity
        );
        let m = rt.block_on(manager.manifest(step))?;
        let blobs = rt.block_on(manager.load_tensors(&m, "dcp/", &|_| true))?;
        let restored = libtorch_boundary("loading", || {
            restore_state(&m, blobs, &self.model, &mut self.opt)?;
            if !optimizer {
                self.opt = fresh_optimizer(&self.model);
            }
            Ok(())
        });
        // A restore cut short leaves a mix of the old state and the checkpoint's.
        restored.map_err(|e| self.breaks(e))?;
        self.grads = None;
        self.broken = None;
        self.steps = m.step;
        // Another run's checkpoint, or this run's without its optimizer state: no checkpoint of
        // this run holds the state as it now is.
        self.saved = None;
        Ok(())
    }

    /// The LoRA rank.
    pub fn lora_rank(&self) -> i64 {
        self.model.lora.as_ref().map_or(0, |l| l.rank)
    }

    /// Whether `data` fits this model and `loss` (one target and each input the loss reads a
    /// token, tokens in the vocabulary): the error names the datum and what is wrong.
    pub fn check(&self, data: &[Datum], loss: Loss) -> Result<()> {
        ensure!(!data.is_empty(), "no datums");
        let width = data[0].width();
        if let Some((i, d)) = data.iter().enumerate().find(|(_, d)| d.width() != width) {
            anyhow::bail!(
                "datum {i} has {} targets a position, datum 0 has {width}: one width a call",
                d.width()
            );
        }
        ensure!(
            width == 1 || !loss.is_policy_gradient(),
            "{width} targets a position: several targets go with cross_entropy only"
        );
        data.iter()
            .enumerate()
            .try_for_each(|(i, d)| check_datum(i, d, self.vocab, loss))
    }

    /// Each datum's target log-probs and the weighted loss; with `backward`, the loss's gradients
    /// are added to those accumulated for the next [`TrainingModel::optim_step`].
    pub fn forward(&mut self, data: &[Datum], loss: Loss, backward: bool) -> Result<Forward> {
        self.check(data, loss)?;
        self.whole()?;
        // This call's gradients are added to the accumulated ones only once all of it ran: a
        // call that fails leaves them as they were.
        let (out, call) = libtorch_boundary("forward_backward", || {
            let mut call: Option<Vec<Tensor>> = None;
            let mut logprobs = Vec::with_capacity(data.len());
            let mut loss_sum = 0.0;
            let device = self.model.device();
            let budget = MAX_BATCH_TOKENS.min(MAX_LOGPROB_BYTES / (4 * self.vocab.max(1) as usize));
            let width = data[0].width();
            for group in batches(data, budget) {
                // One forward over the group, each datum padded on the right to the longest:
                // with causal attention a datum's positions never see its padding, which the
                // mask keeps out of the loss.
                let t = group.iter().map(|d| d.tokens.len()).max().unwrap_or(0);
                let b = group.len() as i64;
                let k = width as i64;
                let ids: Vec<i64> = group.iter().flat_map(|d| padded(&d.tokens, t)).collect();
                let targets: Vec<i64> = group
                    .iter()
                    .flat_map(|d| padded(&d.targets, t * width))
                    .collect();
                // Each datum's values of one input, padded; a datum without them (an input its
                // loss does not read, or clip bounds of its own) takes `absent` throughout.
                let input = |of: &dyn Fn(&Datum) -> &[f32], absent: f64| {
                    let v: Vec<f32> = group
                        .iter()
                        .flat_map(|d| match of(d) {
                            [] => vec![absent as f32; t * width],
                            given => padded(given, t * width).collect(),
                        })
                        .collect();
                    Tensor::from_slice(&v)
                        .view([b, t as i64, k])
                        .to_device(device)
                };
                let (low, high) = loss.clip().unwrap_or((0.0, 0.0));
                let inputs = LossInputs {
                    weights: input(&|d| &d.weights, 0.0),
                    q: input(&|d| &d.sampler_logprobs, 0.0),
                    a: input(&|d| &d.advantages, 0.0),
                    low: input(&|d| &d.clip_low, low),
                    high: input(&|d| &d.clip_high, high),
                };
                let mask: Vec<f32> = group
                    .iter()
                    .flat_map(|d| (0..t).map(|i| f32::from(u8::from(i < d.tokens.len()))))
                    .collect();
                let mask = Tensor::from_slice(&mask)
                    .view([b, t as i64, 1])
                    .to_device(device);
                let ids = Tensor::from_slice(&ids)
                    .view([b, t as i64])
                    .to_device(device);
                let targets = Tensor::from_slice(&targets)
                    .view([b, t as i64, k])
                    .to_device(device);
                // [b, t, k]: each target's log-prob.
                let run = || {
                    self.model
                        .forward(&ids, backward)
                        .to_kind(Kind::Float)
                        .log_softmax(-1, Kind::Float)
                        .gather(-1, &targets, false)
                };
                let lp = if backward { run() } else { tch::no_grad(run) };
                // Summed in float64: `loss:sum` adds many small weighted terms (the gradient
                // reaching each term is the same 1 either way).
                let loss = -(loss.terms(&lp, &inputs) * &mask)
                    .to_kind(Kind::Double)
                    .sum(Kind::Double);
                loss_sum += loss.double_value(&[]);
                if backward {
                    call = Some(gradients(&loss, self.model.trainable(), call.take()));
                }
                let lp = lp.detach().to_device(Device::Cpu);
                for (row, d) in group.iter().enumerate() {
                    let n = d.tokens.len() as i64;
                    let mine = lp.get(row as i64).narrow(0, 0, n).reshape([-1]);
                    logprobs.push(Vec::<f32>::try_from(mine)?);
                }
            }
            Ok((
                Forward {
                    logprobs,
                    width,
                    loss_sum,
                },
                call,
            ))
        })?;
        if let Some(call) = call {
            let added = libtorch_boundary("adding gradients", || {
                Ok(accumulate(self.grads.take(), call))
            });
            match added {
                Ok(grads) => self.grads = Some(grads),
                Err(e) => return Err(self.breaks(e)),
            }
        }
        Ok(out)
    }

    /// Fails when an earlier call left the state broken.
    fn whole(&self) -> Result<()> {
        match &self.broken {
            None => Ok(()),
            Some(why) => anyhow::bail!(
                "this model's state is broken since {why}; load a checkpoint (load_state) to go on"
            ),
        }
    }

    /// Records that `e`, a failure midway through changing the state, broke it.
    fn breaks(&mut self, e: anyhow::Error) -> anyhow::Error {
        self.broken = Some(format!("{e:#}"));
        self.grads = None;
        e
    }

    /// Applies the accumulated gradients with `p` and clears them (without gradients, nothing
    /// changes but the count).
    pub fn optim_step(&mut self, p: AdamParams) -> Result<Stepped> {
        ensure!(
            p.learning_rate >= 0.0 && p.learning_rate.is_finite(),
            "learning_rate must be a finite number ≥ 0, not {}",
            p.learning_rate
        );
        ensure!(
            (0.0..1.0).contains(&p.beta1) && (0.0..1.0).contains(&p.beta2),
            "beta1 and beta2 must be in [0, 1), not {} and {}",
            p.beta1,
            p.beta2
        );
        ensure!(p.eps > 0.0, "eps must be positive, not {}", p.eps);
        self.whole()?;
        let stepped = libtorch_boundary("optim_step", || {
            self.opt.reconfigure(AdamWConfig {
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                weight_decay: p.weight_decay,
            });
            let mut grad_norm = 0.0;
            if let Some(mut grads) = self.grads.take() {
                grad_norm = clip_grad_norm(&mut grads, p.grad_clip_norm);
                self.opt
                    .step(self.model.trainable(), &grads, p.learning_rate);
            }
            self.steps += 1;
            self.saved = None;
            Ok(Stepped {
                grad_norm,
                steps: self.steps,
            })
        });
        stepped.map_err(|e| self.breaks(e))
    }
}

/// `v` padded on the right with zeros (the type's default) to `len`.
fn padded<T: Copy + Default>(v: &[T], len: usize) -> impl Iterator<Item = T> + '_ {
    v.iter()
        .copied()
        .chain(std::iter::repeat(T::default()))
        .take(len)
}

/// Padded tokens a forward pass takes at most (a group of datums; one longer datum alone)...
const MAX_BATCH_TOKENS: usize = 16_384;

/// ... and fewer with a large vocabulary: the group's fp32 log-probs stay within this.
const MAX_LOGPROB_BYTES: usize = 1 << 30;

/// `data` in order, cut into groups whose padded size (datums × the longest) stays within
/// `budget` tokens; a datum longer than that is a group of its own.
fn batches(data: &[Datum], budget: usize) -> Vec<&[Datum]> {
    let mut groups = Vec::new();
    let (mut start, mut longest) = (0, 0);
    for (i, d) in data.iter().enumerate() {
        let wider = longest.max(d.tokens.len());
        if i > start && wider * (i - start + 1) > budget {
            groups.push(&data[start..i]);
            (start, longest) = (i, d.tokens.len());
        } else {
            longest = wider;
        }
    }
    if start < data.len() {
        groups.push(&data[start..]);
    }
    groups
}

impl Sampling for TrainingModel {
    fn sampled_model(&self) -> &Model {
        &self.model
    }
}

/// What [`TrainingModel::begin_save`] leaves to do.
pub enum Saving {
    /// This state is saved already, as this checkpoint (named `step-N`).
    Done(String),
    /// The state, on the host: commit it with [`CheckpointManager::save`].
    Upload {
        /// The save (boxed: it is large).
        request: Box<SaveRequest>,
        /// Its step number.
        step: u64,
    },
}

/// A copy of a model's adapters, to sample from as they were when it was taken.
pub struct Snapshot(Vec<Tensor>);

impl TrainingModel {
    /// A copy of the adapters as they are.
    pub fn snapshot(&self) -> Result<Snapshot> {
        libtorch_boundary("copying the adapters", || {
            Ok(Snapshot(
                self.model
                    .trainable()
                    .iter()
                    .map(|p| p.tensor.detach().copy())
                    .collect(),
            ))
        })
    }

    /// Runs `work` with the adapters of `snapshot` in place of the live ones (put back after).
    pub fn with_snapshot<T>(
        &mut self,
        snapshot: Option<&Snapshot>,
        work: impl FnOnce(&Self) -> Result<T>,
    ) -> Result<T> {
        let Some(snapshot) = snapshot else {
            return work(self);
        };
        let live = self.snapshot()?;
        let swap = |from: &Snapshot| {
            libtorch_boundary("swapping the adapters", || {
                tch::no_grad(|| {
                    for (p, t) in self.model.trainable().iter().zip(&from.0) {
                        p.tensor.shallow_clone().copy_(t);
                    }
                });
                Ok(())
            })
        };
        swap(snapshot)?;
        let out = work(self);
        swap(&live)?;
        out
    }
}

/// A datum's shape and tokens are checked before libtorch sees them: a clear error naming the
/// datum, never a libtorch message (or an out-of-bounds gather).
fn check_datum(i: usize, d: &Datum, vocab: i64, loss: Loss) -> Result<()> {
    let n = d.tokens.len();
    ensure!(n > 0, "datum {i}: model_input is empty");
    let k = d.width();
    let values = n
        .checked_mul(k)
        .with_context(|| format!("datum {i}: {n} positions × {k} targets is too many"))?;
    let inputs: Vec<(&str, usize)> = match loss.is_policy_gradient() {
        false => vec![("weights", d.weights.len())],
        true => vec![
            ("logprobs", d.sampler_logprobs.len()),
            ("advantages", d.advantages.len()),
        ],
    };
    for (name, len) in [("target_tokens", d.targets.len())]
        .into_iter()
        .chain(inputs)
    {
        ensure!(
            len == values,
            "datum {i}: {name} has {len} values, model_input {n} tokens: each input must have \
             {k} per input token"
        );
    }
    check_tokens(d.tokens.iter().chain(&d.targets), vocab)
        .map_err(|e| anyhow::anyhow!("datum {i}: {e}"))?;
    ensure!(
        d.weights
            .iter()
            .chain(&d.sampler_logprobs)
            .chain(&d.advantages)
            .all(|w| w.is_finite()),
        "datum {i}: weights, logprobs and advantages must be finite numbers"
    );
    // Its own clip bounds, when it gives them: one a position, 0 <= low <= high.
    for (name, v) in [
        ("clip_low_threshold", &d.clip_low),
        ("clip_high_threshold", &d.clip_high),
    ] {
        ensure!(
            v.is_empty() || v.len() == n,
            "datum {i}: {name} has {} values, model_input {n} tokens: one a token",
            v.len()
        );
    }
    let (low, high) = (&d.clip_low, &d.clip_high);
    if !low.is_empty() || !high.is_empty() {
        let bounds = |v: &Vec<f32>, j: usize| v.get(j).copied();
        let bad = (0..n).find(|&j| match (bounds(low, j), bounds(high, j)) {
            (Some(l), Some(h)) => !(l.is_finite() && h.is_finite() && 0.0 <= l && l <= h),
            (Some(x), None) | (None, Some(x)) => !(x.is_finite() && x >= 0.0),
            (None, None) => false,
        });
        if let Some(j) = bad {
            anyhow::bail!(
                "datum {i}: clip thresholds at position {j} must be finite with 0 <= low <= high"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datum_is_checked_before_libtorch_sees_it() {
        let ok = Datum {
            tokens: vec![1, 2],
            targets: vec![2, 3],
            weights: vec![1.0, 1.0],
            ..Datum::default()
        };
        let ce = Loss::CrossEntropy;
        assert!(check_datum(0, &ok, 10, ce).is_ok());
        let err = check_datum(1, &ok, 10, Loss::ImportanceSampling)
            .unwrap_err()
            .to_string();
        assert!(err.contains("datum 1: logprobs has 0 values"), "{err}");
        let short = Datum {
            weights: vec![1.0],
            ..ok.clone()
        };
        let err = check_datum(3, &short, 10, ce).unwrap_err().to_string();
        assert!(err.contains("datum 3: weights has 1 values"), "{err}");
        // Two targets a position: each input holds two a token.
        let two = Datum {
            targets: vec![2, 4, 3, 5],
            weights: vec![1.0, 0.5, 1.0, 0.5],
            width: 2,
            ..ok.clone()
        };
        assert!(check_datum(0, &two, 10, ce).is_ok());
        let one_weight = Datum {
            weights: vec![1.0, 1.0],
            ..two.clone()
        };
        let err = check_datum(2, &one_weight, 10, ce).unwrap_err().to_string();
        assert!(err.contains("must have 2 per input token"), "{err}");
        // A position's own clip bounds: one a token, 0 <= low <= high.
        let ppo = Loss::Ppo {
            low: 0.8,
            high: 1.2,
        };
        let pg = Datum {
            sampler_logprobs: vec![-1.0, -1.0],
            advantages: vec![1.0, -1.0],
            clip_low: vec![0.9, 0.7],
            clip_high: vec![1.1, 1.3],
            ..ok.clone()
        };
        assert!(check_datum(0, &pg, 10, ppo).is_ok());
        let crossed = Datum {
            clip_high: vec![1.1, 0.5],
            ..pg.clone()
        };
        let err = check_datum(0, &crossed, 10, ppo).unwrap_err().to_string();
        assert!(err.contains("at position 1"), "{err}");
        let short = Datum {
            clip_low: vec![0.9],
            ..pg
        };
        let err = check_datum(0, &short, 10, ppo).unwrap_err().to_string();
        assert!(err.contains("clip_low_threshold has 1 values"), "{err}");
        let outside = Datum {
            targets: vec![2, 10],
            ..ok.clone()
        };
        let err = check_datum(0, &outside, 10, ce).unwrap_err().to_string();
        assert!(err.contains("token 10 is outside"), "{err}");
        assert!(check_datum(0, &Datum::default(), 10, ce).is_err());
    }

    #[test]
    fn datums_go_in_groups_within_the_token_budget() {
        let of = |n: usize| Datum {
            tokens: vec![0; n],
            ..Datum::default()
        };
        let data: Vec<Datum> = [3, 5, 2, 9, 1].map(of).into();
        let sizes =
            |budget| -> Vec<usize> { batches(&data, budget).iter().map(|g| g.len()).collect() };
        assert_eq!(sizes(100), [5]);
        // 3,5 → 2 × 5 = 10; 2 joins (15); 9 would make 4 × 9 = 36 > 16; 9,1 → 18 > 16.
        assert_eq!(sizes(16), [3, 1, 1]);
        assert_eq!(
            sizes(1),
            [1, 1, 1, 1, 1],
            "a datum over the budget goes alone"
        );
        assert!(batches(&[], 10).is_empty());
    }

    #[test]
    fn each_loss_is_its_formula() {
        let t = |v: &[f32]| Tensor::from_slice(v);
        let (lp, q, a, w) = (
            t(&[-1.0, -2.0]),
            t(&[-1.5, -1.0]),
            t(&[2.0, -1.0]),
            t(&[1.0, 0.5]),
        );
        let value = |loss: Loss| {
            let (low, high) = loss.clip().unwrap_or((0.0, 0.0));
            let inputs = LossInputs {
                weights: w.shallow_clone(),
                q: q.shallow_clone(),
                a: a.shallow_clone(),
                low: Tensor::full([2], low, (Kind::Float, Device::Cpu)),
                high: Tensor::full([2], high, (Kind::Float, Device::Cpu)),
            };
            -loss.terms(&lp, &inputs).sum(Kind::Float).double_value(&[])
        };
        let r = [0.5f64.exp(), (-1.0f64).exp()];
        let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        close(value(Loss::CrossEntropy), 1.0 + 2.0 * 0.5);
        close(value(Loss::ImportanceSampling), -(r[0] * 2.0 - r[1]));
        // PPO: the first ratio (1.65) is clipped at 1.2 (A > 0), the second (0.37) at 0.8,
        // whose term -0.8 is the smaller of -0.37 and -0.8.
        close(
            value(Loss::Ppo {
                low: 0.8,
                high: 1.2,
            }),
            -(1.2 * 2.0 - 0.8),
        );
        close(
            value(Loss::Cispo {
                low: 0.8,
                high: 1.2,
            }),
            // clip(r)·lp·A: 1.2 · (−1) · 2 and 0.8 · (−2) · (−1).
            -(-2.4 + 1.6),
        );
        close(
            value(Loss::Dro { beta: 0.1 }),
            -((-2.0 - 0.05 * 0.25) + (2.0 - 0.05 * 1.0)),
        );
    }

    #[test]
    fn the_lora_spec_names_the_projections_it_trains() {
        let spec = LoraSpec {
            rank: 4,
            attn: false,
            mlp: true,
            unembed: true,
            seed: 0,
        };
        let c = spec.config();
        assert_eq!(c.targets, ["gate_proj", "up_proj", "down_proj", "lm_head"]);
        assert_eq!((c.rank, c.alpha, c.dropout), (4, 4.0, 0.0));
    }
}
