//! Turning a `checkpoint_base_uri` into an object store.
//!
//! Accepted: a plain local path (`./runs`, `/data/runs`), `file:///abs/path`, `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `az://container/prefix` and `memory://name`. Cloud settings come from the
//! environment the way the vendors' own tools read them (`AWS_*`, `GOOGLE_*`, `AZURE_*`); credentials in
//! the URI itself are refused so that a URI can always be logged.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::client::{ClientOptions, HttpClient, HttpConnector};
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

use crate::error::{Result, StorageError};
use crate::options::StoreOptions;
use crate::redact::redact_uri;

/// A backend opened from a URI: the store, the key prefix inside it, and a printable URI.
pub(crate) struct Backend {
    pub store: Arc<dyn ObjectStore>,
    pub root: Path,
    pub display: String,
    /// For a local store: the folder the root stands for.
    pub local_root: Option<PathBuf>,
    /// Whether the backend's own client retries (cloud backends); then the store layer does not.
    pub client_retries: bool,
}

/// An HTTP transport for cloud backends in place of the default one (tests inject faults with it).
pub(crate) type Transport = Option<Arc<dyn HttpConnector>>;

/// Opens the backend a URI names, reading settings from the process environment.
pub(crate) fn open_backend(
    uri: &str,
    options: &StoreOptions,
    transport: Transport,
) -> Result<Backend> {
    open_backend_in(uri, options, &process_env, transport)
}

/// A shared connector, as the builders take one.
#[derive(Debug)]
struct SharedConnector(Arc<dyn HttpConnector>);

impl HttpConnector for SharedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        self.0.connect(options)
    }
}

