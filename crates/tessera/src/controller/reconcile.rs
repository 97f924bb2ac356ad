//! The reconcile loop: snapshot → `tessera_sched::schedule` → plan → apply.
//!
//! Event-driven: a write that changes what could be placed (a submission, a finished replica, a
//! joined node, a quota change) wakes the loop at once; wake-ups that arrive while a round runs
//! coalesce into one more round. Timers only cover what no event announces: a node's lease running
//! out and a restart backoff ending.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_sched::cluster::GpuAffinity;
use tessera_sched::quota::ProjectQuota;
use tessera_sched::schedule::{
    Config, ElasticRunning, Kept, PendingJob, Plan, RunningJob, Snapshot, WaitReason,
    schedule_keeping,
};
use tessera_sched::{Allocation, NodeId, ShapeDistribution};

use super::lifecycle::Note;
use super::lifecycle::settle;
use super::ops::save_job;
use super::{ApiError, Ctl, agents, now_ms};
use crate::state::{EventKind, Job, JobState, NodeHealth, Replica, SchedChanges, State, StopCause};

/// Longest sleep when nothing is due (a safety net, not the scheduling cadence).
const IDLE_WAKE: Duration = Duration::from_secs(5);

pub async fn run(ctl: Ctl) {
    let mut rounds = Rounds::default();
    loop {
        let next_lease = agents::expire_leases(&ctl).await;
        let mut phases = Phases::default();
        let next_backoff = match rounds.schedule_once(&ctl, &mut phases).await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!("scheduling round failed: {}", e.message);
                None
            }
        };
        let now = now_ms();
        let due = [next_lease, next_backoff]
            .into_iter()
            .flatten()
            .min()
            .map(|t| Duration::from_millis(t.saturating_sub(now).max(5)))
            .unwrap_or(IDLE_WAKE)
            .min(IDLE_WAKE);
        let _ = tokio::time::timeout(due, ctl.store.notifier.schedule.notified()).await;
        // Rounds compute at most half of the time: with thousands of jobs waiting a round costs
        // tens of milliseconds of CPU, and back to back they starved the requests and the
        // store's writer of the cores. Changes that arrive meanwhile go to the next round
        // together. (Waiting for the round's own commit is not computing, and does not count.)
        let computing = phases.build + phases.schedule;
        if computing > MIN_PACED_ROUND {
            tokio::time::sleep(computing).await;
        }
    }
}

/// Rounds quicker than this are not paced: with few jobs waiting, a placement follows its
/// submission at once.
const MIN_PACED_ROUND: Duration = Duration::from_millis(2);

/// Node names in snapshot order.
struct Built {
    snapshot: Snapshot,
    node_names: Vec<String>,
    next_backoff: Option<u64>,
    /// Pending jobs that can never run (a dependency failed), with why: they are cancelled.
    never: Vec<(u64, String)>,
    /// Running jobs past their time limit: they are stopped.
    overdue: Vec<u64>,
    /// Each active job's view, hashed (see [`view_hash`]).
    views: HashMap<u64, u64>,
    /// Jobs (or arrays) that pending jobs wait on (`--after`).
    awaited: std::collections::HashSet<u64>,
}

/// Every node carries its own name as this label, so a job can be pinned to one.
pub const NODE_LABEL: &str = "tessera.io/node";

fn build(s: &State, now: u64) -> Built {
    // Nodes that hold a pending job's image, by job: the scheduler's tie-break.
    let mut warm: std::collections::BTreeMap<u64, Vec<NodeId>> = Default::default();
    let mut node_names = Vec::new();
    let mut index: HashMap<&str, u32> = HashMap::new();
    let mut nodes = Vec::new();
    for (name, n) in &s.nodes {
        if n.health == NodeHealth::Ready && !n.cordoned {
            index.insert(name, nodes.len() as u32);
            node_names.push(name.clone());
            let mut spec = n.spec.clone();
            spec.labels.insert(NODE_LABEL.to_string(), name.clone());
            nodes.push(spec);
        }
    }
    let mut running = Vec::new();
    let mut views = HashMap::new();
    let mut awaited = std::collections::HashSet::new();
    let mut pending = Vec::new();
    let mut next_backoff: Option<u64> = None;
    let mut never = Vec::new();
    let mut overdue = Vec::new();
    // Tasks of limited arrays scheduled or running, by array; their pending tasks are judged
    // after every job is counted.
    let mut array_active: HashMap<u64, u32> = HashMap::new();
    let mut array_pending: Vec<&Job> = Vec::new();
    for job in s.jobs.values() {
        if job.state.is_active()
            && let Some(t) = job.def.array.as_ref().filter(|t| t.limit.is_some())
        {
            *array_active.entry(t.id).or_default() += 1;
        }
        if let Some(ends) = time_limit_ends(job) {
            if ends <= now {
                overdue.push(job.id);
            } else {
                next_backoff = Some(next_backoff.map_or(ends, |x| x.min(ends)));
            }
        }
        if job.state.is_active() {
            let (view, protected_until) = running_view(s, job, &|n| index.get(n).copied(), now);
            if let Some(t) = protected_until {
                next_backoff = Some(next_backoff.map_or(t, |x| x.min(t)));
            }
            views.insert(job.id, view_hash(&view));
            running.push(view);
        } else if job.state == JobState::Pending {
            if job.not_before_ms > now {
                next_backoff =
                    Some(next_backoff.map_or(job.not_before_ms, |x| x.min(job.not_before_ms)));
                continue;
            }
            if job.def.array.as_ref().is_some_and(|t| t.limit.is_some()) {
                array_pending.push(job);
                continue;
            }
            match crate::batch::gate(job, |id| s.jobs.get(&id).map(|j| &**j), 0) {
                crate::batch::Gate::Open => {}
                crate::batch::Gate::Wait(_) => {
                    awaited.extend(job.def.after.iter().map(|a| a.job));
                    continue;
                }
                crate::batch::Gate::Never(why) => {
                    never.push((job.id, why));
                    continue;
                }
            }
            let spec = scheduling_spec(job);
            if let Some(image) = &job.def.image {
                let holding: Vec<NodeId> = s
                    .node_images
                    .iter()
                    .filter(|(_, held)| held.contains(image))
                    .filter_map(|(node, _)| index.get(node.as_str()).map(|&i| NodeId(i)))
                    .collect();
                if !holding.is_empty() {
                    warm.insert(job.id, holding);
                }
            }
            pending.push(PendingJob { id: job.id, spec });
        }
    }
    // A limited array's pending tasks, in id order, while its limit leaves room.
    for job in array_pending {
        let Some(t) = &job.def.array else { continue };
        let active = array_active.entry(t.id).or_default();
        match crate::batch::gate(job, |id| s.jobs.get(&id).map(|j| &**j), *active) {
            crate::batch::Gate::Open => {
                *active += 1;
                pending.push(PendingJob {
                    id: job.id,
                    spec: scheduling_spec(job),
                });
            }
            crate::batch::Gate::Wait(_) => awaited.extend(job.def.after.iter().map(|a| a.job)),
            crate::batch::Gate::Never(why) => never.push((job.id, why)),
        }
    }
    let projects = s
        .projects
        .values()
        .map(|p| ProjectQuota {
            name: p.name.clone(),
            parent: p.parent.clone(),
            guaranteed_milli: p.guaranteed_milli,
            limit_milli: p.limit_milli,
            over_quota_weight: p.over_quota_weight,
        })
        .collect();
    let rules = s
        .projects
        .keys()
        .map(|p| (p.clone(), s.placement_rules(p)))
        .filter(|(_, r)| !r.is_empty())
        .collect();
    Built {
        snapshot: Snapshot {
            nodes,
            running,
            pending,
            projects,
            rules,
            history: s
                .usage_history
                .iter()
                .map(|(p, milli)| (p.clone(), milli.round() as u64))
                .collect(),
            warm,
        },
        node_names,
        next_backoff,
        never,
        overdue,
        views,
        awaited,
    }
}

