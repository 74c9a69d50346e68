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
use crate::collective::shard::{rows_of, Rows};
use crate::model::RowCollective;
use waypoint_launch::WorkerEnv;

/// The ranks of the job, from this worker's side.
pub(crate) struct Ranks {
    group: Option<Group>,
    nccl: Option<Communicator>,
    rank: u32,
    world: u32,
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

    /// Whether `flag` is set on any rank (every rank calls this with the same `what`).
    pub(crate) fn any(&self, what: &str, flag: bool) -> Result<bool> {
        let Some(g) = &self.group else {
            return Ok(flag);
        };
        let all = g.all_gather(what, &[u8::from(flag)])?;
        Ok(all.iter().any(|m| m.first().is_some_and(|&b| b != 0)))
    }

    /// Sums the gradients (fp32) and the loss over all ranks, in place.
    pub(crate) fn all_reduce(&mut self, grads: &mut [Tensor], loss: &mut f64) -> Result<()> {
        let Some(g) = &self.group else {
            return Ok(());
        };
        let shapes: Vec<Vec<i64>> = grads.iter().map(|t| t.size()).collect();
        let mut flat: Vec<Tensor> = grads
            .iter()
            .map(|t| t.to_kind(Kind::Float).reshape([-1]))
            .collect();
        let device = flat.first().map_or(Device::Cpu, Tensor::device);
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
        let whole = self.gather(&shards, rows, &shapes)?;
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

/// Gathering and reducing rows, one collective each. On CPU, the TCP ring's own all-gather and
/// reduce-scatter over a rank-major buffer (every rank's rows of every tensor, rank after rank), so
/// each rank sends (N-1)/N of the bytes. On CUDA, sums over NCCL of buffers that are zero outside
/// each rank's rows (adding zeros is exact) — twice those bytes; NCCL's own collectives need equal
/// parts, which uneven shards are not.
impl RowCollective for Ranks {
    fn gather(
        &mut self,
        shards: &[Tensor],
        rows: &[Rows],
        shapes: &[Vec<i64>],
    ) -> Result<Vec<Tensor>> {
        let Some(g) = &self.group else {
            return Ok(shards.iter().map(Tensor::copy).collect());
        };
        let device = shards.first().map_or(Device::Cpu, Tensor::device);
        if self.nccl.is_none() {
            let layout = RankMajor::new(shapes, self.world);
            let mut flat = vec![0f32; layout.len()];
            let own: Vec<Tensor> = shards
                .iter()
                .map(|t| t.to_kind(Kind::Float).reshape([-1]))
                .collect();
            let own: Vec<f32> =
                Vec::try_from(Tensor::cat(&own, 0)).context("weights to host memory")?;
            let (a, b) = layout.parts[self.rank as usize];
            flat[a..b].copy_from_slice(&own);
            g.all_gather_parts(&mut flat, &layout.parts)
                .with_context(|| format!("rank {}: gathering weights", self.rank))?;
            // One staging copy at a time: the host buffer goes before the tensors are cut out.
            let staged = Tensor::from_slice(&flat);
            drop(flat);
            return Ok(layout.whole(&staged, device));
        }
        let parts: Vec<Tensor> = shards
            .iter()
            .zip(rows)
            .zip(shapes)
            .map(|((s, r), shape)| {
                let buf = Tensor::zeros(shape.as_slice(), (Kind::Float, device));
                if r.len > 0 {
                    buf.narrow(0, r.start, r.len).copy_(s);
                }
                buf.reshape([-1])
            })
            .collect();
        let summed = Self::sum_flat(
            &mut self.nccl,
            g,
            Tensor::cat(&parts, 0),
            self.rank,
            "weights",
        )?
        .to_device(device);
        Ok(split_flat(&summed, shapes))
    }

    fn reduce(&mut self, whole: Vec<Tensor>, rows: &[Rows]) -> Result<Vec<Tensor>> {
        let narrow = |t: &Tensor, r: &Rows| t.narrow(0, r.start, r.len).copy();
        let Some(g) = &self.group else {
            return Ok(whole.iter().zip(rows).map(|(t, r)| narrow(t, r)).collect());
        };
        let device = whole.first().map_or(Device::Cpu, Tensor::device);
        if self.nccl.is_none() {
            let shapes: Vec<Vec<i64>> = whole.iter().map(Tensor::size).collect();
            let layout = RankMajor::new(&shapes, self.world);
            // Staged piece by piece into one host buffer; the gradients go before the ring runs.
            let mut flat: Vec<f32> = Vec::with_capacity(layout.len());
            for piece in layout.cut(&whole) {
                flat.extend(Vec::<f32>::try_from(&piece).context("gradients to host memory")?);
            }
            drop(whole);
            g.reduce_scatter_sum(&mut flat, &layout.parts)
                .with_context(|| format!("rank {}: summing gradients", self.rank))?;
            let (a, b) = layout.parts[self.rank as usize];
            let mine = Tensor::from_slice(&flat[a..b]);
            return Ok(layout.own(&mine, self.rank, device));
        }
        let flat: Vec<Tensor> = whole
            .iter()
            .map(|t| t.to_kind(Kind::Float).reshape([-1]))
            .collect();
        let summed = Self::sum_flat(
            &mut self.nccl,
            g,
            Tensor::cat(&flat, 0),
            self.rank,
            "gradients",
        )?
        .to_device(device);
        let shapes: Vec<Vec<i64>> = whole.iter().map(Tensor::size).collect();
        Ok(split_flat(&summed, &shapes)
            .iter()
            .zip(rows)
            .map(|(part, r)| narrow(part, r))
            .collect())
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

    /// The whole tensors of a full buffer `flat`, on `device`.
    fn whole(&self, flat: &Tensor, device: Device) -> Vec<Tensor> {
        let mut pieces: Vec<Vec<Tensor>> = self.shapes.iter().map(|_| Vec::new()).collect();
        for (q, part) in self.rows.iter().zip(&self.parts) {
            let mut at = part.0 as i64;
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
