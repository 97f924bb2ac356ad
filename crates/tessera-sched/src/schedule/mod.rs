//! The scheduler as one pure function: `schedule(&Snapshot, &Config) -> Plan`.
//!
//! No I/O, no clock; randomness only from `Config::seed`. The controller builds a snapshot from
//! its store, applies the plan, and the simulator replays traces through the same engine.
//!
//! Stages, least disruptive first:
//! 1. order pending jobs by fair share between projects ([`crate::quota`]), then priority and age
//!    inside a project;
//! 2. refuse jobs that would break a hard limit;
//! 3. place whole gangs ([`crate::place`]);
//! 4. only when a gang fits nowhere: take back replicas that elastic jobs run above their
//!    minimum (lent idle capacity); else look for running work to preempt: jobs of projects above
//!    their guarantee (when the waiting job's project is within its own), and lower-priority jobs
//!    of the same project; lowest priority and newest first, and never more than needed; else
//!    move small jobs to gather scattered free capacity (consolidation);
//! 5. last, grow elastic jobs into what is still idle.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use serde::Serialize;

use crate::cluster::{Allocation, CapacityError, Cluster, DeviceShare, NodeId};
use crate::model::NodeSpec;
use crate::place::{FilterReport, PlacementError, Placer, Usable};
use crate::policy::PolicyKind;
use crate::quota::{LimitHit, ProjectQuota, Quotas};
use crate::request::{GpuRequest, JobSpec, ResourceRequest};
use crate::shapes::ShapeDistribution;
use crate::validate::ValidationError;

/// A job waiting to be placed; `id` orders jobs of equal priority (lower first).
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub id: u64,
    pub spec: JobSpec,
}

/// A job that holds resources now.
#[derive(Debug, Clone, Hash)]
pub struct RunningJob {
    pub id: u64,
    pub project: String,
    pub priority: i32,
    /// Order in which jobs started; larger is newer.
    pub started: u64,
    /// Milli-GPU it counts against its project's quota.
    pub gpu_milli: u64,
    /// Its replicas' allocations on nodes of this snapshot (a node left out, e.g. cordoned, keeps
    /// its work out of placement but not out of the quota).
    pub allocations: Vec<Allocation>,
    /// Already told to stop (e.g. preempted earlier): its resources are as good as free.
    pub stopping: bool,
    pub preemptible: bool,
    /// What each of its replicas asked for; `None` when unknown (the job is then never moved to
    /// consolidate free capacity, only preempted).
    pub request: Option<ResourceRequest>,
    /// Set for an elastic job (`replicas: {min, max}`).
    pub elastic: Option<ElasticRunning>,
}

/// What an elastic job may do now: grow into idle capacity, and give back its replicas above
/// its minimum when a waiting job needs the room.
#[derive(Debug, Clone, Default, Hash)]
pub struct ElasticRunning {
    /// Replicas it may add now (its maximum less what it runs; 0 while it must not grow).
    pub may_grow: u32,
    /// Its replicas above its minimum, oldest first: (replica index, allocation). The newest go
    /// first when room is needed.
    pub extra: Vec<(u32, Allocation)>,
    /// Its replicas already told to stop and not stopped yet: their room is as good as free, and
    /// counted before any other replica is asked to go.
    pub leaving: Vec<(u32, Allocation)>,
}

/// The pool as the controller sees it at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeSpec>,
    pub running: Vec<RunningJob>,
    pub pending: Vec<PendingJob>,
    pub projects: Vec<ProjectQuota>,
    /// Each project's placement rules (residency; what its jobs may request).
    pub rules: BTreeMap<String, crate::rules::PlacementRules>,
    /// Each project's past use: average milli-GPU, decayed with the pool's half-life.
    pub history: BTreeMap<String, u64>,
    /// Nodes that already hold a pending job's container image, by job id: preferred among
    /// nodes that score the same (a tie-break only: packing still decides).
    pub warm: BTreeMap<u64, Vec<NodeId>>,
}

/// How to schedule.
#[derive(Debug, Clone)]
pub struct Config {
    pub policy: PolicyKind,
    pub seed: u64,
    /// The pool's task-shape history, for fragmentation-aware policies.
    pub shapes: ShapeDistribution,
}

