//! Sharded weights (`--sharding full`, FSDP2's `Shard(0)` for every weight): each rank holds only
//! its rows of each base weight (fp32, the master copy the optimizer updates; under LoRA the frozen
//! base, in the dtype it is held in). A part of the model — the embedding, one decoder layer, the
//! head — runs on whole weights gathered from all ranks just before it and dropped just after, so
//! only one layer's whole weights live at a time.
//!
//! The step is the recomputing one of [`super::recompute`]: a forward pass without autograd,
//! layer by layer, keeping each layer's input; then from the head back to the embedding, each part
//! gathers its weights again (as fresh leaves when they are trained), recomputes, backpropagates
//! the incoming gradient, and hands its weights' gradients to [`RowCollective::reduce`], which sums
//! them over the ranks and keeps this rank's rows — or, under LoRA, keeps the adapters' gradients
//! for the step to sum. The collectives run in the same order on every rank.

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::recompute::{in_stage, layer_seed, Stage};
use crate::model::layers::{embed_lookup, Layer};
use crate::model::Model;
use crate::shard::{RowCollective, Rows};

/// The dtype weight `name` is gathered in: the compute dtype (bf16 on CUDA) for the weights the
/// forward pass casts to it anyway — the projections' weights and biases and an untied `lm_head` —
/// so the gathered bytes halve and the results are those of the unsharded pass (a cast commutes
/// with the gather); `None` (its own dtype, fp32) for the embedding (looked up, not multiplied) and
/// the norms. Their gradients come back in that dtype and are summed in fp32.
pub(super) fn gathered_in(name: &str, compute: Option<Kind>) -> Option<Kind> {
    let projection = name.contains("_proj.") || name == "lm_head.weight";
    compute.filter(|_| projection)
}

impl Model {
    /// Indices into `base` of the weights of `stage`; the head also uses a tied embedding.
    fn base_of(&self, stage: Stage) -> Vec<usize> {
        in_stage(&self.base, stage, self.config.tie_word_embeddings)
    }

    /// The whole weights `idx` (fresh tensors; leaves requiring gradients when `grad`), by name,
    /// each gathered in the dtype [`gathered_in`] gives it.
    fn gather(
        &self,
        idx: &[usize],
        grad: bool,
        comm: &mut dyn RowCollective,
    ) -> Result<BTreeMap<String, Tensor>> {
        self.gather_in(idx, grad, None, comm)
    }

    /// [`Model::gather`], every weight gathered in `kind` when given (its shard cast first: exact).
    fn gather_in(
        &self,
        idx: &[usize],
        grad: bool,
        kind: Option<Kind>,
        comm: &mut dyn RowCollective,
    ) -> Result<BTreeMap<String, Tensor>> {
        let parts = self.shards.as_deref().unwrap_or_default();
        let shards: Vec<Tensor> = idx
            .iter()
            .map(|&i| {
                let own = self.base[i].tensor.detach();
                match kind.or_else(|| gathered_in(&self.base[i].name, self.compute)) {
                    Some(k) if own.kind() != k => own.to_kind(k),
                    _ => own,
                }
            })
            .collect();
        let shapes: Vec<Vec<i64>> = idx.iter().map(|&i| parts[i].whole.clone()).collect();
        let whole = tch::no_grad(|| comm.gather(&shards, &shapes))?;
        Ok(idx
            .iter()
            .zip(whole)
            .map(|(&i, t)| {
                let t = if grad { t.set_requires_grad(true) } else { t };
                (self.base[i].name.clone(), t)
            })
            .collect())
    }

    fn layer_of(&self, l: usize, weights: &BTreeMap<String, Tensor>) -> Layer {
        Layer::from_weights(
            &self.config,
            l as i64,
            &|name| weights[name].shallow_clone(),
            &|p| self.lora_at(p),
        )
    }

