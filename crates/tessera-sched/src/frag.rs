//! GPU fragmentation of a node with respect to a distribution of task shapes (FGD's measure).
//!
//! For a node n and a shape m: if m cannot run on n at all (too little CPU, not enough devices
//! with room, no device of an allowed model), all of n's idle GPU is fragment for m; if it can,
//! only the devices whose free share is below m's per-device request are. A CPU-only shape can use
//! no GPU, so for it all idle GPU counts. The node's fragmentation is the expectation over shapes.

use crate::cluster::{ModelId, NodeState};
use crate::model::MAX_DEVICES_PER_NODE;

/// A task shape resolved against one pool's model registry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResolvedShape {
    pub cpu_milli: u64,
    /// Per-device request: 0 (CPU only), a share, or 1000.
    pub milli: u32,
    pub devices: u32,
    /// Allowed models; `None` for any.
    pub models: Option<u64>,
    pub weight: f64,
}

/// A node's devices as (free milli, model), copied to the stack so that hypothetical placements
/// can be evaluated without touching the real state.
#[derive(Clone, Copy)]
pub struct DeviceFree {
    pub free: [u32; MAX_DEVICES_PER_NODE],
    pub model: [ModelId; MAX_DEVICES_PER_NODE],
    pub len: usize,
}

impl DeviceFree {
    pub fn of(node: &NodeState) -> Self {
        let mut out = DeviceFree {
            free: [0; MAX_DEVICES_PER_NODE],
            model: [0; MAX_DEVICES_PER_NODE],
            len: node.devices.len(),
        };
        for (i, d) in node.devices.iter().enumerate() {
            out.free[i] = d.milli_free;
            out.model[i] = d.model;
        }
        out
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.free[..self.len]
    }

    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(|&f| u64::from(f)).sum()
    }
}

/// Expected idle milli-GPU on a node that the next task (drawn from `shapes`) could not use.
pub fn node_fragmentation(cpu_free: u64, devices: &DeviceFree, shapes: &[ResolvedShape]) -> f64 {
    let total = devices.total() as f64;
    if total == 0.0 {
        return 0.0;
    }
    let mut frag = 0.0;
    for shape in shapes {
        frag += shape.weight * shape_fragment(cpu_free, devices, shape, total);
    }
    frag
}

/// Idle milli-GPU that one task of `shape` could not use on this node.
pub fn shape_fragment(
    cpu_free: u64,
    devices: &DeviceFree,
    shape: &ResolvedShape,
    total: f64,
) -> f64 {
    if shape.milli == 0 {
        return total;
    }
    let mut fitting = 0u32;
    let mut unusable = 0u64;
    let mut accessible = false;
    for i in 0..devices.len {
        let free = devices.free[i];
        let allowed = shape
            .models
            .is_none_or(|mask| mask & (1u64 << devices.model[i]) != 0);
        if !allowed {
            unusable += u64::from(free);
            continue;
        }
        accessible = true;
        if free >= shape.milli {
            fitting += 1;
        } else {
            unusable += u64::from(free);
        }
    }
    if !accessible || fitting < shape.devices || cpu_free < shape.cpu_milli {
        total
    } else {
        unusable as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devs(free: &[u32]) -> DeviceFree {
        let mut d = DeviceFree {
            free: [0; MAX_DEVICES_PER_NODE],
            model: [0; MAX_DEVICES_PER_NODE],
            len: free.len(),
        };
        d.free[..free.len()].copy_from_slice(free);
        d
    }

    fn shape(cpu: u64, milli: u32, devices: u32, weight: f64) -> ResolvedShape {
        ResolvedShape {
            cpu_milli: cpu,
            milli,
            devices,
            models: None,
            weight,
        }
    }

    #[test]
    fn devices_below_the_request_are_fragment_when_the_task_fits() {
        // Free 300 and 1000: a 500-milli task fits on the second; the 300 is fragment for it.
        let d = devs(&[300, 1000]);
        assert_eq!(
            node_fragmentation(8000, &d, &[shape(1000, 500, 1, 1.0)]),
            300.0
        );
    }

    #[test]
    fn everything_idle_is_fragment_when_the_task_cannot_run() {
        let d = devs(&[300, 1000]);
        // Not enough CPU.
        assert_eq!(
            node_fragmentation(500, &d, &[shape(1000, 500, 1, 1.0)]),
            1300.0
        );
        // Needs two whole devices, only one is free.
        assert_eq!(
            node_fragmentation(8000, &d, &[shape(1000, 1000, 2, 1.0)]),
            1300.0
        );
        // A CPU-only task can use no GPU at all.
        assert_eq!(
            node_fragmentation(8000, &d, &[shape(1000, 0, 0, 1.0)]),
            1300.0
        );
    }

    #[test]
    fn fragmentation_is_the_expectation_over_shapes() {
        let d = devs(&[300, 1000]);
        let shapes = [shape(1000, 500, 1, 0.5), shape(1000, 200, 1, 0.5)];
        assert_eq!(node_fragmentation(8000, &d, &shapes), 150.0);
    }

    #[test]
    fn devices_of_other_models_are_fragment_for_a_constrained_task() {
        let mut d = devs(&[1000, 1000]);
        d.model[1] = 1;
        let mut s = shape(1000, 500, 1, 1.0);
        s.models = Some(0b01);
        assert_eq!(node_fragmentation(8000, &d, &[s]), 1000.0);
        s.models = Some(0b100);
        assert_eq!(node_fragmentation(8000, &d, &[s]), 2000.0);
    }
}