/// A running job as the scheduler sees it, with `index` giving the scheduler's number of each
/// node it sees; and when its protection from preemption ends, if later than `now` (the loop
/// wakes then).
fn running_view(
    s: &State,
    job: &Job,
    index: &dyn Fn(&str) -> Option<u32>,
    now: u64,
) -> (RunningJob, Option<u64>) {
    // What a replica holds on the nodes the scheduler sees; of a remote pair with one
    // node gone (lost, cordoned), the half on the other.
    let allocation = |r: &Replica| {
        let node = index(r.node.as_str()).map(NodeId);
        let gpu_node = r.gpu_node.as_ref().map(|g| index(g.as_str()).map(NodeId));
        let whole = Allocation {
            gpu_node: None,
            node: node.unwrap_or(NodeId(0)),
            cpu_milli: r.cpu_milli,
            memory_bytes: r.memory_bytes,
            devices: r.devices.clone(),
            affinity: affinity(&job.def.spec.request.gpu),
        };
        match (node, gpu_node) {
            (Some(_), None) => Some(whole),
            (None, None) => None,
            (Some(_), Some(Some(g))) => Some(Allocation {
                gpu_node: Some(g),
                ..whole
            }),
            (Some(_), Some(None)) => Some(Allocation {
                devices: Vec::new(),
                affinity: None,
                ..whole
            }),
            (None, Some(g)) => Some(Allocation {
                node: g?,
                cpu_milli: 0,
                memory_bytes: 0,
                ..whole
            }),
        }
    };
    let live = || job.replicas.iter().filter(|r| !r.phase.is_done());
    let allocations = live().filter_map(allocation).collect();
    let elastic = job.def.elastic.filter(|_| job.stop.is_none()).map(|e| {
        let leaving: Vec<(u32, Allocation)> = live()
            .filter(|r| r.leaving)
            .filter_map(|r| Some((r.index, allocation(r)?)))
            .collect();
        // Replicas of the starting gang (indexes below min) are never given back.
        let extra = job
            .members()
            .filter(|r| r.index >= e.min)
            .filter_map(|r| Some((r.index, allocation(r)?)))
            .collect();
        // It grows only while it runs whole: not while it starts, finishes, or gives
        // replicas back.
        let settled = job.state == JobState::Running
            && leaving.is_empty()
            && !job.replicas.iter().any(|r| !r.leaving && r.phase.is_done());
        ElasticRunning {
            may_grow: if settled {
                e.max.saturating_sub(job.members().count() as u32)
            } else {
                0
            },
            extra,
            leaving,
        }
    });
    // A job is protected from preemption for its project's minimum runtime, counted
    // from its first replica's start; the loop wakes when the protection ends.
    let min_runtime = s
        .projects
        .get(job.project())
        .map_or(0, |p| p.min_runtime_ms);
    let protected_until = job
        .replicas
        .iter()
        .filter_map(|r| r.started_ms)
        .min()
        .map_or(0, |t| t + min_runtime);
    let view = RunningJob {
        id: job.id,
        project: job.project().to_string(),
        priority: job.def.spec.priority,
        started: job.started_seq,
        gpu_milli: job.gpu_milli_held(),
        allocations,
        stopping: job.stop.is_some(),
        preemptible: job.def.preemptible && protected_until <= now,
        request: Some(job.def.spec.request.clone()),
        elastic,
    };
    let wake = (job.def.preemptible && protected_until > now).then_some(protected_until);
    (view, wake)
}

/// When an active job that is not being stopped reaches its time limit (counted from its first
/// replica's start), if it has one and has started.
fn time_limit_ends(job: &Job) -> Option<u64> {
    let limit = job.def.time_limit_ms?;
    if !job.state.is_active() || job.stop.is_some() {
        return None;
    }
    let started = job.replicas.iter().filter_map(|r| r.started_ms).min()?;
    Some(started.saturating_add(limit))
}

/// A running job's view, hashed: a job written since a round whose view hashes the same changed
/// nothing the scheduler reads (e.g. it only reported progress). Hashed with a fixed seed (the
/// same view hashes the same for the life of the process) and a fast hash: a full round hashes
/// every running job.
fn view_hash(view: &RunningJob) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x7e55e7a).hash_one(view)
}

/// What the scheduler places for a pending job: its spec, plus the node it is pinned to and the
/// node features a transparent checkpoint needs. A waiting job's reason is described against
/// the same spec.
pub(crate) fn scheduling_spec(job: &Job) -> tessera_sched::JobSpec {
    let mut spec = job.def.spec.clone();
    if let Some(node) = &job.pin_node {
        spec.request
            .node_selector
            .insert(NODE_LABEL.to_string(), node.clone());
    }
    // A transparent checkpoint needs CRIU on the node (and cuda-checkpoint for GPUs).
    // An image job's is taken by the node's runtime.
    if job.def.checkpoint.as_ref().is_some_and(|c| c.transparent) {
        use crate::agent::criu::{CRIU_LABEL, CUDA_LABEL, IMAGES_LABEL};
        let sel = &mut spec.request.node_selector;
        let needs = match job.def.image {
            Some(_) => IMAGES_LABEL,
            None => CRIU_LABEL,
        };
        sel.insert(needs.to_string(), "true".into());
        if spec.request.gpu != tessera_sched::GpuRequest::None {
            sel.insert(CUDA_LABEL.to_string(), "true".into());
        }
    }
    spec
}

fn affinity(gpu: &tessera_sched::GpuRequest) -> Option<GpuAffinity> {
    match *gpu {
        tessera_sched::GpuRequest::None => None,
        tessera_sched::GpuRequest::Share { .. } => Some(GpuAffinity::Share),
        tessera_sched::GpuRequest::Whole { devices } => Some(GpuAffinity::Whole(devices)),
    }
}

/// Where a round's time went.
#[derive(Debug, Default, Clone, Copy)]
pub struct Phases {
    /// Reading the state into a snapshot (under the state's lock); for a quick round, reading
    /// what changed.
    pub build: Duration,
    /// The scheduler's work on the snapshot (and gathering the waiting jobs' reasons).
    pub schedule: Duration,
    /// Applying the plan to the state and committing it.
    pub apply: Duration,
    /// Jobs placed.
    pub placed: usize,
    /// A quick round: only jobs submitted since were decided (see [`Rounds`]).
    pub quick: bool,
}

/// The reconcile loop's memory from round to round: its count, and what the last full round
/// that changed nothing kept (`tessera_sched::schedule::Kept`). While only new jobs arrive, a
/// round decides them alone in that kept cluster (a quick round) and costs what arrived, not
/// the pool; anything else the scheduler reads changing, a timer falling due, or a new job
/// that fits nowhere with no known answer, makes the round a full one.
#[derive(Default)]
pub struct Rounds {
    round: u64,
    kept: Option<KeptRound>,
}

/// What a quick round starts from.
struct KeptRound {
    sched: Kept,
    /// The full round's nodes, in its numbering.
    node_names: Arc<Vec<String>>,
    index: HashMap<String, u32>,
    /// Each active job's view as the scheduler holds it, hashed: a job written since whose view
    /// hashes the same changed nothing it reads.
    views: HashMap<u64, u64>,
    /// The earliest timer the full round saw (a time limit, a protection ending, a --begin):
    /// a full round once it falls due.
    next_backoff: Option<u64>,
    /// Jobs (or arrays) that pending jobs wait on (`--after`): one written since may let them
    /// go, and the round is a full one.
    awaited: std::collections::HashSet<u64>,
}

/// Jobs submitted since the kept round, ready for a quick one.
struct Arrived {
    new: Vec<PendingJob>,
    warm: std::collections::BTreeMap<u64, Vec<NodeId>>,
    history: std::collections::BTreeMap<String, u64>,
    /// Pending jobs written since that may not start yet (held, waiting on a dependency):
    /// their old reasons go.
    gated: Vec<u64>,
    /// What the gated ones wait on.
    awaited: Vec<u64>,
    elastic: BTreeSet<u64>,
    next_backoff: Option<u64>,
}

impl Rounds {
    /// One round, as the reconcile loop runs it (the in-process benchmark runs it too).
    pub async fn round(&mut self, ctl: &Ctl) -> Result<Phases, ApiError> {
        let mut phases = Phases::default();
        self.schedule_once(ctl, &mut phases).await?;
        Ok(phases)
    }

