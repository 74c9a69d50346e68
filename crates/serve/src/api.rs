//! The JSON bodies of the Tinker SDK's routes that this server reads, as `tinker==0.38.0` sends
//! them (see `docs/tinker-protocol.md` §3). Unknown fields are accepted and ignored — newer SDKs
//! add some — and every field the SDK may leave out has its default here.

use serde::Deserialize;
use serde_json::Value;

/// `POST create_session`.
#[derive(Debug, Deserialize)]
pub(crate) struct CreateSession {}

/// `POST session_heartbeat`.
#[derive(Debug, Deserialize)]
pub(crate) struct SessionHeartbeat {
    pub(crate) session_id: String,
}

/// The SDK's `LoraConfig`.
#[derive(Debug, Deserialize)]
pub(crate) struct LoraConfig {
    pub(crate) rank: i64,
    #[serde(default)]
    pub(crate) seed: Option<i64>,
    #[serde(default = "yes")]
    pub(crate) train_unembed: bool,
    #[serde(default = "yes")]
    pub(crate) train_mlp: bool,
    #[serde(default = "yes")]
    pub(crate) train_attn: bool,
}

fn yes() -> bool {
    true
}

/// `POST create_model`.
#[derive(Debug, Deserialize)]
pub(crate) struct CreateModel {
    pub(crate) session_id: String,
    pub(crate) model_seq_id: i64,
    pub(crate) base_model: String,
    #[serde(default)]
    pub(crate) lora_config: Option<LoraConfig>,
    #[serde(default)]
    pub(crate) optimizer_config: Option<Value>,
}

/// `POST get_info`.
#[derive(Debug, Deserialize)]
pub(crate) struct GetInfo {
    pub(crate) model_id: String,
}

/// The SDK's `AdamParams` (its defaults).
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct AdamParams {
    #[serde(default = "default_lr")]
    pub(crate) learning_rate: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub(crate) eps: f64,
    #[serde(default)]
    pub(crate) weight_decay: f64,
    #[serde(default)]
    pub(crate) grad_clip_norm: f64,
}

fn default_lr() -> f64 {
    1e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-12
}

/// `POST optim_step`: Adam's parameters under `adam_params`; another optimizer's under
/// `optimizer_params`.
#[derive(Debug, Deserialize)]
pub(crate) struct OptimStep {
    pub(crate) model_id: String,
    pub(crate) seq_id: i64,
    #[serde(default)]
    pub(crate) adam_params: Option<AdamParams>,
    #[serde(default)]
    pub(crate) optimizer_params: Option<Value>,
}

/// `POST save_weights` (`save_state`).
#[derive(Debug, Deserialize)]
pub(crate) struct SaveWeights {
    pub(crate) model_id: String,
    pub(crate) seq_id: i64,
    #[serde(default)]
    pub(crate) path: Option<String>,
    #[serde(default)]
    pub(crate) overwrite: bool,
}

/// `POST save_weights_for_sampler`: named (`path`), or ephemeral for a sampling client
/// (`sampling_session_seq_id`).
#[derive(Debug, Deserialize)]
pub(crate) struct SaveWeightsForSampler {
    pub(crate) model_id: String,
    pub(crate) seq_id: i64,
    #[serde(default)]
    pub(crate) path: Option<String>,
    #[serde(default)]
    pub(crate) sampling_session_seq_id: Option<i64>,
}

/// `POST create_sampling_session`.
#[derive(Debug, Deserialize)]
pub(crate) struct CreateSamplingSession {
    pub(crate) session_id: String,
    pub(crate) sampling_session_seq_id: i64,
    #[serde(default)]
    pub(crate) base_model: Option<String>,
    #[serde(default)]
    pub(crate) model_path: Option<String>,
}

/// A chunk of a JSON `ModelInput`.
#[derive(Debug, Deserialize)]
pub(crate) struct Chunk {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) tokens: Vec<i64>,
}

/// A JSON `ModelInput`.
#[derive(Debug, Deserialize)]
pub(crate) struct ModelInput {
    pub(crate) chunks: Vec<Chunk>,
}

/// The SDK's `SamplingParams`.
#[derive(Debug, Deserialize)]
pub(crate) struct SamplingParams {
    #[serde(default)]
    pub(crate) max_tokens: Option<usize>,
    #[serde(default)]
    pub(crate) seed: Option<u64>,
    #[serde(default)]
    pub(crate) stop: Option<Value>,
    #[serde(default = "one")]
    pub(crate) temperature: f64,
    #[serde(default = "minus_one")]
    pub(crate) top_k: i64,
    #[serde(default = "one")]
    pub(crate) top_p: f64,
}

fn one() -> f64 {
    1.0
}
fn minus_one() -> i64 {
    -1
}

/// `POST asample`.
#[derive(Debug, Deserialize)]
pub(crate) struct ASample {
    pub(crate) sampling_session_id: String,
    #[serde(default = "one_sample")]
    pub(crate) num_samples: usize,
    pub(crate) prompt: ModelInput,
    pub(crate) sampling_params: SamplingParams,
    #[serde(default)]
    pub(crate) prompt_logprobs: bool,
}

fn one_sample() -> usize {
    1
}

/// `POST load_weights`: into a model (`model_id`, `seq_id`: `load_state`), or a new model made from
/// the checkpoint (`session_id`, `model_seq_id`: `create_training_client_from_state`).
#[derive(Debug, Deserialize)]
pub(crate) struct LoadWeights {
    pub(crate) path: String,
    #[serde(default)]
    pub(crate) optimizer: bool,
    #[serde(default)]
    pub(crate) model_id: Option<String>,
    #[serde(default)]
    pub(crate) seq_id: Option<i64>,
    #[serde(default)]
    pub(crate) session_id: Option<String>,
    #[serde(default)]
    pub(crate) model_seq_id: Option<i64>,
}

/// `POST retrieve_future`.
#[derive(Debug, Deserialize)]
pub(crate) struct RetrieveFuture {
    pub(crate) request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdks_bodies_parse_with_their_defaults_and_extra_fields() {
        // As captured from the SDK (docs/tinker-protocol.md §8), plus a field a newer SDK adds.
        let c: CreateModel = serde_json::from_str(
            r#"{"session_id":"S","model_seq_id":0,"base_model":"Qwen/Qwen3-8B",
                "lora_config":{"rank":8,"train_unembed":true,"train_mlp":true,"train_attn":true},
                "optimizer_config":{"type":"adamw"},"type":"create_model","new_field":1}"#,
        )
        .unwrap();
        let lora = c.lora_config.unwrap();
        assert_eq!((lora.rank, lora.seed, lora.train_unembed), (8, None, true));
        let o: OptimStep = serde_json::from_str(
            r#"{"model_id":"S:train:0","seq_id":2,"type":"optim_step",
                "adam_params":{"learning_rate":0.01}}"#,
        )
        .unwrap();
        let a = o.adam_params.unwrap();
        assert_eq!((a.learning_rate, a.beta2, a.eps), (0.01, 0.95, 1e-12));
        assert!(serde_json::from_str::<GetInfo>(r#"{"type":"get_info"}"#).is_err());
    }
}

/// `POST weights_info`.
#[derive(Debug, Deserialize)]
pub(crate) struct WeightsInfo {
    pub(crate) tinker_path: String,
}
