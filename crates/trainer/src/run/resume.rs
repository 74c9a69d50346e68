//! Resume: the newest resumable checkpoint that loads whole, passing over damaged ones; the
//! configuration-drift and model-id checks; the attempt (fencing) and run records; then the restored
//! (or `init_from_checkpoint`, or fresh) weights, optimizer state and data position.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use waypoint_checkpoint::{
    dcp, model_dir, CheckpointError, CheckpointManager, Promotion, RowRange, RunLayout, Skipped,
    Tensor as Blob,
};
use waypoint_storage::Store;

use super::reference::{self, ReferenceKey, ReferenceSource};
use super::setup::{Loaded, Setup};
use super::{Live, Session, UsageError};
use crate::checkpointing::policy::DurableSchedule;
use crate::checkpointing::saver::{Saver, SaverTier};
use crate::checkpointing::state::SaveContext;
use crate::checkpointing::state::{assemble_slices, copy_into, restore_state};
use crate::checkpointing::tier::{self, MemoryTier};
use crate::checkpointing::{peer, replica};
use crate::model::Model;
use crate::optim::{AdamW, AdamWConfig, Schedule};
use crate::recipe::{recipe_for, Recipe};
use crate::shard::{rows_of, Rows};
use waypoint_config::Sharding;
use waypoint_config::{changes, fingerprint, BATCH_SPLIT};
use waypoint_observe::records::{self, JobState, ResumedFrom, RunRecords, Status};

