//! Which run `waypoint status` and `waypoint ckpt` read. A run is named the way `waypoint train`
//! prints it (`<base>/<run_id>/framework=<framework>`), by its run folder (`<base>/<run_id>`, when
//! one framework is inside), or by the flags `train` takes (`--checkpoint_base_uri`, `--run_id`,
//! `--framework`); `waypoint status` with none of them lists the runs under `./runs`.

use anyhow::{bail, Context, Result};
use waypoint_checkpoint::RunLayout;
use waypoint_storage::Store;

/// The prefix of a run folder's framework folders (`framework=<name>`).
const FRAMEWORK: &str = "framework=";

/// A run by the flags `waypoint train` takes.
#[derive(Debug, Clone, clap::Args)]
pub struct RunFlags {
    /// Where runs live, as `train` takes it [default: ./runs].
    #[arg(long = "checkpoint_base_uri")]
    pub checkpoint_base_uri: Option<String>,
    /// The run's id, as `train` takes it.
    #[arg(long = "run_id")]
    pub run_id: Option<String>,
    /// The framework segment, as `train` takes it [default: waypoint].
    #[arg(long = "framework")]
    pub framework: Option<String>,
}

impl RunFlags {
    /// The base the flags name (`./runs` by default).
    pub fn base(&self) -> &str {
        self.checkpoint_base_uri.as_deref().unwrap_or("./runs")
    }

    /// The run URI the flags name, if they name a run (`--run_id`).
    pub fn uri(&self) -> Result<Option<String>> {
        let Some(run_id) = &self.run_id else {
            if self.framework.is_some() {
                bail!("--framework names a run together with --run_id; add --run_id");
            }
            return Ok(None);
        };
        let framework = self.framework.as_deref().unwrap_or("waypoint");
        let layout = RunLayout::new(run_id, framework)
            .with_context(|| format!("--run_id {run_id:?} --framework {framework:?}"))?;
        Ok(Some(layout.uri_under(self.base())))
    }
}

/// The run URI that `given` (a run URI or a run folder, see [`run_of`]) or `flags` name; `None`
/// when neither names one, an error when both do.
pub async fn resolve(given: Option<&str>, flags: &RunFlags) -> Result<Option<String>> {
    let named = flags.uri()?;
    let Some(given) = given else {
        return Ok(named);
    };
    if named.is_some() || flags.checkpoint_base_uri.is_some() {
        bail!(
            "{given:?} and --checkpoint_base_uri/--run_id/--framework both name a run; give one \
             of them"
        );
    }
    run_of(given).await.map(Some)
}

/// The run URI `given` names: a run URI as it is, or the run of a run folder, found by listing it:
/// it must hold exactly one `framework=<name>` folder.
pub async fn run_of(given: &str) -> Result<String> {
    if RunLayout::from_uri(given).is_ok() {
        return Ok(given.trim_end_matches('/').to_string());
    }
    let folder = given.trim_end_matches('/');
    let (base, run_id) = folder.rsplit_once('/').unwrap_or((".", folder));
    let base = if base.is_empty() { "/" } else { base };
    let store = Store::open(base).with_context(|| format!("opening {base}"))?;
    let listing = store
        .list_dir(run_id)
        .await
        .with_context(|| format!("listing {folder}"))?;
    let frameworks: Vec<&str> = listing
        .prefixes
        .iter()
        .filter_map(|p| framework_of(p))
        .collect();
    match frameworks.as_slice() {
        [one] => Ok(format!("{folder}/{one}")),
        [] => bail!(
            "{given:?} is neither a run (<checkpoint_base_uri>/<run_id>/framework=<framework>) nor \
             a run folder holding one: nothing named {FRAMEWORK}… is inside it"
        ),
        several => bail!(
            "the run folder {given:?} holds {} runs; name one: {}",
            several.len(),
            several
                .iter()
                .map(|f| format!("{folder}/{f}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The `framework=<name>` segment that ends a listed prefix, if it is one.
fn framework_of(prefix: &str) -> Option<&str> {
    prefix
        .rsplit('/')
        .next()
        .filter(|name| name.starts_with(FRAMEWORK))
}

/// The runs under `base`: every `<run_id>/framework=<name>` folder, as run URIs, sorted.
pub async fn list(base: &str) -> Result<Vec<String>> {
    let store = Store::open(base).with_context(|| format!("opening {base}"))?;
    let top = store
        .list_dir("")
        .await
        .with_context(|| format!("listing {base}"))?;
    let mut runs = Vec::new();
    for run_id in &top.prefixes {
        let inside = store
            .list_dir(run_id)
            .await
            .with_context(|| format!("listing {base}/{run_id}"))?;
        for p in &inside.prefixes {
            if framework_of(p).is_some() {
                runs.push(format!("{}/{p}", base.trim_end_matches('/')));
            }
        }
    }
    runs.sort();
    Ok(runs)
}
