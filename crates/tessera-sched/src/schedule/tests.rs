use super::*;
use crate::cluster::NodeId;
use crate::model::{DeviceSpec, GIB};
use crate::testkit::{one_gpu_on, running as run, whole};

#[test]
fn a_node_holding_the_jobs_image_wins_a_tie_but_never_a_better_packing() {
    let gpu = DeviceSpec {
        class: Default::default(),
        model: "H100".into(),
        memory_bytes: 80 * GIB,
    };
    let nodes: Vec<NodeSpec> = (0..3)
        .map(|i| NodeSpec::with_devices(format!("n{i}"), 32_000, 64 * GIB, 2, gpu.clone()))
        .collect();
    let job = |id| PendingJob {
        id,
        spec: whole("train", 50, 1, 1),
    };
    for policy in [PolicyKind::Tessera, PolicyKind::BestFit] {
        let config = Config {
            policy,
            seed: 1,
            shapes: ShapeDistribution::default(),
        };
        let placed_on = |snapshot: &Snapshot| plan_node(&schedule(snapshot, &config).unwrap());
        // Three empty, identical nodes: the first, unless another holds the image.
        let mut snapshot = Snapshot {
            nodes: nodes.clone(),
            pending: vec![job(1)],
            ..Default::default()
        };
        assert_eq!(placed_on(&snapshot), NodeId(0), "{policy:?}");
        snapshot.warm.insert(1, vec![NodeId(2)]);
        assert_eq!(placed_on(&snapshot), NodeId(2), "{policy:?}");
    }
    // Node 1 half full: best fit packs the job there, and an empty node that holds the
    // image does not change that.
    let config = Config {
        policy: PolicyKind::BestFit,
        seed: 1,
        shapes: ShapeDistribution::default(),
    };
    let busy = one_gpu_on(1, 0);
    let mut snapshot = Snapshot {
        nodes,
        pending: vec![job(1)],
        running: vec![run(9, "p", 50, 9, vec![busy])],
        ..Default::default()
    };
    assert_eq!(plan_node(&schedule(&snapshot, &config).unwrap()), NodeId(1));
    snapshot.warm.insert(1, vec![NodeId(2)]);
    assert_eq!(
        plan_node(&schedule(&snapshot, &config).unwrap()),
        NodeId(1),
        "the image does not outweigh packing"
    );
}

/// The node of the plan's only placement.
fn plan_node(plan: &Plan) -> NodeId {
    assert_eq!(plan.placements.len(), 1, "{plan:?}");
    plan.placements[0].1[0].node
}

#[test]
fn higher_priority_goes_first_and_a_gang_that_cannot_fit_waits_with_its_reason() {
    let node = NodeSpec::with_devices(
        "n0",
        32_000,
        64 * GIB,
        4,
        DeviceSpec {
            class: Default::default(),
            model: "H100".into(),
            memory_bytes: 80 * GIB,
        },
    );
    // One device already runs something.
    let running = one_gpu_on(0, 0);
    let snapshot = Snapshot {
        nodes: vec![node],
        running: vec![run(9, "p", 50, 9, vec![running])],
        projects: vec![],
        pending: vec![
            PendingJob {
                id: 1,
                spec: whole("early-low", 25, 2, 1),
            },
            PendingJob {
                id: 2,
                spec: whole("late-high", 75, 2, 1),
            },
            PendingJob {
                id: 3,
                spec: whole("gang", 50, 1, 2),
            },
        ],
        ..Default::default()
    };
    let config = Config {
        policy: PolicyKind::Tessera,
        seed: 1,
        shapes: ShapeDistribution::default(),
    };
    let plan = schedule(&snapshot, &config).unwrap();
    // Three devices are free: the high-priority job takes two, the gang of two single
    // devices cannot be placed whole and waits, and the low-priority job no longer fits.
    let placed: Vec<u64> = plan.placements.iter().map(|(id, _)| *id).collect();
    assert_eq!(placed, vec![2]);
    assert!(
        plan.placements[0].1[0]
            .devices
            .iter()
            .all(|d| d.device != 0)
    );
    let waiting: Vec<u64> = plan.waiting.iter().map(|(id, _)| *id).collect();
    assert_eq!(waiting, vec![3, 1]);
    match &*plan.waiting[0].1 {
        WaitReason::NoFit {
            replica,
            replicas,
            report,
            ..
        } => {
            // The first replica found the last free device; the second had none left. The
            // report judges the second with the first in place: no node fits, GPU binds.
            assert_eq!((*replica, *replicas), (1, 2));
            assert_eq!((report.feasible, report.lacking_gpu), (0, 1));
            assert_eq!(
                report.binding.map(|b| b.resource),
                Some(crate::place::Lack::Gpu)
            );
        }
        other => panic!("unexpected reason {other:?}"),
    }
}

#[test]
fn running_work_beyond_capacity_is_a_snapshot_error() {
    let node = NodeSpec::with_devices(
        "n0",
        1000,
        GIB,
        0,
        DeviceSpec {
            class: Default::default(),
            model: "x".into(),
            memory_bytes: 0,
        },
    );
    let too_big = Allocation {
        gpu_node: None,
        node: NodeId(0),
        cpu_milli: 2000,
        memory_bytes: 0,
        devices: vec![],
        affinity: None,
    };
    let snapshot = Snapshot {
        nodes: vec![node],
        running: vec![run(1, "p", 50, 1, vec![too_big])],
        pending: vec![],
        projects: vec![],
        ..Default::default()
    };
    let config = Config {
        policy: PolicyKind::Fgd,
        seed: 1,
        shapes: ShapeDistribution::default(),
    };
    assert!(matches!(
        schedule(&snapshot, &config),
        Err(SnapshotError::Running(_))
    ));
}
