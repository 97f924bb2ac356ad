//! BestFit: the node with the least CPU and GPU left over after placement.

use rand_chacha::ChaCha8Rng;

use super::{Fit, MAX_SPEC_CPU_MILLI, MAX_SPEC_GPU_MILLI, PlacementPolicy, Resolved, Scored};
use crate::cluster::NodeState;

pub struct BestFit;

impl PlacementPolicy for BestFit {
    fn name(&self) -> &'static str {
        "BestFit"
    }

    /// `100 × (1 − Σ 0.5 × (free − request) / max)` over CPU and GPU, truncated. The reference
    /// then rescales scores min–max over the feasible nodes; that map is strictly increasing when
    /// the range is at most 100, so it never changes the winner and is left out.
    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, _rng: &mut ChaCha8Rng) -> Scored {
        let cpu_left = node.cpu_free as f64 - req.request.cpu_milli as f64;
        let gpu_left = node.milli_free_total() as f64 - req.total_milli() as f64;
        let mut s = 0.0;
        s += cpu_left / MAX_SPEC_CPU_MILLI * 0.5;
        s += gpu_left / MAX_SPEC_GPU_MILLI * 0.5;
        let score = ((1.0 - s) * 100.0) as i64;
        Scored::with_default_pick(score, node, req, fit)
    }
}