    /// One round; returns when the earliest backoff ends, and fills in `phases`.
    async fn schedule_once(
        &mut self,
        ctl: &Ctl,
        phases: &mut Phases,
    ) -> Result<Option<u64>, ApiError> {
        self.round += 1;
        if let Some(kept) = self.kept.take()
            && let Some(next) = self.quick(ctl, kept, phases).await?
        {
            return Ok(next);
        }
        *phases = Phases::default();
        self.full(ctl, phases).await
    }

    /// A quick round from `kept`, or `None` when the round must be a full one.
    async fn quick(
        &mut self,
        ctl: &Ctl,
        kept: KeptRound,
        phases: &mut Phases,
    ) -> Result<Option<Option<u64>>, ApiError> {
        let building = Instant::now();
        let now = now_ms();
        let arrived = {
            let mut s = ctl.store.state.lock().unwrap_or_else(|e| e.into_inner());
            let changes = std::mem::replace(&mut s.sched_changes, SchedChanges::none());
            if changes.other || kept.next_backoff.is_some_and(|t| t <= now) {
                return Ok(None);
            }
            match arrived(&s, &kept, changes.jobs, now) {
                Some(arrived) => arrived,
                None => return Ok(None),
            }
        };
        phases.build = building.elapsed();
        let started = Instant::now();
        let KeptRound {
            sched,
            node_names,
            index,
            mut views,
            mut awaited,
            ..
        } = kept;
        let (plan, still) = sched.schedule_new(&arrived.new, &arrived.history, &arrived.warm);
        let Some(mut plan) = plan else {
            return Ok(None);
        };
        let waits: HashMap<u64, Arc<WaitReason>> =
            std::mem::take(&mut plan.waiting).into_iter().collect();
        phases.schedule = started.elapsed();
        phases.placed = plan.placements.len();
        phases.quick = true;
        ctl.metrics
            .schedule_seconds
            .observe(phases.schedule.as_secs_f64());
        let placed: Vec<u64> = plan.placements.iter().map(|(id, _)| *id).collect();
        let elastic = placed.iter().any(|id| arrived.elastic.contains(id));
        let applying = Instant::now();
        let gated = arrived.gated;
        if plan.placements.is_empty() {
            let mut s = ctl.store.state.lock().unwrap_or_else(|e| e.into_inner());
            for id in gated {
                s.wait_reasons.remove(&id);
            }
            s.wait_reasons.extend(waits);
        } else {
            apply(ctl, plan, waits, node_names.clone(), Reasons::Add(gated)).await?;
        }
        phases.apply = applying.elapsed();
        // Kept only while the scheduler's view of every job it placed is the state's.
        let mut sched = still.filter(|_| !elastic);
        if sched.is_some() && !placed.is_empty() {
            let s = ctl.store.state.lock().unwrap_or_else(|e| e.into_inner());
            for id in &placed {
                match s.jobs.get(id).filter(|j| j.state.is_active()) {
                    Some(job) => {
                        let (view, _) = running_view(&s, job, &|n| index.get(n).copied(), now);
                        views.insert(*id, view_hash(&view));
                    }
                    None => sched = None,
                }
            }
        }
        awaited.extend(arrived.awaited);
        self.kept = sched.map(|sched| KeptRound {
            sched,
            node_names,
            index,
            views,
            next_backoff: arrived.next_backoff,
            awaited,
        });
        Ok(Some(arrived.next_backoff))
    }

    /// A full round: the whole pool read into a snapshot and scheduled.
    async fn full(&mut self, ctl: &Ctl, phases: &mut Phases) -> Result<Option<u64>, ApiError> {
        let building = Instant::now();
        let now = now_ms();
        let (mut built, shapes) = {
            let mut s = ctl.store.state.lock().unwrap_or_else(|e| e.into_inner());
            s.sched_changes = SchedChanges::none();
            let shapes = ShapeDistribution::typical(s.recent_requests.iter(), 0.95);
            (build(&s, now), shapes)
        };
        let next_backoff = built.next_backoff;
        let (never, overdue) = (
            std::mem::take(&mut built.never),
            std::mem::take(&mut built.overdue),
        );
        if !never.is_empty() || !overdue.is_empty() {
            ctl.store
                .write(move |c, s| end_gated(c, s, never, overdue))
                .await?;
        }
        phases.build = building.elapsed();
        let config = Config {
            policy: ctl.config.policy,
            seed: ctl.config.seed ^ self.round,
            shapes,
        };
        let started = Instant::now();
        let Built {
            snapshot,
            node_names,
            views,
            awaited,
            ..
        } = built;
        // Reasons are kept as the scheduler gave them and put in words when a view asks: with
        // thousands of jobs waiting, describing each one every round cost more than the round.
        // They are gathered into their map on the blocking thread too (part of the round's cost).
        let scheduled = tokio::task::spawn_blocking(move || {
            schedule_keeping(snapshot, &config).map(|(mut plan, kept)| {
                let waits: HashMap<u64, Arc<WaitReason>> =
                    std::mem::take(&mut plan.waiting).into_iter().collect();
                // The node numbering a quick round needs, made here off the async threads.
                let kept = kept.map(|sched| {
                    let index = (node_names.iter().enumerate())
                        .map(|(i, n)| (n.clone(), i as u32))
                        .collect::<HashMap<_, _>>();
                    (sched, index)
                });
                (plan, waits, kept, node_names)
            })
        })
        .await
        .map_err(|_| ApiError::internal("the scheduler task failed"))?;
        let (plan, waits, kept, node_names) =
            scheduled.map_err(|e| ApiError::internal(format!("snapshot: {e}")))?;
        ctl.metrics
            .schedule_seconds
            .observe(started.elapsed().as_secs_f64());
        phases.schedule = started.elapsed();
        phases.placed = plan.placements.len();
        let node_names = Arc::new(node_names);
        self.kept = kept.map(|(sched, index)| KeptRound {
            sched,
            node_names: node_names.clone(),
            index,
            views,
            next_backoff,
            awaited,
        });

        if self.kept.is_some() {
            // Nothing to write: only the reasons change, and they live in memory. The last
            // round's are dropped after the lock is let go.
            let old = {
                let mut state = ctl.store.state.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::replace(&mut state.wait_reasons, waits)
            };
            drop(old);
            return Ok(next_backoff);
        }
        let applying = Instant::now();
        apply(ctl, plan, waits, node_names, Reasons::Replace).await?;
        phases.apply = applying.elapsed();
        Ok(next_backoff)
    }
}

/// The jobs written since the kept round, if all that changed is jobs submitted (or that only
/// reported progress): the new ones to decide, with what deciding them needs. `None` when the
/// round must be a full one: a job ended, stopped, moved, was requeued or changed what it holds;
/// a pending one was cancelled (its dependents may be let go) or is a task of a limited array.
fn arrived(s: &State, kept: &KeptRound, written: Vec<u64>, now: u64) -> Option<Arrived> {
    let mut seen = std::collections::HashSet::new();
    let mut arrived = Arrived {
        new: Vec::new(),
        warm: Default::default(),
        history: s
            .usage_history
            .iter()
            .map(|(p, milli)| (p.clone(), milli.round() as u64))
            .collect(),
        gated: Vec::new(),
        awaited: Vec::new(),
        elastic: BTreeSet::new(),
        next_backoff: kept.next_backoff,
    };
    let index = |n: &str| kept.index.get(n).copied();
    for id in written {
        if !seen.insert(id) {
            continue;
        }
        let job = s.jobs.get(&id)?;
        let array = job.def.array.as_ref().map(|t| t.id);
        if kept.awaited.contains(&id) || array.is_some_and(|a| kept.awaited.contains(&a)) {
            return None;
        }
        if job.state.is_active() {
            let (view, protected_until) = running_view(s, job, &index, now);
            if kept.views.get(&id) != Some(&view_hash(&view)) {
                return None;
            }
            // Its timers may be new (it started since): a time limit passed is a full round's
            // to act on, and the loop wakes for the next.
            let ends = time_limit_ends(job);
            if ends.is_some_and(|t| t <= now) {
                return None;
            }
            for t in [ends, protected_until].into_iter().flatten() {
                arrived.next_backoff = Some(arrived.next_backoff.map_or(t, |x| x.min(t)));
            }
            continue;
        }
        if kept.views.contains_key(&id) || job.state != JobState::Pending {
            return None;
        }
        if job.not_before_ms > now {
            let t = job.not_before_ms;
            arrived.next_backoff = Some(arrived.next_backoff.map_or(t, |x| x.min(t)));
            arrived.gated.push(id);
            continue;
        }
        if job.def.array.as_ref().is_some_and(|t| t.limit.is_some()) {
            return None;
        }
        match crate::batch::gate(job, |id| s.jobs.get(&id).map(|j| &**j), 0) {
            crate::batch::Gate::Open => {}
            crate::batch::Gate::Wait(_) => {
                arrived.gated.push(id);
                arrived.awaited.extend(job.def.after.iter().map(|a| a.job));
                continue;
            }
            crate::batch::Gate::Never(_) => return None,
        }
        if let Some(image) = &job.def.image {
            let holding: Vec<NodeId> = s
                .node_images
                .iter()
                .filter(|(_, held)| held.contains(image))
                .filter_map(|(node, _)| index(node).map(NodeId))
                .collect();
            if !holding.is_empty() {
                arrived.warm.insert(id, holding);
            }
        }
        if job.def.elastic.is_some() {
            arrived.elastic.insert(id);
        }
        arrived.new.push(PendingJob {
            id,
            spec: scheduling_spec(job),
        });
    }
    Some(arrived)
}

