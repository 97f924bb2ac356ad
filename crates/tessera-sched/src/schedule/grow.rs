//! Stage 5: grow elastic jobs into the capacity nothing waiting could use.

use super::*;

/// Most replicas added to elastic jobs in one round (a large pool grows over a few rounds).
pub(super) const MAX_GROWS_PER_ROUND: usize = 256;

/// Grows running elastic jobs into the capacity nothing waiting could use (this runs after every
/// waiting job had its turn): one replica at a time to each job in turn, higher priority first,
/// then the job with fewest replicas, within its project's hard limit.
pub(super) fn grow_elastic(
    placer: &mut Placer,
    quotas: &mut Quotas,
    snapshot: &Snapshot,
    requests: &Requests<'_>,
    taken: &HashSet<u64>,
    shrunk: &HashSet<(u64, u32)>,
) -> Vec<Grow> {
    let mut growers: Vec<(&RunningJob, &ResourceRequest, u32)> = snapshot
        .running
        .iter()
        .filter(|r| !r.stopping && !taken.contains(&r.id))
        // A job giving back replicas this round does not take others at once.
        .filter(|r| !shrunk.iter().any(|(job, _)| *job == r.id))
        .filter_map(|r| {
            let e = r.elastic.as_ref()?;
            let request = requests.get(&r.id)?;
            // Never past the project's most GPU per job.
            let room = match snapshot
                .rules
                .get(&r.project)
                .and_then(|x| x.max_job_gpu_milli)
            {
                Some(max) if request.gpu.total_milli() > 0 => {
                    let per = request.gpu.total_milli();
                    let now = per * r.allocations.len() as u64;
                    (max.saturating_sub(now) / per).min(u64::from(e.may_grow)) as u32
                }
                _ => e.may_grow,
            };
            (room > 0).then_some((r, &**request, room))
        })
        .collect();
    growers.sort_by_key(|(r, _, _)| (std::cmp::Reverse(r.priority), r.allocations.len(), r.id));
    let mut grown: BTreeMap<u64, Vec<Allocation>> = BTreeMap::new();
    let mut total = 0;
    loop {
        let mut progress = false;
        for (r, request, left) in &mut growers {
            if *left == 0 || total >= MAX_GROWS_PER_ROUND {
                continue;
            }
            let milli = request.gpu.total_milli();
            if quotas.limit_hit(&r.project, milli).is_some() {
                *left = 0;
                continue;
            }
            match placer.place_replica(request) {
                Some(alloc) => {
                    quotas.charge(&r.project, milli);
                    grown.entry(r.id).or_default().push(alloc);
                    *left -= 1;
                    total += 1;
                    progress = true;
                }
                None => *left = 0,
            }
        }
        if !progress {
            break;
        }
    }
    grown
        .into_iter()
        .map(|(job, allocations)| Grow { job, allocations })
        .collect()
}
