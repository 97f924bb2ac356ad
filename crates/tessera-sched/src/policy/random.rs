//! Random: a uniformly random feasible node, and a random fitting device on it.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{DevicePick, Fit, PlacementPolicy, Resolved, Scored};
use crate::cluster::NodeState;
use crate::request::GpuRequest;

pub struct Random;

impl PlacementPolicy for Random {
    fn name(&self) -> &'static str {
        "Random"
    }

    /// Independent uniform scores make the arg-max a uniform draw over feasible nodes.
    fn score(&self, _node: &NodeState, req: &Resolved, fit: &Fit, rng: &mut ChaCha8Rng) -> Scored {
        let score = i64::from(rng.random::<u32>());
        let pick = match req.request.gpu {
            GpuRequest::None => DevicePick::None,
            GpuRequest::Share { .. } => {
                DevicePick::One(fit.devices[rng.random_range(0..fit.len.max(1))])
            }
            GpuRequest::Whole { .. } => DevicePick::FirstFree,
        };
        Scored { score, pick }
    }

    fn node_local(&self) -> bool {
        false
    }
}
