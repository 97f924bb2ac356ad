//! The placement engine: feasibility → score → choose, one replica at a time, whole gangs or
//! nothing.
//!
//! Feasibility is exact and policy-independent (CPU, memory, node labels, device models, and a
//! device-level fit of the GPU request). The policy scores the feasible nodes; the highest score
//! wins and ties go to the node first in the pool's tie order. Scores of node-local policies are
//! cached per (request shape, node version) with the best busy node of each model group at hand
//! (`score_cache.rs`), so a decision on a large pool costs scoring the few nodes that
//! changed since that shape was last placed, not a scan of the pool.

use std::collections::HashMap;
use std::fmt;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::cluster::{Allocation, CapacityError, Cluster, DeviceShare, GpuAffinity, NodeState};
use crate::model::{MILLI_PER_DEVICE, human_milli, plural};
use crate::policy::{DevicePick, Fit, PlacementPolicy, Resolved, Scored};
use crate::request::{GpuAttach, GpuRequest, JobSpec, LOCALITY_LABEL, ResourceRequest};
use crate::score_cache::{Scorer, ShapeScores};
use crate::validate::{ValidationError, validate_job};

/// Memory the score cache may take: shapes × nodes × an entry. A pool with many distinct
/// request shapes (model pins multiply them) keeps more of them on a small pool than a large one.
const SCORE_CACHE_BYTES: usize = 384 << 20;

/// Most distinct request shapes whose scores are cached at once, for a pool of `nodes`.
fn max_cached_shapes(nodes: usize) -> usize {
    (SCORE_CACHE_BYTES / (nodes.max(1) * crate::score_cache::BYTES_PER_NODE)).clamp(64, 4096)
}

/// The best node seen so far: the highest score, then a preferred node, then the earlier node.
#[derive(Default)]
struct Best(Option<(i64, bool, u32, u32, DevicePick)>);

impl Best {
    fn offer(&mut self, s: Scored, warm: bool, rank: u32, node: u32) {
        let better = match self.0 {
            None => true,
            Some((bs, bw, br, _, _)) => {
                s.score > bs || (s.score == bs && (warm && !bw || (warm == bw && rank < br)))
            }
        };
        if better {
            self.0 = Some((s.score, warm, rank, node, s.pick));
        }
    }

    fn choice(self) -> Option<(crate::cluster::NodeId, DevicePick)> {
        self.0
            .map(|(_, _, _, i, pick)| (crate::cluster::NodeId(i), pick))
    }
}

/// Why a job could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("replica {replica} of {replicas} fits on no node; the gang was not placed")]
    NoFit { replica: u32, replicas: u32 },
}

/// Places replicas on one pool with one policy. Owns the pool so that cached scores can never
/// outlive the state they were computed from.
pub struct Placer {
    cluster: Cluster,
    policy: Box<dyn PlacementPolicy>,
    rng: ChaCha8Rng,
    cache: HashMap<ResourceRequest, ShapeScores>,
    /// Decisions taken, to find the least recently used shape in `cache`.
    clock: u64,
    /// Nodes preferred among those that score the same (see [`Placer::place_job_preferring`]).
    prefer: Vec<crate::cluster::NodeId>,
    /// A node the choice in progress must not take (a `remote` pair's CPU part is never beside
    /// its device).
    avoid: Option<u32>,
    /// Changes since the oldest open checkpoint, for [`Placer::rollback`].
    journal: Vec<Change>,
    /// Checkpoints taken and not yet rolled back or committed.
    open: usize,
}

/// One change to the pool, as the journal keeps it.
enum Change {
    Allocated(Allocation),
    Released(Allocation),
}

/// A point the pool can be rolled back to: trial moves (KAI's Statement) are taken after a
/// checkpoint and either kept ([`Placer::commit`]) or undone whole ([`Placer::rollback`]).
#[must_use = "a checkpoint must be committed or rolled back"]
#[derive(Debug)]
pub struct Checkpoint {
    at: usize,
}