/// A source of settings by environment-variable name (the process environment, or a test's map).
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Opens the backend a URI names, reading settings through `env`.
pub(crate) fn open_backend_in(
    uri: &str,
    options: &StoreOptions,
    env: Env<'_>,
    transport: Transport,
) -> Result<Backend> {
    let invalid = |reason: &str| StorageError::InvalidUri {
        uri: redact_uri(uri),
        reason: reason.to_string(),
    };
    if uri.trim().is_empty() {
        return Err(invalid(
            "it is empty; give a local path, file://, s3://, gs://, az:// or memory:// URI",
        ));
    }
    let Some((scheme, _)) = uri.split_once("://") else {
        return open_local(uri, FsPath::new(uri), options);
    };
    let url = Url::parse(uri).map_err(|e| invalid(&format!("cannot be parsed ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "credentials are not accepted inside the URI; set them in the environment \
             (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a query (`?`) or fragment (`#`) is not accepted"));
    }
    match scheme {
        "file" => {
            if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                return Err(invalid("file:// URIs take no host; write file:///absolute/path"));
            }
            let path = url
                .to_file_path()
                .map_err(|_| invalid("not an absolute local path; write file:///absolute/path"))?;
            open_local(uri, &path, options)
        }
        "memory" => {
            let name = url.host_str().unwrap_or_default().to_string();
            Ok(Backend {
                store: shared_memory_store(&name),
                root: key_prefix(uri, url.path())?,
                display: uri.to_string(),
                local_root: None,
                client_retries: false,
            })
        }
        "s3" | "gs" | "az" => {
            let bucket = url
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| invalid("the bucket (or container) name is missing: s3://bucket/prefix"))?;
            let root = key_prefix(uri, url.path())?;
            let store: Arc<dyn ObjectStore> = match scheme {
                "s3" => Arc::new(open_s3(uri, bucket, options, env, transport)?),
                "gs" => Arc::new(
                    GoogleCloudStorageBuilder::from_env()
                        .with_bucket_name(bucket)
                        .with_retry(options.retry.to_client_config())
                        .with_client_options(options.retry.to_client_options())
                        .build()
                        .map_err(|e| setting(uri, "GOOGLE_*", &e.to_string(), GCS_HINT))?,
                ),
                _ => {
                    if env("AZURE_STORAGE_ACCOUNT_NAME").is_none() {
                        return Err(setting(
                            uri,
                            "AZURE_STORAGE_ACCOUNT_NAME",
                            "is not set",
                            "set it to the storage account that holds the container",
                        ));
                    }
                    Arc::new(
                        MicrosoftAzureBuilder::from_env()
                            .with_container_name(bucket)
                            .with_retry(options.retry.to_client_config())
                        .with_client_options(options.retry.to_client_options())
                            .build()
                            .map_err(|e| setting(uri, "AZURE_*", &e.to_string(), AZURE_HINT))?,
                    )
                }
            };
            Ok(Backend {
                store,
                root,
                display: uri.to_string(),
                local_root: None,
                client_retries: true,
            })
        }
        other => Err(invalid(&format!(
            "unknown scheme `{other}://`; use a local path, file://, s3://, gs://, az:// or memory://"
        ))),
    }
}

const S3_HINT: &str =
    "set AWS_ENDPOINT_URL (for a non-AWS server), AWS_REGION, AWS_ACCESS_KEY_ID and \
                       AWS_SECRET_ACCESS_KEY, and AWS_ALLOW_HTTP=true for a plain-http endpoint";
const GCS_HINT: &str =
    "set GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT) to a service-account key file";
const AZURE_HINT: &str =
    "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or a SAS / AAD setting)";

fn setting(uri: &str, setting: &str, problem: &str, hint: &str) -> StorageError {
    StorageError::Setting {
        uri: redact_uri(uri),
        setting: setting.to_string(),
        problem: problem.to_string(),
        hint: hint.to_string(),
    }
}

fn open_s3(
    uri: &str,
    bucket: &str,
    options: &StoreOptions,
    env: Env<'_>,
    transport: Transport,
) -> Result<object_store::aws::AmazonS3> {
    let endpoint = env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT"));
    let allow_http = match env("AWS_ALLOW_HTTP").as_deref() {
        None => false,
        Some("true" | "1" | "TRUE" | "True") => true,
        Some("false" | "0" | "FALSE" | "False") => false,
        Some(other) => {
            return Err(setting(
                uri,
                "AWS_ALLOW_HTTP",
                &format!("is {other:?}, which is neither true nor false"),
                "set AWS_ALLOW_HTTP=true to allow a plain-http endpoint",
            ))
        }
    };
    if let Some(ep) = &endpoint {
        if Url::parse(ep).is_err() {
            return Err(setting(
                uri,
                "AWS_ENDPOINT_URL",
                &format!("is {ep:?}, which is not a URL"),
                "set it to the server's URL, e.g. http://127.0.0.1:9000",
            ));
        }
        if ep.starts_with("http://") && !allow_http {
            return Err(setting(
                uri,
                "AWS_ALLOW_HTTP",
                &format!("is not true but the endpoint {ep} is plain http"),
                "set AWS_ALLOW_HTTP=true, or use an https endpoint",
            ));
        }
    }
    let key_id = env("AWS_ACCESS_KEY_ID").is_some();
    let secret = env("AWS_SECRET_ACCESS_KEY").is_some();
    if key_id != secret {
        let (missing, present) = if key_id {
            ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        } else {
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        };
        return Err(setting(
            uri,
            missing,
            &format!("is not set while {present} is"),
            "set both keys, or neither to use the pod's role (web identity or instance metadata)",
        ));
    }
    if endpoint.is_some() && !key_id {
        return Err(setting(
            uri,
            "AWS_ACCESS_KEY_ID",
            "is not set for a custom endpoint",
            "an S3-compatible server needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ));
    }
    // The builder reads the rest (session tokens, web identity, profiles) from the process
    // environment; what was validated above is applied explicitly.
    // Client options first: they replace the whole set, so allow_http goes after them.
    let mut builder = AmazonS3Builder::from_env()
        .with_client_options(options.retry.to_client_options())
        .with_bucket_name(bucket)
        .with_allow_http(allow_http)
        .with_retry(options.retry.to_client_config());
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
    }
    if let Some(ep) = endpoint {
        // Path-style addressing: S3-compatible servers rarely resolve bucket subdomains.
        builder = builder
            .with_endpoint(ep)
            .with_virtual_hosted_style_request(false);
    }
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".to_string());
    builder = builder.with_region(region);
    // Every request carries its body's sha256 (`x-amz-checksum-sha256`; multipart uploads declare
    // the algorithm at creation, and the completion lists each part's), so the server checks each
    // part on arrival and rejects one damaged on the way. (The request signature also covers the
    // body's sha256, which S3-compatible servers without checksum support verify.)
    builder = builder.with_checksum_algorithm(Checksum::SHA256);
    if let Some(t) = transport {
        builder = builder.with_http_connector(SharedConnector(t));
    }
    builder
        .build()
        .map_err(|e| setting(uri, "AWS_*", &format!("is incomplete ({e})"), S3_HINT))
}

fn open_local(uri: &str, path: &FsPath, options: &StoreOptions) -> Result<Backend> {
    let abs: PathBuf = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| StorageError::Io {
                op: "read the current directory for",
                path: path.to_path_buf(),
                source,
            })?
            .join(path)
    };
    // Nothing is created on open (folders appear as objects are written), so a command refused
    // before any work leaves no empty folder behind. The store is rooted at the nearest existing
    // folder; the missing rest becomes the key prefix.
    let mut existing = abs.as_path();
    let mut missing: Vec<String> = Vec::new();
    while !existing.exists() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            break;
        };
        missing.push(name.to_string_lossy().into_owned());
        existing = parent;
    }
    missing.reverse();
    if !existing.is_dir() {
        return Err(StorageError::InvalidUri {
            uri: redact_uri(uri),
            reason: format!("{} is a file, not a folder", existing.display()),
        });
    }
    let fs = LocalFileSystem::new_with_prefix(existing)
        .map_err(|e| StorageError::InvalidUri {
            uri: redact_uri(uri),
            reason: format!("cannot use {} as a store: {e}", abs.display()),
        })?
        .with_fsync(options.fsync)
        .with_automatic_cleanup(true);
    let root = key_prefix(uri, &missing.join("/"))?;
    let local_root = existing
        .canonicalize()
        .unwrap_or_else(|_| existing.to_path_buf())
        .join(missing.join("/"));
    Ok(Backend {
        store: Arc::new(fs),
        root,
        display: abs.display().to_string(),
        local_root: Some(local_root),
        client_retries: false,
    })
}

