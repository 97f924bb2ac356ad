//! The FGD simulator's replay protocol, step by step (openb README, "How the FGD simulator
//! replays a trace"):
//!
//! 1. Per seed, sort tasks by name and shuffle them.
//! 2. Tune the workload to `tune_ratio` × GPU capacity: inflate by sampling original tasks with
//!    replacement and appending them, stopping at the first one whose *per-device* share would
//!    overshoot; or, when the trace already exceeds the target, remove random tasks.
//! 3. Draw one random tie order of the nodes (the simulator's random name prefixes).
//! 4. Place every task once, in order, with no queue, retry or departure; after each task record
//!    the GPU arrived (placed or not) and the GPU allocated.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tessera_sched::cluster::{Cluster, NodeId};
use tessera_sched::model::NodeSpec;
use tessera_sched::place::Placer;
use tessera_sched::policy::PolicyKind;
use tessera_sched::request::JobSpec;
use tessera_sched::shapes::ShapeDistribution;
use tessera_sched::validate::ValidationError;

use crate::metrics::{Curve, Sample, bin};
use crate::openb::{Trace, TraceTask};

/// FGD's typical-pods coverage: the most common shapes covering 95% of tasks.
pub const TYPICAL_COVERAGE: f64 = 0.95;

/// The paper's workload target: 130% of GPU capacity.
pub const TUNE_RATIO: f64 = 1.3;

/// One replay's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub trace: String,
    pub policy: PolicyKind,
    pub seed: u64,
    pub tasks: usize,
    pub placed: usize,
    pub capacity_milli: u64,
    pub curve: Curve,
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

/// The task order of one seed: indexes into the trace, inflated copies included.
pub fn tuned_order(
    tasks: &[TraceTask],
    capacity_milli: u64,
    tune_ratio: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<usize> {
    let mut by_name: Vec<usize> = (0..tasks.len()).collect();
    by_name.sort_by(|&a, &b| tasks[a].name.cmp(&tasks[b].name));
    let mut order = by_name.clone();
    order.shuffle(rng);
    let target = (tune_ratio * capacity_milli as f64) as u64;
    let demand = |i: usize| tasks[i].request.gpu.total_milli();
    let mut total: u64 = order.iter().map(|&i| demand(i)).sum();
    if total < target {
        if tasks.is_empty() {
            return order;
        }
        loop {
            let pick = by_name[rng.random_range(0..by_name.len())];
            let per_device = u64::from(tasks[pick].request.gpu.per_device_milli());
            if total + per_device > target {
                break;
            }
            total += demand(pick);
            order.push(pick);
        }
    } else {
        while total > target && !order.is_empty() {
            let at = rng.random_range(0..order.len());
            total -= demand(order.remove(at));
        }
    }
    order
}

/// Steps 1–3 of the protocol for one seed: the pool with its tie order under `policy`, and the
/// task order to place (indexes into `trace.tasks`).
pub fn prepare(
    nodes: &[NodeSpec],
    trace: &Trace,
    shapes: &ShapeDistribution,
    policy: PolicyKind,
    seed: u64,
) -> Result<(Placer, Vec<usize>), ValidationError> {
    let mut cluster = Cluster::new(nodes.to_vec())?;
    let capacity = cluster.gpu_capacity_milli();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let order = tuned_order(&trace.tasks, capacity, TUNE_RATIO, &mut rng);
    let mut tie: Vec<NodeId> = (0..cluster.len() as u32).map(NodeId).collect();
    tie.shuffle(&mut rng);
    cluster.set_tie_order(&tie)?;
    let built = policy.build(shapes, &cluster);
    Ok((Placer::new(cluster, built, rng.random()), order))
}

/// Replays one trace with one policy and one seed.
pub fn replay(
    nodes: &[NodeSpec],
    trace: &Trace,
    shapes: &ShapeDistribution,
    policy: PolicyKind,
    seed: u64,
) -> Result<RunResult, ValidationError> {
    let (mut placer, order) = prepare(nodes, trace, shapes, policy, seed)?;
    let capacity = placer.cluster().gpu_capacity_milli();
    let mut samples = Vec::with_capacity(order.len());
    let mut arrived = 0u64;
    let mut placed = 0usize;
    for &i in &order {
        let task = &trace.tasks[i];
        let job = JobSpec::single(task.name.clone(), task.request.clone());
        arrived += task.request.gpu.total_milli();
        if placer.place_job(&job).is_ok() {
            placed += 1;
        }
        samples.push(Sample {
            arrived_milli: arrived,
            used_milli: placer.cluster().gpu_used_milli(),
        });
    }
    Ok(RunResult {
        trace: trace.name.clone(),
        policy,
        seed,
        tasks: order.len(),
        placed,
        capacity_milli: capacity,
        curve: bin(&samples, capacity),
        samples,
    })
}

/// The typical task shapes of a trace (FGD's rule, from the original, untuned task list).
pub fn typical_shapes(trace: &Trace) -> ShapeDistribution {
    ShapeDistribution::typical(trace.tasks.iter().map(|t| &t.request), TYPICAL_COVERAGE)
}
