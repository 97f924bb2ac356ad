//! The placement engine: feasibility → score → choose, one replica at a time, whole gangs or
//! nothing.
//!
//! Feasibility is exact and policy-independent (CPU, memory, node labels, device models, and a
//! device-level fit of the GPU request). The policy scores the feasible nodes; the highest score
//! wins and ties go to the node first in the pool's tie order. Scores of node-local policies are
//! cached per (request shape, node version), so a decision on a large pool costs a scan of dense
//! summaries plus scoring the few nodes that changed since that shape was last placed.

use std::collections::HashMap;
use std::fmt;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::cluster::{Allocation, CapacityError, Cluster, DeviceShare, GpuAffinity, NodeState};
use crate::model::MILLI_PER_DEVICE;
use crate::policy::{DevicePick, Fit, PlacementPolicy, Resolved, Scored};
use crate::request::{GpuRequest, JobSpec, ResourceRequest};
use crate::validate::{ValidationError, validate_job};

/// Most distinct request shapes whose scores are cached at once.
const MAX_CACHED_SHAPES: usize = 256;

/// Why a job could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("replica {replica} of {replicas} fits on no node; the gang was not placed")]
    NoFit { replica: u32, replicas: u32 },
}

#[derive(Clone, Copy)]
struct CacheEntry {
    /// Node version + 1; 0 marks an empty entry.
    version: u32,
    scored: Option<Scored>,
}

/// Places replicas on one pool with one policy. Owns the pool so that cached scores can never
/// outlive the state they were computed from.
pub struct Placer {
    cluster: Cluster,
    policy: Box<dyn PlacementPolicy>,
    rng: ChaCha8Rng,
    cache: HashMap<ResourceRequest, Vec<CacheEntry>>,
    /// Nodes preferred among those that score the same (see [`Placer::place_job_preferring`]).
    prefer: Vec<crate::cluster::NodeId>,
}

