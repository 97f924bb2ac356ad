//! The scheduler as one pure function: `schedule(&Snapshot, &Config) -> Plan`.
//!
//! No I/O, no clock; randomness only from `Config::seed`. The controller builds a snapshot from
//! its store, applies the plan, and the simulator replays traces through the same engine.

use serde::Serialize;

use crate::cluster::{Allocation, CapacityError, Cluster};
use crate::model::NodeSpec;
use crate::place::{FilterReport, PlacementError, Placer};
use crate::policy::PolicyKind;
use crate::request::JobSpec;
use crate::shapes::ShapeDistribution;
use crate::validate::ValidationError;

/// A job waiting to be placed; `id` orders jobs of equal priority (lower first).
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub id: u64,
    pub spec: JobSpec,
}

/// The pool as the controller sees it at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeSpec>,
    /// Allocations of replicas that run now (their node is an index into `nodes`).
    pub running: Vec<Allocation>,
    pub pending: Vec<PendingJob>,
}

/// How to schedule.
#[derive(Debug, Clone)]
pub struct Config {
    pub policy: PolicyKind,
    pub seed: u64,
    /// The pool's task-shape history, for fragmentation-aware policies.
    pub shapes: ShapeDistribution,
}

/// Why a job stays pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum WaitReason {
    Invalid(ValidationError),
    NoFit {
        replica: u32,
        replicas: u32,
        report: FilterReport,
    },
}

/// What the controller should do.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Jobs placed, each with one allocation per replica.
    pub placements: Vec<(u64, Vec<Allocation>)>,
    pub waiting: Vec<(u64, WaitReason)>,
}

/// A snapshot that contradicts itself (e.g. running work beyond a node's capacity).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid node: {0}")]
    Node(#[from] ValidationError),
    #[error("running allocation does not fit: {0}")]
    Running(#[from] CapacityError),
}

/// Places pending jobs by priority (highest first), then by id; each gang whole or not at all.
pub fn schedule(snapshot: &Snapshot, config: &Config) -> Result<Plan, SnapshotError> {
    let cluster = Cluster::new(snapshot.nodes.clone())?;
    let policy = config.policy.build(&config.shapes, &cluster);
    let mut placer = Placer::new(cluster, policy, config.seed);
    for alloc in &snapshot.running {
        placer.adopt(alloc)?;
    }
    let mut order: Vec<&PendingJob> = snapshot.pending.iter().collect();
    order.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then(a.id.cmp(&b.id)));
    let mut plan = Plan::default();
    for job in order {
        match placer.place_job(&job.spec) {
            Ok(allocs) => plan.placements.push((job.id, allocs)),
            Err(PlacementError::Invalid(err)) => {
                plan.waiting.push((job.id, WaitReason::Invalid(err)));
            }
            Err(PlacementError::NoFit { replica, replicas }) => {
                let report = placer.explain(&job.spec.request);
                plan.waiting.push((
                    job.id,
                    WaitReason::NoFit {
                        replica,
                        replicas,
                        report,
                    },
                ));
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{DeviceShare, NodeId};
    use crate::model::{DeviceSpec, GIB};
    use crate::request::{GpuRequest, ResourceRequest};

    fn whole(name: &str, priority: i32, devices: u32, replicas: u32) -> JobSpec {
        JobSpec {
            name: name.into(),
            project: "p".into(),
            priority,
            replicas,
            request: ResourceRequest {
                gpu: GpuRequest::Whole { devices },
                cpu_milli: 1000,
                memory_bytes: GIB,
                ..Default::default()
            },
        }
    }

    #[test]
    fn higher_priority_goes_first_and_a_gang_that_cannot_fit_waits_with_its_reason() {
        let node = NodeSpec::with_devices(
            "n0",
            32_000,
            64 * GIB,
            4,
            DeviceSpec {
                model: "H100".into(),
                memory_bytes: 80 * GIB,
            },
        );
        // One device already runs something.
        let running = Allocation {
            node: NodeId(0),
            cpu_milli: 1000,
            memory_bytes: GIB,
            devices: vec![DeviceShare {
                device: 0,
                milli: 1000,
                memory_bytes: 80 * GIB,
            }],
            affinity: None,
        };
        let snapshot = Snapshot {
            nodes: vec![node],
            running: vec![running],
            pending: vec![
                PendingJob {
                    id: 1,
                    spec: whole("early-low", 25, 2, 1),
                },
                PendingJob {
                    id: 2,
                    spec: whole("late-high", 75, 2, 1),
                },
                PendingJob {
                    id: 3,
                    spec: whole("gang", 50, 1, 2),
                },
            ],
        };
        let config = Config {
            policy: PolicyKind::Tessera,
            seed: 1,
            shapes: ShapeDistribution::default(),
        };
        let plan = schedule(&snapshot, &config).unwrap();
        // Three devices are free: the high-priority job takes two, the gang of two single
        // devices cannot be placed whole and waits, and the low-priority job no longer fits.
        let placed: Vec<u64> = plan.placements.iter().map(|(id, _)| *id).collect();
        assert_eq!(placed, vec![2]);
        assert!(
            plan.placements[0].1[0]
                .devices
                .iter()
                .all(|d| d.device != 0)
        );
        let waiting: Vec<u64> = plan.waiting.iter().map(|(id, _)| *id).collect();
        assert_eq!(waiting, vec![3, 1]);
        match &plan.waiting[0].1 {
            WaitReason::NoFit {
                replica,
                replicas,
                report,
            } => {
                // The first replica found the last free device; the second had none left.
                // The report looks at one replica alone, so the node counts as feasible.
                assert_eq!((*replica, *replicas), (1, 2));
                assert_eq!((report.feasible, report.lacking_gpu), (1, 0));
            }
            other => panic!("unexpected reason {other:?}"),
        }
    }

    #[test]
    fn running_work_beyond_capacity_is_a_snapshot_error() {
        let node = NodeSpec::with_devices(
            "n0",
            1000,
            GIB,
            0,
            DeviceSpec {
                model: "x".into(),
                memory_bytes: 0,
            },
        );
        let too_big = Allocation {
            node: NodeId(0),
            cpu_milli: 2000,
            memory_bytes: 0,
            devices: vec![],
            affinity: None,
        };
        let snapshot = Snapshot {
            nodes: vec![node],
            running: vec![too_big],
            pending: vec![],
        };
        let config = Config {
            policy: PolicyKind::Fgd,
            seed: 1,
            shapes: ShapeDistribution::default(),
        };
        assert!(matches!(
            schedule(&snapshot, &config),
            Err(SnapshotError::Running(_))
        ));
    }
}
