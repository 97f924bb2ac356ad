use super::*;
use crate::cluster::NodeId;
use crate::request::ResourceRequest;
use crate::testkit::{h100_node as node, one_gpu_on, quota, running, whole};

/// The plan's waiting jobs with their reasons, to compare whole.
fn reasons(plan: &Plan) -> Vec<(u64, WaitReason)> {
    plan.waiting
        .iter()
        .map(|(id, r)| (*id, WaitReason::clone(r)))
        .collect()
}

fn job(project: &str, priority: i32, devices: u32, replicas: u32) -> JobSpec {
    JobSpec {
        project: project.into(),
        ..whole("j", priority, devices, replicas)
    }
}

/// A one-GPU job running on device `device` of node `node`.
fn on(id: u64, project: &str, priority: i32, started: u64, node: u32, device: u32) -> RunningJob {
    running(
        id,
        project,
        priority,
        started,
        vec![one_gpu_on(node, device)],
    )
}

fn config() -> Config {
    Config {
        policy: PolicyKind::Tessera,
        seed: 7,
        shapes: ShapeDistribution::default(),
    }
}

/// Four GPUs, all held by project `b` (guarantee 1), jobs of different priority and age.
fn full_pool() -> Snapshot {
    Snapshot {
        nodes: vec![node("n0", 4)],
        running: vec![
            on(1, "b", 50, 1, 0, 0),
            on(2, "b", 25, 2, 0, 1),
            on(3, "b", 25, 3, 0, 2),
            on(4, "b", 50, 4, 0, 3),
        ],
        pending: vec![],
        projects: vec![quota("a", 2000, None), quota("b", 1000, None)],
        ..Default::default()
    }
}

#[test]
fn a_project_under_its_guarantee_reclaims_lowest_priority_newest_first_and_no_more() {
    let mut snapshot = full_pool();
    snapshot.pending = vec![PendingJob {
        id: 10,
        spec: job("a", 50, 2, 1),
    }];
    let plan = schedule(&snapshot, &config()).unwrap();
    let victims: Vec<u64> = plan.preemptions.iter().map(|p| p.job).collect();
    // Two GPUs are needed: the two low-priority jobs go, the newer one first.
    assert_eq!(victims, vec![3, 2]);
    assert!(
        plan.preemptions
            .iter()
            .all(|p| p.for_job == 10 && p.reason == PreemptReason::QuotaReclaim)
    );
    assert_eq!(
        reasons(&plan),
        vec![(
            10,
            WaitReason::Reclaiming {
                victims: vec![3, 2]
            }
        )]
    );
}

#[test]
fn reclaim_stops_at_the_other_projects_guarantee() {
    let mut snapshot = full_pool();
    // b's guarantee is 3 GPUs now: only one of its four may be taken back.
    snapshot.projects[1].guaranteed_milli = 3000;
    snapshot.pending = vec![PendingJob {
        id: 10,
        spec: job("a", 50, 2, 1),
    }];
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.preemptions.is_empty());
    assert!(matches!(*plan.waiting[0].1, WaitReason::NoFit { .. }));
}

#[test]
fn a_project_over_its_guarantee_cannot_reclaim_but_may_preempt_its_own_lower_priority_work() {
    let mut snapshot = full_pool();
    snapshot.pending = vec![
        PendingJob {
            id: 10,
            spec: job("b", 75, 1, 1),
        },
        PendingJob {
            id: 11,
            spec: job("a", 50, 1, 1),
        },
    ];
    snapshot.projects[0].guaranteed_milli = 0;
    let plan = schedule(&snapshot, &config()).unwrap();
    let got: Vec<(u64, u64, PreemptReason)> = plan
        .preemptions
        .iter()
        .map(|p| (p.job, p.for_job, p.reason))
        .collect();
    assert_eq!(got, vec![(3, 10, PreemptReason::Priority)]);
    let waiting: HashMap<u64, &WaitReason> =
        plan.waiting.iter().map(|(id, r)| (*id, &**r)).collect();
    assert!(matches!(waiting[&11], WaitReason::NoFit { .. }));
}

#[test]
fn jobs_already_stopping_are_counted_before_new_victims() {
    let mut snapshot = full_pool();
    snapshot.running[2].stopping = true; // job 3
    snapshot.pending = vec![PendingJob {
        id: 10,
        spec: job("a", 50, 1, 1),
    }];
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.preemptions.is_empty());
    assert_eq!(
        reasons(&plan),
        vec![(10, WaitReason::Reclaiming { victims: vec![3] })]
    );
}

