//! GpuPacking: fill devices that are already shared, then partly used nodes, then idle nodes.

use rand_chacha::ChaCha8Rng;

use super::{Fit, PlacementPolicy, Resolved, Scored};
use crate::cluster::NodeState;
use crate::model::MILLI_PER_DEVICE;

pub struct GpuPacking;

impl PlacementPolicy for GpuPacking {
    fn name(&self) -> &'static str {
        "GpuPacking"
    }

    /// As the reference defines it: 50–100 when the request goes on shared devices (more when they
    /// have less free), 33–50 when it must open fully free devices on a used node, below 33 on an
    /// idle node; 0 for CPU-only requests. Devices by best fit.
    fn score(&self, node: &NodeState, req: &Resolved, fit: &Fit, _rng: &mut ChaCha8Rng) -> Scored {
        let score = packing_score(node, req);
        Scored::with_default_pick(score, node, req, fit)
    }
}

fn packing_score(node: &NodeState, req: &Resolved) -> i64 {
    if req.milli == 0 {
        return 0;
    }
    let full = MILLI_PER_DEVICE;
    let fully_free = node.devices.iter().filter(|d| d.milli_free == full).count() as i64;
    if fully_free == node.devices.len() as i64 {
        return (100 / 3 - fully_free).max(fully_free);
    }
    // Devices in ascending free order (stable), taking those the request fits on.
    let mut order: Vec<usize> = (0..node.devices.len()).collect();
    order.sort_by_key(|&i| node.devices[i].milli_free);
    let mut wanted = req.count;
    let mut fully_free_used = 0i64;
    let mut used_free_pct = 0i64;
    for i in order {
        if wanted == 0 {
            break;
        }
        let free = node.devices[i].milli_free;
        if req.milli <= free {
            wanted -= 1;
            if free == full {
                fully_free_used += 1;
            }
            used_free_pct += i64::from(free) * 100 / i64::from(full);
        }
    }
    if fully_free_used > 0 {
        return (100 / 2 - fully_free_used).max(100 / 3);
    }
    (100 - used_free_pct / 10).max(100 / 2)
}
