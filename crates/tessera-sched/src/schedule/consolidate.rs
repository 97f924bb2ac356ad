//! Stage 4c: move small jobs to gather scattered free capacity.

use super::*;

/// Most nodes one consolidation attempt tries to clear.
pub(super) const MAX_CONSOLIDATION_NODES: usize = 16;

/// Most starting nodes tried: each try clears nodes from its start onwards.
pub(super) const MAX_CONSOLIDATION_STARTS: usize = 4;

/// Gathers scattered free capacity for `job` (one replica or a whole gang): moves small running
/// jobs off some nodes onto others. Planned in memory and kept only when the job and every moved
/// job fit (all or nothing, KAI's transactional style); the pool is left holding the capacity the
/// job and the moved jobs will take, as for a reclaim. Candidates are preemptible one-replica jobs
/// of no higher priority, smallest first; never more of them move than the job needs.
fn consolidate<'a>(
    placer: &mut Placer,
    snapshot: &'a Snapshot,
    requests: &Requests<'_>,
    job: &PendingJob,
    taken: &HashSet<u64>,
) -> Option<Vec<(&'a RunningJob, NodeId)>> {
    let movable: Vec<&RunningJob> = snapshot
        .running
        .iter()
        .filter(|r| {
            r.preemptible
                && !r.stopping
                && requests.contains_key(&r.id)
                && r.allocations.len() == 1
                && r.priority <= job.spec.priority
                && !taken.contains(&r.id)
        })
        .collect();
    // Only nodes where the free GPU share plus what could move away covers one replica, most
    // promising first, and a bounded number of them: a round on a large pool stays cheap.
    let need = job.spec.request.gpu.total_milli();
    let mut room: HashMap<NodeId, u64> = HashMap::new();
    for r in &movable {
        *room.entry(r.allocations[0].node).or_insert_with(|| {
            placer
                .cluster()
                .node(r.allocations[0].node)
                .milli_free_total()
        }) += r.allocations[0].gpu_milli();
    }
    let mut nodes: Vec<(u64, NodeId)> = room
        .into_iter()
        .filter(|(_, milli)| *milli >= need)
        .map(|(n, milli)| (milli, n))
        .collect();
    nodes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let nodes: Vec<NodeId> = nodes
        .into_iter()
        .take(MAX_CONSOLIDATION_NODES)
        .map(|(_, n)| n)
        .collect();
    (0..nodes.len().min(MAX_CONSOLIDATION_STARTS))
        .find_map(|start| try_consolidation(placer, &movable, requests, &nodes[start..], &job.spec))
}

/// One consolidation trial: takes jobs off `nodes` in order, smallest first, until `spec` fits;
/// puts back every one it can do without; then places `spec` and the moved jobs elsewhere. On
/// success the pool holds what `spec` and the moved jobs will take; otherwise it is unchanged.
fn try_consolidation<'a>(
    placer: &mut Placer,
    movable: &[&'a RunningJob],
    requests: &Requests<'_>,
    nodes: &[NodeId],
    spec: &JobSpec,
) -> Option<Vec<(&'a RunningJob, NodeId)>> {
    // Candidates node by node, smallest first on each.
    let mut candidates: Vec<&RunningJob> = Vec::new();
    for &node in nodes {
        let mut on_node: Vec<&RunningJob> = movable
            .iter()
            .copied()
            .filter(|r| r.allocations[0].node == node)
            .collect();
        on_node.sort_by_key(|r| (r.gpu_milli, r.id));
        candidates.extend(on_node);
    }
    let mut moving = fewest_to_release(
        placer,
        spec,
        candidates,
        |r| r.allocations.as_slice(),
        |_, _| true,
    )?;
    // The last taken is placed elsewhere first.
    moving.reverse();
    // The trial: the job and every moved job placed with the moved ones gone, then undone whole.
    let checkpoint = placer.checkpoint();
    for r in &moving {
        let undone = placer.release(&r.allocations[0]);
        debug_assert!(undone.is_ok(), "{undone:?}");
    }
    let placed = placer.place_job(spec).unwrap_or_default();
    let mut moves: Vec<(&RunningJob, Allocation)> = Vec::new();
    let mut ok = !placed.is_empty();
    if ok {
        for r in &moving {
            match placer.place_replica(&requests[&r.id]) {
                // Moving onto the node it is on gains nothing.
                Some(a) if a.node != r.allocations[0].node => moves.push((r, a)),
                _ => {
                    ok = false;
                    break;
                }
            }
        }
    }
    // Whatever it found, the running jobs keep their places this round.
    placer.rollback(checkpoint);
    if !ok {
        return None;
    }
    // Hold what the moved jobs will take, then what the job will.
    for (_, a) in &moves {
        let redone = placer.adopt(a);
        debug_assert!(redone.is_ok(), "{redone:?}");
    }
    hold_for_reclaimer(placer, spec, &allocations_of(&moving));
    Some(moves.into_iter().map(|(r, a)| (r, a.node)).collect())
}

/// Stage 4c for `job`: if moving small jobs gathers room, records the moves, holds the room, and
/// says why the job waits.
pub(super) fn make_room(round: &mut Round, job: &PendingJob, milli: u64) -> Option<WaitReason> {
    let moves = consolidate(
        &mut round.placer,
        round.snapshot,
        &round.requests,
        job,
        &round.taken,
    )?;
    let mut moved = Vec::new();
    for (m, to) in moves {
        moved.push(m.id);
        round.taken.insert(m.id);
        round.plan.moves.push(Move {
            job: m.id,
            to,
            for_job: job.id,
        });
    }
    round.quotas.charge(&job.spec.project, milli);
    Some(WaitReason::Consolidating { moved })
}