impl Placer {
    /// `seed` drives the policy's randomness, if it has any.
    pub fn new(cluster: Cluster, policy: Box<dyn PlacementPolicy>, seed: u64) -> Self {
        Placer {
            cluster,
            policy,
            rng: ChaCha8Rng::seed_from_u64(seed),
            cache: HashMap::new(),
            clock: 0,
            prefer: Vec::new(),
            avoid: None,
            journal: Vec::new(),
            open: 0,
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// As [`Placer::place_job`], preferring `prefer` among nodes that score the same (nodes that
    /// already hold what the job needs, e.g. its container image): a tie-break only, the
    /// policy's score still decides.
    pub fn place_job_preferring(
        &mut self,
        job: &JobSpec,
        prefer: &[crate::cluster::NodeId],
    ) -> Result<Vec<Allocation>, PlacementError> {
        self.prefer = prefer.to_vec();
        let placed = self.place_job(job);
        self.prefer.clear();
        placed
    }

    /// Places every replica of `job` or none of them.
    pub fn place_job(&mut self, job: &JobSpec) -> Result<Vec<Allocation>, PlacementError> {
        validate_job(job)?;
        let checkpoint = self.checkpoint();
        let mut placed: Vec<Allocation> = Vec::with_capacity(job.replicas as usize);
        for replica in 0..job.replicas {
            match self.place_replica(&job.request) {
                Some(alloc) => placed.push(alloc),
                None => {
                    self.rollback(checkpoint);
                    return Err(PlacementError::NoFit {
                        replica,
                        replicas: job.replicas,
                    });
                }
            }
        }
        self.commit(checkpoint);
        Ok(placed)
    }

    /// Returns a finished replica's resources.
    pub fn release(&mut self, alloc: &Allocation) -> Result<(), CapacityError> {
        self.cluster.release(alloc)?;
        self.record(|| Change::Released(alloc.clone()));
        Ok(())
    }

    /// Applies an allocation decided elsewhere (e.g. a replica already running when the engine
    /// starts).
    pub fn adopt(&mut self, alloc: &Allocation) -> Result<(), CapacityError> {
        self.cluster.allocate(alloc)?;
        self.record(|| Change::Allocated(alloc.clone()));
        Ok(())
    }

    /// Starts a trial: every placement, release and adoption from here on can be undone whole
    /// with [`Placer::rollback`], or kept with [`Placer::commit`]. Checkpoints nest; each must be
    /// closed, innermost first.
    pub fn checkpoint(&mut self) -> Checkpoint {
        self.open += 1;
        Checkpoint {
            at: self.journal.len(),
        }
    }

    /// Keeps the changes made since `checkpoint` (they become part of any outer trial).
    pub fn commit(&mut self, checkpoint: Checkpoint) {
        self.close(checkpoint);
    }

    /// Undoes every change made since `checkpoint`, newest first: the pool's free CPU, memory,
    /// device shares, affinities and replica counts are as they were when it was taken. (Node
    /// versions move on, so that no score cached during the trial is ever reused.)
    pub fn rollback(&mut self, checkpoint: Checkpoint) {
        while self.journal.len() > checkpoint.at {
            let Some(change) = self.journal.pop() else {
                break;
            };
            // Undoing the newest change returns the pool to the state right before it, in which
            // the opposite operation was just valid: neither can fail.
            let undone = match &change {
                Change::Allocated(alloc) => self.cluster.release(alloc),
                Change::Released(alloc) => self.cluster.allocate(alloc),
            };
            debug_assert!(undone.is_ok(), "{undone:?}");
        }
        self.close(checkpoint);
    }

    fn close(&mut self, checkpoint: Checkpoint) {
        debug_assert!(self.open > 0, "a checkpoint closed twice");
        debug_assert!(checkpoint.at <= self.journal.len(), "closed out of order");
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            self.journal.clear();
        }
    }

    /// Journals a change while a trial is open (and only then: outside trials nothing is kept).
    fn record(&mut self, change: impl FnOnce() -> Change) {
        if self.open > 0 {
            self.journal.push(change());
        }
    }

    /// Places one replica (the request must be valid) and commits it; `None` when nothing fits.
    /// A replica that may attach its device from another node is placed as a pair when its
    /// attachment says so (`remote`) or when it fits on no single node (`any`).
    pub fn place_replica(&mut self, request: &ResourceRequest) -> Option<Allocation> {
        if request.gpu == GpuRequest::None {
            return self.place_local(request);
        }
        match request.gpu_attach {
            GpuAttach::Local => self.place_local(request),
            GpuAttach::Any => self
                .place_local(request)
                .or_else(|| self.place_pair(request)),
            GpuAttach::Remote => self.place_pair(request),
        }
    }

    /// A replica's device on one node and its CPU part on another of the same network locality:
    /// the device first (it is the scarcer), by the policy, as a request of the device alone;
    /// then the CPU part, by the policy, among the nodes that share the device node's locality.
    fn place_pair(&mut self, request: &ResourceRequest) -> Option<Allocation> {
        let device_part = ResourceRequest {
            cpu_milli: 0,
            memory_bytes: 0,
            gpu_attach: GpuAttach::Local,
            ..request.clone()
        };
        let (g, pick) = self.choose(&device_part)?;
        let gnode = self.cluster.node(g);
        let fit = check_node(gnode, &Resolved::new(&device_part, &self.cluster)).ok()?;
        let device = build_allocation(gnode, &device_part, pick, &fit);
        let mut host_part = ResourceRequest {
            gpu: GpuRequest::None,
            gpu_memory_bytes: 0,
            device_models: Vec::new(),
            gpu_attach: GpuAttach::Local,
            ..request.clone()
        };
        if let Some(locality) = gnode.spec.labels.get(LOCALITY_LABEL) {
            host_part
                .node_selector
                .insert(LOCALITY_LABEL.to_string(), locality.clone());
        }
        // `remote` keeps the CPU part off the device's node: among the candidates each group of
        // nodes offers, the best other one.
        if request.gpu_attach == GpuAttach::Remote {
            self.avoid = Some(g.0);
        }
        let chosen = self.choose(&host_part);
        self.avoid = None;
        let (c, _) = chosen?;
        let alloc = Allocation {
            node: c,
            cpu_milli: request.cpu_milli,
            memory_bytes: request.memory_bytes,
            devices: device.devices,
            affinity: device.affinity,
            gpu_node: (c != g).then_some(g),
        };
        match self.cluster.allocate(&alloc) {
            Ok(()) => {
                self.record(|| Change::Allocated(alloc.clone()));
                Some(alloc)
            }
            Err(err) => {
                debug_assert!(false, "engine chose an infeasible pair: {err}");
                None
            }
        }
    }

    /// Places a replica on one node.
    fn place_local(&mut self, request: &ResourceRequest) -> Option<Allocation> {
        let (id, pick) = self.choose(request)?;
        let node = self.cluster.node(id);
        let fit = check_node(node, &Resolved::new(request, &self.cluster)).ok()?;
        let alloc = build_allocation(node, request, pick, &fit);
        // The choice came from an exact feasibility check on the current state.
        match self.cluster.allocate(&alloc) {
            Ok(()) => {
                self.record(|| Change::Allocated(alloc.clone()));
                Some(alloc)
            }
            Err(err) => {
                debug_assert!(false, "engine chose an infeasible placement: {err}");
                None
            }
        }
    }

    /// The best node and its device pick, without committing.
    fn choose(
        &mut self,
        request: &ResourceRequest,
    ) -> Option<(crate::cluster::NodeId, DevicePick)> {
        let moved = self.policy.observe(&self.cluster);
        if moved != 0 {
            self.cluster.invalidate_models(moved);
        }
        let cluster = &self.cluster;
        let resolved = Resolved::new(request, cluster);
        if resolved.models == Some(0) {
            return None;
        }
        if !self.policy.node_local() {
            return self.choose_scanning(&resolved);
        }
        // No policy scores on node memory, and the dense summary checks it exactly, so scores are
        // cached per request shape *without* memory: tasks that differ only in memory share them.
        // Nor on the allowed models: on a node whose every model is allowed, a pinned request
        // fits and scores as the same request unpinned (nodes with none allowed are filtered
        // out, nodes with some are scored afresh), so pins do not multiply the cached shapes.
        let key = ResourceRequest {
            memory_bytes: 0,
            device_models: Vec::new(),
            ..request.clone()
        };
        self.clock += 1;
        if !self.cache.contains_key(&key) {
            if self.cache.len() >= max_cached_shapes(cluster.len()) {
                let oldest = self
                    .cache
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.cache.remove(&oldest);
                }
            }
            self.cache.insert(key.clone(), ShapeScores::new(cluster));
        }
        let scores = self.cache.get_mut(&key)?;
        scores.last_used = self.clock;
        let shape = Resolved::new(&key, cluster);
        let mut scorer = Scorer {
            policy: self.policy.as_ref(),
            shape: &shape,
            rng: &mut self.rng,
        };
        scores.sync(cluster, &mut scorer);

        // Candidates: the best busy node of each group the request may use, every busy node of a
        // group it may use in part (mixed-model nodes, scored afresh), the first idle node of
        // each hardware class, and the preferred nodes (a tie-break needs them all).
        let allowed = resolved.models;
        let mut candidates: Vec<u32> = Vec::new();
        for (g, group) in cluster.model_groups().iter().enumerate() {
            match allowed {
                Some(mask) if group.model_mask & mask == 0 => continue,
                Some(mask) if group.model_mask & !mask != 0 => {
                    candidates.extend(group.nodes.iter().filter(|&&i| cluster.is_touched(i)));
                }
                _ => candidates.extend(scores.best(cluster, g, request.memory_bytes, |i| {
                    quick_fit(cluster, i, &resolved)
                })),
            }
        }
        for class in cluster.pristine_classes() {
            candidates.extend(class.first().map(|&(_, i)| i));
        }
        candidates.extend(self.prefer.iter().map(|id| id.0));

        let mut best = Best::default();
        for i in candidates {
            if Some(i) == self.avoid || !quick_fit(cluster, i, &resolved) {
                continue;
            }
            let node = &cluster.nodes()[i as usize];
            let partly_allowed = allowed.is_some_and(|mask| node.model_mask & !mask != 0);
            let scored = if partly_allowed {
                evaluate(scorer.policy, node, &resolved, scorer.rng)
            } else {
                scores.scored(cluster, i, &mut scorer)
            };
            let Some(s) = scored else { continue };
            best.offer(
                s,
                self.prefer.contains(&node.id),
                cluster.tie_rank(node.id),
                i,
            );
        }
        best.choice()
    }