fn key_prefix(uri: &str, path: &str) -> Result<Path> {
    Path::parse(path.trim_matches('/')).map_err(|e| StorageError::InvalidUri {
        uri: redact_uri(uri),
        reason: format!("the key prefix {path:?} is not a valid object path ({e})"),
    })
}

/// `memory://name` stores live as long as the process and are shared by every opening of the same
/// name, so one component can write what another reads back.
fn shared_memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut stores = stores
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(uri: &str, vars: &[(&str, &str)]) -> Result<Backend> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        open_backend_in(
            uri,
            &StoreOptions::default(),
            &move |k| vars.get(k).cloned(),
            None,
        )
    }

    fn err(uri: &str, vars: &[(&str, &str)]) -> String {
        match open(uri, vars) {
            Ok(_) => panic!("{uri} opened"),
            Err(e) => e.to_string(),
        }
    }

    const S3_OK: [(&str, &str); 4] = [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "id"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
    ];

    #[test]
    fn opens_each_scheme_with_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let local = open(dir.path().to_str().unwrap(), &[]).unwrap();
        assert_eq!(local.root.as_ref(), "");
        let file_uri = format!("file://{}/sub", dir.path().display());
        let sub = open(&file_uri, &[]).unwrap();
        // Opening writes nothing: the missing folder becomes the key prefix, created on first write.
        assert!(!dir.path().join("sub").exists());
        assert_eq!(sub.root.as_ref(), "sub");
        let s3 = open("s3://bucket/runs/a/", &S3_OK).unwrap();
        assert_eq!(s3.root.as_ref(), "runs/a");
        let mem = open("memory://x/p", &[]).unwrap();
        assert_eq!(mem.root.as_ref(), "p");
    }

    #[test]
    fn malformed_uris_say_what_is_wrong() {
        assert!(err("", &[]).contains("empty"));
        assert!(err("ftp://host/x", &[]).contains("unknown scheme `ftp://`"));
        assert!(err("s3:///prefix", &S3_OK).contains("bucket"));
        let e = err("s3://key:secret@bucket/p", &S3_OK);
        assert!(e.contains("credentials are not accepted"), "{e}");
        assert!(
            !e.contains("secret"),
            "the refusal must not echo the secret: {e}"
        );
        let e = err("s3://bucket/p?token=hunter2", &S3_OK);
        assert!(e.contains("query") && !e.contains("hunter2"), "{e}");
        assert!(err("file://host/x", &[]).contains("no host"));
        assert!(err("s3://bucket/a//b", &S3_OK).contains("key prefix"));
    }

    #[test]
    fn missing_s3_settings_are_named() {
        let e = err("s3://b/p", &[("AWS_ENDPOINT_URL", "http://127.0.0.1:9")]);
        assert!(
            e.contains("AWS_ALLOW_HTTP") && e.contains("set AWS_ALLOW_HTTP=true"),
            "{e}"
        );
        let e = err(
            "s3://b/p",
            &[
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
                ("AWS_ALLOW_HTTP", "yes please"),
            ],
        );
        assert!(e.contains("neither true nor false"), "{e}");
        let e = err(
            "s3://b/p",
            &[
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
                ("AWS_ALLOW_HTTP", "true"),
            ],
        );
        assert!(e.contains("AWS_ACCESS_KEY_ID is not set"), "{e}");
        let e = err("s3://b/p", &[("AWS_ACCESS_KEY_ID", "id")]);
        assert!(
            e.contains("AWS_SECRET_ACCESS_KEY is not set while AWS_ACCESS_KEY_ID is"),
            "{e}"
        );
        let e = err("s3://b/p", &[("AWS_ENDPOINT_URL", "not a url")]);
        assert!(e.contains("not a URL"), "{e}");
        let e = err("az://container/p", &[]);
        assert!(e.contains("AZURE_STORAGE_ACCOUNT_NAME is not set"), "{e}");
    }
}
