//! Placement policies: how to rank the nodes (and the devices on them) that can host a replica.
//!
//! The engine ([`crate::place`]) decides feasibility; a policy only scores feasible nodes and picks
//! devices. Scores are integers, higher is better, and equal scores go to the node first in the
//! pool's tie order, which is how the reference simulator of the FGD paper breaks ties.

mod best_fit;
mod clustering;
mod dot_product;
mod fgd;
mod packing;
mod random;
mod tessera;

use rand_chacha::ChaCha8Rng;
use serde::Serialize;

pub use best_fit::BestFit;
pub use clustering::GpuClustering;
pub use dot_product::DotProduct;
pub use fgd::Fgd;
pub use packing::GpuPacking;
pub use random::Random;
pub use tessera::Tessera;

use crate::cluster::{Cluster, NodeState};
use crate::frag::ResolvedShape;
use crate::model::MAX_DEVICES_PER_NODE;
use crate::request::{GpuRequest, ResourceRequest};
use crate::shapes::ShapeDistribution;

/// The largest CPU and GPU of any node in the reference simulator, used there to normalise scores.
pub const MAX_SPEC_CPU_MILLI: f64 = 128_000.0;
pub const MAX_SPEC_GPU_MILLI: f64 = 8_000.0;

/// A request resolved against one pool (model names turned into a mask).
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    pub request: &'a ResourceRequest,
    /// Allowed device models; `None` for any.
    pub models: Option<u64>,
    /// Per-device milli-GPU (0, a share, or 1000).
    pub milli: u32,
    /// Devices needed.
    pub count: u32,
}

impl<'a> Resolved<'a> {
    pub fn new(request: &'a ResourceRequest, cluster: &Cluster) -> Self {
        Resolved {
            request,
            models: (!request.device_models.is_empty())
                .then(|| cluster.model_mask(&request.device_models)),
            milli: request.gpu.per_device_milli(),
            count: request.gpu.device_count(),
        }
    }

    pub fn total_milli(&self) -> u64 {
        u64::from(self.milli) * u64::from(self.count)
    }
}

/// The devices of one node that can take a request, in index order.
#[derive(Debug, Clone, Copy)]
pub struct Fit {
    pub devices: [u8; MAX_DEVICES_PER_NODE],
    pub len: usize,
}

impl Fit {
    pub fn empty() -> Self {
        Fit {
            devices: [0; MAX_DEVICES_PER_NODE],
            len: 0,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.devices[..self.len]
    }

    /// The fitting device with the least free share (first one on ties).
    pub fn best_fit(&self, node: &NodeState) -> DevicePick {
        let mut best: Option<u8> = None;
        for &d in self.as_slice() {
            let free = node.devices[d as usize].milli_free;
            if best.is_none_or(|b| free < node.devices[b as usize].milli_free) {
                best = Some(d);
            }
        }
        best.map_or(DevicePick::None, DevicePick::One)
    }
}

/// Which devices a placement takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicePick {
    /// No device (CPU-only request).
    None,
    /// This one device (a share).
    One(u8),
    /// The first fitting devices in index order (whole devices).
    FirstFree,
}

/// A policy's verdict on one feasible node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scored {
    pub score: i64,
    pub pick: DevicePick,
}

impl Scored {
    /// The default device choice for a request: best fit for a share, first free for whole devices.
    pub fn with_default_pick(score: i64, node: &NodeState, req: &Resolved, fit: &Fit) -> Self {
        let pick = match req.request.gpu {
            GpuRequest::None => DevicePick::None,
            GpuRequest::Share { .. } => fit.best_fit(node),
            GpuRequest::Whole { .. } => DevicePick::FirstFree,
        };
        Scored { score, pick }
    }
}

/// Ranks feasible nodes for a replica.
pub trait PlacementPolicy: Send + Sync {
    fn name(&self) -> &'static str;

    /// Scores one node that can host `req`; `fit` lists the devices that can take it.
    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, rng: &mut ChaCha8Rng) -> Scored;

    /// True when the score depends only on the node's own state and the request, so the engine may
    /// cache it per node version and score one idle node per hardware class.
    fn node_local(&self) -> bool {
        true
    }

    /// Called before each decision with the pool as it is. A policy whose score of a node also
    /// reads a pool-wide quantity per device model (Tessera: each model's pin pressure) updates it
    /// here and returns the mask of models whose quantity moved, so that the engine stops reusing
    /// scores it cached for nodes of those models. The score of a node may depend on the
    /// quantities of its own models only.
    fn observe(&mut self, _cluster: &Cluster) -> u64 {
        0
    }
}

/// The policies Tessera ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PolicyKind {
    Random,
    DotProd,
    GpuClustering,
    GpuPacking,
    BestFit,
    Fgd,
    Tessera,
}