    /// The pool, the policy and its randomness, for tests that score nodes themselves.
    #[cfg(test)]
    pub(crate) fn parts(&mut self) -> (&Cluster, &dyn PlacementPolicy, &mut ChaCha8Rng) {
        (&self.cluster, self.policy.as_ref(), &mut self.rng)
    }

    /// The node [`Placer::choose`] picks, for tests.
    #[cfg(test)]
    pub(crate) fn choose_for_test(&mut self, request: &ResourceRequest) -> Option<u32> {
        self.choose(request).map(|(id, _)| id.0)
    }

    /// The best node for a policy whose scores cannot be cached (they depend on more than the
    /// node): every busy node and every idle one is scored.
    fn choose_scanning(
        &mut self,
        resolved: &Resolved,
    ) -> Option<(crate::cluster::NodeId, DevicePick)> {
        let cluster = &self.cluster;
        let mut best = Best::default();
        let idle = cluster
            .pristine_classes()
            .flat_map(|c| c.iter().map(|&(_, i)| i));
        for i in cluster.touched().iter().copied().chain(idle) {
            if Some(i) == self.avoid || !quick_fit(cluster, i, resolved) {
                continue;
            }
            let node = &cluster.nodes()[i as usize];
            let Some(s) = evaluate(self.policy.as_ref(), node, resolved, &mut self.rng) else {
                continue;
            };
            best.offer(
                s,
                self.prefer.contains(&node.id),
                cluster.tie_rank(node.id),
                i,
            );
        }
        best.choice()
    }

