//! Sampling with a cache of keys and values, and prompt log-probs, for any model that holds a
//! [`Model`]: a training client's with its adapters on (the service's `TrainingModel`) or a base model
//! alone ([`BaseModel`]). The draw (temperature, `top_k`, `top_p`) is a pure function of the
//! logits beside the loop that calls it.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::model::lora::frozen_base_kind;
use crate::model::{KvCache, Model};
use crate::step::libtorch_boundary;

/// How to sample, as the SDK's `SamplingParams` says.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleParams {
    /// Tokens to sample at most.
    pub max_tokens: usize,
    /// The logits' divisor (0: the most likely token, always).
    pub temperature: f64,
    /// Sample among the `top_k` most likely tokens (≤ 0: all).
    pub top_k: i64,
    /// Sample among the most likely tokens whose probabilities reach `top_p` (1: all).
    pub top_p: f64,
    /// Seeds the draw (each sample `seed + i`), for the same samples again.
    pub seed: Option<u64>,
    /// Tokens that end a sample (kept as its last).
    pub stop: Vec<i64>,
}

/// One sampled sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The tokens, after the prompt.
    pub tokens: Vec<i64>,
    /// Each token's log-prob under the distribution it was drawn from (the model's, over the
    /// temperature, before `top_k`/`top_p`).
    pub logprobs: Vec<f32>,
    /// Whether a stop token ended it (else `max_tokens` did).
    pub stopped: bool,
}

/// Whether the tokens sampled so far end a sample (a stop string in their text: the caller
/// decodes, the sampler knows no tokenizer).
pub type TextStop<'a> = &'a dyn Fn(&[i64]) -> bool;

/// What samples: a model and its vocabulary.
pub trait Sampling {
    /// The model sampled from.
    fn sampled_model(&self) -> &Model;

    /// The model's end-of-sequence tokens (`eos_token_id` of its `config.json`).
    fn eos_tokens(&self) -> Vec<i64> {
        match &self.sampled_model().config.raw["eos_token_id"] {
            serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
            serde_json::Value::Array(a) => a.iter().filter_map(serde_json::Value::as_i64).collect(),
            _ => Vec::new(),
        }
    }

    /// `n` samples after `prompt`, each decoded with a cache of the keys and values; a sample
    /// ends at a stop token, when `text_stop` says so, or after `max_tokens`.
    fn sample(
        &self,
        prompt: &[i64],
        p: &SampleParams,
        n: usize,
        text_stop: Option<TextStop<'_>>,
    ) -> Result<Vec<Sampled>> {
        let request = Request {
            prompt,
            params: p,
            n,
            text_stop,
        };
        let mut sampled = self.sample_together(&[request]);
        sampled.pop().unwrap_or_else(|| Ok(Vec::new()))
    }

