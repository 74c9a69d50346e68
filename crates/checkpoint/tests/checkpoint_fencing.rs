//! Fencing without a losing race (docs/fencing.md): a newer attempt wins against an older one (a
//! zombie) in every interleaving of the zombie's commit with the newer attempt's resume and save.
//! The zombie's commit, made with its fence checked before the newer attempt's record was visible,
//! lands (a) before the newer attempt starts its save of that step, or (b) while the newer attempt
//! writes it — with the same files (adopted) or other files (set aside). The zombie's next save is
//! fenced.

use waypoint_testkit as common;

use bytes::Bytes;
use common::{backends, commit, training_state};
use waypoint_checkpoint::{
    CheckpointError, CheckpointManager, ManagerOptions, Peers, RunLayout, SamplerPart, SaveRequest,
    StepName,
};
use waypoint_storage::{Store, StoreOptions};

fn manager(store: &Store) -> CheckpointManager {
    CheckpointManager::new(
        store.clone(),
        RunLayout::new("fenced", "waypoint").unwrap(),
        ManagerOptions::default(),
    )
}

async fn started(store: &Store) -> CheckpointManager {
    let mut m = manager(store);
    m.start_attempt(&serde_json::json!({})).await.unwrap();
    m
}

/// The save of `step` a deterministic trainer makes: the same bytes from any attempt.
fn save_of(step: u64, sampler: bool) -> SaveRequest {
    SaveRequest {
        commit: commit(step),
        dcp: Some(training_state(step)),
        sampler: sampler.then(|| SamplerPart::Full {
            config_json: Bytes::from_static(br#"{"model_type": "llama"}"#),
            tensors: vec![training_state(step + 1000).remove(0)],
            extra_files: Vec::new(),
        }),
    }
}

/// One rank whose all-gather (after its files are written, before the commit) runs `hook`.
struct Hooked<F: FnMut()>(F);

impl<F: FnMut()> Peers for Hooked<F> {
    fn rank(&self) -> u32 {
        0
    }
    fn world(&self) -> u32 {
        1
    }
    fn barrier(&mut self, _name: &str) -> waypoint_checkpoint::Result<()> {
        Ok(())
    }
    fn all_gather(
        &mut self,
        _name: &str,
        data: &[u8],
    ) -> waypoint_checkpoint::Result<Vec<Vec<u8>>> {
        (self.0)();
        Ok(vec![data.to_vec()])
    }
    fn broadcast(&mut self, _name: &str, data: &[u8]) -> waypoint_checkpoint::Result<Vec<u8>> {
        Ok(data.to_vec())
    }
}

/// Quarantine records of the run (checkpoints set aside).
async fn set_aside(store: &Store, m: &CheckpointManager) -> Vec<String> {
    let dir = format!("{}/quarantine", m.layout().checkpoints_dir());
    store
        .list(&dir)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// (a) The zombie commits step 4 after the newer attempt chose step 2 to resume from: the newer
/// attempt's save of step 4 sets the zombie's aside and commits its own; the zombie is fenced next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_commit_before_the_newer_save_is_set_aside() {
    for b in backends("fence-before", StoreOptions::default()) {
        let zombie = started(&b.store).await;
        zombie.save(save_of(2, false)).await.unwrap();
        // The newer trainer chooses its resume point…
        let mut newer = manager(&b.store);
        let resume = newer.latest_resumable(true).await.unwrap().unwrap();
        assert_eq!(resume.step, 2);
        // …the zombie commits step 4 (its fence passes: no newer attempt yet)…
        zombie.save(save_of(4, false)).await.unwrap();
        // …then the newer one takes its attempt, trains from step 2 and saves step 4.
        newer.start_attempt(&serde_json::json!({})).await.unwrap();
        let mine = newer.save(save_of(4, false)).await.unwrap();
        assert_eq!(mine.attempt, 2, "{}", b.name);
        let latest = newer.latest_resumable(true).await.unwrap().unwrap();
        assert_eq!((latest.step, latest.attempt), (4, 2), "{}", b.name);
        let aside = set_aside(&b.store, &newer).await;
        assert_eq!(aside.len(), 1, "{}: {aside:?}", b.name);
        assert!(aside[0].contains("step-000004"), "{aside:?}");
        // The zombie's next save is fenced; the newer attempt goes on.
        let e = zombie.save(save_of(6, false)).await.unwrap_err();
        assert!(
            matches!(e, CheckpointError::Fenced { .. }),
            "{}: {e}",
            b.name
        );
        newer.save(save_of(6, false)).await.unwrap();
        assert_eq!(common::committed_steps(&newer).await, [6, 4, 2]);
    }
}

/// (b) The zombie's commit of step 4 lands while the newer attempt writes step 4 (its fence was
/// checked before the newer attempt's record was visible): with the same files, the newer attempt
/// adopts it; with other files (the newer save also holds the promotable weights), it sets the
/// zombie's aside and commits its own. Either way the save succeeds and the step holds what the
/// newer attempt wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_commit_during_the_newer_save_is_adopted_or_set_aside() {
    for (newer_has_sampler, adopted) in [(false, true), (true, false)] {
        for b in backends("fence-during", StoreOptions::default()) {
            let zombie = started(&b.store).await;
            zombie.save(save_of(2, false)).await.unwrap();
            // The zombie starts its save of step 4 (fence passes), writes it…
            let step = StepName::new(4);
            zombie.prepare_save(step).await.unwrap();
            let request = save_of(4, false);
            let writer = zombie.file_writer(step, 0);
            let files = zombie
                .write_dcp(&writer, 1, request.dcp.clone().unwrap())
                .await
                .unwrap();
            // …the newer attempt starts and saves step 4 (clearing the zombie's uncommitted files
            // and writing the same names); the zombie's commit lands while it writes.
            let newer = started(&b.store).await;
            let record = newer.layout().attempt(2);
            let record_bytes = b.store.get(&record).await.unwrap();
            let handle = tokio::runtime::Handle::current();
            let (zs, zcommit) = (b.store.clone(), request.commit.clone());
            let mut hook = Hooked(|| {
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        // The zombie checked its fence before the newer record was visible.
                        zs.delete(&record).await.unwrap();
                        zombie.commit(zcommit.clone(), files.clone()).await.unwrap();
                        zs.put(&record, record_bytes.clone()).await.unwrap();
                    })
                })
            });
            let mine = newer
                .save_with(&mut hook, save_of(4, newer_has_sampler))
                .await
                .unwrap_or_else(|e| panic!("{}: the newer save failed: {e}", b.name));
            let latest = newer.latest_resumable(true).await.unwrap().unwrap();
            assert_eq!(latest, mine, "{}", b.name);
            let aside = set_aside(&b.store, &newer).await;
            if adopted {
                assert_eq!(mine.attempt, 1, "{}: adopted the zombie's commit", b.name);
                assert!(aside.is_empty(), "{}: {aside:?}", b.name);
            } else {
                assert_eq!(mine.attempt, 2, "{}: committed its own", b.name);
                assert!(mine.sampler_files().next().is_some());
                assert_eq!(aside.len(), 1, "{}: {aside:?}", b.name);
            }
            // Every file the step lists is intact, and nothing else is in its folder.
            assert!(newer.check(&mine, true).await.unwrap().is_empty());
            let listed = b
                .store
                .list(&newer.layout().checkpoint_dir(step))
                .await
                .unwrap();
            assert_eq!(listed.len(), mine.files.len(), "{}: {listed:?}", b.name);
            let loaded = newer.load_tensors(&mine, "dcp/", &|_| true).await.unwrap();
            let mut want = training_state(4);
            let mut got = loaded;
            want.sort_by(|a, b| a.name.cmp(&b.name));
            got.sort_by(|a, b| a.name.cmp(&b.name));
            assert_eq!(got, want, "{}", b.name);
            let e = zombie.save(save_of(6, false)).await.unwrap_err();
            assert!(
                matches!(e, CheckpointError::Fenced { .. }),
                "{}: {e}",
                b.name
            );
        }
    }
}

/// A step this attempt committed itself is never saved over, and a writer of an older attempt
/// finds a newer attempt's commit fenced, not "already committed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_commits_are_refused_and_newer_ones_fence() {
    for b in backends("fence-own", StoreOptions::default()) {
        let zombie = started(&b.store).await;
        let newer = started(&b.store).await;
        newer.save(save_of(2, false)).await.unwrap();
        assert!(matches!(
            newer.save(save_of(2, false)).await,
            Err(CheckpointError::AlreadyCommitted { .. })
        ));
        assert!(matches!(
            zombie.save(save_of(2, false)).await,
            Err(CheckpointError::Fenced { .. })
        ));
    }
}