    /// Why `request` fits nowhere: every node's shortages, and which one binds.
    pub fn explain(&self, request: &ResourceRequest) -> FilterReport {
        let resolved = Resolved::new(request, &self.cluster);
        let mut report = FilterReport::default();
        // Per binding resource: nodes it alone keeps out, and the most of it free on one of them.
        let mut only = [(0u32, 0u64); Lack::ALL.len()];
        for node in self.cluster.nodes() {
            report.nodes += 1;
            let lacks = shortages(node, &resolved);
            if lacks.labels {
                report.wrong_labels += 1;
                continue;
            }
            let mut missing = Vec::new();
            for (i, lack) in Lack::ALL.iter().enumerate() {
                if lacks.has(*lack) {
                    missing.push(i);
                    match lack {
                        Lack::Model => report.no_allowed_model += 1,
                        Lack::Cpu => report.lacking_cpu += 1,
                        Lack::Memory => report.lacking_memory += 1,
                        Lack::Gpu => report.lacking_gpu += 1,
                        Lack::GpuMemory => report.lacking_gpu_memory += 1,
                    }
                }
            }
            if missing.is_empty() {
                report.feasible += 1;
            } else if let [i] = missing[..] {
                only[i].0 += 1;
                only[i].1 = only[i].1.max(lacks.most(Lack::ALL[i]));
            }
            if lacks.usable_milli > 0 {
                report.usable.nodes += 1;
                report.usable.milli += lacks.usable_milli;
                report.usable.cpu_milli += node.cpu_free;
            }
        }
        report.binding = Lack::ALL
            .iter()
            .zip(only)
            .filter(|(_, (n, _))| *n > 0)
            .max_by_key(|(lack, (n, _))| (*n, lack.tie_rank()))
            .map(|(lack, (nodes, most_free))| Binding {
                resource: *lack,
                nodes,
                most_free,
            });
        report
    }

    /// Why replica `placed + 1` of a gang fits nowhere once its first `placed` replicas are in
    /// place: they are placed for the look and taken back, leaving the pool as it was.
    pub fn explain_gang(&mut self, request: &ResourceRequest, placed: u32) -> FilterReport {
        let checkpoint = self.checkpoint();
        for _ in 0..placed {
            if self.place_replica(request).is_none() {
                break;
            }
        }
        let report = self.explain(request);
        self.rollback(checkpoint);
        report
    }
}

/// A resource a node can be short of for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lack {
    /// Free GPU capacity on devices of an allowed model (whole devices, or room for a share).
    Gpu,
    /// Device memory: the devices have the GPU free but not the memory the request asks.
    GpuMemory,
    Cpu,
    Memory,
    /// The node carries no device of a model the request allows.
    Model,
}

impl Lack {
    const ALL: [Lack; 5] = [
        Lack::Gpu,
        Lack::GpuMemory,
        Lack::Cpu,
        Lack::Memory,
        Lack::Model,
    ];

    /// On a tie, the less expected shortage is the one named: a model or device memory the user
    /// chose tells them more than "no GPU free", which they can see for themselves.
    fn tie_rank(self) -> u8 {
        match self {
            Lack::Model => 4,
            Lack::GpuMemory => 3,
            Lack::Cpu => 2,
            Lack::Memory => 1,
            Lack::Gpu => 0,
        }
    }
}

/// The resource that alone keeps the most nodes from taking the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Binding {
    pub resource: Lack,
    /// Nodes that lack only this.
    pub nodes: u32,
    /// The most of it free on one of those nodes (milli-GPU, device memory bytes, milli-CPU or
    /// bytes; 0 for a model).
    pub most_free: u64,
}

/// What the request could still use, summed over the nodes with GPU room for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usable {
    /// Nodes with at least one device (of an allowed model, matching labels) that could take a
    /// replica's GPU, whatever their CPU and memory.
    pub nodes: u32,
    /// Milli-GPU on those devices that replicas of this request could take.
    pub milli: u64,
    /// Free CPU on those nodes.
    pub cpu_milli: u64,
}