/// What a round does with the waiting jobs' reasons: a full round's replace them all; a quick
/// round's are added, and the reasons of jobs that may not start yet dropped.
enum Reasons {
    Replace,
    Add(Vec<u64>),
}

/// Applies `plan` and commits it, with the reasons of the jobs that wait.
async fn apply(
    ctl: &Ctl,
    plan: Plan,
    waits: HashMap<u64, Arc<WaitReason>>,
    node_names: Arc<Vec<String>>,
    reasons: Reasons,
) -> Result<(), ApiError> {
    let metrics = ctl.metrics.clone();
    let ports = ctl.config.rendezvous_ports.clone();
    let old_reasons = ctl
        .store
        .write(move |c, s| -> Result<_, ApiError> {
            let now = c.now_ms;
            // Placements are applied a slice at a time, each slice's changed jobs saved before
            // the next is made: a round that places 100,000 jobs would otherwise hold a copy of
            // each beside the state at once (this set the controller's peak memory). One
            // transaction still: a slice sees the ones before it (start numbers, ports).
            for part in slices(plan, APPLY_SLICE) {
                let applied = apply_plan(s, &part, &node_names, ports.clone(), now);
                drop(part);
                for waited in applied.waited_ms {
                    metrics.observe_wait(waited);
                }
                for _ in 0..applied.preemptions {
                    metrics.preemptions.inc();
                }
                for (job, notes) in applied.changed {
                    save_job(c, s, job, notes, now)?;
                }
                s.next_start_seq = applied.next_start_seq;
            }
            Ok(match reasons {
                Reasons::Replace => std::mem::replace(&mut s.wait_reasons, waits),
                Reasons::Add(gated) => {
                    for id in gated {
                        s.wait_reasons.remove(&id);
                    }
                    s.wait_reasons.extend(waits);
                    HashMap::new()
                }
            })
        })
        .await?;
    // Dropped here, not under the state's lock in the writer.
    drop(old_reasons);
    Ok(())
}

/// Placements a round applies at a time (see the round's write).
const APPLY_SLICE: usize = 2048;

/// `plan` as plans of at most `n` placements each, in order, then one with the rest of it
/// (preemptions, moves, grows, shrinks, reasons) and no placements.
fn slices(mut plan: Plan, n: usize) -> impl Iterator<Item = Plan> {
    let mut placements = std::mem::take(&mut plan.placements).into_iter();
    let mut rest = Some(plan);
    std::iter::from_fn(move || {
        let part: Vec<_> = placements.by_ref().take(n.max(1)).collect();
        if part.is_empty() {
            return rest.take();
        }
        Some(Plan {
            placements: part,
            ..Plan::default()
        })
    })
}

/// Cancels the pending jobs that can never run (a dependency failed) and stops the running
/// ones past their time limit, judged again against the state as it is now.
fn end_gated(
    c: &crate::store::Write,
    s: &mut State,
    never: Vec<(u64, String)>,
    overdue: Vec<u64>,
) -> Result<(), ApiError> {
    let now = c.now_ms;
    for (id, why) in never {
        let Some(job) = s.jobs.get(&id).filter(|j| j.state == JobState::Pending) else {
            continue;
        };
        let mut job = Job::clone(job);
        job.state = JobState::Cancelled;
        job.reason = why.clone();
        job.finished_ms = Some(now);
        save_job(c, s, job, vec![(EventKind::Cancelled, why)], now)?;
    }
    for id in overdue {
        let Some(job) = s
            .jobs
            .get(&id)
            .filter(|j| j.state.is_active() && j.stop.is_none())
        else {
            continue;
        };
        let mut job = Job::clone(job);
        let limit_ms = job.def.time_limit_ms.unwrap_or_default();
        let limit = crate::units::duration_text(limit_ms);
        job.stop = Some(Box::new(StopCause::TimeLimit { limit_ms }));
        job.reason = format!("time limit: it ran {limit}, its limit; stopping it");
        let mut notes = vec![(
            EventKind::TimeLimit,
            format!("it ran {limit}, its time limit; stopping it (its checkpoint signal first)"),
        )];
        notes.extend(settle(&mut job, now));
        save_job(c, s, job, notes, now)?;
    }
    Ok(())
}

/// What a plan changes in the pool, judged against the state at the time it is applied.
#[derive(Debug, Default)]
struct Applied {
    /// Jobs to save, with the events that say why.
    changed: Vec<(Job, Vec<Note>)>,
    /// The start sequence after the placements (each start takes the next number).
    next_start_seq: u64,
    /// How long each placed job waited, for the wait-time metric.
    waited_ms: Vec<u64>,
    preemptions: u64,
}

