//! This worker among the others: joining them (through the torchrun environment), agreeing on each
//! step, and averaging gradients. A single worker needs none of it and pays nothing.
//!
//! Gradients are summed with NCCL on CUDA ([`crate::collective::nccl`], its id passed through the store) and
//! with the ring all-reduce of `waypoint-c10d` on CPU. Each rank's loss is already divided by the
//! global token count, so the sum is the gradient of the global mean loss: 2 ranks × batch b
//! compute what 1 rank × batch 2b does.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use waypoint_c10d::{Group, GroupConfig};

use crate::collective::nccl::{Communicator, Nccl};
use crate::shard::RowCollective;
use crate::shard::{rows_of, Rows};
use waypoint_launch::WorkerEnv;

/// The ranks of the job, from this worker's side.
pub(crate) struct Ranks {
    group: Option<Group>,
    nccl: Option<Communicator>,
    rank: u32,
    world: u32,
    /// This worker's device: what NCCL sums on (the CPU ring reads host copies).
    device: Device,
}

impl Ranks {
    /// Joins the other workers (nothing to join when there are none); on CUDA also their NCCL
    /// communicator, on this worker's GPU.
    pub(crate) fn join(env: &WorkerEnv, timeout: Duration, device: Device) -> Result<Self> {
        let rank = u32::try_from(env.rank).context("RANK is too large")?;
        let world = u32::try_from(env.world_size).context("WORLD_SIZE is too large")?;
        if world == 1 {
            return Ok(Self {
                group: None,
                nccl: None,
                rank,
                world,
                device,
            });
        }
        let restart_count =
            u32::try_from(env.restart_count).context("TORCHELASTIC_RESTART_COUNT is too large")?;
        tracing::info!(rank, world, pid = std::process::id(), store = %format!("{}:{}", env.master_addr, env.master_port), "joining the other ranks");
        let group = Group::join(GroupConfig {
            rank,
            world_size: world,
            master_addr: env.master_addr.clone(),
            master_port: env.master_port,
            agent_store: env.agent_store,
            restart_count,
            timeout,
        })
        .with_context(|| format!("rank {rank} of {world}: joining the group"))?;
        let nccl = match device {
            Device::Cuda(gpu) => {
                let nccl = Nccl::load()?;
                let (major, minor, patch) = nccl.version()?;
                tracing::info!(rank, gpu, "NCCL {major}.{minor}.{patch} (libtorch's)");
                let id = if rank == 0 {
                    nccl.unique_id()?
                } else {
                    Vec::new()
                };
                let id = group.broadcast("nccl-id", &id)?;
                let comm = Communicator::join(nccl, &id, rank, world, gpu, timeout)
                    .with_context(|| format!("rank {rank} of {world}: joining NCCL"))?;
                tracing::info!(rank, gpu, "NCCL communicator ready");
                Some(comm)
            }
            _ => None,
        };
        Ok(Self {
            group: Some(group),
            nccl,
            rank,
            world,
            device,
        })
    }

    /// This rank.
    pub(crate) fn rank(&self) -> u32 {
        self.rank
    }

    /// Number of ranks.
    pub(crate) fn world(&self) -> u32 {
        self.world
    }

    /// Rank 0: it writes the run records and commits checkpoints.
    pub(crate) fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The group, when there are other ranks.
    pub(crate) fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// Before each step: the global token count of the step, and whether any rank was asked to stop
    /// (so that all stop after the same step).
    pub(crate) fn agree(&self, tokens: i64, stop: bool) -> Result<(i64, bool)> {
        let Some(g) = &self.group else {
            return Ok((tokens, stop));
        };
        let mut msg = tokens.to_le_bytes().to_vec();
        msg.push(u8::from(stop));
        let all = g.all_gather("step", &msg)?;
        let mut total = 0i64;
        let mut any_stop = false;
        for m in all {
            ensure!(m.len() == 9, "a rank sent a malformed step message");
            let mut b = [0u8; 8];
            b.copy_from_slice(&m[..8]);
            total += i64::from_le_bytes(b);
            any_stop |= m[8] != 0;
        }
        Ok((total, any_stop))
    }