impl Session {
    /// From the setup to a run ready to step: see the module documentation.
    pub(super) fn resume(&mut self, setup: Setup, rt: &Runtime) -> Result<Live> {
        let cfg = self.config.clone();
        let Setup {
            env,
            device,
            mut ranks,
            loaded,
            global_batch,
            mut manager,
            memory_tier_fits,
        } = setup;
        let Loaded {
            mut model,
            tokenizer_files,
            train,
            eval,
            model_fingerprint,
        } = loaded;
        let main = ranks.is_main();
        let world = ranks.world() as u64;
        let total = self.total_steps;
        let resume_fields = cfg.resume_fields(&model_fingerprint);
        let config_fp = fingerprint(&resume_fields);
        // The node's memory tier, when this start has one: every rank opens it, and it is used only
        // if every rank could.
        let section = cfg.checkpoint();
        let place = tier::NodePlace::of(&env);
        let sharded = cfg.sharding() != waypoint_config::Sharding::None;
        let shards = tier::shards_of(place, world as u32, sharded);
        let mut memory = match tier::off_because(&section, shards, cfg.lora().is_some()) {
            Some(why) => {
                if main && section.memory_save_steps > 0 {
                    tracing::info!("the memory tier is off: {why}");
                }
                None
            }
            // Its host copies do not fit the memory plan (named in the log).
            None if !memory_tier_fits => None,
            None => {
                let run_uri = self.layout.uri_under(&cfg.run.checkpoint_base_uri);
                MemoryTier::open(
                    &section,
                    &self.layout,
                    &run_uri,
                    place,
                    world as u32,
                    shards,
                )
            }
        };
        if ranks.any("memory-tier-open", memory.is_none())? {
            memory = None;
        }
        // Rank 0 picks the checkpoint to resume from — the newest step of either tier (sizes
        // checked); every rank loads it, checking each blob's sha256 as it is read. A checkpoint any
        // rank finds damaged is passed over (and set aside once this attempt owns the run) and the
        // next older one tried, in either tier.
        let mut damaged: Vec<Skipped> = Vec::new();
        let mut damaged_in_memory: Vec<Skipped> = Vec::new();
        // Whether a node's memory tier received the checkpoint resumed from a peer node's.
        let mut from_peer = false;
        let (latest, tier_used, mut resume_blobs) = loop {
            // Each node's memory tier is its own: every rank states its node's newest candidate,
            // and the tier offers the newest step every node has (the nodes save the same steps and
            // keep 2, so the oldest of the newest is on all).
            let mut in_memory = None;
            if let Some(t) = &memory {
                // What was found damaged already is neither examined nor reported again.
                let known: Vec<_> = damaged_in_memory.iter().map(|d| d.step).collect();
                let newest = match rt.block_on(t.manager.resume_candidate(false, &known)) {
                    Ok((found, skipped)) => {
                        damaged_in_memory.extend(skipped);
                        found.map(|m| (m.step, m))
                    }
                    Err(e) => {
                        tracing::warn!(
                            "the memory tier could not be read ({e}); resuming from the durable tier"
                        );
                        None
                    }
                };
                // The steps this node's tier holds from its newest good one down (it keeps 2): the
                // nodes' tiers need not hold the same ones (a node killed mid-write is behind).
                let held: Vec<u64> = match &newest {
                    None => Vec::new(),
                    Some((step, _)) => {
                        let older = rt.block_on(t.manager.committed_steps()).unwrap_or_default();
                        std::iter::once(*step)
                            .chain(
                                older
                                    .iter()
                                    .filter(|s| s.step() < *step && !known.contains(s))
                                    .map(|s| s.step()),
                            )
                            .take(tier::KEEP)
                            .collect()
                    }
                };
                let held_all = ranks.gather_u64s("memory-tier-held", &held)?;
                let all: Vec<u64> = held_all
                    .iter()
                    .map(|h| h.first().copied().unwrap_or(0))
                    .collect();
                let mut usable = peer::newest_held_by_all(&held_all);
                let timeout = std::time::Duration::from_secs(cfg.distributed.dist_timeout_secs);
                // The step a copy between nodes made every node hold, and whether it went well.
                let mut copy: Option<(u64, bool)> = None;
                if let Some(replica_folder) = t.replica_folder() {
                    // A node's shards are in its own tier and in the next node's replica: a node
                    // lacking the newest step all can have (replaced: its tier is empty) receives
                    // its shards back from the next node; if that fails, the newest step all hold.
                    let kept: Vec<u64> = t
                        .replica_steps()
                        .into_iter()
                        .filter(|s| !known.iter().any(|k| k.step() == *s))
                        .collect();
                    let kept_all = ranks.gather_u64s("memory-tier-replicas-held", &kept)?;
                    let by_node = |all: &[Vec<u64>]| -> Vec<Vec<u64>> {
                        all.iter()
                            .step_by(place.local_world as usize)
                            .cloned()
                            .collect()
                    };
                    let plan = peer::replica_plan(&by_node(&held_all), &by_node(&kept_all));
                    if plan.step > usable {
                        tracing::info!(
                            step = plan.step,
                            copies = ?plan.copies,
                            "the memory tier's newest step is missing on some nodes: each \
                             receives its shards from the replica the next node keeps \
                             (giver, taker)"
                        );
                        let mut copied = true;
                        for &(giver, taker) in &plan.copies {
                            let one = peer::PeerPlan {
                                step: plan.step,
                                giver: Some(giver * place.local_world),
                                takers: vec![taker * place.local_world],
                            };
                            let manifest = (one.giver == Some(ranks.rank()))
                                .then(|| {
                                    replica::manifest_in(replica_folder, &self.layout, plan.step)
                                })
                                .flatten();
                            let ok = peer::carry_out(
                                &one,
                                &ranks,
                                replica_folder,
                                t.folder(),
                                &self.layout,
                                manifest.as_ref(),
                                timeout,
                            )?;
                            if !ok {
                                copied = false;
                                break;
                            }
                        }
                        copy = Some((plan.step, copied));
                    }
                } else {
                    // A node lacking the newest step (replaced: its tier is empty) receives it
                    // from a node that holds it (every node's tier holds the whole replicated
                    // state); if that fails, the newest step all hold is used.
                    let plan = peer::plan(&all, place.local_world);
                    if let Some(giver) = plan.giver {
                        tracing::info!(
                            step = plan.step,
                            giver,
                            takers = ?plan.takers,
                            "the memory tier's newest checkpoint is missing on some nodes: copying \
                             it from rank {giver}'s node"
                        );
                        let manifest = newest.as_ref().filter(|(s, _)| *s == plan.step);
                        let copied = peer::carry_out(
                            &plan,
                            &ranks,
                            t.folder(),
                            t.folder(),
                            &self.layout,
                            manifest.map(|(_, m)| m),
                            timeout,
                        )?;
                        copy = Some((plan.step, copied));
                    }
                }
                // Every rank took the same copies and agrees on their outcome.
                match copy {
                    Some((step, true)) => {
                        usable = step;
                        from_peer = true;
                    }
                    Some((_, false)) => tracing::warn!(
                        "resuming from the newest step every node's tier holds, or the durable \
                         tier"
                    ),
                    None => {}
                }
                if main {
                    // One entry a node (its local rank 0's).
                    let by_node: Vec<&Vec<u64>> = held_all
                        .iter()
                        .step_by(place.local_world as usize)
                        .collect();
                    tracing::info!(
                        held_by_node = ?by_node,
                        usable,
                        "memory tier: the steps each node's tier holds, and the newest all can \
                         resume from"
                    );
                }
                in_memory = match newest {
                    _ if usable == 0 => None,
                    Some((step, m)) if step == usable => Some((usable, Some(m))),
                    _ => Some((usable, None)),
                };
            }
            let mut pick = None;
            if main {
                // What was found damaged already is neither examined nor reported again.
                let known: Vec<_> = damaged.iter().map(|d| d.step).collect();
                let (found, skipped) = rt
                    .block_on(manager.resume_candidate(false, &known))
                    .context("looking for the run's newest resumable checkpoint")?;
                damaged.extend(skipped);
                pick = found.map(|m| (m, Tier::Durable));
            }
            let chosen = match (&in_memory, &pick) {
                (Some((step, _)), p) if p.as_ref().is_none_or(|(d, _)| *step > d.step) => {
                    format!(
                        "{}:{}",
                        Tier::Memory.name(),
                        waypoint_checkpoint::StepName::new(*step)
                    )
                }
                (_, Some((m, t))) => format!("{}:{}", t.name(), m.name),
                _ => String::new(),
            };
            let chosen =
                String::from_utf8_lossy(&ranks.broadcast("resume-from", chosen.as_bytes())?)
                    .to_string();
            let Some((tier_name, chosen)) = chosen.split_once(':') else {
                break (None, Tier::Durable, Vec::new());
            };
            let (chosen, from) = (chosen.to_string(), Tier::parse(tier_name)?);
            let source = from.manager(&memory, &manager);
            let step: waypoint_checkpoint::StepName = chosen.parse()?;
            let known = match from {
                Tier::Durable => pick.map(|(m, _)| m),
                Tier::Memory => in_memory.and_then(|(_, m)| m),
            };
            let m = match known.filter(|m| m.step == step.step()) {
                Some(m) => m,
                None => rt.block_on(source.manifest(step))?,
            };
            // Sharded state: the ranks check a share of the files each (agreeing on damage
            // before anything else is read), then every rank reads only its rows.
            let rows = rows_wanted(&cfg, &model, &ranks);
            let mut shared_check = None;
            if let Some(want) = &rows {
                // A node's tier holding only its ranks' shards is checked by the node's ranks.
                let own_shards = from == Tier::Memory
                    && memory
                        .as_ref()
                        .is_some_and(MemoryTier::holds_own_shards_only);
                let (rank, world) = match own_shards {
                    true => (place.local_rank as usize, place.local_world as usize),
                    false => (ranks.rank() as usize, ranks.world() as usize),
                };
                let mine = move |i: usize| i % world == rank;
                let problem = match rt.block_on(source.verify_files(&m, "dcp/", &mine)) {
                    Ok(()) => None,
                    Err(e) if e.is_damage() => Some(e.to_string()),
                    Err(e) => return Err(e).context(format!("checking checkpoint {chosen}")),
                };
                let any = ranks.any(&format!("resume-checked/{chosen}"), problem.is_some())?;
                shared_check = Some((any, problem, want));
            }
            let loaded = rt.block_on(async {
                let blobs = match &shared_check {
                    None => source.load_tensors(&m, "dcp/", &|_| true).await?,
                    Some((true, problem, _)) => {
                        return Err(CheckpointError::Damaged {
                            name: chosen.clone(),
                            problems: vec![problem
                                .clone()
                                .unwrap_or_else(|| "another rank found it damaged".into())],
                        })
                    }
                    Some((false, _, want)) => {
                        source
                            .load_rows(&m, "dcp/", &|n| want.get(n).copied())
                            .await?
                    }
                };
                // A finished run resumes at its final checkpoint only to promote it: what it
                // would deploy must be whole too, or the run is redone from the one before.
                if main && m.step >= total && m.sampler_files().next().is_some() {
                    source.sampler_weight_files(&m).await?;
                }
                Ok::<_, waypoint_checkpoint::CheckpointError>(blobs)
            });
            let (blobs, problem) = match loaded {
                Ok(blobs) => (blobs, None),
                Err(e) if e.is_damage() => (Vec::new(), Some(e.to_string())),
                Err(e) => return Err(e).context(format!("loading checkpoint {chosen}")),
            };
            let what = format!("resume-damaged/{}/{chosen}", from.name());
            if !ranks.any(&what, problem.is_some())? {
                break (Some(m), from, blobs);
            }
            let reason = problem.unwrap_or_else(|| "another rank found it damaged".into());
            tracing::warn!(checkpoint = %chosen, tier = from.name(), "passing over a damaged checkpoint: {reason}");
            match from {
                Tier::Memory => damaged_in_memory.push(Skipped { step, reason }),
                Tier::Durable => damaged.push(Skipped { step, reason }),
            }
        };
        // Committed checkpoints newer than the one resumed that hold no resumable state would
        // block saving their step again: set aside too (the trainer writes none of its own).
        if main {
            let resumed = latest.as_ref().map_or(0, |m| m.step);
            for step in rt.block_on(manager.committed_steps())? {
                if step.step() > resumed && !damaged.iter().any(|d| d.step == step) {
                    damaged.push(Skipped {
                        step,
                        reason: format!(
                            "holds no resumable state, newer than the checkpoint resumed \
                             (step {resumed}); set aside so that step {} can be saved again",
                            step.step()
                        ),
                    });
                }
            }
        }
        if let Some(m) = &latest {
            if m.config_fingerprint != config_fp {
                let drift = rt.block_on(describe_drift(&self.store, &self.layout, &resume_fields));
                return Err(UsageError(format!(
                    "configuration drift: run {} has checkpoints up to {} made with other settings \
                     ({drift}). Resuming would not continue that run. Restore the settings, or start \
                     a new --run_id. Nothing was written.",
                    cfg.run.run_id, m.name
                ))
                .into());
            }
        }
        // What decides the trajectory (optimizer, schedule, global batch, recipe) is what the
        // checkpoint was trained with, unless the user asks for the change.
        let recipe: Box<dyn Recipe> = recipe_for(cfg.objective());
        let mut trajectory = cfg.trajectory(&resume_fields, world, total, recipe.name());
        trajectory["data"] = Value::String(train.content_fingerprint());
        let config_changes = match &latest {
            // Every rank reads the record and decides alike, so a refusal needs no word between
            // them.
            Some(m) => {
                let before = match &m.training {
                    Some(t) => Some(t.clone()),
                    None => rt.block_on(trained_with(&self.store, &self.layout, m.attempt)),
                };
                let diffs = before
                    .map(|b| changes(&b, &recorded_keys(&trajectory, &b), &BATCH_SPLIT))
                    .unwrap_or_default();
                if !diffs.is_empty() && !cfg.checkpointing.allow_config_change {
                    return Err(UsageError(format!(
                        "run {} was trained to {} with other settings: {}. Resuming with these \
                         would silently change its training. Restore them, pass \
                         --allow_config_change to continue with the new ones (the change is \
                         logged and recorded in the attempt record and config/run.json), or start \
                         a new --run_id. Nothing was written.",
                        cfg.run.run_id,
                        m.name,
                        diffs.join("; ")
                    ))
                    .into());
                }
                for change in diffs.iter().filter(|_| main) {
                    tracing::warn!(checkpoint = %m.name, "--allow_config_change: {change}");
                }
                diffs
            }
            _ => Vec::new(),
        };
        let section = cfg.checkpoint();
        if let Some(model_id) = &section.output_model_id {
            let dir =
                model_dir(model_id).map_err(|e| UsageError(format!("--output_model_id: {e}")))?;
            // A finished promotion of another source, or files that are not a promotion, are never
            // overwritten; this run's own promotion (done, or interrupted) is finished at the end.
            let final_name = waypoint_checkpoint::StepName::new(total).to_string();
            let refuse = match rt.block_on(manager.promotion(model_id))? {
                Promotion::Absent | Promotion::Partial(_) => false,
                done => !done.is_done_from(&self.layout, &final_name),
            };
            if refuse {
                return Err(UsageError(format!(
                    "--output_model_id {model_id}: {dir} already exists; choose another id \
                     (nothing is overwritten)"
                ))
                .into());
            }
        }

        // The starting weights, before anything is written (a bad LoRA setting is a usage error):
        // own checkpoint first (restored below); else init_from_checkpoint; else fresh.
        match (&latest, &section.init_from_checkpoint) {
            (Some(_), Some(spec)) => tracing::info!(
                init_from_checkpoint = %spec,
                "ignoring --init_from_checkpoint: the run has checkpoints of its own"
            ),
            (None, Some(spec)) => rt.block_on(init_from(&manager, spec, &mut model))?,
            _ => {}
        }
        if let Some(lora) = cfg.lora() {
            model
                .add_lora(lora, cfg.run.seed as i64 + 1)
                .map_err(|e| UsageError(format!("--lora_rank/--lora_target_modules: {e:#}")))?;
        }
        // From here on the run is ours: rank 0 takes an attempt number (fencing), records the start.
        let attempt = if main {
            rt.block_on(manager.start_attempt(&json!({
                "pid": std::process::id(),
                "host": host_name(),
                "restart_count": env.restart_count,
                "world_size": world,
                "training": trajectory,
                "config_changes": config_changes,
            })))?
        } else {
            0
        };
        self.attempt = Some(attempt);
        // Damaged checkpoints newer than the one resumed are set aside, so the steps they held can
        // be saved again as training goes past them.
        for skipped in damaged.iter().filter(|_| main) {
            rt.block_on(manager.set_aside(skipped.step, &skipped.reason))
                .with_context(|| {
                    format!("setting the damaged checkpoint {} aside", skipped.step)
                })?;
        }
        let manager = Arc::new(manager);
        if let Some(t) = memory.as_mut() {
            t.start_saving(
                attempt,
                &ranks,
                rt.handle(),
                std::time::Duration::from_secs(cfg.distributed.dist_timeout_secs),
            )?;
            for skipped in damaged_in_memory.iter().filter(|_| place.local_rank == 0) {
                if let Err(e) = rt.block_on(t.manager.set_aside(skipped.step, &skipped.reason)) {
                    tracing::warn!(checkpoint = %skipped.step, "could not set a damaged memory-tier checkpoint aside: {e}");
                }
            }
        }
        let history = if main {
            rt.block_on(run_history(&self.store, &self.layout))
        } else {
            Vec::new()
        };
        let run_record = json!({
            "config": cfg.redacted()?,
            "training": trajectory,
            "config_changes": config_changes,
            "history": history,
            "resume_fields": resume_fields,
            "config_fingerprint": config_fp,
            "model": model.config.raw,
            "world_size": env.world_size,
            "device": format!("{device:?}"),
            "attempt": attempt,
            "train_samples": train.len(),
            "train_documents": train.documents,
            "skipped_rows": train.skipped,
            "total_steps": total,
            "started_unix_ms": waypoint_checkpoint::now_ms(),
        });
        let mut status = Status::new(JobState::Pending, 0, total);
        status.attempt = Some(attempt);
        if main {
            rt.block_on(self.store.put(
                &self.layout.run_config(),
                Bytes::from(serde_json::to_vec_pretty(&run_record)?),
            ))
            .context("writing config/run.json")?;
            rt.block_on(records::write_status(&self.store, &self.layout, &status))?;
        }

        let mut data_consumed = 0u64;
        let adamw = AdamWConfig {
            beta1: cfg.optim.adam_beta1,
            beta2: cfg.optim.adam_beta2,
            eps: cfg.optim.adam_epsilon,
            weight_decay: cfg.optim.weight_decay,
        };
        if cfg.sharding() == Sharding::Full {
            model.shard(ranks.rank(), ranks.world())?;
        }
        let mut opt = if ranks.world() > 1
            && cfg
                .sharding()
                .cuts_optimizer_state_alone(model.lora.is_some())
        {
            AdamW::sharded(adamw, model.trainable(), ranks.rank(), ranks.world())
        } else {
            AdamW::new(adamw, model.trainable())
        };
        // A DPO run's reference is its starting weights: a stored one is scored before they are
        // restored or trained (read back when the run has it already).
        let source = reference::reference_source(
            recipe.needs_reference(),
            model.lora.is_some(),
            train.len() as u64,
            total.saturating_mul(global_batch),
        );
        if source == ReferenceSource::AdaptersOff && main {
            tracing::info!(
                "reference log-probs: the base with the adapters off, scored with each batch (the \
                 run trains on fewer pairs than the data holds)"
            );
        }
        let (reference, eval_reference) = if source == ReferenceSource::Stored {
            let mut table_of = |data: &waypoint_data::Dataset, what: &'static str| {
                let key = ReferenceKey::new(
                    &model_fingerprint,
                    section.init_from_checkpoint.as_deref(),
                    &data.content_fingerprint(),
                    what,
                    json!({"recipe": recipe.name(), "max_seq_len": cfg.data.max_seq_len}),
                );
                reference::load_or_compute(
                    &self.store,
                    &self.layout,
                    &key,
                    &model,
                    data,
                    &mut ranks,
                    cfg.data.batch_size as usize,
                    latest.is_some(),
                    rt,
                )
            };
            let train_table = table_of(&train, reference::TRAIN)?;
            // Under LoRA an eval set is scored with the adapters off as it comes.
            let eval_table = match model.lora {
                Some(_) => None,
                None => eval
                    .as_ref()
                    .map(|e| table_of(e, reference::EVAL))
                    .transpose()?,
            };
            (Some(train_table), eval_table)
        } else {
            (None, None)
        };
        if let Some(m) = &latest {
            restore_state(m, std::mem::take(&mut resume_blobs), &model, &mut opt)?;
            let source = tier_used.manager(&memory, &manager);
            let pos = rt.block_on(source.data_position(m))?;
            let remaining = (total.saturating_sub(m.step)).saturating_add(1);
            ensure!(
                pos.data_consumed / train.len().max(1) as u64 == pos.epoch
                    && remaining
                        .checked_mul(global_batch)
                        .and_then(|n| n.checked_add(pos.data_consumed))
                        .is_some(),
                "checkpoint {} records data_consumed {} and epoch {}, which do not fit this \
                 dataset of {} samples; it was not written by this run's settings",
                m.name,
                pos.data_consumed,
                pos.epoch,
                train.len()
            );
            self.step = m.step;
            data_consumed = pos.data_consumed;
            // `status.json`'s checkpoint is the newest durable one.
            if tier_used == Tier::Durable {
                self.last_checkpoint = Some(m.name.clone());
            } else if main {
                self.last_checkpoint = rt
                    .block_on(manager.committed_steps())?
                    .first()
                    .map(|s| s.to_string());
            }
            tracing::info!(checkpoint = %m.name, tier = tier_used.label(from_peer), step = m.step, data_consumed, "resumed");
        }
        let metrics = if main {
            let mut metrics =
                rt.block_on(records::metrics_until(&self.store, &self.layout, self.step))?;
            // From the memory tier: the steps since the last durable save are in its own tail of
            // the metrics.
            if let (Tier::Memory, Some(t)) = (tier_used, &memory) {
                match rt.block_on(records::metrics_until(
                    t.manager.store(),
                    &self.layout,
                    self.step,
                )) {
                    Ok(tail) => metrics.push_str(&records::lines_between(
                        &tail,
                        records::last_step(&metrics),
                        self.step,
                    )),
                    Err(e) => tracing::warn!("the memory tier's metrics could not be read: {e:#}"),
                }
            }
            metrics
        } else {
            String::new()
        };