mod consolidate;
mod grow;
mod holds;
mod kept;
mod order;
mod reasons;
mod reclaim;
mod release;
mod shrink;

use grow::grow_elastic;
use holds::{fits, hold_for_reclaimer};
pub use kept::Kept;
use order::next_project;
use reasons::no_fit;
pub use reasons::{FreeBlock, WaitReason};
use release::{Turn, allocations_of, fewest_to_release};

/// A running job to stop so that another can start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preemption {
    pub job: u64,
    /// The job that needs the room.
    pub for_job: u64,
    pub reason: PreemptReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptReason {
    /// The victim's project is above its guarantee and the other project is within its own.
    QuotaReclaim,
    /// A higher-priority job of the same project needs the room.
    Priority,
}

/// What the controller should do.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Jobs placed, each with one allocation per replica.
    pub placements: Vec<(u64, Vec<Allocation>)>,
    /// Why each job not placed waits. Jobs of one shape share one reason: with thousands
    /// waiting, a copy each cost more than the round.
    pub waiting: Vec<(u64, Arc<WaitReason>)>,
    pub preemptions: Vec<Preemption>,
    /// Running jobs to move (stop, then start on `to`) so that `for_job` fits.
    pub moves: Vec<Move>,
    /// Replicas to add to running elastic jobs, in idle capacity.
    pub grows: Vec<Grow>,
    /// Replicas above their minimum that elastic jobs give back so that `for_job` fits.
    pub shrinks: Vec<Shrink>,
}

/// New replicas for a running elastic job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grow {
    pub job: u64,
    pub allocations: Vec<Allocation>,
}

/// Replicas of a running elastic job to stop (checkpointed where it checkpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shrink {
    pub job: u64,
    pub replicas: Vec<u32>,
    pub for_job: u64,
}

/// A running job to move to another node, for consolidation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    pub job: u64,
    pub to: NodeId,
    pub for_job: u64,
}

