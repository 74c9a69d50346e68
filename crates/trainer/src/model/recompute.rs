//! Activation checkpointing: the loss and its gradients with only each decoder layer's input kept
//! through the forward pass. The forward runs without autograd, layer by layer, keeping the
//! residual stream entering each layer; the backward starts at the head and then, from the last
//! layer to the first, recomputes one layer with autograd and backpropagates the incoming gradient
//! through it (`(out * grad_out).sum()`, whose gradient into `out` is exactly `grad_out`), so one
//! layer's activations live at a time. The ops and their order within each layer are those of the
//! plain forward and backward, so on CPU the gradients are bit for bit the same.
//!
//! LoRA dropout draws its masks from libtorch's generator, reseeded before each layer from
//! (`seed`, layer) in both passes, so the recomputed layer draws the masks the first pass drew.

use tch::{Kind, Tensor};

use super::Model;

/// The seed of libtorch's generator before decoder layer `l` runs (in both passes), from the
/// micro-batch's `seed`.
pub(super) fn layer_seed(seed: i64, l: usize) -> i64 {
    seed.wrapping_mul(1_000_003).wrapping_add(l as i64 + 1)
}

/// Which part of the forward pass a trained weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// The token embedding (also the head's weight when tied).
    Embed,
    /// Decoder layer `l`.
    Layer(usize),
    /// The final norm and `lm_head`.
    Head,
}

/// The part of the forward pass weight `name` (an HF name) belongs to.
pub(super) fn stage_of(name: &str) -> Stage {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some(l) = rest.split('.').next().and_then(|l| l.parse().ok()) {
            return Stage::Layer(l);
        }
    }
    if name.starts_with("model.embed_tokens.") {
        Stage::Embed
    } else {
        Stage::Head
    }
}

/// Indices into `params` of the weights of `stage`; with `tied`, the head also uses the embedding.
pub(super) fn in_stage(params: &[super::Param], stage: Stage, tied: bool) -> Vec<usize> {
    (0..params.len())
        .filter(|&i| {
            let s = stage_of(&params[i].name);
            s == stage || (tied && stage == Stage::Head && s == Stage::Embed)
        })
        .collect()
}

impl Model {
    /// The summed cross-entropy of `logits_of(ids)` against `labels`, divided by `divisor`, and its
    /// gradients for [`Model::trainable`] (in that order; undefined for a weight the batch does not
    /// reach), computed with activation checkpointing. `loss_of` turns logits into the loss (the
    /// step's own, so both paths share it).
    pub fn loss_and_gradients_recomputed(
        &self,
        ids: &Tensor,
        seed: i64,
        train: bool,
        loss_of: impl Fn(&Tensor) -> Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let params = self.trainable();
        let mut grads: Vec<Option<Tensor>> = params.iter().map(|_| None).collect();
        let in_stage = |stage: Stage| in_stage(params, stage, self.config.tie_word_embeddings);

        // Forward without autograd, keeping each layer's input.
        let rope = self.rope(ids);
        let mut inputs = Vec::with_capacity(self.layers.len());
        let last = tch::no_grad(|| {
            let mut h = self.embed_tokens(ids);
            for (l, layer) in self.layers.iter().enumerate() {
                tch::manual_seed(layer_seed(seed, l));
                let next = layer.forward(&h, &rope, &self.config, train);
                inputs.push(h);
                h = next;
            }
            h
        });

        // The head: loss, its gradient into the last layer's output and into the head's weights.
        let x = last.detach().set_requires_grad(true);
        let loss = loss_of(&self.logits(&x, train));
        let mut grad = backward_stage(&loss, &x, &in_stage(Stage::Head), params, &mut grads);
        let loss = loss.detach();

        // The layers, last to first: recompute one, backpropagate through it.
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let x = inputs[l].detach().set_requires_grad(true);
            tch::manual_seed(layer_seed(seed, l));
            let out = layer.forward(&x, &rope, &self.config, train);
            let vjp = (out * &grad).sum(Kind::Float);
            grad = backward_stage(&vjp, &x, &in_stage(Stage::Layer(l)), params, &mut grads);
            inputs.truncate(l);
        }

        // The embedding, when it is trained.
        let embed = in_stage(Stage::Embed);
        if !embed.is_empty() {
            let out = self.embed_tokens(ids);
            let vjp = (out * &grad).sum(Kind::Float);
            let weights: Vec<&Tensor> = embed.iter().map(|&i| &params[i].tensor).collect();
            let got = Tensor::run_backward(&[vjp], &weights, false, false);
            add_into(&mut grads, &embed, got);
        }
        (
            loss,
            grads
                .into_iter()
                .map(|g| g.unwrap_or_else(Tensor::new))
                .collect(),
        )
    }
}

/// Backpropagates the scalar `output` of one stage into its input `x` and its trained weights
/// (`stage`: their indices in `params`); adds the weights' gradients into `grads` and returns `x`'s.
fn backward_stage(
    output: &Tensor,
    x: &Tensor,
    stage: &[usize],
    params: &[super::Param],
    grads: &mut [Option<Tensor>],
) -> Tensor {
    let mut wrt: Vec<&Tensor> = vec![x];
    wrt.extend(stage.iter().map(|&i| &params[i].tensor));
    let mut got = Tensor::run_backward(&[output], &wrt, false, false);
    let into_x = got.remove(0);
    add_into(grads, stage, got);
    into_x
}

