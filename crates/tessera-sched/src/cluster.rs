//! The pool's state as the placement engine sees it: every node's free CPU, memory and device
//! capacity, kept exact under allocate and release.
//!
//! Two indexes keep placement fast on large pools without changing its result:
//! - *pristine classes*: idle nodes with identical hardware score identically under any policy
//!   whose score depends only on the node, so only the one first in tie order can win; the engine
//!   scores that one representative per class.
//! - *summaries*: a dense array of each node's free totals, for a cheap necessary-condition filter
//!   before the exact device-level check.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::model::{DeviceClass, DeviceSpec, MAX_DEVICE_MODELS, MILLI_PER_DEVICE, NodeSpec};
use crate::validate::{ValidationError, validate_node};

/// Index of a node in its [`Cluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Index of a device model in the cluster's model registry (below [`MAX_DEVICE_MODELS`]).
pub type ModelId = u8;

/// The kind of GPU request a replica made; GpuClustering groups like with like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GpuAffinity {
    Share,
    Whole(u32),
}

/// One device's live state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub model: ModelId,
    pub memory_bytes: u64,
    pub milli_free: u32,
    pub memory_free: u64,
}

impl DeviceState {
    pub fn is_free(&self) -> bool {
        self.milli_free == MILLI_PER_DEVICE && self.memory_free == self.memory_bytes
    }
}

/// One node's live state.
#[derive(Debug, Clone)]
pub struct NodeState {
    pub id: NodeId,
    pub spec: NodeSpec,
    pub cpu_free: u64,
    pub memory_free: u64,
    pub devices: Vec<DeviceState>,
    /// Bit `m` set when some device is of model `m`.
    pub model_mask: u64,
    /// Kinds of GPU request running here, with counts.
    pub affinities: Vec<(GpuAffinity, u32)>,
    /// Replicas placed on this node.
    pub replicas: u32,
    /// Bumped on every change; lets the engine cache scores per node.
    pub version: u32,
    class: usize,
}

impl NodeState {
    /// Free milli-GPU over all devices.
    pub fn milli_free_total(&self) -> u64 {
        self.devices.iter().map(|d| u64::from(d.milli_free)).sum()
    }

    /// Devices with nothing on them.
    pub fn whole_free(&self) -> u32 {
        self.devices.iter().filter(|d| d.is_free()).count() as u32
    }

    /// Largest free share on any one device.
    pub fn max_device_free(&self) -> u32 {
        self.devices.iter().map(|d| d.milli_free).max().unwrap_or(0)
    }

    /// Nothing runs here.
    pub fn is_pristine(&self) -> bool {
        self.replicas == 0
    }

    /// Free milli-GPU the node had when empty.
    pub fn milli_capacity(&self) -> u64 {
        self.devices.len() as u64 * u64::from(MILLI_PER_DEVICE)
    }
}

/// Dense per-node totals for the first, cheap feasibility filter.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeSummary {
    pub cpu_free: u64,
    pub memory_free: u64,
    pub max_device_free: u32,
    pub whole_free: u32,
    pub model_mask: u64,
}

/// The share of one device an allocation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceShare {
    pub device: u32,
    pub milli: u32,
    pub memory_bytes: u64,
}

/// One replica bound to a node and a set of slices.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Allocation {
    pub node: NodeId,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub devices: Vec<DeviceShare>,
    pub affinity: Option<GpuAffinity>,
    /// For a remotely attached device: the node its `devices` are on (`node` holds the CPU and
    /// memory). `None`: the devices are on `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_node: Option<NodeId>,
}

impl Allocation {
    pub fn gpu_milli(&self) -> u64 {
        self.devices.iter().map(|d| u64::from(d.milli)).sum()
    }

    /// The node the devices are on.
    pub fn device_node(&self) -> NodeId {
        self.gpu_node.unwrap_or(self.node)
    }