/// How many nodes lack what for a request; a node counts under every resource it lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FilterReport {
    pub nodes: u32,
    pub feasible: u32,
    pub wrong_labels: u32,
    pub no_allowed_model: u32,
    pub lacking_cpu: u32,
    pub lacking_memory: u32,
    pub lacking_gpu: u32,
    pub lacking_gpu_memory: u32,
    /// The resource that binds, when some node lacks only one.
    pub binding: Option<Binding>,
    pub usable: Usable,
}

impl FilterReport {
    /// The binding resource in words: "CPU binds: 3 nodes have everything else, at most 2 CPU
    /// free on one (it needs 4)".
    pub fn binding_text(&self, request: &ResourceRequest) -> Option<String> {
        let b = self.binding?;
        let nodes = plural(b.nodes, "node");
        let have = if b.nodes == 1 { "has" } else { "have" };
        Some(match b.resource {
            Lack::Cpu => format!(
                "CPU binds: {nodes} {have} everything else but at most {} CPU free (it needs {})",
                human_milli(b.most_free),
                human_milli(request.cpu_milli)
            ),
            Lack::Memory => format!(
                "memory binds: {nodes} {have} everything else but at most {} of memory free \
                 (it needs {})",
                crate::model::human_bytes(b.most_free),
                crate::model::human_bytes(request.memory_bytes)
            ),
            Lack::Gpu => match request.gpu {
                GpuRequest::Share { milli } => format!(
                    "GPU binds: {nodes} {have} the CPU and memory but no device with {} GPU \
                     free (the most free on one device there: {})",
                    human_milli(u64::from(milli)),
                    human_milli(b.most_free)
                ),
                GpuRequest::Whole { devices } => format!(
                    "GPU binds: {nodes} {have} the CPU and memory but not {} free \
                     (the most there: {})",
                    plural(devices, "whole GPU"),
                    plural(
                        (b.most_free / u64::from(MILLI_PER_DEVICE)) as u32,
                        "whole GPU"
                    )
                ),
                GpuRequest::None => "GPU binds".into(),
            },
            Lack::GpuMemory => format!(
                "GPU memory binds: {nodes} {have} the GPU free but no device with {} of device \
                 memory free (the most on one: {})",
                crate::model::human_bytes(request.gpu_memory_bytes),
                crate::model::human_bytes(b.most_free)
            ),
            Lack::Model => format!(
                "the model constraint binds: {nodes} would fit but carry only other models than \
                 {}",
                request.device_models.join(" or ")
            ),
        })
    }
}

impl fmt::Display for FilterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.feasible > 0 {
            return write!(f, "{} of {} nodes fit", self.feasible, self.nodes);
        }
        let parts: Vec<String> = [
            (self.wrong_labels, "do not match the node selector"),
            (self.no_allowed_model, "have no device of an allowed model"),
            (self.lacking_cpu, "lack CPU"),
            (self.lacking_memory, "lack memory"),
            (self.lacking_gpu, "lack free GPU capacity"),
            (self.lacking_gpu_memory, "lack free device memory"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        write!(f, "no node of {} fits: {}", self.nodes, parts.join(", "))
    }
}

/// Everything one node lacks for a request (not just the first check it fails).
#[derive(Default)]
struct Shortages {
    labels: bool,
    model: bool,
    cpu: bool,
    memory: bool,
    gpu: bool,
    gpu_memory: bool,
    cpu_free: u64,
    memory_free: u64,
    /// Milli-GPU replicas of this request could take here (allowed devices with room).
    usable_milli: u64,
    /// The most free GPU (milli on one device for a share; whole devices × 1000 otherwise).
    gpu_free: u64,
    /// The most free device memory on one allowed device with the GPU room.
    device_memory_free: u64,
}

impl Shortages {
    fn has(&self, lack: Lack) -> bool {
        match lack {
            Lack::Gpu => self.gpu,
            Lack::GpuMemory => self.gpu_memory,
            Lack::Cpu => self.cpu,
            Lack::Memory => self.memory,
            Lack::Model => self.model,
        }
    }

    fn most(&self, lack: Lack) -> u64 {
        match lack {
            Lack::Gpu => self.gpu_free,
            Lack::GpuMemory => self.device_memory_free,
            Lack::Cpu => self.cpu_free,
            Lack::Memory => self.memory_free,
            Lack::Model => 0,
        }
    }
}

