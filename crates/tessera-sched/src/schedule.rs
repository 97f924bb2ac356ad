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
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone, Default)]
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

/// The largest free capacity on one node, for telling a user what is there instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FreeBlock {
    pub node: String,
    pub whole_devices: u32,
    pub largest_share_milli: u32,
}

/// Why a job stays pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WaitReason {
    Invalid(ValidationError),
    NoFit {
        replica: u32,
        replicas: u32,
        /// Why replica `replica` fits nowhere, with the replicas before it in place.
        report: FilterReport,
        /// What the request could use in the pool as it is (before any of its replicas).
        free_for_it: Usable,
        largest_free: Option<FreeBlock>,
        /// The node labels its project's residency allows (`key=value`), when it has any: they
        /// narrow where the job may fit.
        residency: Vec<String>,
    },
    QuotaLimit {
        hit: LimitHit,
        requested_milli: u64,
    },
    /// Jobs were preempted (or are stopping) to make room; the job is placed once they stop.
    Reclaiming {
        victims: Vec<u64>,
    },
    /// Free capacity was enough but scattered: these jobs are being moved to gather it.
    Consolidating {
        moved: Vec<u64>,
    },
    /// The job's project does not allow what it asks for (its placement rules).
    Policy {
        why: String,
    },
    /// Elastic jobs are giving back replicas above their minimum: (job, replicas).
    Shrinking {
        from: Vec<(u64, u32)>,
    },
}

