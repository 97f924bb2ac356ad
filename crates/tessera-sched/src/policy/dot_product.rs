//! DotProd (Tetris): prefer the node whose free-resource vector has the smallest dot product with
//! the request, i.e. the node the request fills best.

use rand_chacha::ChaCha8Rng;

use super::{Fit, MAX_SPEC_CPU_MILLI, MAX_SPEC_GPU_MILLI, PlacementPolicy, Resolved, Scored};
use crate::cluster::NodeState;

pub struct DotProduct;

impl PlacementPolicy for DotProduct {
    fn name(&self) -> &'static str {
        "DotProd"
    }

    /// The simulator's "merge" dimension (all devices' free GPU summed) with max normalisation:
    /// `100 × (1 − (free · request) / 2)`, truncated; devices by best fit.
    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, _rng: &mut ChaCha8Rng) -> Scored {
        let node_cpu = node.cpu_free as f64 / MAX_SPEC_CPU_MILLI;
        let node_gpu = node.milli_free_total() as f64 / MAX_SPEC_GPU_MILLI;
        let pod_cpu = req.request.cpu_milli as f64 / MAX_SPEC_CPU_MILLI;
        let pod_gpu = req.total_milli() as f64 / MAX_SPEC_GPU_MILLI;
        let dot = node_cpu * pod_cpu + node_gpu * pod_gpu;
        let score = (100.0 * (1.0 - dot / 2.0)) as i64;
        Scored::with_default_pick(score, node, req, fit)
    }
}