        let schedule = Schedule {
            lr: cfg.optim.lr,
            warmup_steps: cfg.optim.warmup_steps,
            total_steps: total,
            kind: cfg.schedule_kind(),
            min_lr_ratio: cfg.optim.min_lr_ratio,
        };
        self.watch = self.start_watch(main, attempt, rt);
        if !main {
            self.rank_log = self.start_rank_log(ranks.rank(), rt);
        }
        let saver = Saver::new(
            manager.clone(),
            RunRecords::new(self.store.clone(), self.layout.clone()).watched(self.watch.clone()),
            &ranks,
            rt.handle().clone(),
            Bytes::from(serde_json::to_vec_pretty(&run_record)?),
            SaverTier::Durable,
        )?;
        let ctx = SaveContext {
            fingerprint: config_fp.clone(),
            sampler_dtype: section.sampler_dtype,
            tokenizer_files,
            model_id: cfg.model.model_id.clone(),
            n_samples: train.len() as u64,
            sampler_base_every: section.sampler_base_every,
            training: trajectory.clone(),
        };
        status.state = JobState::Running;
        status.step = self.step;
        status.checkpoint = self.last_checkpoint.clone();
        self.resumed_from = latest.as_ref().map(|m| ResumedFrom {
            checkpoint: m.name.clone(),
            tier: tier_used.label(from_peer).to_string(),
        });
        status.resumed_from = self.resumed_from.clone();
        if main {
            rt.block_on(records::write_status(&self.store, &self.layout, &status))?;
        }

