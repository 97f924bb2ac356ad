//! Rounds that cost what changed: what a round that changed nothing leaves behind, and the quick
//! round that places only the jobs submitted since.
//!
//! A full round on a large pool builds its cluster, adopts every running allocation and, for
//! each shape that fits nowhere, looks at every running job for room to reclaim or gather. When
//! such a round changes nothing (every pending job waits), none of that can come out otherwise
//! until something is freed or changed: so while only new jobs arrive, the next round need only
//! try them, in the cluster the last one left.

use super::*;

/// What a round that changed nothing leaves for the next: its cluster with every running
/// allocation adopted, each project's use as charged, its projects' rules, the answers of the
/// shapes that found no room even by reclaiming or moving work, and what waits.
///
/// These hold only while nothing but new pending jobs changed since that round's snapshot; the
/// caller knows what changed and keeps this only while that is so.
pub struct Kept {
    pub(super) placer: Placer,
    pub(super) quotas: Quotas,
    pub(super) no_room: NoRoom,
    pub(super) rules: BTreeMap<String, crate::rules::PlacementRules>,
    /// Per project with jobs waiting: the highest priority and the fewest milli-GPU among them.
    pub(super) waiting: BTreeMap<String, Waiting>,
}

/// What a project's waiting jobs could take from a job placed after them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Waiting {
    priority: i32,
    milli: u64,
}

impl Kept {
    pub(super) fn new(ended: Ended, snapshot: &mut Snapshot) -> Kept {
        let mut kept = Kept {
            placer: ended.placer,
            quotas: ended.quotas,
            no_room: ended.no_room,
            rules: std::mem::take(&mut snapshot.rules),
            waiting: BTreeMap::new(),
        };
        for job in &snapshot.pending {
            kept.waits(&job.spec);
        }
        kept
    }

    fn waits(&mut self, spec: &JobSpec) {
        let milli = spec.request.gpu.total_milli() * u64::from(spec.replicas);
        let w = self.waiting.entry(spec.project.clone()).or_insert(Waiting {
            priority: spec.priority,
            milli,
        });
        w.priority = w.priority.max(spec.priority);
        w.milli = w.milli.min(milli);
    }

    /// Places `new`, the pending jobs submitted since the round that kept this, in fair-share
    /// and priority order among themselves (with `history`, each project's past use now), the
    /// way a full round would: a job of a shape that found no room waits for the same reason,
    /// another is placed where it fits.
    ///
    /// `None` when a job's answer needs a full round: it fits nowhere as the pool stands and
    /// its shape's answer is not known (reclaiming, shrinking or moving work might make room).
    /// With a plan, what is kept comes back (its cluster holding the placements) unless a
    /// placement gave a waiting job something to reclaim: a job of the same project of higher
    /// priority waits, or another project waits within its guarantee. Then the round after is
    /// a full one, as it would have been.
    pub fn schedule_new(
        mut self,
        new: &[PendingJob],
        history: &BTreeMap<String, u64>,
        warm: &BTreeMap<u64, Vec<NodeId>>,
    ) -> (Option<Plan>, Option<Kept>) {
        self.quotas = self.quotas.with_history(history);
        let mut plan = Plan::default();
        let mut queues = project_queues(new);
        let mut placed = Vec::new();
        while let Some(job) = next_job(&mut queues, &self.quotas) {
            let step = take_step(
                &mut self.placer,
                &mut self.quotas,
                &self.no_room,
                &self.rules,
                job,
                warm,
            );
            match step {
                Step::Waits(reason) => {
                    self.waits(&job.spec);
                    plan.waiting.push((job.id, reason));
                }
                Step::Placed(allocs) => {
                    placed.push(&job.spec);
                    plan.placements.push((job.id, allocs));
                }
                Step::NoFit { .. } => return (None, None),
            }
        }
        let reclaimable = placed
            .iter()
            .any(|spec| may_reclaim(&self.waiting, &mut self.quotas, spec));
        let kept = (!reclaimable).then_some(self);
        (Some(plan), kept)
    }
}