/// Adds `got[k]` into `grads[stage[k]]` (a tied weight gets a gradient from two stages).
fn add_into(grads: &mut [Option<Tensor>], stage: &[usize], got: Vec<Tensor>) {
    for (&i, g) in stage.iter().zip(got) {
        if !g.defined() {
            continue;
        }
        grads[i] = Some(match grads[i].take() {
            None => g,
            Some(mut acc) => {
                tch::no_grad(|| {
                    let _ = acc.g_add_(&g);
                });
                acc
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use tch::Device;
    use waypoint_config::LoraConfig;

    fn summed<'a>(model: &'a Model, labels: &'a Tensor) -> impl Fn(&Tensor) -> Tensor + 'a {
        let v = model.config.vocab_size;
        move |logits: &Tensor| {
            logits
                .view([-1, v])
                .to_kind(Kind::Float)
                .cross_entropy_loss::<Tensor>(
                    &labels.view([-1]),
                    None,
                    tch::Reduction::Sum,
                    -100,
                    0.0,
                )
        }
    }

    fn plain(model: &Model, ids: &Tensor, labels: &Tensor) -> (Tensor, Vec<Tensor>) {
        let loss = summed(model, labels)(&model.forward(ids, true));
        let inputs: Vec<&Tensor> = model.trainable().iter().map(|p| &p.tensor).collect();
        let grads = Tensor::run_backward(&[&loss], &inputs, false, false);
        (loss.detach(), grads)
    }

    fn batch() -> (Tensor, Tensor) {
        let ids = Tensor::from_slice(&[1i64, 5, 9, 200, 3, 4, 7, 8, 2, 11, 12, 13]).view([2, 6]);
        let labels =
            Tensor::from_slice(&[5i64, 9, 200, 3, 4, -100, 8, 2, 11, 12, 13, 1]).view([2, 6]);
        (ids, labels)
    }

    /// Full-parameter training of the tied tiny model, and Qwen3 (q/k norms, untied head, biases
    /// off): the same loss and bit-identical gradients as the plain backward pass.
    #[test]
    fn recomputed_gradients_equal_the_plain_ones_bit_for_bit() {
        let mut qwen = ModelConfig::tiny().raw;
        qwen["model_type"] = "qwen3".into();
        qwen["tie_word_embeddings"] = false.into();
        for config in [
            ModelConfig::tiny(),
            ModelConfig::from_json("qwen3", qwen).unwrap(),
        ] {
            let _turn = crate::model::tests::seeded();
            let model = Model::init(config, 3, Device::Cpu).unwrap();
            let (ids, labels) = batch();
            let (want_loss, want) = plain(&model, &ids, &labels);
            let (loss, got) =
                model.loss_and_gradients_recomputed(&ids, 9, true, summed(&model, &labels));
            assert!(loss.equal(&want_loss));
            assert_eq!(got.len(), want.len());
            for ((g, w), p) in got.iter().zip(&want).zip(model.trainable()) {
                assert!(g.equal(w), "{} differs by {}", p.name, (g - w).abs().max());
            }
        }
    }

    /// LoRA with dropout: the recomputed layer draws the masks of the first pass, so the gradients
    /// are those of one consistent forward pass (checked against a plain pass seeded the same way
    /// layer by layer), and the frozen base gets none.
    #[test]
    fn lora_with_dropout_recomputes_the_same_masks() {
        let _turn = crate::model::tests::seeded();
        let mut model = Model::init(ModelConfig::tiny(), 3, Device::Cpu).unwrap();
        model
            .add_lora(
                LoraConfig {
                    rank: 4,
                    alpha: 8.0,
                    dropout: 0.3,
                    targets: vec!["q_proj".into(), "down_proj".into()],
                },
                4,
            )
            .unwrap();
        // Nonzero B so that A's gradient depends on the masks too.
        tch::no_grad(|| {
            for p in model.trainable() {
                if p.name.contains("lora_B") {
                    let _ = p.tensor.shallow_clone().fill_(0.01);
                }
            }
        });
        let (ids, labels) = batch();
        let seed = 21;
        let (loss, got) =
            model.loss_and_gradients_recomputed(&ids, seed, true, summed(&model, &labels));
        // The plain pass with the same per-layer seeds.
        let rope = model.rope(&ids);
        let mut h = model.embed_tokens(&ids);
        for (l, layer) in model.layers.iter().enumerate() {
            tch::manual_seed(layer_seed(seed, l));
            h = layer.forward(&h, &rope, &model.config, true);
        }
        let want_loss = summed(&model, &labels)(&model.logits(&h, false));
        let inputs: Vec<&Tensor> = model.trainable().iter().map(|p| &p.tensor).collect();
        let want = Tensor::run_backward(&[&want_loss], &inputs, false, false);
        assert!(loss.equal(&want_loss.detach()));
        for ((g, w), p) in got.iter().zip(&want).zip(model.trainable()) {
            assert!(g.equal(w), "{}", p.name);
        }
        assert_eq!(got.len(), model.trainable().len());
    }
}