    /// Every rank's `values` (any number each), in rank order (every rank calls this with the
    /// same `what`).
    pub(crate) fn gather_u64s(&self, what: &str, values: &[u64]) -> Result<Vec<Vec<u64>>> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.all_gather(what, &bytes)?
            .iter()
            .map(|m| {
                if m.len() % 8 != 0 {
                    anyhow::bail!("a rank sent a malformed `{what}`");
                }
                m.chunks_exact(8).map(|c| u64_of(what, c)).collect()
            })
            .collect()
    }

    /// Rank 0's `value` on every rank (every rank calls this with the same `what`).
    pub(crate) fn broadcast_u64(&self, what: &str, value: u64) -> Result<u64> {
        u64_of(what, &self.broadcast(what, &value.to_le_bytes())?)
    }

    /// Every rank's `data`, in rank order (every rank calls this with the same `what`).
    pub(crate) fn all_gather(&self, what: &str, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        match &self.group {
            None => Ok(vec![data.to_vec()]),
            Some(g) => Ok(g.all_gather(what, data)?),
        }
    }

    /// The address this rank's node is reached at by the others (the one its store connection
    /// leaves from).
    pub(crate) fn local_ip(&self) -> Result<std::net::IpAddr> {
        match &self.group {
            None => Ok(std::net::IpAddr::from([127, 0, 0, 1])),
            Some(g) => Ok(g.reachable_ip()?),
        }
    }

    /// Whether `flag` is set on any rank (every rank calls this with the same `what`).
    pub(crate) fn any(&self, what: &str, flag: bool) -> Result<bool> {
        let Some(g) = &self.group else {
            return Ok(flag);
        };
        let all = g.all_gather(what, &[u8::from(flag)])?;
        Ok(all.iter().any(|m| m.first().is_some_and(|&b| b != 0)))
    }

    /// Sums the gradients (fp32) and the loss over all ranks, in place. The tensors may live on
    /// any device (statistics and tables come from the host): they are summed on this worker's.
    pub(crate) fn all_reduce(&mut self, grads: &mut [Tensor], loss: &mut f64) -> Result<()> {
        let Some(g) = &self.group else {
            return Ok(());
        };
        let shapes: Vec<Vec<i64>> = grads.iter().map(|t| t.size()).collect();
        let device = self.device;
        let mut flat: Vec<Tensor> = grads
            .iter()
            .map(|t| t.to_kind(Kind::Float).reshape([-1]).to_device(device))
            .collect();
        flat.push(Tensor::from_slice(&[*loss as f32]).to_device(device));
        let summed = Self::sum_flat(
            &mut self.nccl,
            g,
            Tensor::cat(&flat, 0),
            self.rank,
            "gradients",
        )?;
        let n_grads = summed.numel() as i64 - 1;
        *loss = summed.double_value(&[n_grads]);
        for (t, part) in grads.iter_mut().zip(split_flat(&summed, &shapes)) {
            *t = part.to_kind(t.kind()).to_device(t.device());
        }
        Ok(())
    }

    /// After a sharded optimizer step: every rank's own rows (`rows[i]` of `tensors[i]`, fp32) copied
    /// into the others', so all ranks hold the whole updated tensors again.
    pub(crate) fn all_gather_rows(&mut self, tensors: &[Tensor], rows: &[Rows]) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let shards: Vec<Tensor> = tensors
            .iter()
            .zip(rows)
            .map(|(t, r)| t.narrow(0, r.start, r.len))
            .collect();
        let shapes: Vec<Vec<i64>> = tensors.iter().map(Tensor::size).collect();
        let whole = self.gather(&shards, &shapes)?;
        tch::no_grad(|| {
            for (t, w) in tensors.iter().zip(whole) {
                t.shallow_clone().copy_(&w);
            }
        });
        Ok(())
    }

    /// The element-wise sum of `flat` (fp32) over all ranks: NCCL on CUDA, the TCP ring on CPU.
    fn sum_flat(
        nccl: &mut Option<Communicator>,
        group: &Group,
        mut flat: Tensor,
        rank: u32,
        what: &str,
    ) -> Result<Tensor> {
        match nccl {
            Some(comm) => {
                comm.all_reduce_sum(&mut flat)
                    .with_context(|| format!("rank {rank}: summing {what}"))?;
                Ok(flat)
            }
            None => {
                let mut buf: Vec<f32> =
                    Vec::try_from(&flat).with_context(|| format!("{what} to host memory"))?;
                group
                    .all_reduce_sum(&mut buf)
                    .with_context(|| format!("rank {rank}: summing {what}"))?;
                Ok(Tensor::from_slice(&buf))
            }
        }
    }

    /// Rank 0's `data` on every rank.
    pub(crate) fn broadcast(&self, what: &str, data: &[u8]) -> Result<Vec<u8>> {
        match &self.group {
            None => Ok(data.to_vec()),
            Some(g) => Ok(g.broadcast(what, data)?),
        }
    }
}