    /// Several requests' samples, decoded together (see [`sample_rows`]): each request's
    /// outcome, in order; a request that is wrong fails alone.
    fn sample_together(&self, requests: &[Request<'_>]) -> Vec<Result<Vec<Sampled>>> {
        let model = self.sampled_model();
        let checked: Vec<Result<()>> = requests.iter().map(|r| check(model, r)).collect();
        let valid: Vec<&Request<'_>> = requests
            .iter()
            .zip(&checked)
            .filter(|(_, c)| c.is_ok())
            .map(|(r, _)| r)
            .collect();
        // No gradients: the adapters of a training client would record a graph.
        let rows = |requests: &[&Request<'_>]| {
            libtorch_boundary("sampling", || tch::no_grad(|| sample_rows(model, requests)))
        };
        let mut sampled = match rows(&valid) {
            Ok(each) => each.into_iter().map(Ok).collect::<Vec<_>>(),
            // Together they failed (out of memory, say): each alone, to fail only for itself.
            Err(e) if valid.len() > 1 => {
                tracing::warn!(
                    requests = valid.len(),
                    "sampling requests together failed ({e:#}); each alone"
                );
                valid
                    .iter()
                    .map(|r| rows(&[r]).map(|mut each| each.swap_remove(0)))
                    .collect()
            }
            Err(e) => vec![Err(e)],
        }
        .into_iter();
        checked
            .into_iter()
            .map(|c| {
                c.and_then(|()| {
                    sampled
                        .next()
                        .unwrap_or_else(|| Err(anyhow::anyhow!("no samples came back")))
                })
            })
            .collect()
    }

    /// The log-prob of each prompt token after the ones before it; the first has none (NaN).
    fn prompt_logprobs(&self, prompt: &[i64]) -> Result<Vec<f32>> {
        let model = self.sampled_model();
        ensure!(!prompt.is_empty(), "the prompt is empty");
        check_tokens(prompt.iter(), model.config.vocab_size)?;
        libtorch_boundary("prompt log-probs", || {
            let n = prompt.len() as i64;
            let ids = Tensor::from_slice(prompt)
                .view([1, n])
                .to_device(model.device());
            let lp = tch::no_grad(|| {
                model
                    .forward(&ids, false)
                    .to_kind(Kind::Float)
                    .log_softmax(-1, Kind::Float)
            });
            let next = ids.narrow(1, 1, n - 1).unsqueeze(-1);
            let got = lp
                .narrow(1, 0, n - 1)
                .gather(-1, &next, false)
                .view([n - 1]);
            let mut out = vec![f32::NAN];
            out.extend(Vec::<f32>::try_from(got.to_device(Device::Cpu))?);
            Ok(out)
        })
    }
}

/// One request of those sampled together: `n` samples after `prompt` as `params` say, each
/// ending at a stop token, when `text_stop` says so, or after `max_tokens`.
pub struct Request<'a> {
    /// The prompt.
    pub prompt: &'a [i64],
    /// How to sample.
    pub params: &'a SampleParams,
    /// Samples wanted.
    pub n: usize,
    /// Whether the tokens so far end a sample (stop strings).
    pub text_stop: Option<TextStop<'a>>,
}

/// Fails saying what is wrong with request `r` for `model`.
fn check(model: &Model, r: &Request<'_>) -> Result<()> {
    let (prompt, p) = (r.prompt, r.params);
    ensure!(!prompt.is_empty(), "the prompt is empty");
    check_tokens(prompt.iter().chain(&p.stop), model.config.vocab_size)?;
    // The positions the model was made for bound a sample (and its cache).
    if let Some(limit) = model.config.raw["max_position_embeddings"].as_u64() {
        let wanted = prompt.len() as u64 + p.max_tokens as u64;
        ensure!(
            wanted <= limit,
            "{} prompt tokens + max_tokens {} = {wanted} positions, more than the model's \
             {limit} (max_position_embeddings): ask for at most {} tokens",
            prompt.len(),
            p.max_tokens,
            limit.saturating_sub(prompt.len() as u64)
        );
    }
    ensure!(
        p.temperature >= 0.0 && p.temperature.is_finite() && p.top_p > 0.0 && p.top_p <= 1.0,
        "temperature must be ≥ 0 and top_p in (0, 1], not {} and {}",
        p.temperature,
        p.top_p
    );
    Ok(())
}

/// A base model alone, to sample from (`create_sampling_client(base_model=…)`).
pub struct BaseModel(Model);

impl BaseModel {
    /// Loads the Hugging Face directory `dir` (on CUDA when there is one, else the CPU), frozen,
    /// held as a LoRA model holds its base (so that adapters go on over it without a copy).
    pub fn load(dir: &Path) -> Result<Self> {
        let device = Device::cuda_if_available();
        libtorch_boundary("loading the base model", || {
            let (model, _) = Model::load_hf_dir(dir, device, None, frozen_base_kind(device))
                .with_context(|| format!("loading the base model in {}", dir.display()))?;
            Ok(Self(model.sharing_base()?))
        })
    }

    /// Another handle on the same weights (no copy).
    pub fn share(&self) -> Result<Self> {
        libtorch_boundary("sharing the base model", || {
            Ok(Self(self.0.sharing_base()?))
        })
    }
}