#[test]
fn a_victim_that_stopped_first_does_not_take_back_the_capacity_it_freed() {
    // Job 10 of project a reclaimed two GPUs; job 3 has stopped and is pending again, job 2
    // is still stopping. Job 3 must not land on the GPU it freed: that is job 10's.
    let mut snapshot = full_pool();
    snapshot.running.retain(|r| r.id != 3);
    snapshot.running[1].stopping = true; // job 2
    snapshot.pending = vec![
        PendingJob {
            id: 10,
            spec: job("a", 50, 2, 1),
        },
        PendingJob {
            id: 3,
            spec: job("b", 25, 1, 1),
        },
    ];
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.placements.is_empty(), "{:?}", plan.placements);
    assert!(plan.preemptions.is_empty(), "{:?}", plan.preemptions);
    let waiting: HashMap<u64, &WaitReason> =
        plan.waiting.iter().map(|(id, r)| (*id, &**r)).collect();
    assert_eq!(waiting[&10], &WaitReason::Reclaiming { victims: vec![2] });
    assert!(matches!(waiting[&3], WaitReason::NoFit { .. }));

    // Capacity that the reclaiming job cannot use (its two GPUs must share a node) stays
    // usable by others.
    snapshot.nodes.push(node("n1", 1));
    let plan = schedule(&snapshot, &config()).unwrap();
    let placed: Vec<(u64, NodeId)> = plan
        .placements
        .iter()
        .map(|(id, allocs)| (*id, allocs[0].node))
        .collect();
    assert_eq!(placed, vec![(3, NodeId(1))]);
}

#[test]
fn scattered_free_gpus_are_gathered_by_moving_a_small_job_and_only_when_it_fits_elsewhere() {
    // Two nodes of two GPUs, one busy GPU on each: two GPUs are free, but not on one node.
    let movable = |id, node| {
        let mut r = on(id, "a", 50, id, node, 0);
        r.request = Some(job("a", 50, 1, 1).request);
        r
    };
    let mut snapshot = Snapshot {
        nodes: vec![node("n0", 2), node("n1", 2)],
        running: vec![movable(1, 0), movable(2, 1)],
        pending: vec![PendingJob {
            id: 10,
            spec: job("a", 50, 2, 1),
        }],
        projects: vec![quota("a", 0, None)],
        ..Default::default()
    };
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.placements.is_empty());
    assert!(plan.preemptions.is_empty());
    assert_eq!(plan.moves.len(), 1, "{:?}", plan.moves);
    let m = &plan.moves[0];
    assert_eq!(m.for_job, 10);
    // The moved job goes to the other node, next to the job that stays.
    let other = if m.job == 1 { NodeId(1) } else { NodeId(0) };
    assert_eq!(m.to, other);
    assert_eq!(
        reasons(&plan),
        vec![(10, WaitReason::Consolidating { moved: vec![m.job] })]
    );

    // With n1 full, only one GPU is free in all: no move can help, so nothing moves.
    snapshot.running.push(movable(3, 1));
    snapshot.running[2].allocations[0].devices[0].device = 1;
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.moves.is_empty(), "{:?}", plan.moves);
    assert!(matches!(*plan.waiting[0].1, WaitReason::NoFit { .. }));

    // A job whose request is unknown, or of higher priority, is never moved.
    snapshot.running.truncate(2);
    snapshot.running[0].request = None;
    snapshot.running[1].priority = 90;
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.moves.is_empty(), "{:?}", plan.moves);
}