        let durable = DurableSchedule::new(section.save_steps, self.step);
        if let (true, Some(mtbf_s)) = (main, durable.mtbf_s()) {
            tracing::info!(
                "durable saves: --save_steps auto for {} h between failures; the first after \
                 {} steps measures what a save costs, then the interval is Young/Daly's \
                 √(2 × cost × MTBF)",
                mtbf_s / 3600.0,
                durable.every()
            );
        }
        Ok(Live {
            checkpoint: section,
            durable,
            ranks,
            device,
            recipe,
            reference,
            eval_reference,
            model,
            opt,
            train,
            eval,
            manager,
            saver,
            memory,
            ctx,
            schedule,
            metrics,
            data_consumed,
            global_batch,
            attempt,
            resumed_step: latest.as_ref().map(|m| m.step),
            last_loss: f64::NAN,
        })
    }
}

/// Loads another run's weights (`run_id:step-N`) into the base model.
async fn init_from(manager: &CheckpointManager, spec: &str, model: &mut Model) -> Result<()> {
    let (run, step) = waypoint_checkpoint::parse_checkpoint_ref(spec)?;
    let other = manager.other_run(&run)?;
    let m = other
        .manifest(step)
        .await
        .with_context(|| format!("--init_from_checkpoint {spec}"))?;
    let blobs: Vec<Blob> = if m.dcp_files().next().is_some() {
        other
            .load_tensors(&m, "dcp/", &|n| n.starts_with("model."))
            .await?
            .into_iter()
            .map(|mut b| {
                b.name = b.name["model.".len()..].to_string();
                b
            })
            .collect()
    } else {
        other.sampler_tensors(&m).await?
    };
    let blobs = assemble_slices(blobs)?;
    if blobs.keys().any(|n| n.contains(".lora_")) {
        bail!("--init_from_checkpoint {spec}: a LoRA checkpoint holds adapters, not full weights");
    }
    tch::no_grad(|| -> Result<()> {
        for (i, p) in model.base().iter().enumerate() {
            let b = blobs.get(&p.name).with_context(|| {
                format!(
                    "--init_from_checkpoint {spec}: weight {} is missing",
                    p.name
                )
            })?;
            copy_into(&p.tensor, b, model.shard_rows(i), spec)?;
        }
        Ok(())
    })?;
    tracing::info!(
        from = spec,
        "initialised the weights from another run's checkpoint"
    );
    Ok(())
}