    /// A remote pair as its two halves on their own nodes: the CPU part (no devices) and the
    /// device part (no CPU or memory); `None` for an allocation on one node.
    pub fn halves(&self) -> Option<(Allocation, Allocation)> {
        let g = self.gpu_node.filter(|g| *g != self.node)?;
        let host = Allocation {
            node: self.node,
            cpu_milli: self.cpu_milli,
            memory_bytes: self.memory_bytes,
            devices: Vec::new(),
            affinity: None,
            gpu_node: None,
        };
        let device = Allocation {
            node: g,
            cpu_milli: 0,
            memory_bytes: 0,
            devices: self.devices.clone(),
            affinity: self.affinity,
            gpu_node: None,
        };
        Some((host, device))
    }
}

/// An allocation that does not fit its node: an engine bug or a stale plan, never applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("node {0} does not exist in this cluster")]
    UnknownNode(u32),
    #[error("device {device} does not exist on node {node}")]
    UnknownDevice { node: String, device: u32 },
    #[error("node {node}: {what} would exceed its capacity")]
    Exceeds { node: String, what: &'static str },
    #[error("node {node}: releasing {what} that was never allocated")]
    NotAllocated { node: String, what: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HardwareKey {
    cpu_milli: u64,
    memory_bytes: u64,
    labels: BTreeMap<String, String>,
    devices: Vec<DeviceSpec>,
}

#[derive(Debug, Clone, Default)]
struct HardwareClass {
    /// Pristine members as (tie rank, node).
    pristine: BTreeSet<(u32, u32)>,
}

/// The whole pool's placement state.
#[derive(Debug, Clone)]
pub struct Cluster {
    nodes: Vec<NodeState>,
    summaries: Vec<NodeSummary>,
    models: Vec<String>,
    /// Each model's class, indexed by [`ModelId`].
    model_classes: Vec<DeviceClass>,
    tie_rank: Vec<u32>,
    classes: Vec<HardwareClass>,
    touched: Vec<u32>,
    touched_pos: Vec<u32>,
    gpu_capacity_milli: u64,
    gpu_used_milli: u64,
    /// Free milli-GPU of each model (index: model id).
    free_by_model: Vec<u64>,
    /// Nodes grouped by the set of models they carry (see [`ModelGroup`]).
    groups: Vec<ModelGroup>,
    /// Each node's group and its position there.
    group_of: Vec<(u32, u32)>,
    /// Nodes whose version moved, oldest first (see [`Cluster::changes_since`]).
    changes: Vec<u32>,
    /// Position of `changes[0]` in the whole history of changes.
    changes_base: u64,
}

/// Nodes that carry the same set of device models. A request that allows every model of a group
/// fits and scores there as it would unpinned, so cached scores can be kept per group.
#[derive(Debug, Clone)]
pub(crate) struct ModelGroup {
    pub model_mask: u64,
    pub nodes: Vec<u32>,
}

const NOT_TOUCHED: u32 = u32::MAX;

/// The change log keeps at least this many changes (few in unit tests, so that they also take
/// the path of a reader the log no longer reaches).
const MIN_KEPT_CHANGES: usize = if cfg!(test) { 16 } else { 1024 };

impl Cluster {
    /// Builds a pool from node inventories; ties between equal scores go to the earlier node.
    pub fn new(specs: Vec<NodeSpec>) -> Result<Self, ValidationError> {
        let mut models: Vec<String> = Vec::new();
        let mut model_classes: Vec<DeviceClass> = Vec::new();
        let mut model_index: HashMap<String, ModelId> = HashMap::new();
        let mut class_index: HashMap<HardwareKey, usize> = HashMap::new();
        let mut names = BTreeSet::new();
        let mut nodes = Vec::with_capacity(specs.len());
        for (i, spec) in specs.into_iter().enumerate() {
            validate_node(&spec)?;
            if !names.insert(spec.name.clone()) {
                return Err(ValidationError::new(
                    "node.name",
                    spec.name.clone(),
                    "two nodes have the same name",
                    "give every node a unique name",
                ));
            }
            let mut devices = Vec::with_capacity(spec.devices.len());
            let mut model_mask = 0u64;
            for d in &spec.devices {
                let id = match model_index.get(&d.model) {
                    Some(&id) if model_classes[usize::from(id)] != d.class => {
                        let other = &model_classes[usize::from(id)];
                        return Err(ValidationError::new(
                            "node.devices.model",
                            d.model.clone(),
                            format!(
                                "the model is reported as {}/{} here and as {}/{} elsewhere",
                                d.class.vendor, d.class.kind, other.vendor, other.kind
                            ),
                            "give devices of different vendors or kinds different model names",
                        ));
                    }
                    Some(&id) => id,
                    None => {
                        if models.len() >= MAX_DEVICE_MODELS {
                            return Err(ValidationError::new(
                                "node.devices.model",
                                d.model.clone(),
                                format!("a pool holds at most {MAX_DEVICE_MODELS} device models"),
                                "group rare models under one name",
                            ));
                        }
                        let id = models.len() as ModelId;
                        models.push(d.model.clone());
                        model_classes.push(d.class.clone());
                        model_index.insert(d.model.clone(), id);
                        id
                    }
                };
                model_mask |= 1u64 << id;
                devices.push(DeviceState {
                    model: id,
                    memory_bytes: d.memory_bytes,
                    milli_free: MILLI_PER_DEVICE,
                    memory_free: d.memory_bytes,
                });
            }
            let key = HardwareKey {
                cpu_milli: spec.cpu_milli,
                memory_bytes: spec.memory_bytes,
                labels: spec.labels.clone(),
                devices: spec.devices.clone(),
            };
            let next = class_index.len();
            let class = *class_index.entry(key).or_insert(next);
            nodes.push(NodeState {
                id: NodeId(i as u32),
                cpu_free: spec.cpu_milli,
                memory_free: spec.memory_bytes,
                devices,
                model_mask,
                affinities: Vec::new(),
                replicas: 0,
                version: 0,
                class,
                spec,
            });
        }
        let n = nodes.len();
        let mut free_by_model = vec![0u64; models.len()];
        for d in nodes.iter().flat_map(|n| &n.devices) {
            free_by_model[usize::from(d.model)] += u64::from(MILLI_PER_DEVICE);
        }
        let mut groups: Vec<ModelGroup> = Vec::new();
        let mut group_of = Vec::with_capacity(n);
        for (i, node) in nodes.iter().enumerate() {
            let g = match groups.iter().position(|g| g.model_mask == node.model_mask) {
                Some(g) => g,
                None => {
                    groups.push(ModelGroup {
                        model_mask: node.model_mask,
                        nodes: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            group_of.push((g as u32, groups[g].nodes.len() as u32));
            groups[g].nodes.push(i as u32);
        }
        let mut cluster = Cluster {
            groups,
            group_of,
            changes: Vec::new(),
            changes_base: 0,
            free_by_model,
            summaries: vec![NodeSummary::default(); n],
            gpu_capacity_milli: nodes.iter().map(|s| s.milli_capacity()).sum(),
            classes: vec![HardwareClass::default(); class_index.len()],
            nodes,
            models,
            model_classes,
            tie_rank: (0..n as u32).collect(),
            touched: Vec::new(),
            touched_pos: vec![NOT_TOUCHED; n],
            gpu_used_milli: 0,
        };
        for i in 0..n {
            cluster.refresh(i);
        }
        cluster.rebuild_classes();
        Ok(cluster)
    }

    /// Sets which node wins a tie: `order[0]` first. Must list every node once.
    pub fn set_tie_order(&mut self, order: &[NodeId]) -> Result<(), ValidationError> {
        let n = self.nodes.len();
        let mut rank = vec![u32::MAX; n];
        for (r, id) in order.iter().enumerate() {
            if id.index() >= n || rank[id.index()] != u32::MAX {
                return Err(ValidationError::new(
                    "tie_order",
                    format!("{}", id.0),
                    "the order must list every node exactly once",
                    "pass a permutation of the node indexes",
                ));
            }
            rank[id.index()] = r as u32;
        }
        if order.len() != n {
            return Err(ValidationError::new(
                "tie_order",
                format!("{} of {n} nodes", order.len()),
                "the order must list every node exactly once",
                "pass a permutation of the node indexes",
            ));
        }
        self.tie_rank = rank;
        self.rebuild_classes();
        Ok(())
    }

    /// Refills every hardware class with its idle nodes, keyed by the current tie rank.
    fn rebuild_classes(&mut self) {
        for class in &mut self.classes {
            class.pristine.clear();
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if node.is_pristine() {
                self.classes[node.class]
                    .pristine
                    .insert((self.tie_rank[i], i as u32));
            }
        }
    }

    pub fn nodes(&self) -> &[NodeState] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &NodeState {
        &self.nodes[id.index()]
    }

    pub fn summary(&self, id: NodeId) -> &NodeSummary {
        &self.summaries[id.index()]
    }

    pub fn tie_rank(&self, id: NodeId) -> u32 {
        self.tie_rank[id.index()]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Registered device model names, indexed by [`ModelId`].
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// Mask of the models the names take (models, classes such as `nvidia/gpu`, or models of a
    /// class; see [`crate::model::DeviceSpec::matches`]); unknown names match no device.
    pub fn model_mask(&self, names: &[String]) -> u64 {
        let mut mask = 0u64;
        for (id, (model, class)) in self.models.iter().zip(&self.model_classes).enumerate() {
            if names.iter().any(|n| class.takes(model, n)) {
                mask |= 1u64 << id;
            }
        }
        mask
    }

    /// Free milli-GPU of each model, indexed by model id (see [`Cluster::models`]).
    pub fn free_milli_by_model(&self) -> &[u64] {
        &self.free_by_model
    }

    pub fn gpu_capacity_milli(&self) -> u64 {
        self.gpu_capacity_milli
    }

    pub fn gpu_used_milli(&self) -> u64 {
        self.gpu_used_milli
    }

    /// Marks every node with a device of a model in `mask` as changed, so that scores cached for
    /// it are not reused (a policy's view of those models moved; see `PlacementPolicy::observe`).
    pub(crate) fn invalidate_models(&mut self, mask: u64) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].model_mask & mask != 0 {
                self.changed(i);
            }
        }
    }

    /// Bumps a node's version and logs the change.
    fn changed(&mut self, i: usize) {
        self.nodes[i].version = self.nodes[i].version.wrapping_add(1);
        // The log keeps the last `n` changes at least and twice that at most: a reader further
        // behind starts afresh, which costs what reading that many changes would.
        let keep = self.nodes.len().max(MIN_KEPT_CHANGES);
        if self.changes.len() >= 2 * keep {
            let cut = self.changes.len() - keep;
            self.changes.drain(..cut);
            self.changes_base += cut as u64;
        }
        self.changes.push(i as u32);
    }

    /// Position after the newest change, for [`Cluster::changes_since`].
    pub(crate) fn change_head(&self) -> u64 {
        self.changes_base + self.changes.len() as u64
    }

    /// Nodes changed since `position` (a value of [`Cluster::change_head`]), oldest first, a node
    /// once per change; `None` when the log no longer reaches back that far.
    pub(crate) fn changes_since(&self, position: u64) -> Option<&[u32]> {
        let from = position.checked_sub(self.changes_base)?;
        self.changes.get(usize::try_from(from).ok()?..)
    }

    /// Nodes grouped by the models they carry.
    pub(crate) fn model_groups(&self) -> &[ModelGroup] {
        &self.groups
    }

    /// A node's model group and its position in it.
    pub(crate) fn group_of(&self, i: u32) -> (u32, u32) {
        self.group_of[i as usize]
    }

    /// Whether something runs on node `i` (it is in [`Cluster::touched`]).
    pub(crate) fn is_touched(&self, i: u32) -> bool {
        self.touched_pos[i as usize] != NOT_TOUCHED
    }

    /// Nodes with something running on them.
    pub(crate) fn touched(&self) -> &[u32] {
        &self.touched
    }

    /// For each hardware class, its idle nodes in tie order.
    pub(crate) fn pristine_classes(&self) -> impl Iterator<Item = &BTreeSet<(u32, u32)>> {
        self.classes.iter().map(|c| &c.pristine)
    }

    /// Applies an allocation, or refuses it whole if any part does not fit (a remote pair's two
    /// halves are applied together or not at all).
    pub fn allocate(&mut self, alloc: &Allocation) -> Result<(), CapacityError> {
        if let Some((host, device)) = alloc.halves() {
            self.allocate(&host)?;
            if let Err(e) = self.allocate(&device) {
                let undone = self.release(&host);
                debug_assert!(undone.is_ok(), "{undone:?}");
                return Err(e);
            }
            return Ok(());
        }
        let i = self.check_node(alloc.node)?;
        let node = &self.nodes[i];
        let name = || node.spec.name.clone();
        if node.cpu_free < alloc.cpu_milli {
            return Err(CapacityError::Exceeds {
                node: name(),
                what: "CPU",
            });
        }
        if node.memory_free < alloc.memory_bytes {
            return Err(CapacityError::Exceeds {
                node: name(),
                what: "memory",
            });
        }
        // Check all device shares first (a device may appear once per allocation), then apply.
        let mut seen = 0u64;
        for share in &alloc.devices {
            let d = node.devices.get(share.device as usize).ok_or_else(|| {
                CapacityError::UnknownDevice {
                    node: name(),
                    device: share.device,
                }
            })?;
            if seen & (1u64 << share.device) != 0 {
                return Err(CapacityError::Exceeds {
                    node: name(),
                    what: "a device listed twice",
                });
            }
            seen |= 1u64 << share.device;
            if d.milli_free < share.milli {
                return Err(CapacityError::Exceeds {
                    node: name(),
                    what: "device share",
                });
            }
            if d.memory_free < share.memory_bytes {
                return Err(CapacityError::Exceeds {
                    node: name(),
                    what: "device memory",
                });
            }
        }
        let node = &mut self.nodes[i];
        node.cpu_free -= alloc.cpu_milli;
        node.memory_free -= alloc.memory_bytes;
        for share in &alloc.devices {
            let d = &mut node.devices[share.device as usize];
            d.milli_free -= share.milli;
            d.memory_free -= share.memory_bytes;
            self.gpu_used_milli += u64::from(share.milli);
            self.free_by_model[usize::from(d.model)] -= u64::from(share.milli);
        }
        if let Some(a) = alloc.affinity {
            // Kept sorted, so that the same replicas give the same list whatever their order.
            match node.affinities.binary_search_by_key(&a, |(k, _)| *k) {
                Ok(pos) => node.affinities[pos].1 += 1,
                Err(pos) => node.affinities.insert(pos, (a, 1)),
            }
        }
        node.replicas += 1;
        self.changed(i);
        self.refresh(i);
        Ok(())
    }

    /// Returns an allocation's resources to its node (a remote pair's to both of its nodes).
    pub fn release(&mut self, alloc: &Allocation) -> Result<(), CapacityError> {
        if let Some((host, device)) = alloc.halves() {
            self.release(&device)?;
            if let Err(e) = self.release(&host) {
                let undone = self.allocate(&device);
                debug_assert!(undone.is_ok(), "{undone:?}");
                return Err(e);
            }
            return Ok(());
        }
        let i = self.check_node(alloc.node)?;
        let node = &self.nodes[i];
        let name = || node.spec.name.clone();
        if node.replicas == 0 {
            return Err(CapacityError::NotAllocated {
                node: name(),
                what: "a replica",
            });
        }
        if node.cpu_free + alloc.cpu_milli > node.spec.cpu_milli {
            return Err(CapacityError::NotAllocated {
                node: name(),
                what: "CPU",
            });
        }
        if node.memory_free + alloc.memory_bytes > node.spec.memory_bytes {
            return Err(CapacityError::NotAllocated {
                node: name(),
                what: "memory",
            });
        }
        for share in &alloc.devices {
            let d = node.devices.get(share.device as usize).ok_or_else(|| {
                CapacityError::UnknownDevice {
                    node: name(),
                    device: share.device,
                }
            })?;
            if d.milli_free + share.milli > MILLI_PER_DEVICE
                || d.memory_free + share.memory_bytes > d.memory_bytes
            {
                return Err(CapacityError::NotAllocated {
                    node: name(),
                    what: "a device share",
                });
            }
        }
        if let Some(a) = alloc.affinity
            && !node.affinities.iter().any(|(k, c)| *k == a && *c > 0)
        {
            return Err(CapacityError::NotAllocated {
                node: name(),
                what: "a GPU request kind",
            });
        }
        let node = &mut self.nodes[i];
        node.cpu_free += alloc.cpu_milli;
        node.memory_free += alloc.memory_bytes;
        for share in &alloc.devices {
            let d = &mut node.devices[share.device as usize];
            d.milli_free += share.milli;
            d.memory_free += share.memory_bytes;
            self.gpu_used_milli -= u64::from(share.milli);
            self.free_by_model[usize::from(d.model)] += u64::from(share.milli);
        }
        if let Some(a) = alloc.affinity
            && let Some(pos) = node.affinities.iter().position(|(k, _)| *k == a)
        {
            node.affinities[pos].1 -= 1;
            if node.affinities[pos].1 == 0 {
                node.affinities.remove(pos);
            }
        }
        node.replicas -= 1;
        self.changed(i);
        self.refresh(i);
        Ok(())
    }

    fn check_node(&self, id: NodeId) -> Result<usize, CapacityError> {
        if id.index() < self.nodes.len() {
            Ok(id.index())
        } else {
            Err(CapacityError::UnknownNode(id.0))
        }
    }

    /// Updates a node's summary and, when it turns idle or busy, moves it between its hardware
    /// class (idle nodes) and the touched list (busy nodes). The one place that membership changes.
    fn refresh(&mut self, i: usize) {
        let node = &self.nodes[i];
        self.summaries[i] = NodeSummary {
            cpu_free: node.cpu_free,
            memory_free: node.memory_free,
            max_device_free: node.max_device_free(),
            whole_free: node.whole_free(),
            model_mask: node.model_mask,
        };
        let (pristine, class) = (node.is_pristine(), node.class);
        let key = (self.tie_rank[i], i as u32);
        if pristine && self.touched_pos[i] != NOT_TOUCHED {
            let pos = self.touched_pos[i] as usize;
            self.touched.swap_remove(pos);
            if let Some(&moved) = self.touched.get(pos) {
                self.touched_pos[moved as usize] = pos as u32;
            }
            self.touched_pos[i] = NOT_TOUCHED;
            self.classes[class].pristine.insert(key);
        } else if !pristine && self.touched_pos[i] == NOT_TOUCHED {
            self.touched_pos[i] = self.touched.len() as u32;
            self.touched.push(i as u32);
            self.classes[class].pristine.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GIB;

    fn t4_node(name: &str) -> NodeSpec {
        NodeSpec::with_devices(
            name,
            16_000,
            64 * GIB,
            2,
            DeviceSpec {
                class: Default::default(),
                model: "T4".into(),
                memory_bytes: 16 * GIB,
            },
        )
    }

    fn share(node: u32, device: u32, milli: u32) -> Allocation {
        Allocation {
            gpu_node: None,
            node: NodeId(node),
            cpu_milli: 1000,
            memory_bytes: GIB,
            devices: vec![DeviceShare {
                device,
                milli,
                memory_bytes: GIB,
            }],
            affinity: Some(GpuAffinity::Share),
        }
    }

    #[test]
    fn allocate_and_release_restore_the_node_exactly() {
        let mut c = Cluster::new(vec![t4_node("a"), t4_node("b")]).unwrap();
        let before = c.node(NodeId(1)).clone();
        c.allocate(&share(1, 0, 400)).unwrap();
        assert_eq!(c.node(NodeId(1)).devices[0].milli_free, 600);
        assert_eq!(c.gpu_used_milli(), 400);
        assert_eq!(c.touched(), &[1]);
        c.release(&share(1, 0, 400)).unwrap();
        let after = c.node(NodeId(1));
        assert_eq!(after.cpu_free, before.cpu_free);
        assert_eq!(after.devices, before.devices);
        assert!(after.affinities.is_empty());
        assert!(c.touched().is_empty());
        assert_eq!(c.gpu_used_milli(), 0);
    }

    #[test]
    fn over_capacity_is_refused_and_changes_nothing() {
        let mut c = Cluster::new(vec![t4_node("a")]).unwrap();
        c.allocate(&share(0, 0, 700)).unwrap();
        let version = c.node(NodeId(0)).version;
        let err = c.allocate(&share(0, 0, 400)).unwrap_err();
        assert!(matches!(err, CapacityError::Exceeds { .. }));
        assert_eq!(c.node(NodeId(0)).devices[0].milli_free, 300);
        assert_eq!(c.node(NodeId(0)).version, version);
        assert!(c.allocate(&share(5, 0, 1)).is_err());
        assert!(c.allocate(&share(0, 9, 1)).is_err());
    }

    #[test]
    fn releasing_what_was_never_allocated_is_refused() {
        let mut c = Cluster::new(vec![t4_node("a")]).unwrap();
        assert!(c.release(&share(0, 0, 100)).is_err());
        c.allocate(&share(0, 0, 100)).unwrap();
        assert!(c.release(&share(0, 1, 100)).is_err());
        assert_eq!(c.node(NodeId(0)).devices[1].milli_free, 1000);
    }

    #[test]
    fn identical_idle_nodes_share_a_class_ordered_by_tie_rank() {
        let mut c = Cluster::new(vec![t4_node("a"), t4_node("b"), t4_node("c")]).unwrap();
        c.set_tie_order(&[NodeId(2), NodeId(0), NodeId(1)]).unwrap();
        let firsts: Vec<_> = c
            .pristine_classes()
            .filter_map(|s| s.first().copied())
            .collect();
        assert_eq!(firsts, vec![(0, 2)]);
        c.allocate(&share(2, 0, 10)).unwrap();
        let firsts: Vec<_> = c
            .pristine_classes()
            .filter_map(|s| s.first().copied())
            .collect();
        assert_eq!(firsts, vec![(1, 0)]);
        assert!(c.set_tie_order(&[NodeId(0), NodeId(0), NodeId(1)]).is_err());
        assert!(c.set_tie_order(&[NodeId(0)]).is_err());
    }

    #[test]
    fn duplicate_node_names_are_refused() {
        let err = Cluster::new(vec![t4_node("a"), t4_node("a")]).unwrap_err();
        assert_eq!(err.field, "node.name");
    }

    #[test]
    fn requests_name_models_classes_or_models_of_a_class() {
        let mut amd = crate::testkit::node("mi", 64, 256, 2, "MI300X", 192);
        for d in &mut amd.devices {
            d.class = DeviceClass {
                vendor: "amd".into(),
                kind: "gpu".into(),
            };
        }
        let nvidia = crate::testkit::node("h", 64, 256, 2, "H100", 80);
        let c = Cluster::new(vec![nvidia.clone(), amd.clone()]).unwrap();
        let mask =
            |names: &[&str]| c.model_mask(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        let (h100, mi) = (1u64 << 0, 1u64 << 1);
        assert_eq!(mask(&["H100"]), h100);
        assert_eq!(mask(&["amd/gpu"]), mi);
        assert_eq!(mask(&["nvidia/gpu"]), h100);
        assert_eq!(mask(&["nvidia/gpu/H100", "amd/gpu/MI300X"]), h100 | mi);
        assert_eq!(mask(&["amd/gpu/H100"]), 0, "a model of another class");
        assert_eq!(mask(&["amd/npu"]), 0);
        // One model name may not stand for two classes.
        let mut clash = nvidia;
        clash.name = "h2".into();
        clash.devices[0].model = "MI300X".into();
        let err = Cluster::new(vec![amd, clash]).unwrap_err();
        assert!(
            err.to_string()
                .contains("nvidia/gpu here and as amd/gpu elsewhere"),
            "{err}"
        );
    }
}