impl Sampling for BaseModel {
    fn sampled_model(&self) -> &Model {
        &self.0
    }
}

/// Fails naming the first of `tokens` outside `0..vocab`.
pub(crate) fn check_tokens<'a>(
    mut tokens: impl Iterator<Item = &'a i64>,
    vocab: i64,
) -> Result<()> {
    match tokens.find(|&&t| t < 0 || t >= vocab) {
        Some(t) => anyhow::bail!("token {t} is outside the model's vocabulary (0..{vocab})"),
        None => Ok(()),
    }
}

/// The samples of `requests`, decoded together: each prompt goes through the model once (prompts
/// of different lengths padded on the left to the longest, in one pass), its cache is copied to a
/// row for each of its samples, then each step takes one token of every row in one pass (rows
/// that ended ride along, their tokens unused, until an eighth of the rows has ended: then they
/// leave the batch) and each request draws its rows' tokens as its
/// parameters say. With a seed, row `i` of a request draws at step `s` from libtorch's generator
/// seeded from (seed + i, s): the same request gives the same samples, alone or beside others,
/// and row `i` is row 0 of the request with seed + i.
fn sample_rows(model: &Model, requests: &[&Request<'_>]) -> Result<Vec<Vec<Sampled>>> {
    let mut out: Vec<Vec<Sampled>> = requests.iter().map(|r| no_samples(r.n)).collect();
    // Only the requests that sample anything go through the model.
    let live: Vec<usize> = (0..requests.len())
        .filter(|&i| requests[i].n > 0 && requests[i].params.max_tokens > 0)
        .collect();
    if live.is_empty() {
        return Ok(out);
    }
    let decoding: Vec<&Request<'_>> = live.iter().map(|&i| requests[i]).collect();
    for (i, sampled) in live.into_iter().zip(decode(model, &decoding)?) {
        out[i] = sampled;
    }
    Ok(out)
}

/// `n` samples with no tokens yet.
fn no_samples(n: usize) -> Vec<Sampled> {
    let empty = Sampled {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        stopped: false,
    };
    vec![empty; n]
}

/// [`sample_rows`] over requests that each sample something.
fn decode(model: &Model, requests: &[&Request<'_>]) -> Result<Vec<Vec<Sampled>>> {
    let device = model.device();
    let mut out: Vec<Vec<Sampled>> = requests.iter().map(|r| no_samples(r.n)).collect();
    // The rows in the batch, each (its request, its sample); a row is done once it stopped or
    // has its request's max_tokens, and goes once an eighth of the batch is done (a copy of the
    // cache's rows each time), rows of one request staying side by side.
    let mut rows: Vec<(usize, usize)> = requests
        .iter()
        .enumerate()
        .flat_map(|(r, q)| (0..q.n).map(move |i| (r, i)))
        .collect();
    let steps = requests
        .iter()
        .map(|r| r.params.max_tokens)
        .max()
        .unwrap_or(0);
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let pad: Vec<i64> = requests
        .iter()
        .map(|r| (longest - r.prompt.len()) as i64)
        .collect();
    let ids: Vec<i64> = requests
        .iter()
        .flat_map(|r| {
            std::iter::repeat_n(0, longest - r.prompt.len()).chain(r.prompt.iter().copied())
        })
        .collect();
    let ids = Tensor::from_slice(&ids)
        .view([requests.len() as i64, longest as i64])
        .to_device(device);
    let mut row_pad: Vec<i64> = rows.iter().map(|&(r, _)| pad[r]).collect();
    let index: Vec<i64> = rows.iter().map(|&(r, _)| r as i64).collect();
    // The prompts' pass; its cache copied to a row a sample (then let go).
    let (mut cache, mut last) = {
        let mut prompts = KvCache::default();
        let prefill = model.forward_padded(&ids, &mut prompts, 0, &pad);
        let rows = Tensor::from_slice(&index).to_device(device);
        let last = prefill.to_kind(Kind::Float).index_select(0, &rows);
        (prompts.rows(&index), last)
    };
    let mut done = vec![false; rows.len()];
    for step in 0..steps {
        let mut drawn = vec![(0i64, 0f32); rows.len()];
        let mut first = 0;
        while first < rows.len() {
            let r = rows[first].0;
            let end = first + rows[first..].iter().take_while(|(q, _)| *q == r).count();
            let (request, span) = (requests[r], first..end);
            first = end;
            if span.clone().all(|row| done[row]) {
                continue;
            }
            let p = request.params;
            let logits = last.narrow(0, span.start as i64, span.len() as i64);
            // Every row of the request at once; a seeded row alone, from its own generator's seed.
            let got = match p.seed {
                None => draw(&logits, p)?,
                Some(seed) => {
                    let drawn = span
                        .clone()
                        .map(|row| {
                            let i = rows[row].1 as u64;
                            tch::manual_seed(step_seed(seed.wrapping_add(i), step));
                            Ok(draw(&last.narrow(0, row as i64, 1), p)?[0])
                        })
                        .collect::<Result<Vec<_>>>();
                    // libtorch's generator is the process's: the draws after these (another
                    // request's, dropout's) must not follow from this seed.
                    tch::manual_seed(rand::random::<i64>() & i64::MAX);
                    drawn?
                }
            };
            drawn[span.clone()].copy_from_slice(&got);
            for (row, (token, logprob)) in span.zip(got) {
                if done[row] {
                    continue;
                }
                let sample = &mut out[r][rows[row].1];
                sample.tokens.push(token);
                sample.logprobs.push(logprob);
                sample.stopped = p.stop.contains(&token)
                    || request.text_stop.is_some_and(|stop| stop(&sample.tokens));
                done[row] = sample.stopped || sample.tokens.len() >= p.max_tokens;
            }
        }
        let finished = done.iter().filter(|&&d| d).count();
        if finished == rows.len() {
            break;
        }
        if finished > 0 && finished >= rows.len() / 8 {
            let keep: Vec<usize> = (0..rows.len()).filter(|&row| !done[row]).collect();
            let index: Vec<i64> = keep.iter().map(|&row| row as i64).collect();
            cache = cache.rows(&index);
            rows = keep.iter().map(|&row| rows[row]).collect();
            row_pad = keep.iter().map(|&row| row_pad[row]).collect();
            drawn = keep.iter().map(|&row| drawn[row]).collect();
            done = vec![false; rows.len()];
        }
        let next: Vec<i64> = drawn.iter().map(|&(t, _)| t).collect();
        let tokens = Tensor::from_slice(&next)
            .view([next.len() as i64, 1])
            .to_device(device);
        last = model
            .forward_padded(&tokens, &mut cache, (longest + step) as i64, &row_pad)
            .to_kind(Kind::Float);
    }
    Ok(out)
}

/// The generator's seed for step `step` of a row seeded `seed` (SplitMix64's finalizer: nearby
/// seeds and steps give unrelated streams).
fn step_seed(seed: u64, step: usize) -> i64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF) as i64
}