/// A snapshot that contradicts itself (e.g. running work beyond a node's capacity).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid node: {0}")]
    Node(#[from] ValidationError),
    #[error("running allocation does not fit: {0}")]
    Running(#[from] CapacityError),
}

/// Places pending jobs in fair-share and priority order, each gang whole or not at all, and
/// preempts running work only where quotas or priorities call for it.
pub fn schedule(snapshot: &Snapshot, config: &Config) -> Result<Plan, SnapshotError> {
    schedule_on(snapshot.nodes.clone(), snapshot, config)
}

/// [`schedule`] of a snapshot the caller gives up: its nodes become the round's cluster instead
/// of a copy of them (a large pool's nodes cost a copy per round).
pub fn schedule_owned(snapshot: Snapshot, config: &Config) -> Result<Plan, SnapshotError> {
    schedule_keeping(snapshot, config).map(|(plan, _)| plan)
}

/// [`schedule_owned`], and when the round changed nothing (every job waits), what it leaves for
/// a quick next round ([`Kept::schedule_new`]).
pub fn schedule_keeping(
    mut snapshot: Snapshot,
    config: &Config,
) -> Result<(Plan, Option<Kept>), SnapshotError> {
    let nodes = std::mem::take(&mut snapshot.nodes);
    let (plan, ended) = run_round(nodes, &snapshot, config)?;
    let quiet = plan.placements.is_empty()
        && plan.preemptions.is_empty()
        && plan.moves.is_empty()
        && plan.grows.is_empty()
        && plan.shrinks.is_empty();
    let kept = quiet.then(|| Kept::new(ended, &mut snapshot));
    Ok((plan, kept))
}

/// The round, on a cluster of `nodes` (the snapshot's nodes; the snapshot's own list is not
/// read again).
fn schedule_on(
    nodes: Vec<NodeSpec>,
    snapshot: &Snapshot,
    config: &Config,
) -> Result<Plan, SnapshotError> {
    run_round(nodes, snapshot, config).map(|(plan, _)| plan)
}

/// What a round ends with besides its plan.
struct Ended {
    placer: Placer,
    quotas: Quotas,
    no_room: NoRoom,
}

fn run_round(
    nodes: Vec<NodeSpec>,
    snapshot: &Snapshot,
    config: &Config,
) -> Result<(Plan, Ended), SnapshotError> {
    let cluster = Cluster::new(nodes)?;
    let policy = config.policy.build(&config.shapes, &cluster);
    let mut placer = Placer::new(cluster, policy, config.seed);
    let mut quotas = Quotas::new(&snapshot.projects).with_history(&snapshot.history);
    for job in &snapshot.running {
        for alloc in &job.allocations {
            placer.adopt(alloc)?;
        }
        quotas.charge(&job.project, job.gpu_milli);
    }
    let mut queues = project_queues(&snapshot.pending);
    let mut round = Round {
        snapshot,
        placer,
        quotas,
        plan: Plan::default(),
        taken: HashSet::new(),
        shrunk: HashSet::new(),
        requests: running_requests(snapshot),
    };
    let mut no_room = NoRoom::default();
    while let Some(job) = next_job(&mut queues, &round.quotas) {
        let step = take_step(
            &mut round.placer,
            &mut round.quotas,
            &no_room,
            &snapshot.rules,
            job,
            &snapshot.warm,
        );
        match step {
            Step::Waits(reason) => round.plan.waiting.push((job.id, reason)),
            Step::Placed(allocs) => round.plan.placements.push((job.id, allocs)),
            Step::NoFit {
                job: narrowed,
                milli,
                replica,
                replicas,
            } => {
                let job = &*narrowed;
                let spec = &job.spec;
                // Least disruptive first: lent replicas back, then preemption, then moves.
                let reason = if let Some(reason) = shrink::make_room(&mut round, job, milli) {
                    Arc::new(reason)
                } else if let Some(reason) = reclaim::make_room(&mut round, job, milli) {
                    Arc::new(reason)
                } else if let Some(reason) = consolidate::make_room(&mut round, job, milli) {
                    Arc::new(reason)
                } else {
                    let rules = snapshot.rules.get(&spec.project);
                    let reason =
                        Arc::new(no_fit(&mut round.placer, spec, rules, replica, replicas));
                    no_room.insert(spec, reason.clone());
                    reason
                };
                round.plan.waiting.push((job.id, reason));
            }
        }
    }
    round.plan.grows = grow_elastic(
        &mut round.placer,
        &mut round.quotas,
        snapshot,
        &round.requests,
        &round.taken,
        &round.shrunk,
    );
    let ended = Ended {
        placer: round.placer,
        quotas: round.quotas,
        no_room,
    };
    Ok((round.plan, ended))
}

/// The next job in fair-share order, taken off its project's queue.
fn next_job<'a>(
    queues: &mut BTreeMap<&'a str, VecDeque<&'a PendingJob>>,
    quotas: &Quotas,
) -> Option<&'a PendingJob> {
    let project = next_project(queues, quotas)?;
    let queue = queues.get_mut(project)?;
    let job = queue.pop_front();
    if queue.is_empty() {
        queues.remove(project);
    }
    job
}

/// How a job's turn went short of making room: it waits, it was placed (and charged), or it
/// fits nowhere as the pool stands.
enum Step<'j> {
    Waits(Arc<WaitReason>),
    Placed(Vec<Allocation>),
    NoFit {
        /// The job as its project's rules narrow it.
        job: std::borrow::Cow<'j, PendingJob>,
        /// Milli-GPU it counts against its project's quota.
        milli: u64,
        replica: u32,
        replicas: u32,
    },
}

