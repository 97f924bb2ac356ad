//! Tessera's default policy: FGD's fragmentation potential plus the GPU a node's CPU can no longer
//! serve.
//!
//! FGD (Weng et al., ATC'23) places each task where the node's expected fragmentation, measured
//! against the pool's task-shape history, grows least. Replaying the openb trace shows what it
//! still leaves idle when the pool saturates: besides slivers on shared devices, whole devices
//! stranded on nodes whose CPU is gone (0.3–0.55% of all GPUs at arrived = 100%). FGD sees CPU
//! only through thresholds (a typical shape fits or not), and its integer score cannot tell mild
//! from severe CPU pressure.
//!
//! Tessera adds one term to the node potential, in the same unit (milli-GPU):
//!
//! ```text
//! stranded(n) = max(0, free_gpu(n) − free_cpu(n) / r)
//! ```
//!
//! where `r` is the CPU that GPU work asks per milli-GPU, averaged over the same shape history
//! (weighted by each shape's share and GPU demand). It counts the free GPU that this node's
//! remaining CPU cannot feed at the pool's usual ratio. The weight of the term is 1: a stranded
//! milli-GPU is worth exactly what a fragmented one is, so there is no knob to tune per trace.
//! Scores are then FGD's integer `sigmoid(Δ/1000) × 100` of the combined potential, with ties to
//! the pool's node order, which keeps FGD's consolidation effect.
//!
//! With no history (empty distribution), every score ties and placement is first fit in node order.

use rand_chacha::ChaCha8Rng;

use super::{Fit, PlacementPolicy, Resolved, Scored, resolve_shapes};
use crate::cluster::{Cluster, NodeState};
use crate::frag::{DeviceFree, ResolvedShape, node_fragmentation};
use crate::policy::fgd::score_by_potential;
use crate::shapes::ShapeDistribution;

pub struct Tessera {
    shapes: Vec<ResolvedShape>,
    /// CPU milli that GPU work asks per milli-GPU; 0 when the history has no GPU work.
    cpu_per_gpu_milli: f64,
}

impl Tessera {
    pub fn new(shapes: &ShapeDistribution, cluster: &Cluster) -> Self {
        let shapes = resolve_shapes(shapes, cluster);
        let (mut cpu, mut gpu) = (0.0, 0.0);
        for s in shapes.iter().filter(|s| s.milli > 0) {
            cpu += s.weight * s.cpu_milli as f64;
            gpu += s.weight * f64::from(s.milli) * f64::from(s.devices);
        }
        Tessera {
            shapes,
            cpu_per_gpu_milli: if gpu > 0.0 { cpu / gpu } else { 0.0 },
        }
    }

    /// Free milli-GPU that `cpu_free` cannot feed at the usual CPU-per-GPU ratio.
    fn stranded(&self, cpu_free: u64, devices: &DeviceFree) -> f64 {
        if self.cpu_per_gpu_milli == 0.0 {
            return 0.0;
        }
        let servable = cpu_free as f64 / self.cpu_per_gpu_milli;
        (devices.total() as f64 - servable).max(0.0)
    }

    /// The node potential Tessera descends: expected fragmentation plus stranded GPU.
    fn potential(&self, cpu_free: u64, devices: &DeviceFree) -> f64 {
        node_fragmentation(cpu_free, devices, &self.shapes) + self.stranded(cpu_free, devices)
    }
}

impl PlacementPolicy for Tessera {
    fn name(&self) -> &'static str {
        "Tessera"
    }

    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, _rng: &mut ChaCha8Rng) -> Scored {
        score_by_potential(node, req, fit, |cpu, devices| self.potential(cpu, devices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frag::DeviceFree;
    use crate::model::{DeviceSpec, GIB, NodeSpec};
    use crate::request::{GpuRequest, ResourceRequest};

    fn history() -> ShapeDistribution {
        let reqs: Vec<ResourceRequest> = (0..10)
            .map(|_| ResourceRequest {
                cpu_milli: 8000,
                memory_bytes: GIB,
                gpu: GpuRequest::Whole { devices: 1 },
                ..Default::default()
            })
            .collect();
        ShapeDistribution::typical(&reqs, 1.0)
    }

    #[test]
    fn free_gpu_beyond_what_the_cpu_can_feed_is_stranded() {
        let node = NodeSpec::with_devices(
            "n",
            64_000,
            64 * GIB,
            8,
            DeviceSpec {
                model: "G2".into(),
                memory_bytes: 0,
            },
        );
        let cluster = Cluster::new(vec![node]).unwrap();
        let policy = Tessera::new(&history(), &cluster);
        assert!((policy.cpu_per_gpu_milli - 8.0).abs() < 1e-12);
        let devices = DeviceFree::of(&cluster.nodes()[0]);
        // 64 CPUs feed all 8 devices at 8 CPUs each; 16 CPUs feed only 2 of the 8.
        assert_eq!(policy.stranded(64_000, &devices), 0.0);
        assert_eq!(policy.stranded(16_000, &devices), 6000.0);
    }
}
