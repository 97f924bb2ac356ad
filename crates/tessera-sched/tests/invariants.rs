//! Scheduler invariants under random pools, jobs and releases, for every policy:
//! no device beyond 1000 milli or its memory, no node beyond its CPU or memory, gangs all or
//! nothing, model and label constraints always hold, the same seed gives the same placements.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tessera_sched::cluster::{Allocation, Cluster};
use tessera_sched::model::{DeviceSpec, GIB, NodeSpec};
use tessera_sched::place::{Lack, Placer};
use tessera_sched::policy::PolicyKind;
use tessera_sched::request::{GpuRequest, JobSpec, ResourceRequest};
use tessera_sched::shapes::ShapeDistribution;

const MODELS: [&str; 3] = ["H100", "A100", "T4"];

fn node_strategy() -> impl Strategy<Value = NodeSpec> {
    (
        1u64..=16,
        1u64..=64,
        0usize..=8,
        0usize..3,
        any::<bool>(),
        prop::sample::select(vec![0u64, 16, 80]),
        any::<bool>(),
    )
        .prop_map(|(cpus, mem_gib, devices, model, mixed, dev_mem, zone_a)| {
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_owned(), if zone_a { "a" } else { "b" }.to_owned());
            NodeSpec {
                name: String::new(),
                cpu_milli: cpus * 4000,
                memory_bytes: mem_gib * GIB,
                labels,
                devices: (0..devices)
                    .map(|i| DeviceSpec {
                        class: Default::default(),
                        model: MODELS[if mixed { (model + i) % 3 } else { model }].to_owned(),
                        memory_bytes: dev_mem * GIB,
                    })
                    .collect(),
            }
        })
}

