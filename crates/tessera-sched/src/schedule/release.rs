//! The fewest replicas to release so that a job fits, shared by shrink, reclaim and
//! consolidation.

use super::*;

/// All the allocations of these jobs, for [`hold_for_reclaimer`].
/// A turn of [`fewest_to_release`] for the caller's own accounting (e.g. quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// May this candidate be released? (`false` passes over it.) Asked in order, with the ones
    /// before it released.
    Take,
    /// The job fits without this candidate: may it be given back? (`false` keeps it chosen.)
    MayReturn,
    /// This candidate was given back (or, when nothing was enough, restored).
    Returned,
}

/// The fewest `candidates`, taken in order, whose release lets `spec` fit, shared by shrinking
/// elastic jobs, reclaim and consolidation: releases them one by one until `spec` fits, then gives
/// back, last taken first, every one it can do without. Returns them in the order taken, or `None`
/// when even all of them are not enough; either way the pool is left as it was.
pub(super) fn fewest_to_release<'a, T: Copy>(
    placer: &mut Placer,
    spec: &JobSpec,
    candidates: impl IntoIterator<Item = T>,
    allocations: impl Fn(&T) -> &'a [Allocation],
    mut turn: impl FnMut(Turn, T) -> bool,
) -> Option<Vec<T>> {
    let release = |placer: &mut Placer, c: &T| {
        for alloc in allocations(c) {
            let undone = placer.release(alloc);
            debug_assert!(undone.is_ok(), "{undone:?}");
        }
    };
    let adopt = |placer: &mut Placer, c: &T| {
        for alloc in allocations(c) {
            let redone = placer.adopt(alloc);
            debug_assert!(redone.is_ok(), "{redone:?}");
        }
    };
    let mut taken: Vec<T> = Vec::new();
    let mut found = false;
    for c in candidates {
        if !turn(Turn::Take, c) {
            continue;
        }
        release(placer, &c);
        taken.push(c);
        if fits(placer, spec) {
            found = true;
            break;
        }
    }
    if !found {
        for c in taken.iter().rev() {
            adopt(placer, c);
            turn(Turn::Returned, *c);
        }
        return None;
    }
    // Never more than needed: give back, last taken first, every one the job can do without.
    let mut needed = Vec::new();
    for c in taken.into_iter().rev() {
        adopt(placer, &c);
        if fits(placer, spec) && turn(Turn::MayReturn, c) {
            turn(Turn::Returned, c);
            continue;
        }
        release(placer, &c);
        needed.push(c);
    }
    for c in &needed {
        adopt(placer, c);
    }
    needed.reverse();
    Some(needed)
}

pub(super) fn allocations_of<'a>(jobs: &[&'a RunningJob]) -> Vec<&'a Allocation> {
    jobs.iter().flat_map(|j| &j.allocations).collect()
}