/// One row per policy: everything about it outside its own file (a new policy is a file, a
/// variant and a row here; the simulator, its plots and the live pool read this table).
pub struct PolicyEntry {
    pub kind: PolicyKind,
    /// Its name on the command line and in reports (the FGD paper's names).
    pub name: &'static str,
    /// Other names it answers to (lower case, without `-` or `_`).
    pub aliases: &'static [&'static str],
    /// The FGD paper's results label it `NN-Name`.
    pub published_label: Option<&'static str>,
    /// Builds it for one pool; `shapes` is the pool's task-shape history.
    pub build: fn(&ShapeDistribution, &Cluster) -> Box<dyn PlacementPolicy>,
}

pub const POLICIES: [PolicyEntry; 7] = [
    PolicyEntry {
        kind: PolicyKind::Random,
        name: "Random",
        aliases: &[],
        published_label: Some("01-Random"),
        build: |_, _| Box::new(Random),
    },
    PolicyEntry {
        kind: PolicyKind::DotProd,
        name: "DotProd",
        aliases: &["dotproduct"],
        published_label: Some("02-DotProd"),
        build: |_, _| Box::new(DotProduct),
    },
    PolicyEntry {
        kind: PolicyKind::GpuClustering,
        name: "GpuClustering",
        aliases: &["clustering"],
        published_label: Some("03-GpuClustering"),
        build: |_, _| Box::new(GpuClustering),
    },
    PolicyEntry {
        kind: PolicyKind::GpuPacking,
        name: "GpuPacking",
        aliases: &["packing"],
        published_label: Some("04-GpuPacking"),
        build: |_, _| Box::new(GpuPacking),
    },
    PolicyEntry {
        kind: PolicyKind::BestFit,
        name: "BestFit",
        aliases: &[],
        published_label: Some("05-BestFit"),
        build: |_, _| Box::new(BestFit),
    },
    PolicyEntry {
        kind: PolicyKind::Fgd,
        name: "FGD",
        aliases: &[],
        published_label: Some("06-FGD"),
        build: |shapes, cluster| Box::new(Fgd::new(resolve_shapes(shapes, cluster))),
    },
    PolicyEntry {
        kind: PolicyKind::Tessera,
        name: "Tessera",
        aliases: &["default"],
        published_label: None,
        build: |shapes, cluster| Box::new(Tessera::new(shapes, cluster)),
    },
];

impl PolicyKind {
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::Random,
        PolicyKind::DotProd,
        PolicyKind::GpuClustering,
        PolicyKind::GpuPacking,
        PolicyKind::BestFit,
        PolicyKind::Fgd,
        PolicyKind::Tessera,
    ];

    /// Its row of [`POLICIES`].
    pub fn entry(self) -> &'static PolicyEntry {
        POLICIES
            .iter()
            .find(|e| e.kind == self)
            .expect("every policy has its row in POLICIES")
    }

    /// The name used on the command line and in reports (the FGD paper's names).
    pub fn name(self) -> &'static str {
        self.entry().name
    }

    /// The FGD paper's results label this policy `NN-Name`.
    pub fn published_label(self) -> Option<&'static str> {
        self.entry().published_label
    }

    /// Reads a policy name or alias, case-insensitively.
    pub fn from_name(name: &str) -> Option<Self> {
        let wanted = name.to_ascii_lowercase().replace(['-', '_'], "");
        POLICIES
            .iter()
            .find(|e| e.name.to_ascii_lowercase() == wanted || e.aliases.contains(&wanted.as_str()))
            .map(|e| e.kind)
    }

    /// Builds the policy for one pool; `shapes` is the pool's task-shape history.
    pub fn build(self, shapes: &ShapeDistribution, cluster: &Cluster) -> Box<dyn PlacementPolicy> {
        (self.entry().build)(shapes, cluster)
    }
}

/// Resolves a shape distribution's model names against one pool.
pub fn resolve_shapes(shapes: &ShapeDistribution, cluster: &Cluster) -> Vec<ResolvedShape> {
    shapes
        .shapes
        .iter()
        .map(|(shape, weight)| {
            let models = shape.model_list();
            ResolvedShape {
                cpu_milli: shape.cpu_milli,
                milli: shape.gpu.per_device_milli(),
                devices: shape.gpu.device_count(),
                models: (!models.is_empty()).then(|| cluster.model_mask(&models)),
                weight: *weight,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_has_one_row_and_answers_to_its_names() {
        for kind in PolicyKind::ALL {
            assert_eq!(
                POLICIES.iter().filter(|e| e.kind == kind).count(),
                1,
                "{kind:?}"
            );
            assert_eq!(PolicyKind::from_name(kind.name()), Some(kind));
            assert_eq!(
                PolicyKind::from_name(&kind.name().to_uppercase()),
                Some(kind)
            );
            for alias in kind.entry().aliases {
                assert_eq!(PolicyKind::from_name(alias), Some(kind), "{alias}");
            }
        }
        assert_eq!(POLICIES.len(), PolicyKind::ALL.len());
        assert_eq!(
            PolicyKind::from_name("gpu-packing"),
            Some(PolicyKind::GpuPacking)
        );
        assert_eq!(PolicyKind::from_name("default"), Some(PolicyKind::Tessera));
        assert_eq!(PolicyKind::from_name("nope"), None);
    }
}
