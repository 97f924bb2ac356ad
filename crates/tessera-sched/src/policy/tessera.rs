//! Tessera's default policy (work in progress: delegates to FGD until the design lands).

use rand_chacha::ChaCha8Rng;

use super::{Fgd, Fit, PlacementPolicy, Resolved, Scored, resolve_shapes};
use crate::cluster::{Cluster, NodeState};
use crate::shapes::ShapeDistribution;

pub struct Tessera {
    inner: Fgd,
}

impl Tessera {
    pub fn new(shapes: &ShapeDistribution, cluster: &Cluster) -> Self {
        Tessera {
            inner: Fgd::new(resolve_shapes(shapes, cluster)),
        }
    }
}

impl PlacementPolicy for Tessera {
    fn name(&self) -> &'static str {
        "Tessera"
    }

    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, rng: &mut ChaCha8Rng) -> Scored {
        self.inner.score(node, req, fit, rng)
    }
}
