//! Training data: JSONL rows (a text field, or chat `messages` rendered with the tokenizer's chat
//! template, loss on assistant turns only), tokenized once into a memory-mapped token cache
//! ([`cache`]) and read from it as packed (or padded) fixed-length samples, visited in an order
//! that is a pure function of (seed, epoch).
//!
//! The position in the data is one global counter, `data_consumed`: sample `g` of the run is
//! `permuted(seed, g / n, n, g % n)` of the `n` samples. Resuming at any counter — with any batch
//! split — continues the same sequence, at a cost that grows neither with the counter nor with the
//! data.
//!
//! Modules: [`source`] lists and streams the files (local or on a store); [`tokenizer`] and
//! [`template`] turn rows into ids and loss masks; [`pairs`] reads preference pairs; [`cache`] is the token cache; [`dataset`] reads
//! samples from it as [`Batch`]es; [`order`] is the seeded order. Nothing here knows libtorch: the
//! trainer turns a [`Batch`] into tensors.

pub mod cache;
pub mod dataset;
pub mod order;
pub mod pairs;
pub mod source;
pub mod template;
pub mod tokenizer;

pub use dataset::{cache_key, default_cache_dir, Batch, DataOptions, Dataset, CHAT_ROLES, IGNORE};
pub use order::permuted;
pub use pairs::PairStyle;
pub use source::{list_sources, DEMO_DATASET};