fn request_strategy() -> impl Strategy<Value = ResourceRequest> {
    let gpu = prop_oneof![
        Just(GpuRequest::None),
        (1u32..1000).prop_map(|milli| GpuRequest::Share { milli }),
        (1u32..=4).prop_map(|devices| GpuRequest::Whole { devices }),
    ];
    (
        gpu,
        0u64..=20_000,
        0u64..=16,
        prop::sample::subsequence(MODELS.to_vec(), 0..=2),
        prop::option::of(any::<bool>()),
        prop::sample::select(vec![0u64, 4, 40]),
    )
        .prop_map(
            |(gpu, cpu, mem_gib, models, zone, gpu_mem)| ResourceRequest {
                gpu_attach: Default::default(),
                gpu,
                gpu_memory_bytes: if gpu == GpuRequest::None {
                    0
                } else {
                    gpu_mem * GIB
                },
                cpu_milli: if gpu == GpuRequest::None {
                    cpu.max(1)
                } else {
                    cpu
                },
                memory_bytes: mem_gib * GIB,
                device_models: if gpu == GpuRequest::None {
                    Vec::new()
                } else {
                    models.into_iter().map(str::to_owned).collect()
                },
                node_selector: zone
                    .map(|a| {
                        [("zone".to_owned(), if a { "a" } else { "b" }.to_owned())]
                            .into_iter()
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    Submit(ResourceRequest, u32),
    Release(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (request_strategy(), 1u32..=3).prop_map(|(r, n)| Op::Submit(r, n)),
        1 => (0usize..100).prop_map(Op::Release),
    ]
}

/// Free CPU, memory and (milli, memory) per device of one node.
type NodeFree = (u64, u64, Vec<(u32, u64)>);

/// Free capacity of every node and device, for before/after comparisons.
fn state(cluster: &Cluster) -> Vec<NodeFree> {
    cluster
        .nodes()
        .iter()
        .map(|n| {
            (
                n.cpu_free,
                n.memory_free,
                n.devices
                    .iter()
                    .map(|d| (d.milli_free, d.memory_free))
                    .collect(),
            )
        })
        .collect()
}

/// Recounts usage from the live allocations and checks it against capacity and the engine's state.
fn check_accounting(cluster: &Cluster, live: &[(ResourceRequest, Allocation)]) {
    for node in cluster.nodes() {
        let mine: Vec<&Allocation> = live
            .iter()
            .map(|(_, a)| a)
            .filter(|a| a.node == node.id)
            .collect();
        let cpu: u64 = mine.iter().map(|a| a.cpu_milli).sum();
        let mem: u64 = mine.iter().map(|a| a.memory_bytes).sum();
        assert!(
            cpu <= node.spec.cpu_milli,
            "CPU over capacity on {}",
            node.id.0
        );
        assert!(mem <= node.spec.memory_bytes, "memory over capacity");
        assert_eq!(node.cpu_free, node.spec.cpu_milli - cpu);
        assert_eq!(node.memory_free, node.spec.memory_bytes - mem);
        for (i, d) in node.devices.iter().enumerate() {
            let shares = mine
                .iter()
                .flat_map(|a| &a.devices)
                .filter(|s| s.device as usize == i);
            let (milli, dmem) =
                shares.fold((0u32, 0u64), |(m, b), s| (m + s.milli, b + s.memory_bytes));
            assert!(milli <= 1000, "device over 1000 milli");
            assert!(dmem <= d.memory_bytes, "device memory over capacity");
            assert_eq!(d.milli_free, 1000 - milli);
            assert_eq!(d.memory_free, d.memory_bytes - dmem);
        }
    }
}

/// The allocation honours the request's models, labels and device count.
fn check_constraints(cluster: &Cluster, request: &ResourceRequest, alloc: &Allocation) {
    let node = cluster.node(alloc.node);
    for (k, v) in &request.node_selector {
        assert_eq!(node.spec.labels.get(k), Some(v), "label constraint broken");
    }
    assert_eq!(alloc.devices.len() as u32, request.gpu.device_count());
    let mut seen = std::collections::BTreeSet::new();
    for share in &alloc.devices {
        assert!(
            seen.insert(share.device),
            "a device taken twice by one replica"
        );
        assert_eq!(share.milli, request.gpu.per_device_milli());
        let model = &node.spec.devices[share.device as usize].model;
        assert!(
            request.device_models.is_empty() || request.device_models.contains(model),
            "model constraint broken: {model} not in {:?}",
            request.device_models
        );
    }
    assert_eq!(alloc.cpu_milli, request.cpu_milli);
    assert_eq!(alloc.memory_bytes, request.memory_bytes);
}

/// Runs the ops and returns every placement decision, checking invariants after each step.
fn run(
    nodes: &[NodeSpec],
    ops: &[Op],
    policy: PolicyKind,
    seed: u64,
) -> Vec<Option<Vec<Allocation>>> {
    let mut cluster = Cluster::new(nodes.to_vec()).unwrap();
    let order: Vec<_> = (0..nodes.len() as u32)
        .rev()
        .map(tessera_sched::NodeId)
        .collect();
    cluster.set_tie_order(&order).unwrap();
    let history: Vec<ResourceRequest> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Submit(r, _) => Some(r.clone()),
            Op::Release(_) => None,
        })
        .collect();
    let shapes = ShapeDistribution::typical(&history, 0.95);
    let built = policy.build(&shapes, &cluster);
    let mut placer = Placer::new(cluster, built, seed);
    let mut live: Vec<(ResourceRequest, Allocation)> = Vec::new();
    let mut decisions = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Submit(request, replicas) => {
                let before = state(placer.cluster());
                let report = placer.explain(request);
                let job = JobSpec {
                    name: format!("j{i}"),
                    project: "p".into(),
                    priority: 50,
                    replicas: *replicas,
                    request: request.clone(),
                };
                match placer.place_job(&job) {
                    Ok(allocs) => {
                        assert!(
                            report.feasible > 0,
                            "placed where explain saw no fit: {report}"
                        );
                        assert_eq!(allocs.len() as u32, *replicas, "a partial gang");
                        for a in &allocs {
                            check_constraints(placer.cluster(), request, a);
                            live.push((request.clone(), a.clone()));
                        }
                        decisions.push(Some(allocs));
                    }
                    Err(err) => {
                        assert_eq!(state(placer.cluster()), before, "a failed gang left traces");
                        if let tessera_sched::PlacementError::NoFit { replica, .. } = err {
                            // The reason is about the replica that failed: none fits it now.
                            assert_eq!(replica == 0, report.feasible == 0, "{report}");
                            let gang = placer.explain_gang(request, replica);
                            // (Random may place the trial replicas elsewhere and leave room.)
                            if policy != PolicyKind::Random {
                                assert_eq!(gang.feasible, 0, "{gang}");
                            }
                            assert_eq!(state(placer.cluster()), before, "explaining left traces");
                            if let Some(b) = gang.binding {
                                // The nodes short of only the binding resource are among those
                                // counted short of it.
                                let short = match b.resource {
                                    Lack::Gpu => gang.lacking_gpu,
                                    Lack::GpuMemory => gang.lacking_gpu_memory,
                                    Lack::Cpu => gang.lacking_cpu,
                                    Lack::Memory => gang.lacking_memory,
                                    Lack::Model => gang.no_allowed_model,
                                };
                                assert!(short >= b.nodes, "{b:?} {gang}");
                            }
                        }
                        decisions.push(None);
                    }
                }
            }
            Op::Release(k) => {
                if !live.is_empty() {
                    let (_, alloc) = live.swap_remove(k % live.len());
                    placer.release(&alloc).unwrap();
                }
            }
        }
        check_accounting(placer.cluster(), &live);
    }
    decisions
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn placement_invariants_hold_for_every_policy(
        mut nodes in prop::collection::vec(node_strategy(), 1..8),
        ops in prop::collection::vec(op_strategy(), 1..50),
        policy in prop::sample::select(PolicyKind::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        for (i, n) in nodes.iter_mut().enumerate() {
            n.name = format!("n{i}");
        }
        let first = run(&nodes, &ops, policy, seed);
        let second = run(&nodes, &ops, policy, seed);
        prop_assert_eq!(first, second, "same seed, different placements");
    }
}

#[test]
fn a_gang_that_does_not_fit_whole_is_not_placed_at_all() {
    let node = |name: &str| {
        NodeSpec::with_devices(
            name,
            64_000,
            256 * GIB,
            8,
            DeviceSpec {
                class: Default::default(),
                model: "H100".into(),
                memory_bytes: 80 * GIB,
            },
        )
    };
    let job = JobSpec {
        name: "train".into(),
        project: "p".into(),
        priority: 50,
        replicas: 3,
        request: ResourceRequest {
            gpu: GpuRequest::Whole { devices: 8 },
            cpu_milli: 32_000,
            memory_bytes: 64 * GIB,
            ..Default::default()
        },
    };
    for policy in PolicyKind::ALL {
        let two = Cluster::new(vec![node("a"), node("b")]).unwrap();
        let built = policy.build(&ShapeDistribution::default(), &two);
        let mut placer = Placer::new(two, built, 1);
        assert!(placer.place_job(&job).is_err(), "{policy:?}");
        assert_eq!(placer.cluster().gpu_used_milli(), 0, "{policy:?}");
        let three = Cluster::new(vec![node("a"), node("b"), node("c")]).unwrap();
        let built = policy.build(&ShapeDistribution::default(), &three);
        let mut placer = Placer::new(three, built, 1);
        let allocs = placer.place_job(&job).unwrap();
        let mut nodes: Vec<_> = allocs.iter().map(|a| a.node).collect();
        nodes.dedup();
        assert_eq!(nodes.len(), 3, "{policy:?}");
    }
}

#[test]
fn an_invalid_job_is_refused_before_anything_is_placed() {
    let cluster = Cluster::new(vec![NodeSpec::with_devices(
        "a",
        8000,
        GIB,
        1,
        DeviceSpec {
            class: Default::default(),
            model: "T4".into(),
            memory_bytes: 0,
        },
    )])
    .unwrap();
    let built = PolicyKind::Tessera.build(&ShapeDistribution::default(), &cluster);
    let mut placer = Placer::new(cluster, built, 1);
    let mut job = JobSpec::single(
        "x",
        ResourceRequest {
            gpu: GpuRequest::Share { milli: 1000 },
            cpu_milli: 1,
            memory_bytes: 1,
            ..Default::default()
        },
    );
    let err = placer.place_job(&job).unwrap_err();
    assert!(err.to_string().starts_with("gpu_milli 1000:"), "{err}");
    job.request.gpu = GpuRequest::Share { milli: 500 };
    job.request.device_models = vec!["H100".into()];
    let err = placer.place_job(&job).unwrap_err();
    assert!(matches!(err, tessera_sched::PlacementError::NoFit { .. }));
    let report = placer.explain(&job.request);
    assert_eq!(report.no_allowed_model, 1);
    assert!(
        report
            .to_string()
            .contains("1 have no device of an allowed model"),
        "{report}"
    );
}

/// Everything of the pool's state but the node versions (which move on by design).
fn full_state(cluster: &Cluster) -> Vec<String> {
    cluster
        .nodes()
        .iter()
        .map(|n| {
            format!(
                "{} {} {:?} {:?} {} {:?}",
                n.cpu_free,
                n.memory_free,
                n.devices,
                n.affinities,
                n.replicas,
                cluster.summary(n.id)
            )
        })
        .chain(std::iter::once(format!(
            "used {}",
            cluster.gpu_used_milli()
        )))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A trial of placements, releases and re-adoptions, rolled back, leaves the pool exactly as
    /// it was, for every policy, whatever was placed before it.
    #[test]
    fn a_rolled_back_trial_leaves_the_pool_as_it_was(
        mut nodes in prop::collection::vec(node_strategy(), 1..6),
        before in prop::collection::vec((request_strategy(), 1u32..=3), 0..20),
        trial in prop::collection::vec(op_strategy(), 1..30),
        policy in prop::sample::select(PolicyKind::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        for (i, n) in nodes.iter_mut().enumerate() {
            n.name = format!("n{i}");
        }
        let cluster = Cluster::new(nodes).unwrap();
        let built = policy.build(&ShapeDistribution::default(), &cluster);
        let mut placer = Placer::new(cluster, built, seed);
        let mut live: Vec<Allocation> = Vec::new();
        for (i, (request, replicas)) in before.into_iter().enumerate() {
            let job = JobSpec { name: format!("b{i}"), project: "p".into(), priority: 50, replicas, request };
            if let Ok(allocs) = placer.place_job(&job) {
                live.extend(allocs);
            }
        }
        let state = full_state(placer.cluster());
        let checkpoint = placer.checkpoint();
        let mut released = Vec::new();
        for (i, op) in trial.iter().enumerate() {
            match op {
                Op::Submit(request, replicas) => {
                    let job = JobSpec { name: format!("t{i}"), project: "p".into(), priority: 50, replicas: *replicas, request: request.clone() };
                    let _ = placer.place_job(&job);
                }
                Op::Release(k) if !live.is_empty() => {
                    let alloc = live.swap_remove(k % live.len());
                    placer.release(&alloc).unwrap();
                    released.push(alloc);
                }
                Op::Release(k) if !released.is_empty() => {
                    // Take back something released during the trial, if its room is still free
                    // (a failed adoption changes nothing).
                    let alloc = released.swap_remove(k % released.len());
                    if placer.adopt(&alloc).is_ok() {
                        live.push(alloc);
                    } else {
                        released.push(alloc);
                    }
                }
                Op::Release(_) => {}
            }
        }
        placer.rollback(checkpoint);
        prop_assert_eq!(full_state(placer.cluster()), state);
    }
}
