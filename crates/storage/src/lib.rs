//! waypoint-storage: every checkpoint byte goes through this crate.
//!
//! - [`Store`] opens a `checkpoint_base_uri` (local path, `file://`, `s3://`, `gs://`, `az://`,
//!   `memory://`) and offers puts, create-only puts (the commit primitive), gets, ranged and streaming
//!   reads, listings, heads, deletes and copies, all with retries of transient errors and typed errors.
//! - [`BlobWriter`] streams a blob of any size with bounded memory, computing its digest as the bytes
//!   pass (sha256 of fixed-size parts on all cores, combined S3's way: [`digest`]); nothing is visible
//!   under the key until it finishes. [`BlobReader`] streams one back, checking the same digest.
//!
//! Dependencies inside point one way: `store` → `uri` → `options`/`retry`; `reader`/`writer` → `store`,
//! `digest`.
//!
//! This crate knows nothing of tensors or libtorch.

#![forbid(unsafe_code)]

pub mod digest;
mod error;
mod options;
mod reader;
pub mod redact;
mod retry;
mod store;
mod uri;
mod writer;

pub use digest::DigestScheme;
pub use error::{Result, StorageError};
pub use options::{StoreOptions, PART_ENV};
pub use reader::BlobReader;
pub use redact::{redact_text, redact_uri};
pub use retry::{is_transient, RetryPolicy, RETRY_ENV, TIMEOUT_ENV};
pub use store::{BlobInfo, Listing, ObjectInfo, Store};
pub use writer::BlobWriter;
