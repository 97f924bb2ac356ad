//! Stage 4a: take back replicas that elastic jobs run above their minimum.

use super::*;

/// Finds the fewest replicas above their minimum that elastic jobs can give back so that `job`
/// fits: lowest priority first, each job's newest replica first. They were lent idle capacity, so
/// any waiting job may take it back. Leaves the pool as it was.
fn shrink_elastic<'a>(
    placer: &mut Placer,
    snapshot: &'a Snapshot,
    job: &PendingJob,
    taken: &HashSet<u64>,
    shrunk: &HashSet<(u64, u32)>,
) -> Option<Vec<(&'a RunningJob, u32, &'a Allocation)>> {
    // (already leaving, priority, how many newer replicas of its job come first, job, replica)
    type Candidate<'b> = (bool, i32, usize, &'b RunningJob, u32, &'b Allocation);
    let mut candidates: Vec<Candidate<'a>> = snapshot
        .running
        .iter()
        .filter(|r| !r.stopping && !taken.contains(&r.id) && r.id != job.id)
        .filter_map(|r| Some((r, r.elastic.as_ref()?)))
        .flat_map(|(r, e)| {
            let leaving = e
                .leaving
                .iter()
                .map(move |(index, alloc)| (true, r.priority, 0, r, *index, alloc));
            let extra = e
                .extra
                .iter()
                .rev()
                .filter(|(index, _)| !shrunk.contains(&(r.id, *index)))
                .enumerate()
                .map(move |(newest, (index, alloc))| (false, r.priority, newest, r, *index, alloc));
            leaving.chain(extra)
        })
        .filter(|(leaving, _, _, r, index, _)| !leaving || !shrunk.contains(&(r.id, *index)))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    // Replicas already leaving first; then spread over jobs: every job's newest first, then
    // their second newest, ...
    candidates.sort_by_key(|(leaving, priority, newest, r, index, _)| {
        (!*leaving, *priority, *newest, r.id, *index)
    });
    let chosen = fewest_to_release(
        placer,
        &job.spec,
        candidates
            .into_iter()
            .map(|(_, _, _, r, index, alloc)| (r, index, alloc)),
        |(_, _, alloc)| std::slice::from_ref(*alloc),
        |_, _| true,
    )?;
    // They run until they stop: the pool keeps them this round, and the caller holds the room.
    Some(chosen)
}

/// Stage 4a for `job`: if taking back lent replicas makes room, records the shrinks, holds the
/// room, and says why the job waits.
pub(super) fn make_room(round: &mut Round, job: &PendingJob, milli: u64) -> Option<WaitReason> {
    let chosen = shrink_elastic(
        &mut round.placer,
        round.snapshot,
        job,
        &round.taken,
        &round.shrunk,
    )?;
    let leaving: Vec<&Allocation> = chosen.iter().map(|(_, _, a)| *a).collect();
    hold_for_reclaimer(&mut round.placer, &job.spec, &leaving);
    round.quotas.charge(&job.spec.project, milli);
    let mut per_job: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (owner, index, alloc) in &chosen {
        round.shrunk.insert((owner.id, *index));
        round.quotas.uncharge(&owner.project, alloc.gpu_milli());
        let leaving = owner
            .elastic
            .as_ref()
            .is_some_and(|e| e.leaving.iter().any(|(i, _)| i == index));
        if !leaving {
            per_job.entry(owner.id).or_default().push(*index);
        }
    }
    round
        .plan
        .shrinks
        .extend(per_job.into_iter().map(|(owner, mut replicas)| {
            replicas.sort_unstable();
            Shrink {
                job: owner,
                replicas,
                for_job: job.id,
            }
        }));
    let from = chosen.iter().map(|(o, i, _)| (o.id, *i)).collect();
    Some(WaitReason::Shrinking { from })
}