impl Placer {
    /// `seed` drives the policy's randomness, if it has any.
    pub fn new(cluster: Cluster, policy: Box<dyn PlacementPolicy>, seed: u64) -> Self {
        Placer {
            cluster,
            policy,
            rng: ChaCha8Rng::seed_from_u64(seed),
            cache: HashMap::new(),
            prefer: Vec::new(),
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
        let mut placed: Vec<Allocation> = Vec::with_capacity(job.replicas as usize);
        for replica in 0..job.replicas {
            match self.place_replica(&job.request) {
                Some(alloc) => placed.push(alloc),
                None => {
                    for alloc in placed.iter().rev() {
                        // Undoing an allocation this engine made a moment ago cannot fail.
                        let undone = self.cluster.release(alloc);
                        debug_assert!(undone.is_ok(), "{undone:?}");
                    }
                    return Err(PlacementError::NoFit {
                        replica,
                        replicas: job.replicas,
                    });
                }
            }
        }
        Ok(placed)
    }

    /// Returns a finished replica's resources.
    pub fn release(&mut self, alloc: &Allocation) -> Result<(), CapacityError> {
        self.cluster.release(alloc)
    }

    /// Applies an allocation decided elsewhere (e.g. a replica already running when the engine
    /// starts).
    pub fn adopt(&mut self, alloc: &Allocation) -> Result<(), CapacityError> {
        self.cluster.allocate(alloc)
    }

    /// Places one replica (the request must be valid) and commits it; `None` when nothing fits.
    pub fn place_replica(&mut self, request: &ResourceRequest) -> Option<Allocation> {
        let (id, pick) = self.choose(request)?;
        let node = self.cluster.node(id);
        let fit = check_node(node, &Resolved::new(request, &self.cluster)).ok()?;
        let alloc = build_allocation(node, request, pick, &fit);
        // The choice came from an exact feasibility check on the current state.
        match self.cluster.allocate(&alloc) {
            Ok(()) => Some(alloc),
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
        let cluster = &self.cluster;
        let resolved = Resolved::new(request, cluster);
        if resolved.models == Some(0) {
            return None;
        }
        // No policy scores on node memory, and the dense summary checks it exactly, so scores are
        // cached per request shape *without* memory: tasks that differ only in memory share them.
        let key = ResourceRequest {
            memory_bytes: 0,
            ..request.clone()
        };
        let node_local = self.policy.node_local();
        if node_local && !self.cache.contains_key(&key) {
            if self.cache.len() >= MAX_CACHED_SHAPES {
                self.cache.clear();
            }
            self.cache.insert(
                key.clone(),
                vec![
                    CacheEntry {
                        version: 0,
                        scored: None
                    };
                    cluster.len()
                ],
            );
        }
        let mut entries = if node_local {
            self.cache.get_mut(&key).map(|v| v.as_mut_slice())
        } else {
            None
        };
        let scored_as = if node_local {
            Resolved::new(&key, cluster)
        } else {
            resolved
        };
        let policy = self.policy.as_ref();
        let rng = &mut self.rng;
        let prefer = &self.prefer;
        // (score, preferred, tie rank, node, pick): the highest score, then a preferred node,
        // then the earlier node.
        let mut best: Option<(i64, bool, u32, u32, DevicePick)> = None;
        let mut consider = |i: u32, entries: &mut Option<&mut [CacheEntry]>| {
            if !quick_fit(cluster, i, &resolved) {
                return;
            }
            let node = &cluster.nodes()[i as usize];
            let scored = match entries {
                Some(cache) => {
                    let entry = &mut cache[i as usize];
                    if entry.version != node.version.wrapping_add(1) {
                        *entry = CacheEntry {
                            version: node.version.wrapping_add(1),
                            scored: evaluate(policy, node, &scored_as, rng),
                        };
                    }
                    entry.scored
                }
                None => evaluate(policy, node, &scored_as, rng),
            };
            if let Some(s) = scored {
                let rank = cluster.tie_rank(node.id);
                let warm = prefer.contains(&node.id);
                let better = match best {
                    None => true,
                    Some((bs, bw, br, _, _)) => {
                        s.score > bs
                            || (s.score == bs && (warm && !bw || (warm == bw && rank < br)))
                    }
                };
                if better {
                    best = Some((s.score, warm, rank, i, s.pick));
                }
            }
        };
        for &i in cluster.touched() {
            consider(i, &mut entries);
        }
        for class in cluster.pristine_classes() {
            if node_local {
                if let Some(&(_, i)) = class.first() {
                    consider(i, &mut entries);
                }
                // Identical untouched nodes score the same: a preferred one among them must be
                // looked at for the tie-break to see it.
                if !self.prefer.is_empty() {
                    for &(_, i) in class.iter().skip(1) {
                        if self.prefer.contains(&crate::cluster::NodeId(i)) {
                            consider(i, &mut entries);
                        }
                    }
                }
            } else {
                for &(_, i) in class {
                    consider(i, &mut entries);
                }
            }
        }
        best.map(|(_, _, _, i, pick)| (crate::cluster::NodeId(i), pick))
    }

    /// Why `request` fits nowhere: each node counted once, under the first check it fails.
    pub fn explain(&self, request: &ResourceRequest) -> FilterReport {
        let resolved = Resolved::new(request, &self.cluster);
        let mut report = FilterReport::default();
        for node in self.cluster.nodes() {
            report.nodes += 1;
            match check_node(node, &resolved) {
                Ok(_) => report.feasible += 1,
                Err(reason) => match reason {
                    Reject::Labels => report.wrong_labels += 1,
                    Reject::Model => report.no_allowed_model += 1,
                    Reject::Cpu => report.lacking_cpu += 1,
                    Reject::Memory => report.lacking_memory += 1,
                    Reject::Gpu => report.lacking_gpu += 1,
                },
            }
        }
        report
    }
}

/// How many nodes failed which check for a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FilterReport {
    pub nodes: u32,
    pub feasible: u32,
    pub wrong_labels: u32,
    pub no_allowed_model: u32,
    pub lacking_cpu: u32,
    pub lacking_memory: u32,
    pub lacking_gpu: u32,
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
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        write!(f, "no node of {} fits: {}", self.nodes, parts.join(", "))
    }
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
fn quick_fit(cluster: &Cluster, i: u32, req: &Resolved) -> bool {
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

fn evaluate(
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
    }
}
