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
//! **Pinned models.** Where tasks name the models they accept, a second effect decides: a task
//! that could run on any model, placed on a model that pinned tasks need, takes capacity that
//! those tasks cannot find anywhere else. Tessera learns from the history each model's pinned
//! share of all GPU demand (a set's demand split over the models in it that can hold its
//! replicas, by capacity), and keeps each model's *pin pressure* with the pool as it is: the
//! pinned work still to come, if arrivals keep the history's mix until the pool is full, over
//! what the model has free, capped at 1:
//!
//! ```text
//! pressure(M) = min(1, pinned_share(M) × free(pool) / free(M))
//! ```
//!
//! On an empty pool that is the pinned share over the model's share of GPUs; as a model fills
//! faster than the pool (unpinned work likes its nodes: the CPU-rich T4 nodes of openb, say), its
//! pressure rises. A placement on model M pays, per milli-GPU taken, `pressure(M)` (in the
//! potential's unit, milli-GPU expected to go unallocated, so there is no knob). A task pinned to
//! one model pays the same on every node it may use, so its choice is unchanged; a task free to go
//! anywhere pays most where pinned work will need the room; with no pins, nothing changes. (A
//! first cut charged only the excess over the task's least pressured alternative: the same
//! choices within 0.05 points on every variant, but a node's score then hung on other models'
//! pressure.) Pressure moves in whole steps of [`PRESSURE_STEP`]; [`PlacementPolicy::observe`]
//! tells the engine which models moved, and only their nodes are scored again.
//!
//! Why: the stranded-GPU term alone loses to FGD when pins oversubscribe the small models (it
//! draws low-CPU tasks to the CPU-poor P100 and V100M16 nodes, which pinned work then finds full),
//! and both lose to plain packing when pins follow the fleet but unpinned work crowds the
//! CPU-rich models first.
//!
//! With no history (empty distribution), every score ties and placement is first fit in node order.

use rand_chacha::ChaCha8Rng;

use super::{Fit, PlacementPolicy, Resolved, Scored, resolve_shapes};
use crate::cluster::{Cluster, NodeState};
use crate::frag::{DeviceFree, ResolvedShape, node_fragmentation};
use crate::model::MAX_DEVICE_MODELS;
use crate::policy::fgd::score_by_potential;
use crate::shapes::{PinnedDemand, ShapeDistribution};

pub struct Tessera {
    shapes: Vec<ResolvedShape>,
    /// CPU milli that GPU work asks per milli-GPU; 0 when the history has no GPU work.
    cpu_per_gpu_milli: f64,
    /// Share of all GPU demand pinned to each model (index: model id), from the history.
    pinned: [f64; MAX_DEVICE_MODELS],
    /// Whether the history pins any model (otherwise there is nothing to observe).
    pinned_any: bool,
    /// Pin pressure of each model now, 0..=1, in steps of [`PRESSURE_STEP`].
    pressure: [f64; MAX_DEVICE_MODELS],
}