#[test]
fn a_gang_waiting_on_scattered_gpus_gets_whole_nodes_by_the_fewest_moves() {
    // Four nodes of two GPUs, one busy GPU on each: four GPUs are free, none two on a node.
    let movable = |id, node| {
        let mut r = on(id, "a", 50, id, node, 0);
        r.request = Some(job("a", 50, 1, 1).request);
        r
    };
    let snapshot = Snapshot {
        nodes: (0..4).map(|i| node(&format!("n{i}"), 2)).collect(),
        running: (0..4).map(|i| movable(i + 1, i as u32)).collect(),
        pending: vec![PendingJob {
            id: 10,
            spec: job("a", 50, 2, 2),
        }],
        projects: vec![quota("a", 0, None)],
        ..Default::default()
    };
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.placements.is_empty() && plan.preemptions.is_empty());
    // Two nodes are cleared for the gang's two replicas; their jobs go to the other two.
    assert_eq!(plan.moves.len(), 2, "{:?}", plan.moves);
    let from: HashSet<NodeId> = plan
        .moves
        .iter()
        .map(|m| snapshot.running[m.job as usize - 1].allocations[0].node)
        .collect();
    let to: HashSet<NodeId> = plan.moves.iter().map(|m| m.to).collect();
    assert_eq!(from.len(), 2, "{:?}", plan.moves);
    assert_eq!(to.len(), 2, "{:?}", plan.moves);
    assert!(from.is_disjoint(&to), "{:?}", plan.moves);
    let mut moved: Vec<u64> = plan.moves.iter().map(|m| m.job).collect();
    moved.sort();
    assert!(matches!(
        &reasons(&plan)[..],
        [(10, WaitReason::Consolidating { .. })]
    ));

    // Once the moved jobs stopped and wait to start again, pinned to their targets as the
    // controller pins them, the round places the gang on the two cleared nodes and the moved
    // jobs on the others: no one takes another's place.
    let mut after = snapshot.clone();
    for n in &mut after.nodes {
        n.labels.insert("node".into(), n.name.clone());
    }
    after.running.retain(|r| !moved.contains(&r.id));
    after.pending.extend(plan.moves.iter().map(|m| {
        let mut spec = job("a", 50, 1, 1);
        spec.request
            .node_selector
            .insert("node".into(), format!("n{}", m.to.0));
        PendingJob { id: m.job, spec }
    }));
    let plan = schedule(&after, &config()).unwrap();
    let placed: HashMap<u64, Vec<NodeId>> = plan
        .placements
        .iter()
        .map(|(id, allocs)| (*id, allocs.iter().map(|a| a.node).collect()))
        .collect();
    assert_eq!(placed.len(), 3, "{:?}", plan.placements);
    let gang: HashSet<NodeId> = placed[&10].iter().copied().collect();
    assert_eq!(gang, from);
    for id in &moved {
        assert!(to.contains(&placed[id][0]), "{:?}", plan.placements);
    }

    // A gang that needs more than moving can gather (three whole nodes while only four GPUs
    // are free) moves nothing.
    let mut snapshot = snapshot;
    snapshot.pending[0].spec = job("a", 50, 2, 3);
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.moves.is_empty(), "{:?}", plan.moves);
    assert!(matches!(*plan.waiting[0].1, WaitReason::NoFit { .. }));
}

/// An elastic job of project `project` running `replicas` one-GPU replicas on node 0
/// (devices 0..replicas), `min` of them its minimum, allowed `max`.
fn elastic(id: u64, project: &str, priority: i32, replicas: u32, min: u32, max: u32) -> RunningJob {
    let allocations: Vec<Allocation> = (0..replicas)
        .map(|d| on(id, project, priority, id, 0, d).allocations.remove(0))
        .collect();
    RunningJob {
        gpu_milli: 1000 * u64::from(replicas),
        request: Some(job(project, priority, 1, 1).request),
        elastic: Some(ElasticRunning {
            may_grow: max - replicas,
            extra: (min..replicas)
                .map(|i| (i, allocations[i as usize].clone()))
                .collect(),
            leaving: vec![],
        }),
        allocations,
        ..on(id, project, priority, id, 0, 0)
    }
}