/// Turns a plan into changed jobs (pure: the caller saves them). The world may have moved since
/// the snapshot the plan was made from: what no longer holds (a job that is no longer pending,
/// a node that is no longer ready, a job already stopping) is skipped and waits for the next
/// round. A gang gets a rendezvous port that is free on its rank 0's host.
fn apply_plan(
    s: &State,
    plan: &tessera_sched::schedule::Plan,
    node_names: &[String],
    ports: std::ops::RangeInclusive<u16>,
    now: u64,
) -> Applied {
    let mut applied = Applied {
        next_start_seq: s.next_start_seq,
        ..Applied::default()
    };
    let changed = &mut applied.changed;
    // Rendezvous ports in use by node, built at the first gang placed.
    let mut taken: Option<HashMap<String, BTreeSet<u16>>> = None;
    for (id, allocs) in &plan.placements {
        let Some(job) = s.jobs.get(id) else { continue };
        if job.state != JobState::Pending || job.not_before_ms > now {
            continue;
        }
        let names: Vec<&String> = allocs.iter().map(|a| &node_names[a.node.index()]).collect();
        let device_nodes = allocs
            .iter()
            .filter_map(|a| a.gpu_node.map(|g| &node_names[g.index()]));
        if names.iter().copied().chain(device_nodes).any(|n| {
            s.nodes
                .get(n.as_str())
                .is_none_or(|node| node.health != NodeHealth::Ready || node.cordoned)
        }) {
            continue;
        }
        let mut job = job.clone();
        let mut replicas: Vec<Replica> = allocs
            .iter()
            .enumerate()
            .map(|(i, a)| Replica::placed(i as u32, a, node_names))
            .collect();
        // Ports to reserve: a gang's rendezvous on its rank 0's host, and each remote replica's
        // GPU server on its device's host. All or none: a job that cannot have them all waits.
        let mut wanted: Vec<(String, Option<usize>)> = Vec::new();
        if job.def.spec.replicas > 1 || job.def.elastic.is_some() {
            wanted.push((names[0].clone(), None));
        }
        for (i, r) in replicas.iter().enumerate() {
            if let Some(g) = &r.gpu_node {
                wanted.push((g.clone(), Some(i)));
            }
        }
        if !wanted.is_empty() {
            let taken = taken.get_or_insert_with(|| ports_taken(s));
            let mut got = Vec::new();
            for (node, _) in &wanted {
                let on = taken.entry(agents::node_host(s, node)).or_default();
                match ports.clone().find(|p| !on.contains(p)) {
                    Some(port) => {
                        on.insert(port);
                        got.push(port);
                    }
                    None => break,
                }
            }
            if got.len() < wanted.len() {
                for ((node, _), port) in wanted.iter().zip(&got) {
                    if let Some(on) = taken.get_mut(&agents::node_host(s, node)) {
                        on.remove(port);
                    }
                }
                tracing::warn!(
                    "job {id} waits: every port of --rendezvous-ports is in use on {}",
                    wanted[got.len()].0
                );
                continue;
            }
            for ((_, replica), port) in wanted.iter().zip(got) {
                match replica {
                    None => job.rendezvous_port = Some(port),
                    Some(i) => replicas[*i].gpu_port = Some(port),
                }
            }
        }
        job.attempt += 1;
        applied.next_start_seq += 1;
        job.started_seq = applied.next_start_seq;
        job.state = JobState::Scheduled;
        job.pin_node = None;
        job.generation += 1;
        job.replicas = replicas;
        let placed: Vec<String> = job
            .replicas
            .iter()
            .map(|r| placed_line(job.attempt, r))
            .collect();
        job.reason = format!("placed; waiting for the agent on {} to start it", names[0]);
        applied.waited_ms.push(now.saturating_sub(job.queued_ms));
        changed.push((*job, vec![(EventKind::Scheduled, placed.join("; "))]));
    }
    for p in &plan.preemptions {
        let Some(job) = s.jobs.get(&p.job) else {
            continue;
        };
        if !job.state.is_active() || job.stop.is_some() {
            continue;
        }
        let mut job = job.clone();
        let reason = match p.reason {
            tessera_sched::schedule::PreemptReason::QuotaReclaim => format!(
                "project {} is above its guaranteed quota and another project reclaims its share",
                job.project()
            ),
            tessera_sched::schedule::PreemptReason::Priority => {
                "a higher-priority job of the same project needs the room".to_string()
            }
        };
        job.stop = Some(Box::new(StopCause::Preempt {
            for_job: p.for_job,
            reason: reason.clone(),
        }));
        let mut notes = vec![(
            EventKind::Preempting,
            format!("for job {}: {reason}", p.for_job),
        )];
        notes.extend(settle(&mut job, now));
        applied.preemptions += 1;
        changed.push((*job, notes));
    }
    for m in &plan.moves {
        let Some(job) = s.jobs.get(&m.job) else {
            continue;
        };
        if !job.state.is_active() || job.stop.is_some() {
            continue;
        }
        let mut job = job.clone();
        let to = node_names[m.to.index()].clone();
        job.stop = Some(Box::new(StopCause::Migrate {
            by: format!("consolidation for job {}", m.for_job),
            to: Some(to.clone()),
        }));
        let mut notes = vec![(
            EventKind::Migrating,
            format!(
                "moving to {to} to gather free capacity for job {}",
                m.for_job
            ),
        )];
        notes.extend(settle(&mut job, now));
        changed.push((*job, notes));
    }
    for g in &plan.grows {
        let Some(job) = s.jobs.get(&g.job) else {
            continue;
        };
        let names: Vec<&String> = g
            .allocations
            .iter()
            .map(|a| &node_names[a.node.index()])
            .collect();
        let ready = names.iter().all(|n| {
            s.nodes
                .get(*n)
                .is_some_and(|node| node.health == NodeHealth::Ready && !node.cordoned)
        });
        if let Some(grown) = grow(s, job, &g.allocations, node_names).filter(|_| ready) {
            changed.push(grown);
        }
    }
    for sh in &plan.shrinks {
        let Some(job) = s.jobs.get(&sh.job) else {
            continue;
        };
        if let Some(shrunk) = shrink(job, &sh.replicas, sh.for_job) {
            changed.push(shrunk);
        }
    }
    applied
}

/// "attempt 2: replica 0 on n1 gpu0,gpu1": the event line `tessera logs` finds nodes by.
fn placed_line(attempt: u32, r: &Replica) -> String {
    let devs: Vec<String> = r
        .devices
        .iter()
        .map(|d| {
            if d.milli == 1000 {
                format!("gpu{}", d.device)
            } else {
                format!("gpu{}:{}m", d.device, d.milli)
            }
        })
        .collect();
    format!(
        "attempt {attempt}: replica {} on {} {}",
        r.index,
        r.node,
        devs.join(",")
    )
}

/// Why a pending job waits, in words, from the reason the last round gave. A job that asked to
/// wait for capacity (`waitForCapacity`) and that no node of the pool could hold says so,
/// rather than which nodes are busy.
pub fn describe_wait(s: &State, job: &Job, why: &WaitReason) -> String {
    if job.def.wait_for_capacity
        && let Some(m) = super::ops::pool_never_fits(s, &job.def.spec.request)
    {
        return format!(
            "cannot fit any node of the pool today: it {}; waiting for nodes that may join",
            m.why
        );
    }
    why.describe(&scheduling_spec(job))
}

/// The ports active jobs hold, by host (not by node: several agents may share one host, as
/// under `tessera up --nodes`): gangs' rendezvous on their rank 0's, remote replicas' GPU
/// servers on their devices'.
fn ports_taken(s: &State) -> HashMap<String, BTreeSet<u16>> {
    let mut taken: HashMap<String, BTreeSet<u16>> = HashMap::new();
    for job in s.jobs.values().filter(|j| j.state.is_active()) {
        if let (Some(port), Some(first)) = (job.rendezvous_port, job.replicas.first()) {
            let host = agents::node_host(s, &first.node);
            taken.entry(host).or_default().insert(port);
        }
        for r in &job.replicas {
            if let (Some(port), Some(g)) = (r.gpu_port, &r.gpu_node) {
                let host = agents::node_host(s, g);
                taken.entry(host).or_default().insert(port);
            }
        }
    }
    taken
}

const DEPARTED_KEPT: usize = 16;

/// Adds replicas to a running elastic job; `None` when the job no longer may grow.
fn grow(
    s: &State,
    job: &Job,
    allocations: &[Allocation],
    node_names: &[String],
) -> Option<(Job, Vec<Note>)> {
    let e = job.def.elastic?;
    let leaving = job.replicas.iter().any(|r| r.leaving && !r.phase.is_done());
    if job.state != JobState::Running || job.stop.is_some() || leaving {
        return None;
    }
    let room = e.max.saturating_sub(job.members().count() as u32) as usize;
    if room == 0 {
        return None;
    }
    let mut job = job.clone();
    // A new replica takes over the newest checkpoint one that left saved (and none took yet).
    let mut departed: Vec<&Replica> = job
        .replicas
        .iter()
        .filter(|r| r.leaving && r.phase.is_done())
        .filter(|r| s.checkpoints.contains_key(&(job.id, r.index)))
        .filter(|r| !job.replicas.iter().any(|o| o.resume_of == Some(r.index)))
        .collect();
    departed.sort_by_key(|r| (r.finished_ms, r.index));
    let mut takeover: Vec<u32> = departed.iter().map(|r| r.index).collect();
    let first = job.replicas.iter().map(|r| r.index + 1).max().unwrap_or(0);
    let mut lines = Vec::new();
    // A remote pair needs a port reserved for its server: elastic jobs grow on one node each.
    let local = allocations.iter().filter(|a| a.gpu_node.is_none());
    for (next, a) in (first..).zip(local.take(room)) {
        let mut r = Replica::placed(next, a, node_names);
        r.resume_of = job.def.checkpoint.as_ref().and(takeover.pop());
        let mut line = placed_line(job.attempt, &r);
        if let Some(of) = r.resume_of {
            line.push_str(&format!(" (from the checkpoint of replica {of})"));
        }
        lines.push(line);
        job.replicas.push(r);
    }
    let gone: Vec<u32> = job
        .replicas
        .iter()
        .filter(|r| r.leaving && r.phase.is_done())
        .map(|r| r.index)
        .collect();
    if gone.len() > DEPARTED_KEPT {
        let forget = &gone[..gone.len() - DEPARTED_KEPT];
        job.replicas.retain(|r| !forget.contains(&r.index));
    }
    job.generation += 1;
    let now = job.members().count();
    let text = format!(
        "grew to {now} of at most {} replicas in idle capacity; {}",
        e.max,
        lines.join("; ")
    );
    Some((job, vec![(EventKind::Grown, text)]))
}