impl Tessera {
    pub fn new(history: &ShapeDistribution, cluster: &Cluster) -> Self {
        let shapes = resolve_shapes(history, cluster);
        let (mut cpu, mut gpu) = (0.0, 0.0);
        for s in shapes.iter().filter(|s| s.milli > 0) {
            cpu += s.weight * s.cpu_milli as f64;
            gpu += s.weight * f64::from(s.milli) * f64::from(s.devices);
        }
        let most_per_node = most_per_node(cluster);
        let pinned = pinned_share(&history.pinned_demand, cluster, &most_per_node);
        Tessera {
            shapes,
            cpu_per_gpu_milli: if gpu > 0.0 { cpu / gpu } else { 0.0 },
            pressure: pressure_now(&pinned, cluster).map(in_steps),
            pinned_any: pinned.iter().any(|&p| p > 0.0),
            pinned,
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

    fn observe(&mut self, cluster: &Cluster) -> u64 {
        if !self.pinned_any {
            return 0;
        }
        // A model's pressure moves only when the exact value is a whole step away from the kept
        // one, so that a value near a step's edge does not flip back and forth (each move
        // re-scores that model's nodes).
        let exact = pressure_now(&self.pinned, cluster);
        let mut moved = 0u64;
        for (m, (kept, exact)) in self.pressure.iter_mut().zip(exact).enumerate() {
            if (exact - *kept).abs() >= PRESSURE_STEP {
                *kept = in_steps(exact);
                moved |= 1u64 << m;
            }
        }
        moved
    }

    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, _rng: &mut ChaCha8Rng) -> Scored {
        score_by_potential(
            node,
            req,
            fit,
            |cpu, devices| self.potential(cpu, devices),
            |model| self.pressure[usize::from(model)],
        )
    }
}

/// Per model: the most devices of it on one node of the pool.
fn most_per_node(cluster: &Cluster) -> [u32; MAX_DEVICE_MODELS] {
    let mut most = [0u32; MAX_DEVICE_MODELS];
    for node in cluster.nodes() {
        let mut here = [0u32; MAX_DEVICE_MODELS];
        for d in &node.devices {
            here[usize::from(d.model)] += 1;
        }
        for m in 0..MAX_DEVICE_MODELS {
            most[m] = most[m].max(here[m]);
        }
    }
    most
}

/// The models with a node that has `devices` of them.
fn holding(most_per_node: &[u32; MAX_DEVICE_MODELS], devices: u32) -> u64 {
    (0..MAX_DEVICE_MODELS)
        .filter(|&m| most_per_node[m] > 0 && most_per_node[m] >= devices)
        .fold(0u64, |mask, m| mask | (1u64 << m))
}

/// Pressure is kept in steps of this size, so that scores cached per node stay valid until a
/// model's pressure moves by a step (a fill of the pool crosses each step once per model).
pub const PRESSURE_STEP: f64 = 0.05;

/// Each model's share of all GPU demand pinned to it. A set's demand goes to the models in it that
/// can hold its replicas, in proportion to their GPUs.
fn pinned_share(
    pins: &[PinnedDemand],
    cluster: &Cluster,
    most_per_node: &[u32; MAX_DEVICE_MODELS],
) -> [f64; MAX_DEVICE_MODELS] {
    let mut capacity = vec![0u64; cluster.models().len()];
    for d in cluster.nodes().iter().flat_map(|n| &n.devices) {
        capacity[usize::from(d.model)] += 1;
    }
    let mut pinned = [0.0f64; MAX_DEVICE_MODELS];
    for pin in pins {
        let names: Vec<String> = pin.models.split('|').map(str::to_owned).collect();
        let mask = cluster.model_mask(&names) & holding(most_per_node, pin.devices.max(1));
        let members = || (0..capacity.len()).filter(move |&m| mask & (1u64 << m) != 0);
        let set_capacity: u64 = members().map(|m| capacity[m]).sum();
        for m in members() {
            pinned[m] += pin.share * capacity[m] as f64 / set_capacity as f64;
        }
    }
    pinned
}

/// Each model's exact pin pressure with the pool as it is: the pinned work still to come, if arrivals
/// keep the history's mix until the pool is full, over what the model has free, capped at 1.
/// On an empty pool it is the pinned share of demand over the model's share of GPUs; as a model
/// fills faster than the pool (unpinned work likes its nodes), its pressure rises.
fn pressure_now(pinned: &[f64; MAX_DEVICE_MODELS], cluster: &Cluster) -> [f64; MAX_DEVICE_MODELS] {
    let free = cluster.free_milli_by_model();
    let total: u64 = free.iter().sum();
    let mut pressure = [0.0f64; MAX_DEVICE_MODELS];
    for (m, &free_m) in free.iter().enumerate() {
        if pinned[m] == 0.0 {
            continue;
        }
        let p = if free_m == 0 {
            1.0
        } else {
            (pinned[m] * total as f64 / free_m as f64).min(1.0)
        };
        pressure[m] = p;
    }
    pressure
}

/// A pressure rounded to whole steps of [`PRESSURE_STEP`].
fn in_steps(pressure: f64) -> f64 {
    (pressure / PRESSURE_STEP).round() * PRESSURE_STEP
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
                class: Default::default(),
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

    fn gpu_node(name: &str, model: &str) -> NodeSpec {
        NodeSpec::with_devices(
            name,
            64_000,
            64 * GIB,
            4,
            DeviceSpec {
                class: Default::default(),
                model: model.into(),
                memory_bytes: 0,
            },
        )
    }

    fn one_gpu(models: &[&str]) -> ResourceRequest {
        ResourceRequest {
            cpu_milli: 8000,
            memory_bytes: GIB,
            gpu: GpuRequest::Whole { devices: 1 },
            device_models: models.iter().map(|m| (*m).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_task_free_to_go_anywhere_leaves_the_models_that_pinned_work_needs() {
        // Three big-model nodes and one small-model node; half of all GPU demand pins the small
        // model, which has a quarter of the GPUs: its pressure is 1 (capped), the big model's 0.
        let cluster = Cluster::new(vec![
            gpu_node("big0", "G2"),
            gpu_node("big1", "G2"),
            gpu_node("big2", "G2"),
            gpu_node("small", "T4"),
        ])
        .unwrap();
        let mut reqs: Vec<ResourceRequest> = (0..5).map(|_| one_gpu(&[])).collect();
        reqs.extend((0..5).map(|_| one_gpu(&["T4"])));
        let history = ShapeDistribution::typical(&reqs, 1.0);
        let policy = Tessera::new(&history, &cluster);
        let (g2, t4) = (0, 1);
        assert_eq!(cluster.models()[g2], "G2");
        assert_eq!(policy.pressure[g2], 0.0);
        assert_eq!(policy.pressure[t4], 1.0);
        let mut rng = rand::SeedableRng::seed_from_u64(1);
        let score = |req: &ResourceRequest, node: usize, rng: &mut ChaCha8Rng| {
            let resolved = Resolved::new(req, &cluster);
            let mut fit = crate::policy::Fit::empty();
            fit.len = 4;
            fit.devices[..4].copy_from_slice(&[0, 1, 2, 3]);
            policy
                .score(&cluster.nodes()[node], &resolved, &fit, rng)
                .score
        };
        // Unpinned: the T4 node scores below an identical G2 node.
        let free = one_gpu(&[]);
        assert!(score(&free, 3, &mut rng) < score(&free, 0, &mut rng));
        // Pinned to T4: it pays the same on every node it may use (the T4 ones), so the charge
        // does not change which it takes; it is the FGD score shifted down.
        let pinned = one_gpu(&["T4"]);
        assert!(score(&pinned, 3, &mut rng) < score(&free, 0, &mut rng));
        // Allowed both: the same as unpinned.
        let either = one_gpu(&["G2", "T4"]);
        assert_eq!(score(&either, 3, &mut rng), score(&free, 3, &mut rng));
    }

    #[test]
    fn without_pins_or_with_pins_in_proportion_to_the_fleet_nothing_is_charged() {
        let cluster = Cluster::new(vec![gpu_node("a", "G2"), gpu_node("b", "T4")]).unwrap();
        let plain = Tessera::new(&ShapeDistribution::typical(&[one_gpu(&[])], 1.0), &cluster);
        assert_eq!(plain.pressure[..2], [0.0, 0.0]);
        let even = [
            one_gpu(&["G2"]),
            one_gpu(&["T4"]),
            one_gpu(&[]),
            one_gpu(&[]),
        ];
        let policy = Tessera::new(&ShapeDistribution::typical(&even, 1.0), &cluster);
        // Equal pressure: both models charge the same, so nothing changes between them.
        assert_eq!(policy.pressure[..2], [0.5, 0.5]);
    }

    #[test]
    fn a_model_that_fills_faster_than_the_pool_grows_pressure_and_unpinned_work_moves_away() {
        // Pins in proportion to the fleet: equal pressure on an empty pool.
        let cluster = Cluster::new(vec![gpu_node("a", "G2"), gpu_node("b", "T4")]).unwrap();
        let even = [
            one_gpu(&["G2"]),
            one_gpu(&["T4"]),
            one_gpu(&[]),
            one_gpu(&[]),
        ];
        let mut policy = Tessera::new(&ShapeDistribution::typical(&even, 1.0), &cluster);
        assert_eq!(policy.observe(&cluster), 0, "nothing changed yet");
        assert_eq!(policy.pressure[..2], [0.5, 0.5]);
        // Unpinned work takes three of the T4 node's four GPUs.
        let mut placer_cluster = cluster.clone();
        for device in 0..3 {
            let alloc = crate::cluster::Allocation {
                gpu_node: None,
                node: crate::cluster::NodeId(1),
                cpu_milli: 1000,
                memory_bytes: GIB,
                devices: vec![crate::cluster::DeviceShare {
                    device,
                    milli: 1000,
                    memory_bytes: 0,
                }],
                affinity: None,
            };
            placer_cluster.allocate(&alloc).unwrap();
        }
        assert_eq!(
            policy.observe(&placer_cluster),
            0b11,
            "both models' pressure moved"
        );
        // Five of eight GPUs free, one of them a T4: T4 pinned work (a quarter of demand) would
        // need 1.25 of it (capped at 1); G2's quarter needs 1.25 of 4 (0.3125, kept as 0.30).
        assert_eq!(policy.pressure[1], 1.0);
        assert!(
            (policy.pressure[0] - 0.3).abs() < 1e-9,
            "{}",
            policy.pressure[0]
        );
    }
}