impl WaitReason {
    /// The reason in words a user can act on.
    pub fn describe(&self, job: &JobSpec) -> String {
        match self {
            WaitReason::Invalid(err) => format!("the job is invalid: {err}"),
            WaitReason::NoFit {
                replica,
                replicas,
                report,
                free_for_it,
                largest_free,
                residency,
            } => {
                let mut text = format!("needs {}", describe_needs(job));
                if *replicas > 1 {
                    text.push_str(&format!(
                        "; only {replica} of its {replicas} replicas fit at once, and a gang \
                         starts whole or not at all"
                    ));
                    if job.request.gpu != GpuRequest::None {
                        text.push_str(&format!(
                            "; the pool has {} GPU free for it, on {} with {} CPU free there",
                            gpus(free_for_it.milli),
                            plural(free_for_it.nodes, "node"),
                            gpus(free_for_it.cpu_milli)
                        ));
                    }
                }
                if let Some(binding) = report.binding_text(&job.request) {
                    if *replica > 0 {
                        text.push_str(&format!(
                            "; with {} in place, ",
                            plural(*replica, "replica")
                        ));
                    } else {
                        text.push_str("; ");
                    }
                    text.push_str(&binding);
                }
                text.push_str(&format!("; {report}"));
                if job.request.gpu != GpuRequest::None {
                    match largest_free {
                        Some(b) if b.whole_devices > 0 => text.push_str(&format!(
                            "; the largest free block is {} whole GPU{} on {}",
                            b.whole_devices,
                            if b.whole_devices == 1 { "" } else { "s" },
                            b.node
                        )),
                        Some(b) if b.largest_share_milli > 0 => text.push_str(&format!(
                            "; the largest free share is {} GPU on {}",
                            gpus(u64::from(b.largest_share_milli)),
                            b.node
                        )),
                        _ => text.push_str("; no GPU is free anywhere"),
                    }
                }
                if !residency.is_empty() {
                    text.push_str(&format!(
                        " (project {}'s policy: only nodes labelled {})",
                        job.project,
                        residency.join(",")
                    ));
                }
                text
            }
            WaitReason::QuotaLimit {
                hit,
                requested_milli,
            } => format!(
                "needs {} GPU in all; project {} is at {} of its limit of {} GPU",
                gpus(*requested_milli),
                hit.project,
                gpus(hit.used_milli),
                gpus(hit.limit_milli)
            ),
            WaitReason::Consolidating { moved } => format!(
                "free capacity is scattered; moving job{} {} to gather it for this one",
                if moved.len() == 1 { "" } else { "s" },
                moved
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            WaitReason::Policy { why } => {
                format!("its project's policy does not allow it: it {why}")
            }
            WaitReason::Shrinking { from } => {
                let mut per_job: BTreeMap<u64, u32> = BTreeMap::new();
                for (job, _) in from {
                    *per_job.entry(*job).or_default() += 1;
                }
                format!(
                    "waiting for elastic job{} to give back replicas above their minimum: {}",
                    if per_job.len() == 1 { "" } else { "s" },
                    per_job
                        .iter()
                        .map(|(job, n)| format!("{n} of job {job}",))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            WaitReason::Reclaiming { victims } => format!(
                "waiting for {} job{} ({}) to stop and give back capacity for it",
                victims.len(),
                if victims.len() == 1 { "" } else { "s" },
                victims
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

fn plural(n: u32, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn gpus(milli: u64) -> String {
    let whole = milli / 1000;
    let frac = milli % 1000;
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{}", milli as f64 / 1000.0)
    }
}

/// "2 whole GPUs of model H100 on one node", "4 replicas of 0.5 GPU each", ...
fn describe_needs(job: &JobSpec) -> String {
    let r = &job.request;
    let mut each = match r.gpu {
        GpuRequest::None => "no GPU".to_string(),
        GpuRequest::Share { milli } => format!("{} of a GPU", gpus(u64::from(milli))),
        GpuRequest::Whole { devices: 1 } => "1 whole GPU".to_string(),
        GpuRequest::Whole { devices } => format!("{devices} whole GPUs"),
    };
    if !r.device_models.is_empty() {
        each.push_str(&format!(" of model {}", r.device_models.join(" or ")));
    }
    if matches!(r.gpu, GpuRequest::Whole { devices } if devices > 1) {
        each.push_str(" on one node");
    }
    each.push_str(&format!(
        ", {} CPU and {} memory",
        gpus(r.cpu_milli),
        crate::model::human_bytes(r.memory_bytes)
    ));
    if !r.node_selector.is_empty() {
        let labels: Vec<String> = r
            .node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        each.push_str(&format!(" on nodes labelled {}", labels.join(",")));
    }
    if job.replicas > 1 {
        format!("{} replicas, each {each}", job.replicas)
    } else {
        each
    }
}

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
    pub waiting: Vec<(u64, WaitReason)>,
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
    let cluster = Cluster::new(snapshot.nodes.clone())?;
    let policy = config.policy.build(&config.shapes, &cluster);
    let mut placer = Placer::new(cluster, policy, config.seed);
    let mut quotas = Quotas::new(&snapshot.projects).with_history(&snapshot.history);
    for job in &snapshot.running {
        for alloc in &job.allocations {
            placer.adopt(alloc)?;
        }
        quotas.charge(&job.project, job.gpu_milli);
    }

    // One queue per project, highest priority then oldest first.
    let mut queues: BTreeMap<&str, VecDeque<&PendingJob>> = BTreeMap::new();
    for job in &snapshot.pending {
        queues.entry(&job.spec.project).or_default().push_back(job);
    }
    for queue in queues.values_mut() {
        queue
            .make_contiguous()
            .sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then(a.id.cmp(&b.id)));
    }

    // What running jobs' replicas may ask for under their projects' rules (for moves and growth).
    let requests: HashMap<u64, ResourceRequest> = snapshot
        .running
        .iter()
        .filter_map(|r| {
            let request = r.request.as_ref()?;
            let narrowed = match snapshot.rules.get(&r.project) {
                Some(rules) => rules.narrow(request).ok()?,
                None => request.clone(),
            };
            Some((r.id, narrowed))
        })
        .collect();
    let mut plan = Plan::default();
    let mut victims_taken: HashSet<u64> = HashSet::new();
    // Replicas of elastic jobs given back this round: (job, replica index).
    let mut shrunk: HashSet<(u64, u32)> = HashSet::new();
    // Shapes that found no room this round: nothing is released within a round, so the same
    // shape cannot fit later either (preemption is tried once per shape, by its first job).
    let mut no_room: HashMap<(ResourceRequest, u32, String, i32), WaitReason> = HashMap::new();
    while let Some(project) = next_project(&queues, &quotas) {
        let Some(job) = queues.get_mut(project).and_then(|q| q.pop_front()) else {
            break;
        };
        if queues.get(project).is_some_and(|q| q.is_empty()) {
            queues.remove(project);
        }
        // The project's rules narrow what the job may be given (e.g. only nodes in region=eu).
        let narrowed;
        let job: &PendingJob = match snapshot.rules.get(project).filter(|r| !r.is_empty()) {
            None => job,
            Some(rules) => match rules.narrow_job(&job.spec) {
                Ok(spec) => {
                    narrowed = PendingJob { id: job.id, spec };
                    &narrowed
                }
                Err(breach) => {
                    let why = breach.why;
                    plan.waiting.push((job.id, WaitReason::Policy { why }));
                    continue;
                }
            },
        };
        let spec = &job.spec;
        let milli = spec.request.gpu.total_milli() * u64::from(spec.replicas);
        if let Err(err) = crate::validate::validate_job(spec) {
            plan.waiting.push((job.id, WaitReason::Invalid(err)));
            continue;
        }
        if let Some(hit) = quotas.limit_hit(project, milli) {
            plan.waiting.push((
                job.id,
                WaitReason::QuotaLimit {
                    hit,
                    requested_milli: milli,
                },
            ));
            continue;
        }
        let shape = (
            spec.request.clone(),
            spec.replicas,
            spec.project.clone(),
            spec.priority,
        );
        if let Some(reason) = no_room.get(&shape) {
            plan.waiting.push((job.id, reason.clone()));
            continue;
        }
        let warm = snapshot.warm.get(&job.id).map_or(&[][..], Vec::as_slice);
        match placer.place_job_preferring(spec, warm) {
            Ok(allocs) => {
                quotas.charge(project, milli);
                plan.placements.push((job.id, allocs));
            }
            Err(PlacementError::Invalid(err)) => {
                plan.waiting.push((job.id, WaitReason::Invalid(err)));
            }
            Err(PlacementError::NoFit { replica, replicas }) => {
                if let Some(chosen) =
                    shrink_elastic(&mut placer, snapshot, job, &victims_taken, &shrunk)
                {
                    let leaving: Vec<&Allocation> = chosen.iter().map(|(_, _, a)| *a).collect();
                    hold_for_reclaimer(&mut placer, spec, &leaving);
                    quotas.charge(project, milli);
                    let mut per_job: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
                    for (owner, index, alloc) in &chosen {
                        shrunk.insert((owner.id, *index));
                        quotas.uncharge(&owner.project, alloc.gpu_milli());
                        let leaving = owner
                            .elastic
                            .as_ref()
                            .is_some_and(|e| e.leaving.iter().any(|(i, _)| i == index));
                        if !leaving {
                            per_job.entry(owner.id).or_default().push(*index);
                        }
                    }
                    plan.shrinks
                        .extend(per_job.into_iter().map(|(owner, mut replicas)| {
                            replicas.sort_unstable();
                            Shrink {
                                job: owner,
                                replicas,
                                for_job: job.id,
                            }
                        }));
                    let from = chosen.iter().map(|(o, i, _)| (o.id, *i)).collect();
                    plan.waiting.push((job.id, WaitReason::Shrinking { from }));
                    continue;
                }
                let within = quotas.within_guarantee(project, milli);
                match reclaim(
                    &mut placer,
                    &mut quotas,
                    snapshot,
                    job,
                    within,
                    &victims_taken,
                ) {
                    Some(chosen) => {
                        let leaving: Vec<&RunningJob> = chosen.iter().map(|(v, _)| *v).collect();
                        hold_for_reclaimer(&mut placer, spec, &allocations_of(&leaving));
                        quotas.charge(project, milli);
                        let mut victims = Vec::new();
                        for (victim, reason) in chosen {
                            victims.push(victim.id);
                            if !victim.stopping {
                                plan.preemptions.push(Preemption {
                                    job: victim.id,
                                    for_job: job.id,
                                    reason,
                                });
                            }
                            victims_taken.insert(victim.id);
                        }
                        plan.waiting
                            .push((job.id, WaitReason::Reclaiming { victims }));
                    }
                    None => {
                        match consolidate(&mut placer, snapshot, &requests, job, &victims_taken) {
                            Some(moves) => {
                                let mut moved = Vec::new();
                                for (m, to) in moves {
                                    moved.push(m.id);
                                    victims_taken.insert(m.id);
                                    plan.moves.push(Move {
                                        job: m.id,
                                        to,
                                        for_job: job.id,
                                    });
                                }
                                quotas.charge(project, milli);
                                plan.waiting
                                    .push((job.id, WaitReason::Consolidating { moved }));
                            }
                            None => {
                                let rules = snapshot.rules.get(project);
                                let reason = no_fit(&mut placer, spec, rules, replica, replicas);
                                no_room.insert(shape, reason.clone());
                                plan.waiting.push((job.id, reason));
                            }
                        }
                    }
                }
            }
        }
    }
    plan.grows = grow_elastic(
        &mut placer,
        &mut quotas,
        snapshot,
        &requests,
        &victims_taken,
        &shrunk,
    );
    Ok(plan)
}

/// Most replicas added to elastic jobs in one round (a large pool grows over a few rounds).
const MAX_GROWS_PER_ROUND: usize = 256;

/// Grows running elastic jobs into the capacity nothing waiting could use (this runs after every
/// waiting job had its turn): one replica at a time to each job in turn, higher priority first,
/// then the job with fewest replicas, within its project's hard limit.
fn grow_elastic(
    placer: &mut Placer,
    quotas: &mut Quotas,
    snapshot: &Snapshot,
    requests: &HashMap<u64, ResourceRequest>,
    taken: &HashSet<u64>,
    shrunk: &HashSet<(u64, u32)>,
) -> Vec<Grow> {
    let mut growers: Vec<(&RunningJob, &ResourceRequest, u32)> = snapshot
        .running
        .iter()
        .filter(|r| !r.stopping && !taken.contains(&r.id))
        // A job giving back replicas this round does not take others at once.
        .filter(|r| !shrunk.iter().any(|(job, _)| *job == r.id))
        .filter_map(|r| {
            let e = r.elastic.as_ref()?;
            let request = requests.get(&r.id)?;
            // Never past the project's most GPU per job.
            let room = match snapshot
                .rules
                .get(&r.project)
                .and_then(|x| x.max_job_gpu_milli)
            {
                Some(max) if request.gpu.total_milli() > 0 => {
                    let per = request.gpu.total_milli();
                    let now = per * r.allocations.len() as u64;
                    (max.saturating_sub(now) / per).min(u64::from(e.may_grow)) as u32
                }
                _ => e.may_grow,
            };
            (room > 0).then_some((r, request, room))
        })
        .collect();
    growers.sort_by_key(|(r, _, _)| (std::cmp::Reverse(r.priority), r.allocations.len(), r.id));
    let mut grown: BTreeMap<u64, Vec<Allocation>> = BTreeMap::new();
    let mut total = 0;
    loop {
        let mut progress = false;
        for (r, request, left) in &mut growers {
            if *left == 0 || total >= MAX_GROWS_PER_ROUND {
                continue;
            }
            let milli = request.gpu.total_milli();
            if quotas.limit_hit(&r.project, milli).is_some() {
                *left = 0;
                continue;
            }
            match placer.place_replica(request) {
                Some(alloc) => {
                    quotas.charge(&r.project, milli);
                    grown.entry(r.id).or_default().push(alloc);
                    *left -= 1;
                    total += 1;
                    progress = true;
                }
                None => *left = 0,
            }
        }
        if !progress {
            break;
        }
    }
    grown
        .into_iter()
        .map(|(job, allocations)| Grow { job, allocations })
        .collect()
}

/// Finds the fewest replicas above their minimum that elastic jobs can give back so that `job`
/// fits: lowest priority first, each job's newest replica first. They were lent idle capacity, so
/// any waiting job may take it back. Leaves the pool as it was.
fn shrink_elastic<'a>(
    placer: &mut Placer,
    snapshot: &'a Snapshot,
    job: &PendingJob,
    taken: &HashSet<u64>,
    shrunk: &HashSet<(u64, u32)>,
) -> Option<Vec<(&'a RunningJob, u32, &'a Allocation)>> {
    // (already leaving, priority, how many newer replicas of its job come first, job, replica)
    type Candidate<'b> = (bool, i32, usize, &'b RunningJob, u32, &'b Allocation);
    let mut candidates: Vec<Candidate<'a>> = snapshot
        .running
        .iter()
        .filter(|r| !r.stopping && !taken.contains(&r.id) && r.id != job.id)
        .filter_map(|r| Some((r, r.elastic.as_ref()?)))
        .flat_map(|(r, e)| {
            let leaving = e
                .leaving
                .iter()
                .map(move |(index, alloc)| (true, r.priority, 0, r, *index, alloc));
            let extra = e
                .extra
                .iter()
                .rev()
                .filter(|(index, _)| !shrunk.contains(&(r.id, *index)))
                .enumerate()
                .map(move |(newest, (index, alloc))| (false, r.priority, newest, r, *index, alloc));
            leaving.chain(extra)
        })
        .filter(|(leaving, _, _, r, index, _)| !leaving || !shrunk.contains(&(r.id, *index)))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    // Replicas already leaving first; then spread over jobs: every job's newest first, then
    // their second newest, ...
    candidates.sort_by_key(|(leaving, priority, newest, r, index, _)| {
        (!*leaving, *priority, *newest, r.id, *index)
    });
    let chosen = fewest_to_release(
        placer,
        &job.spec,
        candidates
            .into_iter()
            .map(|(_, _, _, r, index, alloc)| (r, index, alloc)),
        |(_, _, alloc)| std::slice::from_ref(*alloc),
        |_, _| true,
    )?;
    // They run until they stop: the pool keeps them this round, and the caller holds the room.
    Some(chosen)
}

/// The project whose head job goes next: lowest fair-share key, then priority, then age.
fn next_project<'a>(
    queues: &BTreeMap<&'a str, VecDeque<&PendingJob>>,
    quotas: &Quotas,
) -> Option<&'a str> {
    queues
        .iter()
        .filter_map(|(name, q)| q.front().map(|head| (*name, head)))
        .min_by_key(|(name, head)| {
            (
                quotas.share_key(name),
                std::cmp::Reverse(head.spec.priority),
                head.id,
            )
        })
        .map(|(name, _)| name)
}

fn no_fit(
    placer: &mut Placer,
    spec: &JobSpec,
    rules: Option<&crate::rules::PlacementRules>,
    replica: u32,
    replicas: u32,
) -> WaitReason {
    let free_for_it = placer.explain(&spec.request).usable;
    let report = placer.explain_gang(&spec.request, replica);
    let largest_free = placer
        .cluster()
        .nodes()
        .iter()
        .filter(|n| !n.devices.is_empty())
        .max_by_key(|n| {
            (
                n.whole_free(),
                n.max_device_free(),
                std::cmp::Reverse(n.id.0),
            )
        })
        .map(|n| FreeBlock {
            node: n.spec.name.clone(),
            whole_devices: n.whole_free(),
            largest_share_milli: n.max_device_free(),
        });
    WaitReason::NoFit {
        replica,
        replicas,
        report,
        free_for_it,
        largest_free,
        residency: rules
            .into_iter()
            .flat_map(|r| &r.node_selector)
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
    }
}

/// Whether `spec` fits now, leaving the pool as it was.
fn fits(placer: &mut Placer, spec: &JobSpec) -> bool {
    let checkpoint = placer.checkpoint();
    let placed = placer.place_job(spec).is_ok();
    placer.rollback(checkpoint);
    placed
}

/// Holds, for the rest of this round, the free capacity that `spec` will use once the `leaving`
/// allocations (of victims, moved jobs or shrinking replicas) are given back. Without it, a victim
/// that stopped first (and is pending again) lands back on the GPU it just freed, and the reclaim
/// starts over: a preemption loop. Only the part of the future placement that is free now is
/// held; the leaving part is theirs until they stop.
fn hold_for_reclaimer(placer: &mut Placer, spec: &JobSpec, leaving: &[&Allocation]) {
    // Where it will go once they have left: a trial, undone whole.
    let checkpoint = placer.checkpoint();
    for alloc in leaving {
        let undone = placer.release(alloc);
        debug_assert!(undone.is_ok(), "{undone:?}");
    }
    let future = placer.place_job(spec).unwrap_or_default();
    placer.rollback(checkpoint);
    for alloc in &future {
        let theirs: Vec<&Allocation> = leaving
            .iter()
            .copied()
            .filter(|a| a.node == alloc.node)
            .collect();
        let on_device = |device: u32| -> (u32, u64) {
            theirs
                .iter()
                .flat_map(|a| &a.devices)
                .filter(|d| d.device == device)
                .fold((0, 0), |(m, b), d| (m + d.milli, b + d.memory_bytes))
        };
        let hold = Allocation {
            node: alloc.node,
            cpu_milli: alloc
                .cpu_milli
                .saturating_sub(theirs.iter().map(|a| a.cpu_milli).sum()),
            memory_bytes: alloc
                .memory_bytes
                .saturating_sub(theirs.iter().map(|a| a.memory_bytes).sum()),
            devices: alloc
                .devices
                .iter()
                .filter_map(|d| {
                    let (milli, bytes) = on_device(d.device);
                    let share = DeviceShare {
                        device: d.device,
                        milli: d.milli.saturating_sub(milli),
                        memory_bytes: d.memory_bytes.saturating_sub(bytes),
                    };
                    (share.milli > 0 || share.memory_bytes > 0).then_some(share)
                })
                .collect(),
            affinity: None,
        };
        if hold.cpu_milli > 0 || hold.memory_bytes > 0 || !hold.devices.is_empty() {
            // It fits: `spec` fitted in this free capacity plus the leaving allocations.
            let held = placer.adopt(&hold);
            debug_assert!(held.is_ok(), "{held:?}");
        }
    }
}

/// All the allocations of these jobs, for [`hold_for_reclaimer`].
/// A turn of [`fewest_to_release`] for the caller's own accounting (e.g. quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// May this candidate be released? (`false` passes over it.) Asked in order, with the ones
    /// before it released.
    Take,
    /// The job fits without this candidate: may it be given back? (`false` keeps it chosen.)
    MayReturn,
    /// This candidate was given back (or, when nothing was enough, restored).
    Returned,
}

/// The fewest `candidates`, taken in order, whose release lets `spec` fit, shared by shrinking
/// elastic jobs, reclaim and consolidation: releases them one by one until `spec` fits, then gives
/// back, last taken first, every one it can do without. Returns them in the order taken, or `None`
/// when even all of them are not enough; either way the pool is left as it was.
fn fewest_to_release<'a, T: Copy>(
    placer: &mut Placer,
    spec: &JobSpec,
    candidates: impl IntoIterator<Item = T>,
    allocations: impl Fn(&T) -> &'a [Allocation],
    mut turn: impl FnMut(Turn, T) -> bool,
) -> Option<Vec<T>> {
    let release = |placer: &mut Placer, c: &T| {
        for alloc in allocations(c) {
            let undone = placer.release(alloc);
            debug_assert!(undone.is_ok(), "{undone:?}");
        }
    };
    let adopt = |placer: &mut Placer, c: &T| {
        for alloc in allocations(c) {
            let redone = placer.adopt(alloc);
            debug_assert!(redone.is_ok(), "{redone:?}");
        }
    };
    let mut taken: Vec<T> = Vec::new();
    let mut found = false;
    for c in candidates {
        if !turn(Turn::Take, c) {
            continue;
        }
        release(placer, &c);
        taken.push(c);
        if fits(placer, spec) {
            found = true;
            break;
        }
    }
    if !found {
        for c in taken.iter().rev() {
            adopt(placer, c);
            turn(Turn::Returned, *c);
        }
        return None;
    }
    // Never more than needed: give back, last taken first, every one the job can do without.
    let mut needed = Vec::new();
    for c in taken.into_iter().rev() {
        adopt(placer, &c);
        if fits(placer, spec) && turn(Turn::MayReturn, c) {
            turn(Turn::Returned, c);
            continue;
        }
        release(placer, &c);
        needed.push(c);
    }
    for c in &needed {
        adopt(placer, c);
    }
    needed.reverse();
    Some(needed)
}