/// With sharded state (`--sharding optimizer|full` over several ranks, or a sharded model): the
/// rows of each resumable tensor this rank reads — its rows of what it holds sharded, all of what it
/// holds whole — by DCP name. `None` when the state is not sharded, and under LoRA (its resumable
/// state is the adapters, small, and they are added after the checkpoint is read): every rank
/// reads it all.
fn rows_wanted(
    cfg: &waypoint_config::TrainConfig,
    model: &Model,
    ranks: &crate::collective::ranks::Ranks,
) -> Option<HashMap<String, RowRange>> {
    let sharding = cfg.sharding();
    let sharded = model.is_sharded() || (sharding != Sharding::None && ranks.world() > 1);
    if !sharded || cfg.lora().is_some() {
        return None;
    }
    let range = |r: Option<Rows>| {
        r.map_or(RowRange::ALL, |r| RowRange {
            start: r.start as usize,
            len: r.len as usize,
        })
    };
    let mut want = HashMap::new();
    for (i, p) in model.trainable().iter().enumerate() {
        let own_rows = || {
            rows_of(
                p.tensor.size().first().copied().unwrap_or(1),
                ranks.rank(),
                ranks.world(),
            )
        };
        // The weights are cut into rows after the resume (`Model::shard`): the rows this rank
        // will hold (a node's memory tier holds no other rank's).
        let weight = model
            .trainable_rows(i)
            .or((sharding == Sharding::Full).then(own_rows));
        let moments = weight.or((sharding == Sharding::Optimizer).then(own_rows));
        want.insert(dcp::model_key(&p.name), range(weight));
        for field in ["exp_avg", "exp_avg_sq"] {
            want.insert(dcp::optim_key(&p.name, field), range(moments));
        }
        want.insert(dcp::optim_key(&p.name, "step"), RowRange::ALL);
    }
    for key in dcp::LOOP_STATE_KEYS {
        want.insert(key.to_string(), RowRange::ALL);
    }
    Some(want)
}