/// Could a waiting job preempt `placed` now that it runs, or others of its project now that it
/// uses more? (A higher-priority job of its project, or another project within its guarantee.)
fn may_reclaim(waiting: &BTreeMap<String, Waiting>, quotas: &mut Quotas, placed: &JobSpec) -> bool {
    waiting.iter().any(|(project, w)| {
        if *project == placed.project {
            w.priority > placed.priority
        } else {
            quotas.within_guarantee(project, w.milli)
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::testkit::{h100_node, quota, request};

    /// A job of `shape` (0: 1 whole GPU, 1: 2 whole, 2: half a GPU, 3: 4 whole on one node, 4:
    /// two replicas of 1 GPU, 5: CPUs only) in project `project` at `priority`.
    fn job(id: u64, shape: u8, project: u8, priority: i32) -> PendingJob {
        let (gpu, replicas) = match shape {
            0 => (GpuRequest::Whole { devices: 1 }, 1),
            1 => (GpuRequest::Whole { devices: 2 }, 1),
            2 => (GpuRequest::Share { milli: 500 }, 1),
            3 => (GpuRequest::Whole { devices: 4 }, 1),
            4 => (GpuRequest::Whole { devices: 1 }, 2),
            _ => (GpuRequest::None, 1),
        };
        PendingJob {
            id,
            spec: JobSpec {
                name: format!("j{id}"),
                project: ["a", "b"][usize::from(project)].into(),
                priority,
                replicas,
                request: request(gpu, if shape == 5 { 20 } else { 4 }),
            },
        }
    }

    type Jobs = Vec<(u8, u8, i32)>;

    fn jobs(count: std::ops::Range<usize>) -> impl Strategy<Value = Jobs> {
        prop::collection::vec((0u8..6, 0u8..2, 0i32..3), count)
    }

    /// Runs full rounds over `snapshot` as a controller would apply them (placements start,
    /// preempted and moved jobs stop) until one changes nothing; returns what that round kept.
    fn settle(snapshot: &mut Snapshot, config: &Config) -> Kept {
        let mut started = 1_000;
        for _ in 0..100 {
            let (plan, kept) = schedule_keeping(snapshot.clone(), config).unwrap();
            if let Some(kept) = kept {
                return kept;
            }
            let gone: HashSet<u64> = (plan.preemptions.iter().map(|p| p.job))
                .chain(plan.moves.iter().map(|m| m.job))
                .collect();
            snapshot.running.retain(|r| !gone.contains(&r.id));
            for (id, allocations) in plan.placements {
                let i = snapshot.pending.iter().position(|p| p.id == id).unwrap();
                let job = snapshot.pending.remove(i);
                started += 1;
                snapshot.running.push(RunningJob {
                    id,
                    project: job.spec.project,
                    priority: job.spec.priority,
                    started,
                    gpu_milli: allocations.iter().map(|a| a.gpu_milli()).sum(),
                    allocations,
                    stopping: false,
                    preemptible: true,
                    request: Some(job.spec.request),
                    elastic: None,
                });
            }
        }
        panic!("the rounds never settled");
    }

    fn reasons(plan: &Plan) -> HashMap<u64, WaitReason> {
        plan.waiting
            .iter()
            .map(|(id, r)| (*id, WaitReason::clone(r)))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// A quick round decides the new jobs as a full round over the whole pool would, and
        /// leaves every other job's answer as it was.
        #[test]
        fn a_quick_round_agrees_with_a_full_round(
            nodes in 1usize..5,
            first in jobs(10..60),
            new in jobs(1..5),
            guaranteed in (0u64..5, 0u64..5),
            limit in prop::option::of(2u64..10),
            best_fit in any::<bool>(),
        ) {
            let config = Config {
                policy: if best_fit { PolicyKind::BestFit } else { PolicyKind::Tessera },
                seed: 7,
                shapes: ShapeDistribution::default(),
            };
            let mut snapshot = Snapshot {
                nodes: (0..nodes).map(|i| h100_node(&format!("n{i}"), 4)).collect(),
                pending: first
                    .iter()
                    .enumerate()
                    .map(|(i, &(s, p, prio))| job(i as u64 + 1, s, p, prio))
                    .collect(),
                projects: vec![
                    quota("a", guaranteed.0 * 1000, limit.map(|l| l * 1000)),
                    quota("b", guaranteed.1 * 1000, None),
                ],
                ..Default::default()
            };
            let kept = settle(&mut snapshot, &config);
            let before = reasons(&schedule(&snapshot, &config).unwrap());
            let new: Vec<PendingJob> = new
                .iter()
                .enumerate()
                .map(|(i, &(s, p, prio))| job(500 + i as u64, s, p, prio))
                .collect();
            let (quick, still) = kept.schedule_new(&new, &snapshot.history, &snapshot.warm);
            snapshot.pending.extend(new.iter().cloned());
            let full = schedule(&snapshot, &config).unwrap();
            let Some(quick) = quick else {
                // Not decided quickly: some new job fits nowhere and its shape's answer was
                // not known from the last round.
                prop_assert!(still.is_none());
                return Ok(());
            };
            // Only new jobs are decided, each once.
            let mut ids: Vec<u64> = quick
                .placements
                .iter()
                .map(|(id, _)| *id)
                .chain(quick.waiting.iter().map(|(id, _)| *id))
                .collect();
            ids.sort_unstable();
            prop_assert_eq!(ids, new.iter().map(|j| j.id).collect::<Vec<_>>());
            let disruptive = !full.preemptions.is_empty()
                || !full.moves.is_empty()
                || !full.shrinks.is_empty();
            if quick.placements.is_empty() {
                // Nothing placed: the full round changes nothing either, and gives every job,
                // old and new, the same answer.
                prop_assert!(full.placements.is_empty() && !disruptive && full.grows.is_empty());
                let mut expected = before;
                expected.extend(reasons(&quick));
                prop_assert_eq!(reasons(&full), expected);
            } else if !disruptive {
                // Placed: the same jobs on the same devices, and the new jobs that wait wait
                // there too. (Their reasons may describe the pool before the placement, and a
                // placement can let a waiting job reclaim at once in a full round: the full
                // round that always follows a quick one that placed work brings both up to
                // date.)
                prop_assert_eq!(&full.placements, &quick.placements);
                let full_reasons = reasons(&full);
                for (id, _) in &quick.waiting {
                    prop_assert!(full_reasons.contains_key(id));
                }
            }
            if still.is_some() && !quick.placements.is_empty() {
                // Kept after placing: the full round after it (the placements running) would
                // place, preempt, shrink and grow nothing either. (It may move a job placed
                // quickly to gather room for a waiting one: that waits for the next full round.)
                let placed: HashMap<u64, &Vec<Allocation>> =
                    quick.placements.iter().map(|(id, a)| (*id, a)).collect();
                for job in &new {
                    if let Some(allocations) = placed.get(&job.id) {
                        snapshot.running.push(RunningJob {
                            id: job.id,
                            project: job.spec.project.clone(),
                            priority: job.spec.priority,
                            started: 10_000 + job.id,
                            gpu_milli: allocations.iter().map(|a| a.gpu_milli()).sum(),
                            allocations: allocations.to_vec(),
                            stopping: false,
                            preemptible: true,
                            request: Some(job.spec.request.clone()),
                            elastic: None,
                        });
                    }
                }
                snapshot.pending.retain(|j| !placed.contains_key(&j.id));
                let after = schedule(&snapshot, &config).unwrap();
                prop_assert!(after.placements.is_empty(), "{:?}", after.placements);
                prop_assert!(after.preemptions.is_empty(), "{:?}", after.preemptions);
                prop_assert!(after.shrinks.is_empty() && after.grows.is_empty());
            }
        }
    }
}
