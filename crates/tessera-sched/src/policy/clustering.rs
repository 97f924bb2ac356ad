//! GpuClustering: put a request with others of its kind (shares with shares, 8-device jobs with
//! 8-device jobs), then on idle nodes, and only then among other kinds.

use rand_chacha::ChaCha8Rng;

use super::{Fit, PlacementPolicy, Resolved, Scored};
use crate::cluster::{GpuAffinity, NodeState};
use crate::request::GpuRequest;

pub struct GpuClustering;

impl PlacementPolicy for GpuClustering {
    fn name(&self) -> &'static str {
        "GpuClustering"
    }

    /// 75–100 on a node running only this kind, 50–75 on a mixed node including it, 25–50 on a
    /// node running no GPU work, 0–25 otherwise; within a band, fuller nodes first. 0 for CPU-only.
    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, _rng: &mut ChaCha8Rng) -> Scored {
        let kind = match req.request.gpu {
            GpuRequest::None => None,
            GpuRequest::Share { .. } => Some(GpuAffinity::Share),
            GpuRequest::Whole { devices } => Some(GpuAffinity::Whole(devices)),
        };
        let score = match kind {
            None => 0,
            Some(kind) => {
                let fullness = 25 * (8000 - node.milli_free_total() as i64) / 8000;
                let here = node.affinities.iter().any(|(k, c)| *k == kind && *c > 0);
                let kinds = node.affinities.len();
                let band = match (here, kinds) {
                    (true, 1) => 75,
                    (true, _) => 50,
                    (false, 0) => 25,
                    (false, _) => 0,
                };
                fullness + band
            }
        };
        Scored::with_default_pick(score, node, req, fit)
    }
}