/// A `u64` another rank sent for the collective `what`.
fn u64_of(what: &str, bytes: &[u8]) -> Result<u64> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("a rank sent a malformed `{what}`"))?;
    Ok(u64::from_le_bytes(b))
}

/// Gathering and reducing rows, one collective each (per dtype gathered), over a rank-major buffer
/// ([`RankMajor`]: every rank's rows of every tensor, rank after rank), so each rank sends (N-1)/N
/// of the bytes. On CPU, the TCP ring's own all-gather and reduce-scatter over uneven parts; on
/// CUDA, NCCL's, whose parts must be equal: each rank's part is padded to the longest. Weights are
/// gathered in the dtype they come in (bf16 for the projections on CUDA; see the model's
/// `gathered_in`); gradients are summed in fp32.
impl RowCollective for Ranks {
    fn gather(&mut self, shards: &[Tensor], shapes: &[Vec<i64>]) -> Result<Vec<Tensor>> {
        let mut out: Vec<Option<Tensor>> = shards.iter().map(|_| None).collect();
        let mut kinds: Vec<Kind> = Vec::new();
        for t in shards {
            if !kinds.contains(&t.kind()) {
                kinds.push(t.kind());
            }
        }
        for kind in kinds {
            let idx: Vec<usize> = (0..shards.len())
                .filter(|&i| shards[i].kind() == kind)
                .collect();
            let picked: Vec<&Tensor> = idx.iter().map(|&i| &shards[i]).collect();
            let picked_shapes: Vec<Vec<i64>> = idx.iter().map(|&i| shapes[i].clone()).collect();
            let whole = self.gather_kind(&picked, &picked_shapes, kind)?;
            for (i, t) in idx.into_iter().zip(whole) {
                out[i] = Some(t);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn reduce(&mut self, whole: Vec<Tensor>, rows: &[Rows]) -> Result<Vec<Tensor>> {
        let Some(g) = &self.group else {
            return Ok(whole
                .iter()
                .zip(rows)
                .map(|(t, r)| t.narrow(0, r.start, r.len).to_kind(Kind::Float).copy())
                .collect());
        };
        let device = whole.first().map_or(Device::Cpu, Tensor::device);
        let shapes: Vec<Vec<i64>> = whole.iter().map(Tensor::size).collect();
        let layout = RankMajor::new(&shapes, self.world);
        let (a, b) = layout.parts[self.rank as usize];
        let mine = match &mut self.nccl {
            None => {
                // Staged piece by piece into one host buffer; the gradients go before the ring runs.
                let mut flat: Vec<f32> = Vec::with_capacity(layout.len());
                for piece in layout.cut(&whole) {
                    flat.extend(Vec::<f32>::try_from(&piece).context("gradients to host memory")?);
                }
                drop(whole);
                g.reduce_scatter_sum(&mut flat, &layout.parts)
                    .with_context(|| format!("rank {}: summing gradients", self.rank))?;
                Tensor::from_slice(&flat[a..b])
            }
            Some(comm) => {
                let padded = layout.padded(&whole, Kind::Float);
                drop(whole);
                comm.reduce_scatter_sum(&padded, self.world)
                    .with_context(|| format!("rank {}: summing gradients", self.rank))?
                    .narrow(0, 0, (b - a) as i64)
            }
        };
        Ok(layout.own(&mine, self.rank, device))
    }
}

impl Ranks {
    /// [`RowCollective::gather`] of shards that are all of `kind` (alone: copies of them).
    fn gather_kind(
        &mut self,
        shards: &[&Tensor],
        shapes: &[Vec<i64>],
        kind: Kind,
    ) -> Result<Vec<Tensor>> {
        let device = shards.first().map_or(Device::Cpu, |t| t.device());
        let layout = RankMajor::new(shapes, self.world);
        let own: Vec<Tensor> = shards.iter().map(|t| t.reshape([-1])).collect();
        let own = Tensor::cat(&own, 0);
        match (&mut self.nccl, &self.group) {
            (None, Some(g)) => {
                let mut flat = vec![0f32; layout.len()];
                let own: Vec<f32> =
                    Vec::try_from(own.to_kind(Kind::Float)).context("weights to host memory")?;
                let (a, b) = layout.parts[self.rank as usize];
                flat[a..b].copy_from_slice(&own);
                g.all_gather_parts(&mut flat, &layout.parts)
                    .with_context(|| format!("rank {}: gathering weights", self.rank))?;
                // One staging copy at a time: the host buffer goes before the tensors are cut out.
                let staged = Tensor::from_slice(&flat);
                drop(flat);
                let starts: Vec<usize> = layout.parts.iter().map(|p| p.0).collect();
                Ok(layout.whole(&staged.to_kind(kind), &starts, device))
            }
            (Some(comm), _) => {
                let send = layout.pad_own(&own);
                let got = comm
                    .all_gather(&send, self.world)
                    .with_context(|| format!("rank {}: gathering weights", self.rank))?;
                // Rank q's part starts at q × the padded part: cut out in place, no unpadded copy.
                let part = layout.padded_part();
                let starts: Vec<usize> = (0..layout.parts.len()).map(|q| q * part).collect();
                Ok(layout.whole(&got, &starts, device))
            }
            (None, None) => Ok(shards.iter().map(|t| t.copy()).collect()),
        }
    }
}

/// Whole tensors laid out rank after rank: rank q's rows ([`rows_of`]) of tensor 0, of tensor 1,
/// …; then rank q + 1's. A rank's rows of all tensors are one contiguous part.
struct RankMajor {
    shapes: Vec<Vec<i64>>,
    /// Each rank's rows of each tensor.
    rows: Vec<Vec<Rows>>,
    /// Each rank's part of the buffer, in elements.
    parts: Vec<(usize, usize)>,
}

impl RankMajor {
    fn new(shapes: &[Vec<i64>], world: u32) -> Self {
        let rows: Vec<Vec<Rows>> = (0..world)
            .map(|q| {
                shapes
                    .iter()
                    .map(|s| rows_of(s.first().copied().unwrap_or(1), q, world))
                    .collect()
            })
            .collect();
        let mut parts = Vec::with_capacity(world as usize);
        let mut at = 0usize;
        for q in &rows {
            let n: i64 = q
                .iter()
                .zip(shapes)
                .map(|(r, s)| r.len * row_numel(s))
                .sum();
            parts.push((at, at + n as usize));
            at += n as usize;
        }
        Self {
            shapes: shapes.to_vec(),
            rows,
            parts,
        }
    }

    fn len(&self) -> usize {
        self.parts.last().map_or(0, |p| p.1)
    }

    /// The longest rank's part: the equal part of NCCL's collectives (at least one element).
    fn padded_part(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.1 - p.0)
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// This rank's part `own` (flat), zero-padded to [`Self::padded_part`].
    fn pad_own(&self, own: &Tensor) -> Tensor {
        let pad = self.padded_part() as i64 - own.numel() as i64;
        if pad == 0 {
            return own.shallow_clone();
        }
        Tensor::cat(
            &[
                own.shallow_clone(),
                own.new_zeros([pad], (own.kind(), own.device())),
            ],
            0,
        )
    }

    /// Whole tensors `whole` cut rank-major, each rank's part zero-padded to
    /// [`Self::padded_part`], in `kind`: what NCCL's reduce-scatter takes (one buffer, each piece
    /// cast as it is copied in).
    fn padded(&self, whole: &[Tensor], kind: Kind) -> Tensor {
        let part = self.padded_part() as i64;
        let device = whole.first().map_or(Device::Cpu, Tensor::device);
        let buf = Tensor::zeros([part * self.parts.len() as i64], (kind, device));
        for (q, rows) in self.rows.iter().enumerate() {
            let mut at = q as i64 * part;
            for (r, t) in rows.iter().zip(whole) {
                let n = r.len * row_numel(&t.size());
                if n > 0 {
                    buf.narrow(0, at, n)
                        .copy_(&t.narrow(0, r.start, r.len).reshape([-1]));
                }
                at += n;
            }
        }
        buf
    }

    /// The rank-major pieces of whole tensors `whole`, flattened, in buffer order.
    fn cut(&self, whole: &[Tensor]) -> Vec<Tensor> {
        self.rows
            .iter()
            .flat_map(|q| {
                q.iter().zip(whole).map(|(r, t)| {
                    t.narrow(0, r.start, r.len)
                        .to_kind(Kind::Float)
                        .reshape([-1])
                })
            })
            .collect()
    }

    /// The whole tensors of a buffer `flat` holding rank q's part at `starts[q]`, on `device`.
    fn whole(&self, flat: &Tensor, starts: &[usize], device: Device) -> Vec<Tensor> {
        let mut pieces: Vec<Vec<Tensor>> = self.shapes.iter().map(|_| Vec::new()).collect();
        for (q, start) in self.rows.iter().zip(starts) {
            let mut at = *start as i64;
            for (i, (r, s)) in q.iter().zip(&self.shapes).enumerate() {
                let n = r.len * row_numel(s);
                let mut shape = s.clone();
                if let Some(d0) = shape.first_mut() {
                    *d0 = r.len;
                }
                pieces[i].push(flat.narrow(0, at, n).reshape(shape.as_slice()));
                at += n;
            }
        }
        pieces
            .iter()
            .map(|p| Tensor::cat(p, 0).to_device(device))
            .collect()
    }

    /// This rank's rows of each tensor from its own part `mine`.
    fn own(&self, mine: &Tensor, rank: u32, device: Device) -> Vec<Tensor> {
        let mut at = 0i64;
        self.rows[rank as usize]
            .iter()
            .zip(&self.shapes)
            .map(|(r, s)| {
                let n = r.len * row_numel(s);
                let mut shape = s.clone();
                if let Some(d0) = shape.first_mut() {
                    *d0 = r.len;
                }
                let t = mine
                    .narrow(0, at, n)
                    .reshape(shape.as_slice())
                    .to_device(device);
                at += n;
                t
            })
            .collect()
    }
}

/// Views of consecutive runs of `flat` (1-D), reshaped to `shapes` in order.
fn split_flat(flat: &Tensor, shapes: &[Vec<i64>]) -> Vec<Tensor> {
    let mut offset = 0i64;
    shapes
        .iter()
        .map(|shape| {
            let n: i64 = shape.iter().product();
            let t = flat.narrow(0, offset, n).reshape(shape.as_slice());
            offset += n;
            t
        })
        .collect()
}

/// Elements in one row (dimension 0) of a tensor of `shape`.
fn row_numel(shape: &[i64]) -> i64 {
    shape.iter().skip(1).product()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NCCL's equal parts, simulated on the CPU: every rank's padded part gathered in rank order
    /// and unpadded is the full rank-major buffer; the sum of every rank's padded cut, split into
    /// equal parts, holds each rank's rows of the summed tensors — for uneven and empty shards.
    #[test]
    fn padded_parts_gather_and_reduce_as_the_uneven_ones() {
        // Draws from libtorch's process-wide generator: not while a seeded test draws its model.
        let _turn = crate::model::tests::seeded();
        let shapes = vec![vec![7i64, 3], vec![2], vec![5, 2, 2]];
        for world in 1u32..=4 {
            let layout = RankMajor::new(&shapes, world);
            let whole: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)))
                .collect();
            let flat = Tensor::cat(&layout.cut(&whole), 0);
            // All-gather: each rank sends its own part, padded.
            let sends: Vec<Tensor> = layout
                .parts
                .iter()
                .map(|(a, b)| layout.pad_own(&flat.narrow(0, *a as i64, (b - a) as i64)))
                .collect();
            assert!(sends.iter().all(|s| s.numel() == layout.padded_part()));
            let part = layout.padded_part();
            let starts: Vec<usize> = (0..world as usize).map(|q| q * part).collect();
            let gathered = Tensor::cat(&sends, 0);
            for (w, g) in whole
                .iter()
                .zip(layout.whole(&gathered, &starts, Device::Cpu))
            {
                assert!(w.equal(&g), "world {world}");
            }
            // Reduce-scatter: every rank contributes its own whole gradients.
            let grads: Vec<Vec<Tensor>> = (0..world)
                .map(|_| whole.iter().map(|t| t.randn_like()).collect())
                .collect();
            let summed = grads
                .iter()
                .map(|g| layout.padded(g, Kind::Float))
                .reduce(|a, b| a + b)
                .unwrap();
            let total: Vec<Tensor> = (0..shapes.len())
                .map(|i| {
                    grads
                        .iter()
                        .map(|g| g[i].shallow_clone())
                        .reduce(|a, b| a + b)
                        .unwrap()
                })
                .collect();
            let part = layout.padded_part() as i64;
            for q in 0..world {
                let (a, b) = layout.parts[q as usize];
                let mine = summed.narrow(0, q as i64 * part, (b - a) as i64);
                for (i, got) in layout.own(&mine, q, Device::Cpu).iter().enumerate() {
                    let r = rows_of(shapes[i][0], q, world);
                    let want = total[i].narrow(0, r.start, r.len);
                    assert!(
                        got.allclose(&want, 1e-6, 1e-6, false),
                        "world {world} rank {q}"
                    );
                }
            }
        }
    }
}