#[test]
fn elastic_jobs_grow_into_idle_capacity_in_turn_and_within_their_limit() {
    let mut snapshot = Snapshot {
        nodes: vec![node("n0", 8)],
        // Job 1 runs 2 of its 2..8, job 2 runs 1 of its 1..3: five GPUs are idle.
        running: vec![elastic(1, "a", 50, 2, 2, 8), {
            let mut j = elastic(2, "a", 50, 1, 1, 3);
            j.allocations[0].devices[0].device = 2;
            j
        }],
        pending: vec![],
        projects: vec![quota("a", 0, None)],
        ..Default::default()
    };
    let plan = schedule(&snapshot, &config()).unwrap();
    let grown: Vec<(u64, usize)> = plan
        .grows
        .iter()
        .map(|g| (g.job, g.allocations.len()))
        .collect();
    // Job 2 (fewer replicas) reaches its maximum of 3; job 1 takes the other three.
    assert_eq!(grown, vec![(1, 3), (2, 2)]);
    let devices: HashSet<u32> = plan
        .grows
        .iter()
        .flat_map(|g| &g.allocations)
        .map(|a| a.devices[0].device)
        .collect();
    assert_eq!(devices.len(), 5, "no GPU given twice: {:?}", plan.grows);
    assert!(!devices.contains(&0) && !devices.contains(&1) && !devices.contains(&2));

    // A project hard limit of 5 GPUs (3 in use) leaves room for two more replicas only.
    snapshot.projects[0].limit_milli = Some(5000);
    let plan = schedule(&snapshot, &config()).unwrap();
    let total: usize = plan.grows.iter().map(|g| g.allocations.len()).sum();
    assert_eq!(total, 2, "{:?}", plan.grows);

    // A job that may not grow now (e.g. finishing) does not.
    snapshot.projects[0].limit_milli = None;
    for r in &mut snapshot.running {
        r.elastic.as_mut().unwrap().may_grow = 0;
    }
    assert!(schedule(&snapshot, &config()).unwrap().grows.is_empty());
}

#[test]
fn a_waiting_job_takes_back_an_elastic_jobs_newest_extra_replicas_and_no_more() {
    // Job 1 holds all four GPUs, 1 of them its minimum; job 10 (lower priority, another
    // project over nothing) needs two.
    let snapshot = Snapshot {
        nodes: vec![node("n0", 4)],
        running: vec![elastic(1, "a", 75, 4, 1, 4)],
        pending: vec![PendingJob {
            id: 10,
            spec: job("b", 25, 2, 1),
        }],
        projects: vec![quota("a", 0, None), quota("b", 0, None)],
        ..Default::default()
    };
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.preemptions.is_empty() && plan.moves.is_empty());
    assert_eq!(
        plan.shrinks,
        vec![Shrink {
            job: 1,
            replicas: vec![2, 3],
            for_job: 10
        }]
    );
    assert_eq!(
        reasons(&plan),
        vec![(
            10,
            WaitReason::Shrinking {
                from: vec![(1, 3), (1, 2)]
            }
        )]
    );
    assert!(
        plan.grows.is_empty(),
        "a shrinking job does not grow: {:?}",
        plan.grows
    );
    assert!(
        plan.waiting[0]
            .1
            .describe(&job("b", 25, 2, 1))
            .contains("give back replicas above their minimum: 2 of job 1")
    );

    // Its minimum is never given back: a job needing four GPUs cannot get them this way.
    let mut snapshot = snapshot;
    snapshot.pending[0].spec = job("b", 25, 4, 1);
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.shrinks.is_empty(), "{:?}", plan.shrinks);
    assert!(matches!(*plan.waiting[0].1, WaitReason::NoFit { .. }));
}

#[test]
fn room_an_elastic_job_gave_back_goes_to_the_job_it_was_given_for() {
    // Replica 3 of job 1 is still stopping (its job is not marked stopping: only the
    // replica is); job 10 waits for it. Job 1 may grow again, but not into job 10's room.
    let mut running = elastic(1, "a", 50, 4, 1, 4);
    running.elastic.as_mut().unwrap().may_grow = 0;
    let mut snapshot = Snapshot {
        nodes: vec![node("n0", 4)],
        running: vec![running],
        pending: vec![PendingJob {
            id: 10,
            spec: job("a", 50, 1, 1),
        }],
        projects: vec![quota("a", 0, None)],
        ..Default::default()
    };
    let plan = schedule(&snapshot, &config()).unwrap();
    assert_eq!(plan.shrinks.len(), 1);
    let gone = plan.shrinks[0].replicas[0];
    // While the replica stops, job 10 waits for it and no other replica is asked to go.
    let e = snapshot.running[0].elastic.as_mut().unwrap();
    let at = e.extra.iter().position(|(i, _)| *i == gone).unwrap();
    let leaving = e.extra.remove(at);
    e.leaving.push(leaving);
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.shrinks.is_empty(), "{:?}", plan.shrinks);
    assert_eq!(
        reasons(&plan),
        vec![(
            10,
            WaitReason::Shrinking {
                from: vec![(1, gone)]
            }
        )]
    );
    // The replica stopped: the next round places job 10 on the GPU it freed.
    snapshot.running[0]
        .elastic
        .as_mut()
        .unwrap()
        .leaving
        .clear();
    let r = &mut snapshot.running[0];
    r.allocations.remove(gone as usize);
    let e = r.elastic.as_mut().unwrap();
    e.extra.retain(|(i, _)| *i != gone);
    e.may_grow = 1;
    let plan = schedule(&snapshot, &config()).unwrap();
    assert_eq!(plan.placements.len(), 1, "{:?}", plan);
    assert_eq!(plan.placements[0].1[0].devices[0].device, gone);
    assert!(plan.grows.is_empty(), "{:?}", plan.grows);
}

