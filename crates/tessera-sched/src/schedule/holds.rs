//! Trial fits and holding capacity for a job that waits for others to leave.

use super::*;

/// Whether `spec` fits now, leaving the pool as it was.
pub(super) fn fits(placer: &mut Placer, spec: &JobSpec) -> bool {
    let checkpoint = placer.checkpoint();
    let placed = placer.place_job(spec).is_ok();
    placer.rollback(checkpoint);
    placed
}

/// Holds, for the rest of this round, the free capacity that `spec` will use once the `leaving`
/// allocations (of victims, moved jobs or shrinking replicas) are given back. Without it, a victim
/// that stopped first (and is pending again) lands back on the GPU it just freed, and the reclaim
/// starts over: a preemption loop. Only the part of the future placement that is free now is
/// held; the leaving part is theirs until they stop.
pub(super) fn hold_for_reclaimer(placer: &mut Placer, spec: &JobSpec, leaving: &[&Allocation]) {
    // Where it will go once they have left: a trial, undone whole.
    let checkpoint = placer.checkpoint();
    for alloc in leaving {
        let undone = placer.release(alloc);
        debug_assert!(undone.is_ok(), "{undone:?}");
    }
    let future = placer.place_job(spec).unwrap_or_default();
    placer.rollback(checkpoint);
    for alloc in &future {
        let theirs: Vec<&Allocation> = leaving
            .iter()
            .copied()
            .filter(|a| a.node == alloc.node)
            .collect();
        let on_device = |device: u32| -> (u32, u64) {
            theirs
                .iter()
                .flat_map(|a| &a.devices)
                .filter(|d| d.device == device)
                .fold((0, 0), |(m, b), d| (m + d.milli, b + d.memory_bytes))
        };
        let hold = Allocation {
            gpu_node: None,
            node: alloc.node,
            cpu_milli: alloc
                .cpu_milli
                .saturating_sub(theirs.iter().map(|a| a.cpu_milli).sum()),
            memory_bytes: alloc
                .memory_bytes
                .saturating_sub(theirs.iter().map(|a| a.memory_bytes).sum()),
            devices: alloc
                .devices
                .iter()
                .filter_map(|d| {
                    let (milli, bytes) = on_device(d.device);
                    let share = DeviceShare {
                        device: d.device,
                        milli: d.milli.saturating_sub(milli),
                        memory_bytes: d.memory_bytes.saturating_sub(bytes),
                    };
                    (share.milli > 0 || share.memory_bytes > 0).then_some(share)
                })
                .collect(),
            affinity: None,
        };
        if hold.cpu_milli > 0 || hold.memory_bytes > 0 || !hold.devices.is_empty() {
            // It fits: `spec` fitted in this free capacity plus the leaving allocations.
            let held = placer.adopt(&hold);
            debug_assert!(held.is_ok(), "{held:?}");
        }
    }
}