/// Which resume-relevant settings differ from those recorded in `config/run.json`.
async fn describe_drift(store: &Store, layout: &RunLayout, now: &Value) -> String {
    let recorded = match store.get(&layout.run_config()).await {
        Ok(b) => serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let diffs = changes(&recorded["resume_fields"], now, &[]);
    if diffs.is_empty() {
        "the recorded fingerprint differs".into()
    } else {
        diffs.join("; ")
    }
}

/// The trajectory settings attempt `attempt` recorded when it started (what its checkpoints were
/// trained with); `None` when its record is gone or predates them (nothing to compare).
async fn trained_with(store: &Store, layout: &RunLayout, attempt: u64) -> Option<Value> {
    let bytes = store.get(&layout.attempt(attempt)).await.ok()?;
    let record: Value = serde_json::from_slice(&bytes).ok()?;
    let training = record["info"]["training"].clone();
    training.is_object().then_some(training)
}

/// The settings of `now` that `before` records: a setting recorded only by newer versions of
/// waypoint is not a change.
fn recorded_keys(now: &Value, before: &Value) -> Value {
    match (now, before) {
        (Value::Object(now), Value::Object(before)) => Value::Object(
            now.iter()
                .filter(|(k, _)| before.contains_key(k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        _ => now.clone(),
    }
}

/// The earlier attempts' settings from `config/run.json` (its `history`, then its own), oldest
/// first: each start adds the one before it, so the file keeps every attempt's configuration.
async fn run_history(store: &Store, layout: &RunLayout) -> Vec<Value> {
    let Ok(bytes) = store.get(&layout.run_config()).await else {
        return Vec::new();
    };
    let Ok(mut previous) = serde_json::from_slice::<Value>(&bytes) else {
        return Vec::new();
    };
    let mut history = match previous.get_mut("history").map(Value::take) {
        Some(Value::Array(h)) => h,
        _ => Vec::new(),
    };
    history.push(json!({
        "attempt": previous["attempt"],
        "started_unix_ms": previous["started_unix_ms"],
        "world_size": previous["world_size"],
        "config": previous["config"],
        "training": previous["training"],
        "config_changes": previous["config_changes"],
    }));
    history
}

/// This machine's name for the attempt record: `HOSTNAME` when set (a pod's name), else the
/// system's.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(sysinfo::System::host_name)
        .unwrap_or_default()
}

/// The tier a checkpoint is resumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// The node's memory tier ([`MemoryTier`]).
    Memory,
    /// Object storage (or the local run folder): `--checkpoint_base_uri`.
    Durable,
}

impl Tier {
    /// The checkpoints of this tier: the memory tier's when it is that and open, else the durable.
    fn manager<'a>(
        self,
        memory: &'a Option<MemoryTier>,
        durable: &'a CheckpointManager,
    ) -> &'a CheckpointManager {
        match (self, memory) {
            (Self::Memory, Some(t)) => &t.manager,
            _ => durable,
        }
    }

    /// How `status.json` names it: `memory`, `peer` (the memory tier, a node's copy received from
    /// a peer node's) or `durable`.
    fn label(self, from_peer: bool) -> &'static str {
        match (self, from_peer) {
            (Self::Memory, true) => "peer",
            _ => self.name(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Durable => "durable",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "memory" => Ok(Self::Memory),
            "durable" => Ok(Self::Durable),
            other => anyhow::bail!("rank 0 named an unknown checkpoint tier {other:?}"),
        }
    }
}