#[test]
fn of_two_projects_equal_now_the_one_that_used_less_lately_goes_first() {
    let mut snapshot = Snapshot {
        nodes: vec![node("n0", 3)],
        running: vec![on(1, "a", 50, 1, 0, 0), on(2, "b", 50, 2, 0, 1)],
        pending: vec![
            PendingJob {
                id: 10,
                spec: job("a", 50, 1, 1),
            },
            PendingJob {
                id: 11,
                spec: job("b", 50, 1, 1),
            },
        ],
        projects: vec![quota("a", 0, None), quota("b", 0, None)],
        ..Default::default()
    };
    let placed = |s: &Snapshot| schedule(s, &config()).unwrap().placements[0].0;
    // Without history the older job (a's) wins the one free GPU; with a's heavy past, b's.
    assert_eq!(placed(&snapshot), 10);
    snapshot.history = [("a".to_string(), 4000)].into();
    assert_eq!(placed(&snapshot), 11);
}

#[test]
fn a_hard_limit_holds_even_with_free_capacity_and_says_so() {
    let snapshot = Snapshot {
        nodes: vec![node("n0", 8)],
        running: vec![on(1, "vision", 50, 1, 0, 0)],
        pending: vec![PendingJob {
            id: 2,
            spec: job("vision", 50, 2, 1),
        }],
        projects: vec![quota("vision", 0, Some(2000))],
        ..Default::default()
    };
    let plan = schedule(&snapshot, &config()).unwrap();
    assert!(plan.placements.is_empty());
    let text = plan.waiting[0].1.describe(&snapshot.pending[0].spec);
    assert_eq!(
        text,
        "needs 2 GPU in all; project vision is at 1 of its limit of 2 GPU"
    );
}

#[test]
fn the_project_furthest_below_its_guarantee_goes_first() {
    let snapshot = Snapshot {
        nodes: vec![node("n0", 1)],
        running: vec![],
        pending: vec![
            PendingJob {
                id: 1,
                spec: job("rich", 100, 1, 1),
            },
            PendingJob {
                id: 2,
                spec: job("poor", 25, 1, 1),
            },
        ],
        projects: vec![quota("rich", 0, None), quota("poor", 1000, None)],
        ..Default::default()
    };
    let plan = schedule(&snapshot, &config()).unwrap();
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.placements[0].0, 2);
}

#[test]
fn a_gang_that_does_not_fit_is_described_in_words_a_user_can_act_on() {
    let snapshot = Snapshot {
        nodes: vec![node("n0", 2), node("n1", 2)],
        running: vec![on(1, "p", 50, 1, 0, 0)],
        pending: vec![PendingJob {
            id: 2,
            spec: JobSpec {
                request: ResourceRequest {
                    device_models: vec!["H100".into()],
                    ..job("p", 50, 2, 2).request
                },
                ..job("p", 50, 2, 2)
            },
        }],
        projects: vec![],
        ..Default::default()
    };
    let plan = schedule(&snapshot, &config()).unwrap();
    let text = plan.waiting[0].1.describe(&snapshot.pending[0].spec);
    assert_eq!(
        text,
        "needs 2 replicas, each 2 whole GPUs of model H100 on one node, 1 CPU and 1.0 GiB \
         memory; only 1 of its 2 replicas fit at once, and a gang starts whole or not at all; \
         the pool has 2 GPU free for it, on 1 node with 64 CPU free there; with 1 replica in \
         place, GPU binds: 2 nodes have the CPU and memory but not 2 whole GPUs free (the \
         most there: 1 whole GPU); no node of 2 fits: 2 lack free GPU capacity; the largest \
         free block is 2 whole GPUs on n1"
    );
}