/// A token drawn from each row of `logits` (`[rows, vocab]`, fp32) as `p` says, and its log-prob:
/// one pass over all rows (on a GPU, one copy back a step, not one a row).
fn draw(logits: &Tensor, p: &SampleParams) -> Result<Vec<(i64, f32)>> {
    let greedy = p.temperature == 0.0 || p.top_k == 1;
    let scaled = if p.temperature > 0.0 {
        logits / p.temperature
    } else {
        logits.shallow_clone()
    };
    let logp = scaled.log_softmax(-1, Kind::Float);
    let tokens = if greedy {
        logits.argmax(-1, true)
    } else {
        let mut kept = scaled.shallow_clone();
        let vocab = kept.size().last().copied().unwrap_or(0);
        if p.top_k > 0 && p.top_k < vocab {
            let kth = kept
                .topk(p.top_k, -1, true, true)
                .0
                .narrow(-1, p.top_k - 1, 1);
            kept = kept.masked_fill(&kept.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        if p.top_p < 1.0 {
            let (sorted, order) = kept.sort(-1, true);
            let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
            // Keep a token while the mass before it is under top_p (the first always).
            let before = &cum - sorted.softmax(-1, Kind::Float);
            let drop_sorted = before.ge(p.top_p);
            let drop = drop_sorted.scatter(-1, &order, &drop_sorted);
            kept = kept.masked_fill(&drop, f64::NEG_INFINITY);
        }
        kept.softmax(-1, Kind::Float).multinomial(1, false)
    };
    let logprobs = logp.gather(-1, &tokens, false);
    let tokens = Vec::<i64>::try_from(tokens.reshape([-1]).to_device(Device::Cpu))?;
    let logprobs = Vec::<f32>::try_from(logprobs.reshape([-1]).to_device(Device::Cpu))?;
    Ok(tokens.into_iter().zip(logprobs).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    /// Requests decoded together — prompts of different lengths, greedy and seeded draws, their
    /// own max_tokens and stop tokens — each get the samples they get alone.
    #[test]
    fn requests_decoded_together_are_the_requests_decoded_alone() {
        let _turn = crate::model::tests::seeded();
        let model = BaseModel(Model::init(ModelConfig::tiny(), 5, Device::Cpu).unwrap());
        let prompts: [&[i64]; 4] = [&[3, 17, 42, 9], &[5], &[8, 8, 1, 200, 7, 31, 2], &[11, 4]];
        let params = |max_tokens, temperature, seed, stop: Vec<i64>| SampleParams {
            max_tokens,
            temperature,
            top_k: -1,
            top_p: 1.0,
            seed,
            stop,
        };
        let each = [
            params(6, 0.0, None, Vec::new()),
            params(4, 1.2, Some(3), Vec::new()),
            params(0, 0.0, None, Vec::new()),
            params(5, 0.9, Some(11), vec![7]),
        ];
        let n = [2, 3, 1, 2];
        let requests: Vec<Request<'_>> = (0..4)
            .map(|i| Request {
                prompt: prompts[i],
                params: &each[i],
                n: n[i],
                text_stop: None,
            })
            .collect();
        // (The batch itself: `sample_together` would hide a failed batch by sampling each alone.)
        let refs: Vec<&Request<'_>> = requests.iter().collect();
        let together = tch::no_grad(|| sample_rows(&model.0, &refs)).unwrap();
        for i in 0..4 {
            let alone = model.sample(prompts[i], &each[i], n[i], None).unwrap();
            let got = &together[i];
            assert_eq!(got.len(), n[i]);
            for (a, b) in got.iter().zip(&alone) {
                assert_eq!(
                    (&a.tokens, a.stopped),
                    (&b.tokens, b.stopped),
                    "request {i}"
                );
                for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                    assert!((x - y).abs() < 1e-4, "request {i}: {x} vs {y}");
                }
                assert!(a.tokens.len() <= each[i].max_tokens);
            }
        }
        assert!(together[2][0].tokens.is_empty());
        // A wrong request fails alone.
        let outside = params(3, 0.0, None, Vec::new());
        let mixed = [
            Request {
                prompt: &[1_000_000],
                params: &outside,
                n: 1,
                text_stop: None,
            },
            Request {
                prompt: prompts[0],
                params: &each[0],
                n: 1,
                text_stop: None,
            },
        ];
        let got = model.sample_together(&mixed);
        let err = got[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("outside the model's vocabulary"), "{err}");
        let alone = model.sample(prompts[0], &each[0], 1, None).unwrap();
        assert_eq!(got[1].as_ref().unwrap()[0].tokens, alone[0].tokens);
    }

    /// Rows decoded together are the samples decoded alone: greedy ones alike, a seeded row `i`
    /// that of the request seeded `seed + i`, each row its own draw.
    #[test]
    fn rows_decoded_together_are_the_samples_decoded_alone() {
        let _turn = crate::model::tests::seeded();
        let model = BaseModel(Model::init(ModelConfig::tiny(), 5, Device::Cpu).unwrap());
        let prompt = [3i64, 17, 42, 9];
        let params = |temperature, seed| SampleParams {
            max_tokens: 6,
            temperature,
            top_k: -1,
            top_p: 1.0,
            seed,
            stop: Vec::new(),
        };
        let greedy = model.sample(&prompt, &params(0.0, None), 3, None).unwrap();
        let alone = model.sample(&prompt, &params(0.0, None), 1, None).unwrap();
        assert!(
            greedy.iter().all(|s| s.tokens == alone[0].tokens),
            "{greedy:?}"
        );
        for (a, b) in greedy[2].logprobs.iter().zip(&alone[0].logprobs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let drawn = model
            .sample(&prompt, &params(1.5, Some(7)), 3, None)
            .unwrap();
        let row2 = model
            .sample(&prompt, &params(1.5, Some(9)), 1, None)
            .unwrap();
        assert_eq!(
            drawn[2].tokens, row2[0].tokens,
            "row 2 is the request seeded 7 + 2"
        );
        assert_ne!(drawn[0].tokens, drawn[1].tokens, "each row draws its own");
        // A stop token ends its row only.
        let stop = drawn[0].tokens[1];
        let stopped = model
            .sample(
                &prompt,
                &SampleParams {
                    stop: vec![stop],
                    ..params(1.5, Some(7))
                },
                3,
                None,
            )
            .unwrap();
        assert!(
            stopped[0].stopped && stopped[0].tokens.len() <= 2,
            "row 0 stops at the token: {stopped:?}"
        );
        for (s, d) in stopped.iter().zip(&drawn) {
            let cut = d
                .tokens
                .iter()
                .position(|&t| t == stop)
                .map_or(6, |i| i + 1);
            assert_eq!(
                s.tokens,
                d.tokens[..cut],
                "each row stops at its own stop token, no sooner"
            );
        }
    }

    /// Rows drawn in one pass keep to each row's own logits: greedy picks each row's best, top-k
    /// each row's own top tokens.
    #[test]
    fn rows_draw_alike() {
        let _turn = crate::model::tests::seeded();
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 0.5, 4.0, 0.0, 0.0, 3.5]).view([2, 4]);
        let p = |temperature, top_k| SampleParams {
            max_tokens: 1,
            temperature,
            top_k,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
        };
        let greedy = draw(&logits, &p(0.0, -1)).unwrap();
        assert_eq!((greedy[0].0, greedy[1].0), (1, 0));
        let want = logits.log_softmax(-1, Kind::Float);
        assert_eq!(greedy[1].1, want.double_value(&[1, 0]) as f32);
        tch::manual_seed(5);
        for _ in 0..50 {
            let d = draw(&logits, &p(1.0, 2)).unwrap();
            assert!(
                [1, 2].contains(&d[0].0) && [0, 3].contains(&d[1].0),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_draw_keeps_to_greedy_top_k_and_top_p() {
        let _turn = crate::model::tests::seeded();
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 0.5]);
        let p = |temperature, top_k, top_p| SampleParams {
            max_tokens: 1,
            temperature,
            top_k,
            top_p,
            seed: None,
            stop: Vec::new(),
        };
        // One row at a time here; `rows_draw_alike` draws several.
        let one = |params: &SampleParams| draw(&logits.unsqueeze(0), params).unwrap()[0];
        let (token, lp) = one(&p(0.0, -1, 1.0));
        let want = logits.log_softmax(-1, Kind::Float).double_value(&[1]) as f32;
        assert_eq!(
            (token, lp),
            (1, want),
            "greedy: the most likely, its log-prob"
        );
        tch::manual_seed(3);
        for _ in 0..50 {
            assert!([1, 2].contains(&one(&p(1.0, 2, 1.0)).0), "top_k 2");
            assert_eq!(one(&p(1.0, -1, 0.3)).0, 1, "top_p 0.3: the first alone");
        }
        let all: std::collections::BTreeSet<i64> =
            (0..400).map(|_| one(&p(2.0, -1, 1.0)).0).collect();
        assert_eq!(all.len(), 4, "no filter: every token comes");
    }
}