fn allocations_of<'a>(jobs: &[&'a RunningJob]) -> Vec<&'a Allocation> {
    jobs.iter().flat_map(|j| &j.allocations).collect()
}

/// Most nodes one consolidation attempt tries to clear.
const MAX_CONSOLIDATION_NODES: usize = 16;

/// Most starting nodes tried: each try clears nodes from its start onwards.
const MAX_CONSOLIDATION_STARTS: usize = 4;

/// Gathers scattered free capacity for `job` (one replica or a whole gang): moves small running
/// jobs off some nodes onto others. Planned in memory and kept only when the job and every moved
/// job fit (all or nothing, KAI's transactional style); the pool is left holding the capacity the
/// job and the moved jobs will take, as for a reclaim. Candidates are preemptible one-replica jobs
/// of no higher priority, smallest first; never more of them move than the job needs.
fn consolidate<'a>(
    placer: &mut Placer,
    snapshot: &'a Snapshot,
    requests: &HashMap<u64, ResourceRequest>,
    job: &PendingJob,
    taken: &HashSet<u64>,
) -> Option<Vec<(&'a RunningJob, NodeId)>> {
    let movable: Vec<&RunningJob> = snapshot
        .running
        .iter()
        .filter(|r| {
            r.preemptible
                && !r.stopping
                && requests.contains_key(&r.id)
                && r.allocations.len() == 1
                && r.priority <= job.spec.priority
                && !taken.contains(&r.id)
        })
        .collect();
    // Only nodes where the free GPU share plus what could move away covers one replica, most
    // promising first, and a bounded number of them: a round on a large pool stays cheap.
    let need = job.spec.request.gpu.total_milli();
    let mut room: HashMap<NodeId, u64> = HashMap::new();
    for r in &movable {
        *room.entry(r.allocations[0].node).or_insert_with(|| {
            placer
                .cluster()
                .node(r.allocations[0].node)
                .milli_free_total()
        }) += r.allocations[0].gpu_milli();
    }
    let mut nodes: Vec<(u64, NodeId)> = room
        .into_iter()
        .filter(|(_, milli)| *milli >= need)
        .map(|(n, milli)| (milli, n))
        .collect();
    nodes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let nodes: Vec<NodeId> = nodes
        .into_iter()
        .take(MAX_CONSOLIDATION_NODES)
        .map(|(_, n)| n)
        .collect();
    (0..nodes.len().min(MAX_CONSOLIDATION_STARTS))
        .find_map(|start| try_consolidation(placer, &movable, requests, &nodes[start..], &job.spec))
}

