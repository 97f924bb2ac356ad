//! Stage 4b: preempt running work (other projects above their guarantee, lower priority of
//! the same project), never more than needed.

use super::*;

/// Finds the fewest running jobs whose stopping lets `job` fit: stopping jobs first (they are
/// leaving anyway), then by lowest priority and newest start. Leaves the pool as it was.
fn reclaim<'a>(
    placer: &mut Placer,
    quotas: &mut Quotas,
    snapshot: &'a Snapshot,
    job: &PendingJob,
    within_guarantee: bool,
    taken: &HashSet<u64>,
) -> Option<Vec<(&'a RunningJob, PreemptReason)>> {
    let spec = &job.spec;
    let mut candidates: Vec<(&RunningJob, PreemptReason)> = snapshot
        .running
        .iter()
        .filter(|r| !taken.contains(&r.id) && !r.allocations.is_empty())
        .filter_map(|r| {
            if r.project == spec.project {
                (r.stopping || (r.preemptible && r.priority < spec.priority))
                    .then_some((r, PreemptReason::Priority))
            } else {
                (r.stopping || (within_guarantee && r.preemptible))
                    .then_some((r, PreemptReason::QuotaReclaim))
            }
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    candidates.sort_by(|(a, _), (b, _)| {
        b.stopping
            .cmp(&a.stopping)
            .then(a.priority.cmp(&b.priority))
            .then(b.started.cmp(&a.started))
            .then(b.id.cmp(&a.id))
    });

    let needed = fewest_to_release(
        placer,
        spec,
        candidates,
        |(victim, _)| victim.allocations.as_slice(),
        |turn, (victim, reason)| match turn {
            // Another project's work is reclaimable only down to that project's guarantee.
            Turn::Take => {
                let allowed = reason != PreemptReason::QuotaReclaim
                    || victim.stopping
                    || quotas.over_guarantee(&victim.project) >= victim.gpu_milli;
                if allowed {
                    quotas.uncharge(&victim.project, victim.gpu_milli);
                }
                allowed
            }
            // A job already stopping stays counted: it leaves anyway.
            Turn::MayReturn => !victim.stopping,
            Turn::Returned => {
                quotas.charge(&victim.project, victim.gpu_milli);
                true
            }
        },
    )?;
    // The victims still run until they stop; this round, the pool keeps them.
    for (victim, _) in &needed {
        quotas.charge(&victim.project, victim.gpu_milli);
    }
    Some(needed)
}

/// Stage 4b for `job`: if stopping running work makes room, records the preemptions, holds the
/// room, and says why the job waits.
pub(super) fn make_room(round: &mut Round, job: &PendingJob, milli: u64) -> Option<WaitReason> {
    let within = round.quotas.within_guarantee(&job.spec.project, milli);
    let chosen = reclaim(
        &mut round.placer,
        &mut round.quotas,
        round.snapshot,
        job,
        within,
        &round.taken,
    )?;
    let leaving: Vec<&RunningJob> = chosen.iter().map(|(v, _)| *v).collect();
    hold_for_reclaimer(&mut round.placer, &job.spec, &allocations_of(&leaving));
    round.quotas.charge(&job.spec.project, milli);
    let mut victims = Vec::new();
    for (victim, reason) in chosen {
        victims.push(victim.id);
        if !victim.stopping {
            round.plan.preemptions.push(Preemption {
                job: victim.id,
                for_job: job.id,
                reason,
            });
        }
        round.taken.insert(victim.id);
    }
    Some(WaitReason::Reclaiming { victims })
}