    fn head_of<'a>(&self, weights: &'a BTreeMap<String, Tensor>) -> (&'a Tensor, &'a Tensor) {
        let head = weights
            .get("lm_head.weight")
            .unwrap_or_else(|| &weights["model.embed_tokens.weight"]);
        (&weights["model.norm.weight"], head)
    }

    /// Logits of `ids` with sharded weights, without autograd (evaluation).
    pub(crate) fn forward_sharded(
        &self,
        ids: &Tensor,
        comm: &mut dyn RowCollective,
    ) -> Result<Tensor> {
        tch::no_grad(|| {
            let rope = self.rope(ids);
            let embed = self.gather(&self.base_of(Stage::Embed), false, comm)?;
            let mut h = embed_lookup(&embed["model.embed_tokens.weight"], ids);
            drop(embed);
            for l in 0..self.config.num_hidden_layers as usize {
                let w = self.gather(&self.base_of(Stage::Layer(l)), false, comm)?;
                h = self.layer_of(l, &w).forward(&h, &rope, &self.config, false);
            }
            let w = self.gather(&self.base_of(Stage::Head), false, comm)?;
            let (norm, head) = self.head_of(&w);
            Ok(self.logits_with(&h, norm, head, false))
        })
    }

    /// The loss (`loss_of` the logits) and the gradients of the trainable weights, in
    /// [`Model::trainable`] order, with sharded weights: full-parameter, this rank's rows of every
    /// base weight's gradient, already summed over the ranks; under LoRA, the whole adapters'
    /// gradients of this rank's batch (summed by the step, as in data parallelism), the frozen base
    /// gathered without autograd. `seed` reseeds libtorch's generator per layer (LoRA dropout) as
    /// the recomputing step does.
    pub(crate) fn loss_and_gradients_sharded(
        &self,
        ids: &Tensor,
        seed: i64,
        train: bool,
        loss_of: impl Fn(&Tensor) -> Tensor,
        comm: &mut dyn RowCollective,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let rows: Vec<Rows> = self.shards.iter().flatten().map(|s| s.rows).collect();
        let lora = self.lora.is_some();
        let params = self.trainable();
        let mut grads: Vec<Option<Tensor>> = params.iter().map(|_| None).collect();
        let layers = self.config.num_hidden_layers as usize;
        let rope = self.rope(ids);

        // Forward without autograd, one layer's whole weights at a time, keeping each layer's input.
        let mut inputs = Vec::with_capacity(layers);
        let last = tch::no_grad(|| -> Result<Tensor> {
            let w = self.gather(&self.base_of(Stage::Embed), false, comm)?;
            let mut h = embed_lookup(&w["model.embed_tokens.weight"], ids);
            drop(w);
            for l in 0..layers {
                let w = self.gather(&self.base_of(Stage::Layer(l)), false, comm)?;
                tch::manual_seed(layer_seed(seed, l));
                let next = self.layer_of(l, &w).forward(&h, &rope, &self.config, train);
                inputs.push(h);
                h = next;
            }
            Ok(h)
        })?;

        // Each part from the head back: gather as leaves, (re)compute, backpropagate, reduce.
        let mut backward = |stage: Stage,
                            out_of: &dyn Fn(&BTreeMap<String, Tensor>, &Tensor) -> Tensor,
                            x: Option<&Tensor>,
                            grads: &mut Vec<Option<Tensor>>|
         -> Result<(Option<Tensor>, Tensor)> {
            let idx = self.base_of(stage);
            // What is trained here: the base weights gathered as leaves, or the stage's adapters.
            let trained = if lora {
                in_stage(params, stage, false)
            } else {
                idx.clone()
            };
            if x.is_none() && trained.is_empty() {
                // Nothing to backpropagate into (the embedding under LoRA): no gather either.
                return Ok((None, Tensor::new()));
            }
            let w = self.gather(&idx, !lora, comm)?;
            let x = x.map(|x| x.detach().set_requires_grad(true));
            let mut wrt: Vec<&Tensor> = x.iter().collect();
            if lora {
                wrt.extend(trained.iter().map(|&t| &params[t].tensor));
            } else {
                wrt.extend(idx.iter().map(|i| &w[&self.base[*i].name]));
            }
            let out = out_of(&w, x.as_ref().unwrap_or(&Tensor::new()));
            let mut got = Tensor::run_backward(&[&out], &wrt, false, false);
            let out = out.detach();
            let into_x = x.is_some().then(|| got.remove(0));
            drop(w);
            let mine = if lora {
                got
            } else {
                let picked: Vec<Rows> = idx.iter().map(|&i| rows[i]).collect();
                tch::no_grad(|| comm.reduce(got, &picked))?
            };
            for (&i, g) in trained.iter().zip(mine) {
                grads[i] = Some(match grads[i].take() {
                    None => g,
                    Some(acc) => acc + g,
                });
            }
            Ok((into_x, out))
        };

        let (grad, loss) = backward(
            Stage::Head,
            &|w, x| {
                let (norm, head) = self.head_of(w);
                loss_of(&self.logits_with(x, norm, head, train))
            },
            Some(&last),
            &mut grads,
        )?;
        let mut grad = grad.unwrap_or_else(Tensor::new);
        for l in (0..layers).rev() {
            let g_out = grad.shallow_clone();
            grad = backward(
                Stage::Layer(l),
                &|w, x| {
                    tch::manual_seed(layer_seed(seed, l));
                    let out = self.layer_of(l, w).forward(x, &rope, &self.config, train);
                    (out * &g_out).sum(Kind::Float)
                },
                Some(&inputs[l]),
                &mut grads,
            )?
            .0
            .unwrap_or_else(Tensor::new);
            inputs.truncate(l);
        }
        let g_out = grad;
        let _embedding_done = backward(
            Stage::Embed,
            &|w, _| {
                let e = embed_lookup(&w["model.embed_tokens.weight"], ids);
                (e * &g_out).sum(Kind::Float)
            },
            None,
            &mut grads,
        )?;
        Ok((
            loss,
            grads
                .into_iter()
                .map(|g| g.unwrap_or_else(Tensor::new))
                .collect(),
        ))
    }

    /// Every base weight whole, gathered one at a time (all ranks take part in each gather); those
    /// `keep` names are converted to `kind` and handed to `take` (the weights this rank writes of
    /// the promotable model), the rest dropped at once.
    pub(crate) fn gather_each_base(
        &self,
        kind: Kind,
        keep: &dyn Fn(&str) -> bool,
        take: &mut dyn FnMut(&str, Tensor) -> Result<()>,
        comm: &mut dyn RowCollective,
    ) -> Result<()> {
        for i in 0..self.base.len() {
            // Cast to the sampler dtype before the gather: exact, whatever the compute dtype.
            let w = self.gather_in(&[i], false, Some(kind), comm)?;
            for (name, t) in w {
                if keep(&name) {
                    take(&name, t)?;
                }
            }
        }
        Ok(())
    }

    /// Every base weight's name and whole shape, in `base` order (sharded or not).
    pub(crate) fn whole_shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.base
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let shape = match &self.shards {
                    Some(s) => s[i].whole.clone(),
                    None => p.tensor.size(),
                };
                (p.name.clone(), shape)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::model::ModelConfig;

    /// One rank alone: gathers return the shards (whole), reduces cut the rows; records the dtype
    /// each weight was gathered in.
    #[derive(Default)]
    struct Alone {
        gathered: BTreeMap<Vec<i64>, Vec<Kind>>,
    }

    impl RowCollective for Alone {
        fn gather(&mut self, shards: &[Tensor], shapes: &[Vec<i64>]) -> Result<Vec<Tensor>> {
            for (t, s) in shards.iter().zip(shapes) {
                self.gathered.entry(s.clone()).or_default().push(t.kind());
            }
            Ok(shards.iter().map(Tensor::copy).collect())
        }
        fn reduce(&mut self, whole: Vec<Tensor>, rows: &[Rows]) -> Result<Vec<Tensor>> {
            Ok(whole
                .iter()
                .zip(rows)
                .map(|(t, r)| t.narrow(0, r.start, r.len).to_kind(Kind::Float))
                .collect())
        }
    }

    /// With a bf16 compute dtype (as on CUDA), the projections are gathered in bf16 and the rest
    /// in fp32, and the loss and fp32 gradients are bit for bit those of the unsharded mixed
    /// precision pass, which casts the fp32 weights to bf16 at each matmul.
    #[test]
    fn bf16_gathers_give_the_mixed_precision_gradients_bit_for_bit() {
        let _turn = crate::model::tests::seeded();
        let mut raw = ModelConfig::tiny().raw;
        raw["tie_word_embeddings"] = false.into();
        let config = ModelConfig::from_json("test", raw).unwrap();
        let mut plain = Model::init(config.clone(), 3, Device::Cpu).unwrap();
        let mut sharded = Model::init(config, 3, Device::Cpu).unwrap();
        plain.compute = Some(Kind::BFloat16);
        sharded.compute = Some(Kind::BFloat16);
        sharded.shard(0, 1).unwrap();
        let ids = Tensor::from_slice(&[1i64, 5, 9, 200, 3, 4, 7, 8]).view([2, 4]);
        let loss_of = |logits: &Tensor| logits.to_kind(Kind::Float).square().mean(Kind::Float);
        let (l1, g1) = plain.loss_and_gradients_recomputed(&ids, 5, true, loss_of);
        let mut comm = Alone::default();
        let (l2, g2) = sharded
            .loss_and_gradients_sharded(&ids, 5, true, loss_of, &mut comm)
            .unwrap();
        assert!(l1.equal(&l2));
        for ((p, a), b) in plain.base().iter().zip(&g1).zip(&g2) {
            assert_eq!(b.kind(), Kind::Float, "{}", p.name);
            assert!(a.equal(b), "{}", p.name);
        }
        let h = plain.config.hidden_size;
        let v = plain.config.vocab_size;
        let q = plain.config.num_attention_heads * plain.config.head_dim;
        assert!(comm.gathered[&vec![q, h]]
            .iter()
            .all(|k| *k == Kind::BFloat16));
        assert!(
            comm.gathered[&vec![v, h]].contains(&Kind::BFloat16),
            "lm_head"
        );
        assert!(
            comm.gathered[&vec![v, h]].contains(&Kind::Float),
            "embedding"
        );
        assert!(
            comm.gathered[&vec![h]].iter().all(|k| *k == Kind::Float),
            "norms"
        );
    }

    /// Under LoRA (with dropout), the sharded pass over a sharded frozen base gives the adapters'
    /// gradients of the recomputing pass bit for bit, and never asks for the base's.
    #[test]
    fn lora_over_a_sharded_base_gives_the_recomputed_adapter_gradients() {
        let _turn = crate::model::tests::seeded();
        let lora = waypoint_config::LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        };
        let mut plain = Model::init(ModelConfig::tiny(), 3, Device::Cpu).unwrap();
        let mut sharded = Model::init(ModelConfig::tiny(), 3, Device::Cpu).unwrap();
        plain.add_lora(lora.clone(), 4).unwrap();
        sharded.add_lora(lora, 4).unwrap();
        sharded.shard(0, 1).unwrap();
        assert!(!sharded.gradients_come_reduced());
        // Non-zero B, so that every adapter's gradient is non-trivial.
        for m in [&plain, &sharded] {
            tch::no_grad(|| {
                for p in m.trainable() {
                    let _ = p.tensor.shallow_clone().fill_(0.01);
                }
            });
        }
        let ids = Tensor::from_slice(&[1i64, 5, 9, 200, 3, 4, 7, 8]).view([2, 4]);
        let loss_of = |logits: &Tensor| logits.square().mean(Kind::Float);
        let (l1, g1) = plain.loss_and_gradients_recomputed(&ids, 5, true, loss_of);
        let (l2, g2) = sharded
            .loss_and_gradients_sharded(&ids, 5, true, loss_of, &mut Alone::default())
            .unwrap();
        assert!(l1.equal(&l2));
        assert_eq!(g1.len(), sharded.trainable().len());
        for ((p, a), b) in plain.trainable().iter().zip(&g1).zip(&g2) {
            assert!(a.defined() && b.defined(), "{}", p.name);
            assert!(a.equal(b), "{}", p.name);
        }
    }

    #[test]
    fn projections_and_an_untied_head_are_gathered_in_the_compute_dtype() {
        let bf16 = Some(Kind::BFloat16);
        assert_eq!(
            gathered_in("model.layers.0.self_attn.q_proj.weight", bf16),
            bf16
        );
        assert_eq!(
            gathered_in("model.layers.3.self_attn.k_proj.bias", bf16),
            bf16
        );
        assert_eq!(
            gathered_in("model.layers.3.mlp.down_proj.weight", bf16),
            bf16
        );
        assert_eq!(gathered_in("lm_head.weight", bf16), bf16);
        assert_eq!(gathered_in("model.embed_tokens.weight", bf16), None);
        assert_eq!(
            gathered_in("model.layers.0.input_layernorm.weight", bf16),
            None
        );
        assert_eq!(
            gathered_in("model.layers.0.self_attn.q_norm.weight", bf16),
            None
        );
        assert_eq!(
            gathered_in("model.layers.0.self_attn.q_proj.weight", None),
            None
        );
    }
}