/// One consolidation trial: takes jobs off `nodes` in order, smallest first, until `spec` fits;
/// puts back every one it can do without; then places `spec` and the moved jobs elsewhere. On
/// success the pool holds what `spec` and the moved jobs will take; otherwise it is unchanged.
fn try_consolidation<'a>(
    placer: &mut Placer,
    movable: &[&'a RunningJob],
    requests: &HashMap<u64, ResourceRequest>,
    nodes: &[NodeId],
    spec: &JobSpec,
) -> Option<Vec<(&'a RunningJob, NodeId)>> {
    // Candidates node by node, smallest first on each.
    let mut candidates: Vec<&RunningJob> = Vec::new();
    for &node in nodes {
        let mut on_node: Vec<&RunningJob> = movable
            .iter()
            .copied()
            .filter(|r| r.allocations[0].node == node)
            .collect();
        on_node.sort_by_key(|r| (r.gpu_milli, r.id));
        candidates.extend(on_node);
    }
    let mut moving = fewest_to_release(
        placer,
        spec,
        candidates,
        |r| r.allocations.as_slice(),
        |_, _| true,
    )?;
    // The last taken is placed elsewhere first.
    moving.reverse();
    // The trial: the job and every moved job placed with the moved ones gone, then undone whole.
    let checkpoint = placer.checkpoint();
    for r in &moving {
        let undone = placer.release(&r.allocations[0]);
        debug_assert!(undone.is_ok(), "{undone:?}");
    }
    let placed = placer.place_job(spec).unwrap_or_default();
    let mut moves: Vec<(&RunningJob, Allocation)> = Vec::new();
    let mut ok = !placed.is_empty();
    if ok {
        for r in &moving {
            match placer.place_replica(&requests[&r.id]) {
                // Moving onto the node it is on gains nothing.
                Some(a) if a.node != r.allocations[0].node => moves.push((r, a)),
                _ => {
                    ok = false;
                    break;
                }
            }
        }
    }
    // Whatever it found, the running jobs keep their places this round.
    placer.rollback(checkpoint);
    if !ok {
        return None;
    }
    // Hold what the moved jobs will take, then what the job will.
    for (_, a) in &moves {
        let redone = placer.adopt(a);
        debug_assert!(redone.is_ok(), "{redone:?}");
    }
    hold_for_reclaimer(placer, spec, &allocations_of(&moving));
    Some(moves.into_iter().map(|(r, a)| (r, a.node)).collect())
}

