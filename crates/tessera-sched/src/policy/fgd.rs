//! FGD, Fragmentation Gradient Descent (Weng et al., USENIX ATC'23): place where the expected GPU
//! fragmentation of the node grows least (or shrinks most).

use rand_chacha::ChaCha8Rng;

use super::{DevicePick, Fit, PlacementPolicy, Resolved, Scored};
use crate::cluster::{ModelId, NodeState};
use crate::frag::{DeviceFree, ResolvedShape, node_fragmentation};

pub struct Fgd {
    shapes: Vec<ResolvedShape>,
}

impl Fgd {
    pub fn new(shapes: Vec<ResolvedShape>) -> Self {
        Fgd { shapes }
    }
}

/// `floor(sigmoid(Δ/1000) × 100)`: the reference's integer score for a fragmentation change.
pub(crate) fn sigmoid_score(before: f64, after: f64) -> i64 {
    let x = (before - after) / 1000.0;
    (100.0 / (1.0 + (-x).exp())) as i64
}

impl PlacementPolicy for Fgd {
    fn name(&self) -> &'static str {
        "FGD"
    }

    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, _rng: &mut ChaCha8Rng) -> Scored {
        score_by_potential(
            node,
            req,
            fit,
            |cpu, devices| node_fragmentation(cpu, devices, &self.shapes),
            |_| 0.0,
        )
    }
}

/// Scores a placement by how much it lowers a node potential (FGD's integer sigmoid of the
/// change). For a share, every fitting device is tried and the first with the top score wins;
/// whole devices take the first free ones.
pub(crate) fn score_by_potential(
    node: &NodeState,
    req: &Resolved,
    fit: &Fit,
    potential: impl Fn(u64, &DeviceFree) -> f64,
    cost_per_milli: impl Fn(ModelId) -> f64,
) -> Scored {
    let devices = DeviceFree::of(node);
    let before = potential(node.cpu_free, &devices);
    let cpu_after = node.cpu_free - req.request.cpu_milli;
    if req.request.gpu.is_share() {
        let mut best = Scored {
            score: i64::MIN,
            pick: DevicePick::None,
        };
        for &d in fit.as_slice() {
            let mut after = devices;
            after.free[d as usize] -= req.milli;
            let cost = f64::from(req.milli) * cost_per_milli(devices.model[d as usize]);
            let s = sigmoid_score(before, potential(cpu_after, &after) + cost);
            if s > best.score {
                best = Scored {
                    score: s,
                    pick: DevicePick::One(d),
                };
            }
        }
        best
    } else {
        let mut after = devices;
        let mut cost = 0.0;
        for &d in &fit.as_slice()[..req.count as usize] {
            after.free[d as usize] -= req.milli;
            cost += f64::from(req.milli) * cost_per_milli(devices.model[d as usize]);
        }
        let s = sigmoid_score(before, potential(cpu_after, &after) + cost);
        Scored::with_default_pick(s, node, req, fit)
    }
}
