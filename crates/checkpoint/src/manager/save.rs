//! The one save protocol, for one rank and for N: the committer (rank 0) clears the step's
//! leftovers; a barrier; every rank writes its share; the file lists are all-gathered; the committer
//! commits and runs the upkeep (which never fails the save); its verdict (the manifest, or the error) is broadcast, so every rank
//! returns the same outcome.
//! One rank is the trivial case ([`SingleRank`]). Storage calls are retried inside the storage
//! crate; there is no retry of a whole save.

use serde::{Deserialize, Serialize};

use super::{CheckpointManager, SaveRequest};
use crate::error::{CheckpointError, Result};
use crate::file_entry::WrittenFile;
use crate::manifest::Manifest;
use crate::peers::{Peers, SingleRank};
use crate::StepName;

/// What the committer tells every rank.
#[derive(Serialize, Deserialize)]
enum Verdict {
    /// Committed, with this manifest.
    Committed(Box<Manifest>),
    /// Not committed, for this reason.
    Failed(String),
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| CheckpointError::Serialize { what, source })
}

fn decode<'a, T: Deserialize<'a>>(op: &str, bytes: &'a [u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| CheckpointError::Peers {
        op: op.to_string(),
        reason: format!("a rank sent what is not a save message: {e}"),
    })
}

impl CheckpointManager {
    /// A save by this process alone: [`Self::save_with`] with [`SingleRank`].
    pub async fn save(&self, request: SaveRequest) -> Result<Manifest> {
        self.save_with(&mut SingleRank, request).await
    }

    /// This rank's part of a save by `peers.world()` ranks (see the module documentation). `request`
    /// holds this rank's share of the resumable state; the sampler part comes from the committer
    /// (rank 0), or as a share from every rank ([`SamplerPart::FullShare`](super::SamplerPart)),
    /// in which case the commit checks that every file of the plan came in. Rank 0 returns its own error; the others return the manifest rank 0 committed,
    /// or [`CheckpointError::NotCommitted`]. A rank that fails before the all-gather returns its
    /// error at once and the others' collectives time out: no commit either way.
    pub async fn save_with(
        &self,
        peers: &mut dyn Peers,
        mut request: SaveRequest,
    ) -> Result<Manifest> {
        let step = StepName::new(request.commit.step);
        let (rank, world) = (peers.rank(), peers.world());
        if rank == 0 {
            self.prepare_save(step).await?;
        }
        peers.barrier(&format!("save/{step}/prepared"))?;
        let writer = self.file_writer(step, rank);
        let planned: Vec<String> = match &request.sampler {
            Some(super::SamplerPart::FullShare { plan, .. }) => plan
                .files
                .iter()
                .map(|f| format!("sampler/{}", f.name))
                .collect(),
            _ => Vec::new(),
        };
        let mut files = Vec::new();
        if let Some(state) = request.dcp.take() {
            files.extend(self.write_dcp(&writer, world, state).await?);
        }
        if let Some(sampler) = request.sampler.take() {
            files.extend(
                self.write_sampler(&writer, sampler, &mut request.commit)
                    .await?,
            );
        }
        if world > 1 {
            let bytes: u64 = files.iter().map(|f| f.entry.bytes).sum();
            if self.options.quiet {
                tracing::debug!(rank, checkpoint = %step, files = files.len(), bytes, "wrote this rank's share");
            } else {
                tracing::info!(rank, checkpoint = %step, files = files.len(), bytes, "wrote this rank's share");
            }
        }
        let gather = format!("save/{step}/files");
        let lists = peers.all_gather(&gather, &encode("a save's file list", &files)?)?;
        let result = format!("save/{step}/result");
        if rank != 0 {
            let verdict = peers.broadcast(&result, b"")?;
            return match decode(&result, &verdict)? {
                Verdict::Committed(manifest) => Ok(*manifest),
                Verdict::Failed(reason) => Err(CheckpointError::NotCommitted {
                    name: step.to_string(),
                    reason,
                }),
            };
        }
        let committed = async {
            let mut all = Vec::new();
            for list in &lists {
                all.extend(decode::<Vec<WrittenFile>>(&gather, list)?);
            }
            if let Some(missing) = planned
                .iter()
                .find(|p| !all.iter().any(|f| &f.entry.path == *p))
            {
                return Err(CheckpointError::Invalid(format!(
                    "{missing} of the promotable weights was written by no rank (every rank \
                     must write its share)"
                )));
            }
            let manifest = self.commit(request.commit, all).await?;
            // Upkeep never fails a save that committed: a failure is a warning, redone next save.
            self.upkeep(&manifest).await;
            Ok::<_, CheckpointError>(manifest)
        }
        .await;
        let verdict = match &committed {
            Ok(m) => Verdict::Committed(Box::new(m.clone())),
            Err(e) => Verdict::Failed(e.to_string()),
        };
        peers.broadcast(&result, &encode("a save's verdict", &verdict)?)?;
        committed
    }
}