/// A job's turn up to its placement: its project's rules, its validity, its project's limit, a
/// known answer for its shape, then a placement (charged to its project when made).
fn take_step<'j>(
    placer: &mut Placer,
    quotas: &mut Quotas,
    no_room: &NoRoom,
    rules: &BTreeMap<String, crate::rules::PlacementRules>,
    job: &'j PendingJob,
    warm: &BTreeMap<u64, Vec<NodeId>>,
) -> Step<'j> {
    let waits = |reason: WaitReason| Step::Waits(Arc::new(reason));
    // The project's rules narrow what the job may be given (e.g. only nodes in region=eu).
    let job = match rules.get(&job.spec.project).filter(|r| !r.is_empty()) {
        None => std::borrow::Cow::Borrowed(job),
        Some(rules) => match rules.narrow_job(&job.spec) {
            Ok(spec) => std::borrow::Cow::Owned(PendingJob { id: job.id, spec }),
            Err(breach) => return waits(WaitReason::Policy { why: breach.why }),
        },
    };
    let spec = &job.spec;
    let project = spec.project.as_str();
    let milli = spec.request.gpu.total_milli() * u64::from(spec.replicas);
    if let Err(err) = crate::validate::validate_job(spec) {
        return waits(WaitReason::Invalid(err));
    }
    if let Some(hit) = quotas.limit_hit(project, milli) {
        return waits(WaitReason::QuotaLimit {
            hit,
            requested_milli: milli,
        });
    }
    if let Some(reason) = no_room.get(spec) {
        return Step::Waits(reason);
    }
    let prefer = warm.get(&job.id).map_or(&[][..], Vec::as_slice);
    match placer.place_job_preferring(spec, prefer) {
        Ok(allocs) => {
            quotas.charge(project, milli);
            Step::Placed(allocs)
        }
        Err(PlacementError::Invalid(err)) => waits(WaitReason::Invalid(err)),
        Err(PlacementError::NoFit { replica, replicas }) => Step::NoFit {
            job,
            milli,
            replica,
            replicas,
        },
    }
}

/// Shapes (request, replicas, project, priority) that found no room this round: nothing is
/// released within a round, so the same shape cannot fit later either (preemption is tried once
/// per shape, by its first job). Looked up by a hash of the job's own fields, so a job of a known
/// shape costs no copy.
#[derive(Default)]
struct NoRoom {
    by_hash: HashMap<u64, Vec<(JobSpec, Arc<WaitReason>)>>,
}

impl NoRoom {
    fn hash(spec: &JobSpec) -> u64 {
        let mut h = DefaultHasher::new();
        (&spec.request, spec.replicas, &spec.project, spec.priority).hash(&mut h);
        h.finish()
    }

    fn same(a: &JobSpec, b: &JobSpec) -> bool {
        a.request == b.request
            && a.replicas == b.replicas
            && a.project == b.project
            && a.priority == b.priority
    }

    fn get(&self, spec: &JobSpec) -> Option<Arc<WaitReason>> {
        let known = self.by_hash.get(&Self::hash(spec))?;
        let (_, reason) = known.iter().find(|(s, _)| Self::same(s, spec))?;
        Some(reason.clone())
    }

    fn insert(&mut self, spec: &JobSpec, reason: Arc<WaitReason>) {
        self.by_hash
            .entry(Self::hash(spec))
            .or_default()
            .push((spec.clone(), reason));
    }
}

/// What one scheduling round carries from stage to stage.
struct Round<'a> {
    snapshot: &'a Snapshot,
    placer: Placer,
    quotas: Quotas,
    plan: Plan,
    /// Running jobs chosen this round to stop or move.
    taken: HashSet<u64>,
    /// Replicas of elastic jobs given back this round: (job, replica index).
    shrunk: HashSet<(u64, u32)>,
    /// What running jobs' replicas may ask for under their projects' rules (moves and growth).
    requests: Requests<'a>,
}

/// One queue per project, highest priority then oldest first.
fn project_queues(pending: &[PendingJob]) -> BTreeMap<&str, VecDeque<&PendingJob>> {
    let mut queues: BTreeMap<&str, VecDeque<&PendingJob>> = BTreeMap::new();
    for job in pending {
        queues.entry(&job.spec.project).or_default().push_back(job);
    }
    for queue in queues.values_mut() {
        queue
            .make_contiguous()
            .sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then(a.id.cmp(&b.id)));
    }
    queues
}

/// What running jobs' replicas may ask for under their projects' rules.
/// Running jobs' requests, by job, as their projects' rules narrow them: borrowed from the
/// snapshot where no rule narrows them (a round on a large pool copied every one).
type Requests<'a> = HashMap<u64, std::borrow::Cow<'a, ResourceRequest>>;

fn running_requests(snapshot: &Snapshot) -> Requests<'_> {
    snapshot
        .running
        .iter()
        .filter_map(|r| {
            let request = r.request.as_ref()?;
            let narrowed = match snapshot.rules.get(&r.project) {
                Some(rules) => std::borrow::Cow::Owned(rules.narrow(request).ok()?),
                None => std::borrow::Cow::Borrowed(request),
            };
            Some((r.id, narrowed))
        })
        .collect()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod quota_tests;