fn shortages(node: &NodeState, req: &Resolved) -> Shortages {
    let request = req.request;
    let mut out = Shortages {
        labels: request
            .node_selector
            .iter()
            .any(|(k, v)| node.spec.labels.get(k) != Some(v)),
        model: req.models.is_some_and(|mask| node.model_mask & mask == 0),
        cpu: node.cpu_free < request.cpu_milli,
        memory: node.memory_free < request.memory_bytes,
        cpu_free: node.cpu_free,
        memory_free: node.memory_free,
        ..Default::default()
    };
    if req.count == 0 || out.model {
        return out;
    }
    let (mut room, mut fitting, mut whole_free, mut share_room) = (0u32, 0u32, 0u32, 0u64);
    for (i, d) in node.devices.iter().enumerate() {
        if req.models.is_some_and(|mask| mask & (1u64 << d.model) == 0) {
            continue;
        }
        let has_room = match request.gpu {
            GpuRequest::None => false,
            GpuRequest::Share { milli } => d.milli_free >= milli,
            GpuRequest::Whole { .. } => d.is_free(),
        };
        out.gpu_free = out.gpu_free.max(u64::from(d.milli_free));
        if d.is_free() {
            whole_free += 1;
        }
        if !has_room {
            continue;
        }
        room += 1;
        // The same test as the exact check: a whole device by its size, a share by what is free.
        let (free_memory, needed) = match request.gpu {
            GpuRequest::Whole { .. } => (d.memory_bytes, request.gpu_memory_bytes),
            _ => (d.memory_free, device_memory(node, i, request)),
        };
        out.device_memory_free = out.device_memory_free.max(free_memory);
        if free_memory >= needed {
            fitting += 1;
            if let GpuRequest::Share { milli } = request.gpu {
                share_room += u64::from(d.milli_free / milli * milli);
            }
        }
    }
    // What replicas of this request could take here: whole devices in groups of its count.
    out.usable_milli = match request.gpu {
        GpuRequest::Share { .. } => share_room,
        _ => u64::from(fitting / req.count * req.count) * u64::from(MILLI_PER_DEVICE),
    };
    if matches!(request.gpu, GpuRequest::Whole { .. }) {
        out.gpu_free = u64::from(whole_free) * u64::from(MILLI_PER_DEVICE);
    }
    out.gpu = room < req.count;
    out.gpu_memory = !out.gpu && fitting < req.count;
    out
}

enum Reject {
    Labels,
    Model,
    Cpu,
    Memory,
    Gpu,
}

/// Cheap necessary conditions from the dense summaries.
#[inline]
pub(crate) fn quick_fit(cluster: &Cluster, i: u32, req: &Resolved) -> bool {
    let s = cluster.summary(crate::cluster::NodeId(i));
    if s.cpu_free < req.request.cpu_milli || s.memory_free < req.request.memory_bytes {
        return false;
    }
    if let Some(mask) = req.models
        && s.model_mask & mask == 0
    {
        return false;
    }
    match req.request.gpu {
        GpuRequest::None => true,
        GpuRequest::Share { milli } => s.max_device_free >= milli,
        GpuRequest::Whole { devices } => s.whole_free >= devices,
    }
}

pub(crate) fn evaluate(
    policy: &dyn PlacementPolicy,
    node: &NodeState,
    req: &Resolved,
    rng: &mut ChaCha8Rng,
) -> Option<Scored> {
    let fit = check_node(node, req).ok()?;
    Some(policy.score(node, req, &fit, rng))
}

/// Device memory a share or whole device takes on `device`.
fn device_memory(node: &NodeState, device: usize, request: &ResourceRequest) -> u64 {
    let d = &node.devices[device];
    match request.gpu {
        GpuRequest::None => 0,
        GpuRequest::Share { milli } if request.gpu_memory_bytes == 0 => {
            d.memory_bytes * u64::from(milli) / u64::from(MILLI_PER_DEVICE)
        }
        GpuRequest::Share { .. } => request.gpu_memory_bytes,
        GpuRequest::Whole { .. } => d.memory_bytes,
    }
}

/// The exact feasibility check; on success, the devices that can take the request.
fn check_node(node: &NodeState, req: &Resolved) -> Result<Fit, Reject> {
    let request = req.request;
    for (key, value) in &request.node_selector {
        if node.spec.labels.get(key) != Some(value) {
            return Err(Reject::Labels);
        }
    }
    if let Some(mask) = req.models
        && node.model_mask & mask == 0
    {
        return Err(Reject::Model);
    }
    if node.cpu_free < request.cpu_milli {
        return Err(Reject::Cpu);
    }
    if node.memory_free < request.memory_bytes {
        return Err(Reject::Memory);
    }
    let mut fit = Fit::empty();
    if req.count == 0 {
        return Ok(fit);
    }
    for (i, d) in node.devices.iter().enumerate() {
        if let Some(mask) = req.models
            && mask & (1u64 << d.model) == 0
        {
            continue;
        }
        let fits = match request.gpu {
            GpuRequest::None => false,
            GpuRequest::Share { milli } => {
                d.milli_free >= milli && d.memory_free >= device_memory(node, i, request)
            }
            GpuRequest::Whole { .. } => d.is_free() && d.memory_bytes >= request.gpu_memory_bytes,
        };
        if fits {
            fit.devices[fit.len] = i as u8;
            fit.len += 1;
        }
    }
    if (fit.len as u32) < req.count {
        return Err(Reject::Gpu);
    }
    Ok(fit)
}