/// Finds the fewest running jobs whose stopping lets `job` fit: stopping jobs first (they are
/// leaving anyway), then by lowest priority and newest start. Leaves the pool as it was.
fn reclaim<'a>(
    placer: &mut Placer,
    quotas: &mut Quotas,
    snapshot: &'a Snapshot,
    job: &PendingJob,
    within_guarantee: bool,
    taken: &HashSet<u64>,
) -> Option<Vec<(&'a RunningJob, PreemptReason)>> {
    let spec = &job.spec;
    let mut candidates: Vec<(&RunningJob, PreemptReason)> = snapshot
        .running
        .iter()
        .filter(|r| !taken.contains(&r.id) && !r.allocations.is_empty())
        .filter_map(|r| {
            if r.project == spec.project {
                (r.stopping || (r.preemptible && r.priority < spec.priority))
                    .then_some((r, PreemptReason::Priority))
            } else {
                (r.stopping || (within_guarantee && r.preemptible))
                    .then_some((r, PreemptReason::QuotaReclaim))
            }
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    candidates.sort_by(|(a, _), (b, _)| {
        b.stopping
            .cmp(&a.stopping)
            .then(a.priority.cmp(&b.priority))
            .then(b.started.cmp(&a.started))
            .then(b.id.cmp(&a.id))
    });

    let needed = fewest_to_release(
        placer,
        spec,
        candidates,
        |(victim, _)| victim.allocations.as_slice(),
        |turn, (victim, reason)| match turn {
            // Another project's work is reclaimable only down to that project's guarantee.
            Turn::Take => {
                let allowed = reason != PreemptReason::QuotaReclaim
                    || victim.stopping
                    || quotas.over_guarantee(&victim.project) >= victim.gpu_milli;
                if allowed {
                    quotas.uncharge(&victim.project, victim.gpu_milli);
                }
                allowed
            }
            // A job already stopping stays counted: it leaves anyway.
            Turn::MayReturn => !victim.stopping,
            Turn::Returned => {
                quotas.charge(&victim.project, victim.gpu_milli);
                true
            }
        },
    )?;
    // The victims still run until they stop; this round, the pool keeps them.
    for (victim, _) in &needed {
        quotas.charge(&victim.project, victim.gpu_milli);
    }
    Some(needed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{DeviceShare, NodeId};
    use crate::model::{DeviceSpec, GIB};
    use crate::request::{GpuRequest, ResourceRequest};

    pub(super) fn whole(name: &str, priority: i32, devices: u32, replicas: u32) -> JobSpec {
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

    fn run(
        id: u64,
        project: &str,
        priority: i32,
        started: u64,
        allocs: Vec<Allocation>,
    ) -> RunningJob {
        RunningJob {
            id,
            project: project.into(),
            priority,
            started,
            gpu_milli: allocs.iter().map(|a| a.gpu_milli()).sum(),
            allocations: allocs,
            stopping: false,
            preemptible: true,
            request: None,
            elastic: None,
        }
    }

    #[test]
    fn a_node_holding_the_jobs_image_wins_a_tie_but_never_a_better_packing() {
        let gpu = DeviceSpec {
            model: "H100".into(),
            memory_bytes: 80 * GIB,
        };
        let nodes: Vec<NodeSpec> = (0..3)
            .map(|i| NodeSpec::with_devices(format!("n{i}"), 32_000, 64 * GIB, 2, gpu.clone()))
            .collect();
        let job = |id| PendingJob {
            id,
            spec: whole("train", 50, 1, 1),
        };
        for policy in [PolicyKind::Tessera, PolicyKind::BestFit] {
            let config = Config {
                policy,
                seed: 1,
                shapes: ShapeDistribution::default(),
            };
            let placed_on = |snapshot: &Snapshot| plan_node(&schedule(snapshot, &config).unwrap());
            // Three empty, identical nodes: the first, unless another holds the image.
            let mut snapshot = Snapshot {
                nodes: nodes.clone(),
                pending: vec![job(1)],
                ..Default::default()
            };
            assert_eq!(placed_on(&snapshot), NodeId(0), "{policy:?}");
            snapshot.warm.insert(1, vec![NodeId(2)]);
            assert_eq!(placed_on(&snapshot), NodeId(2), "{policy:?}");
        }
        // Node 1 half full: best fit packs the job there, and an empty node that holds the
        // image does not change that.
        let config = Config {
            policy: PolicyKind::BestFit,
            seed: 1,
            shapes: ShapeDistribution::default(),
        };
        let busy = Allocation {
            node: NodeId(1),
            cpu_milli: 1000,
            memory_bytes: GIB,
            devices: vec![DeviceShare {
                device: 0,
                milli: 1000,
                memory_bytes: 80 * GIB,
            }],
            affinity: None,
        };
        let mut snapshot = Snapshot {
            nodes,
            pending: vec![job(1)],
            running: vec![run(9, "p", 50, 9, vec![busy])],
            ..Default::default()
        };
        assert_eq!(plan_node(&schedule(&snapshot, &config).unwrap()), NodeId(1));
        snapshot.warm.insert(1, vec![NodeId(2)]);
        assert_eq!(
            plan_node(&schedule(&snapshot, &config).unwrap()),
            NodeId(1),
            "the image does not outweigh packing"
        );
    }

    /// The node of the plan's only placement.
    fn plan_node(plan: &Plan) -> NodeId {
        assert_eq!(plan.placements.len(), 1, "{plan:?}");
        plan.placements[0].1[0].node
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
            running: vec![run(9, "p", 50, 9, vec![running])],
            projects: vec![],
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
            ..Default::default()
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
                ..
            } => {
                // The first replica found the last free device; the second had none left. The
                // report judges the second with the first in place: no node fits, GPU binds.
                assert_eq!((*replica, *replicas), (1, 2));
                assert_eq!((report.feasible, report.lacking_gpu), (0, 1));
                assert_eq!(
                    report.binding.map(|b| b.resource),
                    Some(crate::place::Lack::Gpu)
                );
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
            running: vec![run(1, "p", 50, 1, vec![too_big])],
            pending: vec![],
            projects: vec![],
            ..Default::default()
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

#[cfg(test)]
mod quota_tests {
    use super::*;
    use crate::cluster::{DeviceShare, NodeId};
    use crate::model::{DeviceSpec, GIB};
    use crate::request::ResourceRequest;

    fn node(name: &str, devices: usize) -> NodeSpec {
        NodeSpec::with_devices(
            name,
            64_000,
            256 * GIB,
            devices,
            DeviceSpec {
                model: "H100".into(),
                memory_bytes: 80 * GIB,
            },
        )
    }

    fn job(project: &str, priority: i32, devices: u32, replicas: u32) -> JobSpec {
        JobSpec {
            project: project.into(),
            ..super::tests::whole("j", priority, devices, replicas)
        }
    }

    /// A one-GPU job running on device `device` of node `node`.
    fn on(
        id: u64,
        project: &str,
        priority: i32,
        started: u64,
        node: u32,
        device: u32,
    ) -> RunningJob {
        RunningJob {
            id,
            project: project.into(),
            priority,
            started,
            gpu_milli: 1000,
            allocations: vec![Allocation {
                node: NodeId(node),
                cpu_milli: 1000,
                memory_bytes: GIB,
                devices: vec![DeviceShare {
                    device,
                    milli: 1000,
                    memory_bytes: 80 * GIB,
                }],
                affinity: None,
            }],
            stopping: false,
            preemptible: true,
            request: None,
            elastic: None,
        }
    }

    fn quota(name: &str, guaranteed: u64, limit: Option<u64>) -> ProjectQuota {
        ProjectQuota {
            name: name.into(),
            parent: None,
            guaranteed_milli: guaranteed,
            limit_milli: limit,
            over_quota_weight: 1,
        }
    }

    fn config() -> Config {
        Config {
            policy: PolicyKind::Tessera,
            seed: 7,
            shapes: ShapeDistribution::default(),
        }
    }

    /// Four GPUs, all held by project `b` (guarantee 1), jobs of different priority and age.
    fn full_pool() -> Snapshot {
        Snapshot {
            nodes: vec![node("n0", 4)],
            running: vec![
                on(1, "b", 50, 1, 0, 0),
                on(2, "b", 25, 2, 0, 1),
                on(3, "b", 25, 3, 0, 2),
                on(4, "b", 50, 4, 0, 3),
            ],
            pending: vec![],
            projects: vec![quota("a", 2000, None), quota("b", 1000, None)],
            ..Default::default()
        }
    }

    #[test]
    fn a_project_under_its_guarantee_reclaims_lowest_priority_newest_first_and_no_more() {
        let mut snapshot = full_pool();
        snapshot.pending = vec![PendingJob {
            id: 10,
            spec: job("a", 50, 2, 1),
        }];
        let plan = schedule(&snapshot, &config()).unwrap();
        let victims: Vec<u64> = plan.preemptions.iter().map(|p| p.job).collect();
        // Two GPUs are needed: the two low-priority jobs go, the newer one first.
        assert_eq!(victims, vec![3, 2]);
        assert!(
            plan.preemptions
                .iter()
                .all(|p| p.for_job == 10 && p.reason == PreemptReason::QuotaReclaim)
        );
        assert_eq!(
            plan.waiting,
            vec![(
                10,
                WaitReason::Reclaiming {
                    victims: vec![3, 2]
                }
            )]
        );
    }

    #[test]
    fn reclaim_stops_at_the_other_projects_guarantee() {
        let mut snapshot = full_pool();
        // b's guarantee is 3 GPUs now: only one of its four may be taken back.
        snapshot.projects[1].guaranteed_milli = 3000;
        snapshot.pending = vec![PendingJob {
            id: 10,
            spec: job("a", 50, 2, 1),
        }];
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.preemptions.is_empty());
        assert!(matches!(plan.waiting[0].1, WaitReason::NoFit { .. }));
    }

    #[test]
    fn a_project_over_its_guarantee_cannot_reclaim_but_may_preempt_its_own_lower_priority_work() {
        let mut snapshot = full_pool();
        snapshot.pending = vec![
            PendingJob {
                id: 10,
                spec: job("b", 75, 1, 1),
            },
            PendingJob {
                id: 11,
                spec: job("a", 50, 1, 1),
            },
        ];
        snapshot.projects[0].guaranteed_milli = 0;
        let plan = schedule(&snapshot, &config()).unwrap();
        let got: Vec<(u64, u64, PreemptReason)> = plan
            .preemptions
            .iter()
            .map(|p| (p.job, p.for_job, p.reason))
            .collect();
        assert_eq!(got, vec![(3, 10, PreemptReason::Priority)]);
        let waiting: HashMap<u64, &WaitReason> =
            plan.waiting.iter().map(|(id, r)| (*id, r)).collect();
        assert!(matches!(waiting[&11], WaitReason::NoFit { .. }));
    }

    #[test]
    fn jobs_already_stopping_are_counted_before_new_victims() {
        let mut snapshot = full_pool();
        snapshot.running[2].stopping = true; // job 3
        snapshot.pending = vec![PendingJob {
            id: 10,
            spec: job("a", 50, 1, 1),
        }];
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.preemptions.is_empty());
        assert_eq!(
            plan.waiting,
            vec![(10, WaitReason::Reclaiming { victims: vec![3] })]
        );
    }

    #[test]
    fn a_victim_that_stopped_first_does_not_take_back_the_capacity_it_freed() {
        // Job 10 of project a reclaimed two GPUs; job 3 has stopped and is pending again, job 2
        // is still stopping. Job 3 must not land on the GPU it freed: that is job 10's.
        let mut snapshot = full_pool();
        snapshot.running.retain(|r| r.id != 3);
        snapshot.running[1].stopping = true; // job 2
        snapshot.pending = vec![
            PendingJob {
                id: 10,
                spec: job("a", 50, 2, 1),
            },
            PendingJob {
                id: 3,
                spec: job("b", 25, 1, 1),
            },
        ];
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.placements.is_empty(), "{:?}", plan.placements);
        assert!(plan.preemptions.is_empty(), "{:?}", plan.preemptions);
        let waiting: HashMap<u64, &WaitReason> =
            plan.waiting.iter().map(|(id, r)| (*id, r)).collect();
        assert_eq!(waiting[&10], &WaitReason::Reclaiming { victims: vec![2] });
        assert!(matches!(waiting[&3], WaitReason::NoFit { .. }));

        // Capacity that the reclaiming job cannot use (its two GPUs must share a node) stays
        // usable by others.
        snapshot.nodes.push(node("n1", 1));
        let plan = schedule(&snapshot, &config()).unwrap();
        let placed: Vec<(u64, NodeId)> = plan
            .placements
            .iter()
            .map(|(id, allocs)| (*id, allocs[0].node))
            .collect();
        assert_eq!(placed, vec![(3, NodeId(1))]);
    }

    #[test]
    fn scattered_free_gpus_are_gathered_by_moving_a_small_job_and_only_when_it_fits_elsewhere() {
        // Two nodes of two GPUs, one busy GPU on each: two GPUs are free, but not on one node.
        let movable = |id, node| {
            let mut r = on(id, "a", 50, id, node, 0);
            r.request = Some(job("a", 50, 1, 1).request);
            r
        };
        let mut snapshot = Snapshot {
            nodes: vec![node("n0", 2), node("n1", 2)],
            running: vec![movable(1, 0), movable(2, 1)],
            pending: vec![PendingJob {
                id: 10,
                spec: job("a", 50, 2, 1),
            }],
            projects: vec![quota("a", 0, None)],
            ..Default::default()
        };
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.placements.is_empty());
        assert!(plan.preemptions.is_empty());
        assert_eq!(plan.moves.len(), 1, "{:?}", plan.moves);
        let m = &plan.moves[0];
        assert_eq!(m.for_job, 10);
        // The moved job goes to the other node, next to the job that stays.
        let other = if m.job == 1 { NodeId(1) } else { NodeId(0) };
        assert_eq!(m.to, other);
        assert_eq!(
            plan.waiting,
            vec![(10, WaitReason::Consolidating { moved: vec![m.job] })]
        );

        // With n1 full, only one GPU is free in all: no move can help, so nothing moves.
        snapshot.running.push(movable(3, 1));
        snapshot.running[2].allocations[0].devices[0].device = 1;
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.moves.is_empty(), "{:?}", plan.moves);
        assert!(matches!(plan.waiting[0].1, WaitReason::NoFit { .. }));

        // A job whose request is unknown, or of higher priority, is never moved.
        snapshot.running.truncate(2);
        snapshot.running[0].request = None;
        snapshot.running[1].priority = 90;
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.moves.is_empty(), "{:?}", plan.moves);
    }

    #[test]
    fn a_gang_waiting_on_scattered_gpus_gets_whole_nodes_by_the_fewest_moves() {
        // Four nodes of two GPUs, one busy GPU on each: four GPUs are free, none two on a node.
        let movable = |id, node| {
            let mut r = on(id, "a", 50, id, node, 0);
            r.request = Some(job("a", 50, 1, 1).request);
            r
        };
        let snapshot = Snapshot {
            nodes: (0..4).map(|i| node(&format!("n{i}"), 2)).collect(),
            running: (0..4).map(|i| movable(i + 1, i as u32)).collect(),
            pending: vec![PendingJob {
                id: 10,
                spec: job("a", 50, 2, 2),
            }],
            projects: vec![quota("a", 0, None)],
            ..Default::default()
        };
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.placements.is_empty() && plan.preemptions.is_empty());
        // Two nodes are cleared for the gang's two replicas; their jobs go to the other two.
        assert_eq!(plan.moves.len(), 2, "{:?}", plan.moves);
        let from: HashSet<NodeId> = plan
            .moves
            .iter()
            .map(|m| snapshot.running[m.job as usize - 1].allocations[0].node)
            .collect();
        let to: HashSet<NodeId> = plan.moves.iter().map(|m| m.to).collect();
        assert_eq!(from.len(), 2, "{:?}", plan.moves);
        assert_eq!(to.len(), 2, "{:?}", plan.moves);
        assert!(from.is_disjoint(&to), "{:?}", plan.moves);
        let mut moved: Vec<u64> = plan.moves.iter().map(|m| m.job).collect();
        moved.sort();
        assert!(matches!(
            &plan.waiting[..],
            [(10, WaitReason::Consolidating { .. })]
        ));

        // Once the moved jobs stopped and wait to start again, pinned to their targets as the
        // controller pins them, the round places the gang on the two cleared nodes and the moved
        // jobs on the others: no one takes another's place.
        let mut after = snapshot.clone();
        for n in &mut after.nodes {
            n.labels.insert("node".into(), n.name.clone());
        }
        after.running.retain(|r| !moved.contains(&r.id));
        after.pending.extend(plan.moves.iter().map(|m| {
            let mut spec = job("a", 50, 1, 1);
            spec.request
                .node_selector
                .insert("node".into(), format!("n{}", m.to.0));
            PendingJob { id: m.job, spec }
        }));
        let plan = schedule(&after, &config()).unwrap();
        let placed: HashMap<u64, Vec<NodeId>> = plan
            .placements
            .iter()
            .map(|(id, allocs)| (*id, allocs.iter().map(|a| a.node).collect()))
            .collect();
        assert_eq!(placed.len(), 3, "{:?}", plan.placements);
        let gang: HashSet<NodeId> = placed[&10].iter().copied().collect();
        assert_eq!(gang, from);
        for id in &moved {
            assert!(to.contains(&placed[id][0]), "{:?}", plan.placements);
        }

        // A gang that needs more than moving can gather (three whole nodes while only four GPUs
        // are free) moves nothing.
        let mut snapshot = snapshot;
        snapshot.pending[0].spec = job("a", 50, 2, 3);
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.moves.is_empty(), "{:?}", plan.moves);
        assert!(matches!(plan.waiting[0].1, WaitReason::NoFit { .. }));
    }

    /// An elastic job of project `project` running `replicas` one-GPU replicas on node 0
    /// (devices 0..replicas), `min` of them its minimum, allowed `max`.
    fn elastic(
        id: u64,
        project: &str,
        priority: i32,
        replicas: u32,
        min: u32,
        max: u32,
    ) -> RunningJob {
        let allocations: Vec<Allocation> = (0..replicas)
            .map(|d| on(id, project, priority, id, 0, d).allocations.remove(0))
            .collect();
        RunningJob {
            gpu_milli: 1000 * u64::from(replicas),
            request: Some(job(project, priority, 1, 1).request),
            elastic: Some(ElasticRunning {
                may_grow: max - replicas,
                extra: (min..replicas)
                    .map(|i| (i, allocations[i as usize].clone()))
                    .collect(),
                leaving: vec![],
            }),
            allocations,
            ..on(id, project, priority, id, 0, 0)
        }
    }

    #[test]
    fn elastic_jobs_grow_into_idle_capacity_in_turn_and_within_their_limit() {
        let mut snapshot = Snapshot {
            nodes: vec![node("n0", 8)],
            // Job 1 runs 2 of its 2..8, job 2 runs 1 of its 1..3: five GPUs are idle.
            running: vec![elastic(1, "a", 50, 2, 2, 8), {
                let mut j = elastic(2, "a", 50, 1, 1, 3);
                j.allocations[0].devices[0].device = 2;
                j
            }],
            pending: vec![],
            projects: vec![quota("a", 0, None)],
            ..Default::default()
        };
        let plan = schedule(&snapshot, &config()).unwrap();
        let grown: Vec<(u64, usize)> = plan
            .grows
            .iter()
            .map(|g| (g.job, g.allocations.len()))
            .collect();
        // Job 2 (fewer replicas) reaches its maximum of 3; job 1 takes the other three.
        assert_eq!(grown, vec![(1, 3), (2, 2)]);
        let devices: HashSet<u32> = plan
            .grows
            .iter()
            .flat_map(|g| &g.allocations)
            .map(|a| a.devices[0].device)
            .collect();
        assert_eq!(devices.len(), 5, "no GPU given twice: {:?}", plan.grows);
        assert!(!devices.contains(&0) && !devices.contains(&1) && !devices.contains(&2));

        // A project hard limit of 5 GPUs (3 in use) leaves room for two more replicas only.
        snapshot.projects[0].limit_milli = Some(5000);
        let plan = schedule(&snapshot, &config()).unwrap();
        let total: usize = plan.grows.iter().map(|g| g.allocations.len()).sum();
        assert_eq!(total, 2, "{:?}", plan.grows);

        // A job that may not grow now (e.g. finishing) does not.
        snapshot.projects[0].limit_milli = None;
        for r in &mut snapshot.running {
            r.elastic.as_mut().unwrap().may_grow = 0;
        }
        assert!(schedule(&snapshot, &config()).unwrap().grows.is_empty());
    }

    #[test]
    fn a_waiting_job_takes_back_an_elastic_jobs_newest_extra_replicas_and_no_more() {
        // Job 1 holds all four GPUs, 1 of them its minimum; job 10 (lower priority, another
        // project over nothing) needs two.
        let snapshot = Snapshot {
            nodes: vec![node("n0", 4)],
            running: vec![elastic(1, "a", 75, 4, 1, 4)],
            pending: vec![PendingJob {
                id: 10,
                spec: job("b", 25, 2, 1),
            }],
            projects: vec![quota("a", 0, None), quota("b", 0, None)],
            ..Default::default()
        };
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.preemptions.is_empty() && plan.moves.is_empty());
        assert_eq!(
            plan.shrinks,
            vec![Shrink {
                job: 1,
                replicas: vec![2, 3],
                for_job: 10
            }]
        );
        assert_eq!(
            plan.waiting,
            vec![(
                10,
                WaitReason::Shrinking {
                    from: vec![(1, 3), (1, 2)]
                }
            )]
        );
        assert!(
            plan.grows.is_empty(),
            "a shrinking job does not grow: {:?}",
            plan.grows
        );
        assert!(
            plan.waiting[0]
                .1
                .describe(&job("b", 25, 2, 1))
                .contains("give back replicas above their minimum: 2 of job 1")
        );

        // Its minimum is never given back: a job needing four GPUs cannot get them this way.
        let mut snapshot = snapshot;
        snapshot.pending[0].spec = job("b", 25, 4, 1);
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.shrinks.is_empty(), "{:?}", plan.shrinks);
        assert!(matches!(plan.waiting[0].1, WaitReason::NoFit { .. }));
    }

    #[test]
    fn room_an_elastic_job_gave_back_goes_to_the_job_it_was_given_for() {
        // Replica 3 of job 1 is still stopping (its job is not marked stopping: only the
        // replica is); job 10 waits for it. Job 1 may grow again, but not into job 10's room.
        let mut running = elastic(1, "a", 50, 4, 1, 4);
        running.elastic.as_mut().unwrap().may_grow = 0;
        let mut snapshot = Snapshot {
            nodes: vec![node("n0", 4)],
            running: vec![running],
            pending: vec![PendingJob {
                id: 10,
                spec: job("a", 50, 1, 1),
            }],
            projects: vec![quota("a", 0, None)],
            ..Default::default()
        };
        let plan = schedule(&snapshot, &config()).unwrap();
        assert_eq!(plan.shrinks.len(), 1);
        let gone = plan.shrinks[0].replicas[0];
        // While the replica stops, job 10 waits for it and no other replica is asked to go.
        let e = snapshot.running[0].elastic.as_mut().unwrap();
        let at = e.extra.iter().position(|(i, _)| *i == gone).unwrap();
        let leaving = e.extra.remove(at);
        e.leaving.push(leaving);
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.shrinks.is_empty(), "{:?}", plan.shrinks);
        assert_eq!(
            plan.waiting,
            vec![(
                10,
                WaitReason::Shrinking {
                    from: vec![(1, gone)]
                }
            )]
        );
        // The replica stopped: the next round places job 10 on the GPU it freed.
        snapshot.running[0]
            .elastic
            .as_mut()
            .unwrap()
            .leaving
            .clear();
        let r = &mut snapshot.running[0];
        r.allocations.remove(gone as usize);
        let e = r.elastic.as_mut().unwrap();
        e.extra.retain(|(i, _)| *i != gone);
        e.may_grow = 1;
        let plan = schedule(&snapshot, &config()).unwrap();
        assert_eq!(plan.placements.len(), 1, "{:?}", plan);
        assert_eq!(plan.placements[0].1[0].devices[0].device, gone);
        assert!(plan.grows.is_empty(), "{:?}", plan.grows);
    }

    #[test]
    fn of_two_projects_equal_now_the_one_that_used_less_lately_goes_first() {
        let mut snapshot = Snapshot {
            nodes: vec![node("n0", 3)],
            running: vec![on(1, "a", 50, 1, 0, 0), on(2, "b", 50, 2, 0, 1)],
            pending: vec![
                PendingJob {
                    id: 10,
                    spec: job("a", 50, 1, 1),
                },
                PendingJob {
                    id: 11,
                    spec: job("b", 50, 1, 1),
                },
            ],
            projects: vec![quota("a", 0, None), quota("b", 0, None)],
            ..Default::default()
        };
        let placed = |s: &Snapshot| schedule(s, &config()).unwrap().placements[0].0;
        // Without history the older job (a's) wins the one free GPU; with a's heavy past, b's.
        assert_eq!(placed(&snapshot), 10);
        snapshot.history = [("a".to_string(), 4000)].into();
        assert_eq!(placed(&snapshot), 11);
    }

    #[test]
    fn a_hard_limit_holds_even_with_free_capacity_and_says_so() {
        let snapshot = Snapshot {
            nodes: vec![node("n0", 8)],
            running: vec![on(1, "vision", 50, 1, 0, 0)],
            pending: vec![PendingJob {
                id: 2,
                spec: job("vision", 50, 2, 1),
            }],
            projects: vec![quota("vision", 0, Some(2000))],
            ..Default::default()
        };
        let plan = schedule(&snapshot, &config()).unwrap();
        assert!(plan.placements.is_empty());
        let text = plan.waiting[0].1.describe(&snapshot.pending[0].spec);
        assert_eq!(
            text,
            "needs 2 GPU in all; project vision is at 1 of its limit of 2 GPU"
        );
    }

    #[test]
    fn the_project_furthest_below_its_guarantee_goes_first() {
        let snapshot = Snapshot {
            nodes: vec![node("n0", 1)],
            running: vec![],
            pending: vec![
                PendingJob {
                    id: 1,
                    spec: job("rich", 100, 1, 1),
                },
                PendingJob {
                    id: 2,
                    spec: job("poor", 25, 1, 1),
                },
            ],
            projects: vec![quota("rich", 0, None), quota("poor", 1000, None)],
            ..Default::default()
        };
        let plan = schedule(&snapshot, &config()).unwrap();
        assert_eq!(plan.placements.len(), 1);
        assert_eq!(plan.placements[0].0, 2);
    }

    #[test]
    fn a_gang_that_does_not_fit_is_described_in_words_a_user_can_act_on() {
        let snapshot = Snapshot {
            nodes: vec![node("n0", 2), node("n1", 2)],
            running: vec![on(1, "p", 50, 1, 0, 0)],
            pending: vec![PendingJob {
                id: 2,
                spec: JobSpec {
                    request: ResourceRequest {
                        device_models: vec!["H100".into()],
                        ..job("p", 50, 2, 2).request
                    },
                    ..job("p", 50, 2, 2)
                },
            }],
            projects: vec![],
            ..Default::default()
        };
        let plan = schedule(&snapshot, &config()).unwrap();
        let text = plan.waiting[0].1.describe(&snapshot.pending[0].spec);
        assert_eq!(
            text,
            "needs 2 replicas, each 2 whole GPUs of model H100 on one node, 1 CPU and 1.0 GiB \
             memory; only 1 of its 2 replicas fit at once, and a gang starts whole or not at all; \
             the pool has 2 GPU free for it, on 1 node with 64 CPU free there; with 1 replica in \
             place, GPU binds: 2 nodes have the CPU and memory but not 2 whole GPUs free (the \
             most there: 1 whole GPU); no node of 2 fits: 2 lack free GPU capacity; the largest \
             free block is 2 whole GPUs on n1"
        );
    }
}
