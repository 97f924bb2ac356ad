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