fn build_allocation(
    node: &NodeState,
    request: &ResourceRequest,
    pick: DevicePick,
    fit: &Fit,
) -> Allocation {
    let milli = request.gpu.per_device_milli();
    let share = |device: usize| DeviceShare {
        device: device as u32,
        milli,
        memory_bytes: device_memory(node, device, request),
    };
    let devices = match pick {
        DevicePick::None => Vec::new(),
        DevicePick::One(d) => vec![share(d as usize)],
        DevicePick::FirstFree => fit
            .as_slice()
            .iter()
            .take(request.gpu.device_count() as usize)
            .map(|&d| share(d as usize))
            .collect(),
    };
    Allocation {
        node: node.id,
        cpu_milli: request.cpu_milli,
        memory_bytes: request.memory_bytes,
        devices,
        affinity: match request.gpu {
            GpuRequest::None => None,
            GpuRequest::Share { .. } => Some(GpuAffinity::Share),
            GpuRequest::Whole { devices } => Some(GpuAffinity::Whole(devices)),
        },
        gpu_node: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GIB, NodeSpec};
    use crate::policy::PolicyKind;
    use crate::shapes::ShapeDistribution;
    use crate::testkit::{self, request as ask};

    fn node(name: &str, cpus: u64, model: &str, devices: usize) -> NodeSpec {
        testkit::node(name, cpus, 64, devices, model, 40)
    }

    fn placer(nodes: Vec<NodeSpec>) -> Placer {
        let cluster = Cluster::new(nodes).unwrap();
        let policy = PolicyKind::Tessera.build(&ShapeDistribution::default(), &cluster);
        Placer::new(cluster, policy, 1)
    }

    #[test]
    fn cpu_binds_when_the_free_gpus_sit_on_nodes_without_the_cpu() {
        let mut p = placer(vec![node("a", 8, "H100", 2), node("b", 8, "H100", 2)]);
        // Each node keeps its GPUs free but gives 6 of its 8 CPUs to CPU-only work.
        for _ in 0..2 {
            p.place_replica(&ask(GpuRequest::None, 6)).unwrap();
        }
        let want = ask(GpuRequest::Whole { devices: 1 }, 4);
        let report = p.explain(&want);
        assert_eq!(report.feasible, 0);
        let text = report.binding_text(&want).unwrap();
        assert_eq!(
            text,
            "CPU binds: 2 nodes have everything else but at most 2 CPU free (it needs 4)"
        );
        assert_eq!(report.usable.milli, 4000, "four whole GPUs it could take");
        assert_eq!(report.usable.cpu_milli, 4000);
    }

    #[test]
    fn gpu_memory_binds_when_the_share_is_free_but_not_the_device_memory() {
        let mut p = placer(vec![node("a", 64, "H100", 1)]);
        let mut small = ask(GpuRequest::Share { milli: 300 }, 1);
        small.gpu_memory_bytes = 30 * GIB;
        p.place_replica(&small).unwrap();
        let mut want = ask(GpuRequest::Share { milli: 500 }, 1);
        want.gpu_memory_bytes = 20 * GIB;
        let report = p.explain(&want);
        assert_eq!(report.feasible, 0);
        assert_eq!(report.lacking_gpu_memory, 1);
        assert_eq!(report.lacking_gpu, 0);
        assert_eq!(
            report.binding_text(&want).unwrap(),
            "GPU memory binds: 1 node has the GPU free but no device with 20.0 GiB of device \
             memory free (the most on one: 10.0 GiB)"
        );
    }

    #[test]
    fn the_model_constraint_binds_when_only_other_models_are_free() {
        let mut p = placer(vec![node("h", 64, "H100", 1), node("t", 64, "T4", 2)]);
        let mut h100 = ask(GpuRequest::Whole { devices: 1 }, 1);
        h100.device_models = vec!["H100".into()];
        p.place_replica(&h100).unwrap();
        let report = p.explain(&h100);
        assert_eq!((report.lacking_gpu, report.no_allowed_model), (1, 1));
        assert_eq!(
            report.binding_text(&h100).unwrap(),
            "the model constraint binds: 1 node would fit but carry only other models than H100"
        );
    }

    #[test]
    fn a_gang_is_explained_for_the_replica_that_does_not_fit_and_the_pool_is_left_as_it_was() {
        let mut p = placer(vec![node("a", 8, "H100", 2), node("b", 2, "H100", 2)]);
        let want = ask(GpuRequest::Whole { devices: 1 }, 4);
        // Replicas 1 and 2 fit on a (8 CPUs); the third finds b's GPUs but not its CPU.
        let before: Vec<u64> = p.cluster().nodes().iter().map(|n| n.cpu_free).collect();
        let report = p.explain_gang(&want, 2);
        let after: Vec<u64> = p.cluster().nodes().iter().map(|n| n.cpu_free).collect();
        assert_eq!(before, after);
        assert_eq!(p.cluster().gpu_used_milli(), 0);
        let b = report.binding.unwrap();
        assert_eq!((b.resource, b.nodes, b.most_free), (Lack::Cpu, 1, 2000));
        // Node a lacks both: nothing is free there any more.
        assert_eq!((report.lacking_cpu, report.lacking_gpu), (2, 1));
    }

    use crate::cluster::NodeId;

    /// A node with GPUs whose CPUs are nearly gone, and a CPU-only node with room.
    fn stranded_pool(labels: [Option<&str>; 3]) -> Cluster {
        let mut gpu = testkit::node("gpu", 2, 64, 2, "H100", 80);
        let mut cpu = testkit::node("cpu", 32, 64, 0, "H100", 80);
        let mut far = testkit::node("far", 32, 64, 0, "H100", 80);
        for (n, l) in [&mut gpu, &mut cpu, &mut far].into_iter().zip(labels) {
            if let Some(l) = l {
                n.labels.insert(LOCALITY_LABEL.into(), l.into());
            }
        }
        Cluster::new(vec![gpu, cpu, far]).unwrap()
    }

    fn attach(gpu: GpuRequest, cpus: u64, how: GpuAttach) -> ResourceRequest {
        ResourceRequest {
            gpu_attach: how,
            ..ask(gpu, cpus)
        }
    }

    #[test]
    fn a_replica_that_fits_no_node_attaches_a_device_from_another() {
        let cluster = stranded_pool([None, None, None]);
        let mut p = Placer::new(
            cluster,
            PolicyKind::Tessera.build(&ShapeDistribution::default(), &stranded_pool([None; 3])),
            1,
        );
        let want = GpuRequest::Share { milli: 500 };
        // Local only: the GPU node has 2 CPUs, the others no GPU.
        assert!(
            p.place_replica(&attach(want, 8, GpuAttach::Local))
                .is_none()
        );
        let a = p
            .place_replica(&attach(want, 8, GpuAttach::Any))
            .expect("a pair");
        assert_eq!(a.gpu_node, Some(NodeId(0)), "{a:?}");
        assert_ne!(a.node, NodeId(0), "{a:?}");
        assert_eq!((a.cpu_milli, a.gpu_milli()), (8000, 500));
        let gpu = p.cluster().node(NodeId(0));
        assert_eq!(
            (
                gpu.cpu_free,
                gpu.devices[a.devices[0].device as usize].milli_free
            ),
            (2000, 500)
        );
        assert_eq!(p.cluster().node(a.node).cpu_free, 24_000);
        // Released, both halves come back.
        p.release(&a).unwrap();
        assert_eq!(p.cluster().gpu_used_milli(), 0);
        assert_eq!(p.cluster().node(a.node).cpu_free, 32_000);
    }

    #[test]
    fn any_prefers_its_own_node_and_remote_always_pairs() {
        let cluster = stranded_pool([None; 3]);
        let mut p = Placer::new(
            cluster,
            PolicyKind::Tessera.build(&ShapeDistribution::default(), &stranded_pool([None; 3])),
            1,
        );
        let want = GpuRequest::Share { milli: 250 };
        let local = p.place_replica(&attach(want, 1, GpuAttach::Any)).unwrap();
        assert_eq!((local.node, local.gpu_node), (NodeId(0), None));
        let remote = p
            .place_replica(&attach(want, 1, GpuAttach::Remote))
            .unwrap();
        assert_eq!(remote.device_node(), NodeId(0));
        assert_ne!(
            remote.node,
            NodeId(0),
            "remote put its CPU part beside the device"
        );
    }

    #[test]
    fn a_pair_stays_within_its_network_locality() {
        // The device's node and "far" share a rack; "cpu" is elsewhere.
        let labels = [Some("rack-1"), Some("rack-2"), Some("rack-1")];
        let mut p = Placer::new(
            stranded_pool(labels),
            PolicyKind::Tessera.build(&ShapeDistribution::default(), &stranded_pool(labels)),
            1,
        );
        for _ in 0..2 {
            let a = p
                .place_replica(&attach(GpuRequest::Share { milli: 500 }, 8, GpuAttach::Any))
                .unwrap();
            assert_eq!((a.node, a.gpu_node), (NodeId(2), Some(NodeId(0))), "{a:?}");
        }
        // "far" has 16 CPUs left; a replica wanting 20 has nowhere in rack-1 to go.
        assert!(
            p.place_replica(&attach(
                GpuRequest::Share { milli: 500 },
                20,
                GpuAttach::Any
            ))
            .is_none()
        );
        assert_eq!(
            p.cluster().node(NodeId(1)).cpu_free,
            32_000,
            "rack-2 was used"
        );
    }

    #[test]
    fn a_pair_that_does_not_fit_whole_changes_nothing() {
        let mut cluster = stranded_pool([None; 3]);
        let pair = Allocation {
            node: NodeId(1),
            cpu_milli: 8000,
            memory_bytes: GIB,
            devices: vec![DeviceShare {
                device: 0,
                milli: 1000,
                memory_bytes: 80 * GIB,
            }],
            affinity: Some(GpuAffinity::Whole(1)),
            gpu_node: Some(NodeId(0)),
        };
        cluster.allocate(&pair).unwrap();
        // The second asks for the same device: its CPU half fits, its device half does not.
        assert!(cluster.allocate(&pair).is_err());
        assert_eq!(
            cluster.node(NodeId(1)).cpu_free,
            24_000,
            "the CPU half was left applied"
        );
        cluster.release(&pair).unwrap();
        assert_eq!(cluster.node(NodeId(1)).cpu_free, 32_000);
        assert_eq!(cluster.gpu_used_milli(), 0);
    }
}