/// Gives back replicas above an elastic job's minimum; `None` when none of them can go.
fn shrink(job: &Job, replicas: &[u32], for_job: u64) -> Option<(Job, Vec<Note>)> {
    let e = job.def.elastic?;
    if !job.state.is_active() || job.stop.is_some() {
        return None;
    }
    let mut job = job.clone();
    let mut gone = Vec::new();
    for r in job.replicas.iter_mut() {
        if replicas.contains(&r.index) && r.index >= e.min && !r.leaving && !r.phase.is_done() {
            r.leaving = true;
            gone.push(r.index.to_string());
        }
    }
    if gone.is_empty() {
        return None;
    }
    job.generation += 1;
    let how = if job.def.checkpoint.is_some() {
        "checkpointing and stopping"
    } else {
        "stopping"
    };
    let text = format!(
        "{how} replica{} {} for job {for_job}, which needs the room; {} of {}..{} replicas remain",
        if gone.len() == 1 { "" } else { "s" },
        gone.join(", "),
        job.members().count(),
        e.min,
        e.max
    );
    Some((job, vec![(EventKind::Shrinking, text)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Project;
    use crate::testkit::{alloc, job, node};
    use tessera_sched::ResourceRequest;

    fn state() -> State {
        let mut s = State::default();
        for (name, health, cordoned) in [
            ("a", NodeHealth::Ready, false),
            ("b", NodeHealth::Lost, false),
            ("c", NodeHealth::Ready, true),
            ("d", NodeHealth::Ready, false),
        ] {
            s.nodes.insert(name.into(), node(name, health, cordoned));
        }
        s.projects.insert(
            "default".into(),
            Project {
                name: "default".into(),
                parent: None,
                guaranteed_milli: 1000,
                limit_milli: None,
                over_quota_weight: 1,
                members: Default::default(),
                created_ms: 0,
                min_runtime_ms: 60_000,
                policy: Default::default(),
            },
        );
        s
    }

    #[test]
    fn only_ready_uncordoned_nodes_are_offered_each_labelled_with_its_name() {
        let built = build(&state(), 0);
        assert_eq!(built.node_names, ["a", "d"]);
        let labels: Vec<_> = built
            .snapshot
            .nodes
            .iter()
            .map(|n| n.labels.get(NODE_LABEL).cloned())
            .collect();
        assert_eq!(labels, [Some("a".to_string()), Some("d".to_string())]);
        assert_eq!(built.snapshot.projects.len(), 1);
    }

    #[test]
    fn pending_jobs_wait_out_their_backoff_and_a_pinned_or_transparent_one_carries_its_needs() {
        let mut s = state();
        let mut backing_off = job(1, ResourceRequest::default());
        backing_off.not_before_ms = 5_000;
        s.insert_job(backing_off);
        let mut pinned = job(2, ResourceRequest::default());
        pinned.pin_node = Some("d".into());
        s.insert_job(pinned);
        let mut transparent = job(3, ResourceRequest::default());
        transparent.def.spec.request.gpu = tessera_sched::GpuRequest::Whole { devices: 1 };
        transparent.def.checkpoint = Some(Box::new(crate::manifest::Checkpoint {
            signal: 10,
            signal_name: "USR1".into(),
            grace_ms: 1000,
            interval_ms: None,
            transparent: true,
        }));
        s.insert_job(transparent);

        let built = build(&s, 1_000);
        let ids: Vec<u64> = built.snapshot.pending.iter().map(|p| p.id).collect();
        assert_eq!(ids, [2, 3], "the job in backoff is not offered yet");
        assert_eq!(
            built.next_backoff,
            Some(5_000),
            "the loop wakes when it ends"
        );
        let selector = |id: u64| {
            built
                .snapshot
                .pending
                .iter()
                .find(|p| p.id == id)
                .unwrap()
                .spec
                .request
                .node_selector
                .clone()
        };
        assert_eq!(selector(2).get(NODE_LABEL).map(String::as_str), Some("d"));
        let needs = selector(3);
        assert_eq!(
            needs
                .get(crate::agent::criu::CRIU_LABEL)
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(
            needs
                .get(crate::agent::criu::CUDA_LABEL)
                .map(String::as_str),
            Some("true"),
            "a GPU job's transparent checkpoint needs cuda-checkpoint too"
        );
        // After the backoff it is offered.
        let later = build(&s, 5_000);
        assert_eq!(later.snapshot.pending.len(), 3);
    }

    #[test]
    fn a_running_job_is_protected_from_preemption_for_its_projects_minimum_runtime() {
        let mut s = state();
        let mut running = job(7, ResourceRequest::default());
        running.state = JobState::Running;
        running.attempt = 1;
        let placed = tessera_sched::Allocation {
            gpu_node: None,
            node: tessera_sched::NodeId(0),
            cpu_milli: 500,
            memory_bytes: 1 << 30,
            devices: vec![],
            affinity: None,
        };
        let mut replica = crate::state::Replica::assigned(0, "a", &placed);
        replica.started_ms = Some(10_000);
        running.replicas = vec![replica];
        s.insert_job(running);

        let during = build(&s, 30_000);
        let r = &during.snapshot.running[0];
        assert!(!r.preemptible, "protected until 70 s");
        assert_eq!(during.next_backoff, Some(70_000));
        assert_eq!(r.allocations.len(), 1);
        assert_eq!(r.allocations[0].node, tessera_sched::NodeId(0));
        let after = build(&s, 70_000);
        assert!(after.snapshot.running[0].preemptible);
        assert_eq!(after.next_backoff, None);
        // A replica on a node that is not offered (lost) holds no allocation in the snapshot.
        s.nodes.get_mut("a").unwrap().health = NodeHealth::Lost;
        let lost = build(&s, 70_000);
        assert!(lost.snapshot.running[0].allocations.is_empty());
    }

    /// The test state's nodes a (ready), b (lost), c (cordoned), d (ready), on two hosts.
    fn names() -> Vec<String> {
        ["a", "b", "c", "d"].map(String::from).to_vec()
    }

    fn placed_on(a: &Applied) -> Vec<(u64, Vec<String>)> {
        a.changed
            .iter()
            .map(|(j, _)| (j.id, j.replicas.iter().map(|r| r.node.clone()).collect()))
            .collect()
    }

    #[test]
    fn a_plan_is_applied_in_slices_of_placements_then_the_rest_once() {
        let plan = Plan {
            placements: (1..=5).map(|id| (id, Vec::new())).collect(),
            preemptions: vec![tessera_sched::schedule::Preemption {
                job: 9,
                for_job: 1,
                reason: tessera_sched::schedule::PreemptReason::Priority,
            }],
            ..Plan::default()
        };
        let parts: Vec<Plan> = slices(plan, 2).collect();
        let ids: Vec<Vec<u64>> = parts
            .iter()
            .map(|p| p.placements.iter().map(|(id, _)| *id).collect())
            .collect();
        assert_eq!(ids, [vec![1, 2], vec![3, 4], vec![5], vec![]]);
        let preempted: Vec<usize> = parts.iter().map(|p| p.preemptions.len()).collect();
        assert_eq!(preempted, [0, 0, 0, 1], "the rest comes once, last");
        // An empty plan is one empty part; a slice size of 0 is taken as 1.
        assert_eq!(slices(Plan::default(), 2).count(), 1);
        let one_each = Plan {
            placements: (1..=3).map(|id| (id, Vec::new())).collect(),
            ..Plan::default()
        };
        assert_eq!(slices(one_each, 0).count(), 4);
    }

    #[test]
    fn a_plan_places_pending_jobs_and_skips_what_changed_since_its_snapshot() {
        let mut s = state();
        s.next_start_seq = 10;
        for id in 1..=5 {
            let mut j = job(id, ResourceRequest::default());
            j.queued_ms = 400;
            s.insert_job(j);
        }
        let mut cancelled = job(6, ResourceRequest::default());
        cancelled.state = JobState::Cancelled;
        s.insert_job(cancelled);
        let mut backing_off = job(7, ResourceRequest::default());
        backing_off.not_before_ms = 5_000;
        s.insert_job(backing_off);
        let plan = tessera_sched::schedule::Plan {
            placements: vec![
                (1, vec![alloc(0)]),  // a: ready
                (2, vec![alloc(1)]),  // b: lost since
                (3, vec![alloc(2)]),  // c: cordoned since
                (6, vec![alloc(0)]),  // cancelled since
                (7, vec![alloc(0)]),  // backing off again
                (99, vec![alloc(0)]), // gone
                (4, vec![alloc(3)]),  // d: ready
            ],
            ..Default::default()
        };
        let applied = apply_plan(&s, &plan, &names(), 29500..=29599, 1_000);
        assert_eq!(
            placed_on(&applied),
            [(1, vec!["a".to_string()]), (4, vec!["d".to_string()])]
        );
        let (first, notes) = &applied.changed[0];
        assert_eq!(
            (first.state, first.attempt, first.started_seq),
            (JobState::Scheduled, 1, 11)
        );
        assert_eq!(
            first.rendezvous_port, None,
            "a single replica needs no rendezvous"
        );
        assert_eq!(notes[0].0, EventKind::Scheduled);
        assert!(
            notes[0].1.contains("attempt 1: replica 0 on a"),
            "{}",
            notes[0].1
        );
        assert_eq!(applied.changed[1].0.started_seq, 12);
        assert_eq!(applied.next_start_seq, 12);
        assert_eq!(applied.waited_ms, [600, 600]);
        // Pure: the state is as it was.
        assert_eq!(s.jobs[&1].state, JobState::Pending);
        assert_eq!(s.next_start_seq, 10);
    }

    #[test]
    fn gangs_get_a_rendezvous_port_free_on_their_rank_0s_host_or_wait() {
        let mut s = state();
        for (name, host) in [("a", "10.0.0.1"), ("d", "10.0.0.2")] {
            s.nodes.get_mut(name).unwrap().address = format!("http://{host}:7481");
        }
        let gang = |id| {
            let mut j = job(id, ResourceRequest::default());
            j.def.spec.replicas = 2;
            j
        };
        // A running gang already holds 29500 on a's host.
        let mut running = gang(1);
        running.state = JobState::Running;
        running.rendezvous_port = Some(29500);
        running.replicas = vec![Replica::assigned(0, "a", &alloc(0))];
        s.insert_job(running);
        for id in 2..=5 {
            s.insert_job(gang(id));
        }
        let plan = tessera_sched::schedule::Plan {
            placements: vec![
                (2, vec![alloc(0), alloc(3)]), // rank 0 on a: 29501
                (3, vec![alloc(3), alloc(0)]), // rank 0 on d: 29500 is free there
                (4, vec![alloc(0), alloc(0)]), // a has no port left in 29500-29501
                (5, vec![alloc(3), alloc(3)]), // d: 29501
            ],
            ..Default::default()
        };
        let applied = apply_plan(&s, &plan, &names(), 29500..=29501, 1_000);
        let ports: Vec<(u64, Option<u16>)> = applied
            .changed
            .iter()
            .map(|(j, _)| (j.id, j.rendezvous_port))
            .collect();
        assert_eq!(
            ports,
            [(2, Some(29501)), (3, Some(29500)), (5, Some(29501))]
        );
    }

    #[test]
    fn a_remote_pair_gets_a_server_port_on_its_device_nodes_host_and_both_nodes_count() {
        let mut s = state();
        for (name, host) in [("a", "10.0.0.1"), ("d", "10.0.0.2")] {
            s.nodes.get_mut(name).unwrap().address = format!("http://{host}:7481");
        }
        let pair = |cpu: u32, gpu: u32| Allocation {
            gpu_node: Some(NodeId(gpu)),
            devices: vec![tessera_sched::DeviceShare {
                device: 0,
                milli: 500,
                memory_bytes: 40 << 30,
            }],
            ..alloc(cpu)
        };
        // A gang on d holds 29500 there.
        let mut gang = job(1, ResourceRequest::default());
        gang.def.spec.replicas = 2;
        gang.state = JobState::Running;
        gang.rendezvous_port = Some(29500);
        gang.replicas = vec![Replica::assigned(0, "d", &alloc(3))];
        s.insert_job(gang);
        for id in 2..=4 {
            s.insert_job(job(id, ResourceRequest::default()));
        }
        let plan = tessera_sched::schedule::Plan {
            placements: vec![
                (2, vec![pair(0, 3)]), // program on a, device on d: 29501 on d's host
                (3, vec![pair(0, 3)]), // d has no port left: waits, placing nothing
                (4, vec![pair(3, 1)]), // device on b, which is lost: waits
            ],
            ..Default::default()
        };
        let applied = apply_plan(&s, &plan, &names(), 29500..=29501, 1_000);
        assert_eq!(applied.changed.len(), 1, "{:?}", applied.changed);
        let placed = &applied.changed[0].0;
        assert_eq!(placed.id, 2);
        let r = &placed.replicas[0];
        assert_eq!((r.node.as_str(), r.gpu_node.as_deref()), ("a", Some("d")));
        assert_eq!(r.gpu_port, Some(29501));
        assert_eq!(placed.rendezvous_port, None, "one replica: no rendezvous");
        assert!(!r.gpu_serving);
        s.insert_job(placed.clone());
        assert_eq!(ports_taken(&s)["10.0.0.2"], [29500, 29501].into());

        // The next snapshot counts the pair as it was placed: CPU on a, the device on d.
        let built = build(&s, 1_000);
        let a = built.node_names.iter().position(|n| n == "a").unwrap() as u32;
        let d = built.node_names.iter().position(|n| n == "d").unwrap() as u32;
        let held = built
            .snapshot
            .running
            .iter()
            .find(|j| j.id == 2)
            .map(|j| j.allocations.clone())
            .unwrap();
        assert_eq!(held[0].node, NodeId(a));
        assert_eq!(held[0].gpu_node, Some(NodeId(d)));
        assert_eq!(held[0].devices, r.devices);
        // With d cordoned, a keeps the CPU part and nothing counts the device.
        s.nodes.get_mut("d").unwrap().cordoned = true;
        let built = build(&s, 1_000);
        let held = &built
            .snapshot
            .running
            .iter()
            .find(|j| j.id == 2)
            .unwrap()
            .allocations;
        assert_eq!((held[0].gpu_node, held[0].devices.len()), (None, 0));
        assert_eq!(held[0].cpu_milli, 1000);
    }

    #[test]
    fn preemptions_and_moves_stop_only_active_jobs_not_already_stopping() {
        use tessera_sched::schedule::{Move, PreemptReason, Preemption};
        let mut s = state();
        let running = |id| {
            let mut j = job(id, ResourceRequest::default());
            j.state = JobState::Running;
            j.replicas = vec![Replica::assigned(0, "a", &alloc(0))];
            j
        };
        for id in [1, 2, 4] {
            s.insert_job(running(id));
        }
        let mut stopping = running(3);
        stopping.stop = Some(Box::new(StopCause::Preempt {
            for_job: 8,
            reason: "earlier".into(),
        }));
        s.insert_job(stopping);
        let mut ended = running(5);
        ended.state = JobState::Succeeded;
        s.insert_job(ended);
        let preempt = |job, reason| Preemption {
            job,
            for_job: 9,
            reason,
        };
        let plan = tessera_sched::schedule::Plan {
            preemptions: vec![
                preempt(1, PreemptReason::QuotaReclaim),
                preempt(2, PreemptReason::Priority),
                preempt(3, PreemptReason::Priority),
                preempt(5, PreemptReason::Priority),
            ],
            moves: vec![Move {
                job: 4,
                to: tessera_sched::NodeId(3),
                for_job: 9,
            }],
            ..Default::default()
        };
        let applied = apply_plan(&s, &plan, &names(), 29500..=29599, 1_000);
        assert_eq!(applied.preemptions, 2);
        let stops: Vec<(u64, String)> = applied
            .changed
            .iter()
            .map(|(j, notes)| (j.id, format!("{:?} / {}", j.stop, notes[0].1)))
            .collect();
        assert_eq!(stops.len(), 3, "{stops:?}");
        assert!(
            stops[0]
                .1
                .contains("project default is above its guaranteed quota"),
            "{stops:?}"
        );
        assert!(stops[1].1.contains("a higher-priority job"), "{stops:?}");
        assert_eq!(stops[2].0, 4);
        assert!(
            stops[2].1.contains("Migrate") && stops[2].1.contains("moving to d"),
            "{stops:?}"
        );
    }
}

#[cfg(test)]
mod quick_tests {
    use super::*;
    use crate::state::Project;
    use crate::testkit::{job, node};
    use tessera_sched::{GpuRequest, ResourceRequest};

    /// `devices` whole GPUs (none: a CPU-only job), 1 CPU and 1 GiB.
    fn gpus(devices: u32) -> ResourceRequest {
        ResourceRequest {
            gpu: match devices {
                0 => GpuRequest::None,
                devices => GpuRequest::Whole { devices },
            },
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            ..Default::default()
        }
    }

    fn config() -> Config {
        Config {
            policy: tessera_sched::PolicyKind::Tessera,
            seed: 1,
            shapes: ShapeDistribution::default(),
        }
    }

    /// A full round over `s` as the loop runs it: its placements saved into the state; what it
    /// kept, if it changed nothing.
    fn full_round(s: &mut State, now: u64) -> (Option<KeptRound>, HashMap<u64, Arc<WaitReason>>) {
        s.sched_changes = SchedChanges::none();
        let built = build(s, now);
        let (plan, kept) = schedule_keeping(built.snapshot, &config()).unwrap();
        let applied = apply_plan(s, &plan, &built.node_names, 29_500..=29_510, now);
        for (job, _) in applied.changed {
            s.insert_job(job);
        }
        let waits = plan.waiting.into_iter().collect();
        let index = (built.node_names.iter().enumerate())
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        let kept = kept.map(|sched| KeptRound {
            sched,
            node_names: Arc::new(built.node_names),
            index,
            views: built.views,
            next_backoff: built.next_backoff,
            awaited: built.awaited,
        });
        (kept, waits)
    }

    /// Two ready nodes of two GPUs; jobs 1 and 2 hold them, job 3 waits.
    fn settled() -> (State, KeptRound, HashMap<u64, Arc<WaitReason>>) {
        let mut s = State::default();
        for name in ["a", "d"] {
            s.nodes
                .insert(name.into(), node(name, NodeHealth::Ready, false));
        }
        s.projects
            .insert("default".into(), Project::open("default", 0));
        for id in 1..=3 {
            s.insert_job(job(id, gpus(2)));
        }
        let (kept, _) = full_round(&mut s, 1_000);
        assert!(kept.is_none(), "the first round placed work");
        let (kept, waits) = full_round(&mut s, 1_000);
        let kept = kept.expect("the second round changed nothing and keeps what it built");
        assert_eq!(waits.keys().copied().collect::<Vec<_>>(), [3]);
        s.sched_changes = SchedChanges::none();
        (s, kept, waits)
    }

    /// Whether, in the settled pool, writing job `id` changed by `change` makes the next round
    /// a full one.
    fn full_after(id: u64, change: impl FnOnce(&mut Job)) -> bool {
        let (mut s, kept, _) = settled();
        let mut job = Job::clone(&s.jobs[&id]);
        change(&mut job);
        s.insert_job(job);
        let ids = written(&mut s);
        arrived(&s, &kept, ids, 2_000).is_none()
    }

    fn written(s: &mut State) -> Vec<u64> {
        std::mem::replace(&mut s.sched_changes, SchedChanges::none()).jobs
    }

    #[test]
    fn a_quick_round_sees_new_jobs_and_progress_and_hands_anything_else_to_a_full_round() {
        let (mut s, kept, full) = settled();

        // Progress only (a running job's text), a new job of the waiting shape, a CPU-only
        // job, and one held until later: two to decide, one to wake for.
        let mut busy = Job::clone(&s.jobs[&1]);
        busy.reason = "running".into();
        s.insert_job(busy);
        s.insert_job(job(4, gpus(2)));
        s.insert_job(job(5, gpus(0)));
        let mut later = job(6, gpus(1));
        later.not_before_ms = 9_000;
        s.insert_job(later);
        let ids = written(&mut s);
        assert!(!s.sched_changes.other);
        let got = arrived(&s, &kept, ids, 2_000).expect("only new jobs and progress");
        let new: Vec<u64> = got.new.iter().map(|j| j.id).collect();
        assert_eq!(new, [4, 5]);
        assert_eq!(got.gated, [6]);
        assert_eq!(got.next_backoff, Some(9_000));
        let KeptRound { sched, .. } = kept;
        let (plan, still) = sched.schedule_new(&got.new, &got.history, &got.warm);
        let plan = plan.expect("decided without a full round");
        // Job 4 waits for job 3's reason; job 5 fits beside the running work.
        assert_eq!(plan.waiting.len(), 1);
        assert_eq!(plan.waiting[0].0, 4);
        assert_eq!(plan.waiting[0].1, full[&3]);
        assert_eq!(plan.placements.len(), 1);
        assert_eq!(plan.placements[0].0, 5);
        assert!(still.is_some(), "nothing waiting could reclaim from job 5");

        // Anything else is a full round's: a running job that ends, a waiting job cancelled (a
        // job after it may be let go), a node or project changed.
        assert!(
            !full_after(1, |j| j.reason = "running".into()),
            "progress only"
        );
        let ends = |j: &mut Job| j.state = JobState::Succeeded;
        assert!(full_after(2, ends), "capacity was freed");
        let cancelled = |j: &mut Job| j.state = JobState::Cancelled;
        assert!(full_after(3, cancelled), "a pending job ended");
        let stopping = |j: &mut Job| j.stop = Some(Box::new(StopCause::TimeLimit { limit_ms: 1 }));
        assert!(full_after(1, stopping), "a job is stopping");

        // A job that started since with a time limit: the loop wakes for it, and once it is
        // past, the round is a full one (which stops it).
        let (mut s, kept, _) = settled();
        let mut limited = Job::clone(&s.jobs[&1]);
        limited.def.time_limit_ms = Some(5_000);
        limited.replicas[0].started_ms = Some(1_500);
        s.insert_job(limited);
        let ids = written(&mut s);
        let got = arrived(&s, &kept, ids.clone(), 2_000).expect("only a start");
        assert_eq!(got.next_backoff, Some(6_500));
        assert!(
            arrived(&s, &kept, ids, 7_000).is_none(),
            "past its time limit"
        );

        // A job that waits to start after job 3 does: when job 3 is written (placed, say),
        // the round is a full one, which lets it go.
        let (mut s, mut kept, _) = settled();
        let mut after = job(8, gpus(0));
        after.def.after = vec![crate::batch::After {
            job: 3,
            on: crate::batch::AfterKind::Start,
        }];
        s.insert_job(after);
        let ids = written(&mut s);
        let got = arrived(&s, &kept, ids, 2_000).expect("a job that waits on another");
        assert!(got.new.is_empty());
        assert_eq!((got.gated, got.awaited.clone()), (vec![8], vec![3]));
        kept.awaited.extend(got.awaited);
        let mut placed = Job::clone(&s.jobs[&3]);
        placed.attempt = 1;
        s.insert_job(placed);
        let ids = written(&mut s);
        assert!(
            arrived(&s, &kept, ids, 2_000).is_none(),
            "job 3 was awaited"
        );

        let (mut s, _, _) = settled();
        s.changed_for_scheduler();
        s.insert_job(job(7, gpus(1)));
        assert!(s.sched_changes.other && s.sched_changes.jobs.is_empty());
    }
}
