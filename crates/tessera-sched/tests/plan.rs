//! Plan invariants under random pools of running, elastic and waiting jobs: what a plan starts
//! now (placements and elastic growth) fits beside everything running, elastic jobs never grow
//! past their maximum or shrink below their minimum, and nothing is both moved and preempted.

use std::collections::HashSet;

use proptest::prelude::*;
use tessera_sched::cluster::Cluster;
use tessera_sched::model::{DeviceSpec, GIB, NodeSpec};
use tessera_sched::place::Placer;
use tessera_sched::policy::PolicyKind;
use tessera_sched::quota::ProjectQuota;
use tessera_sched::request::{GpuRequest, JobSpec, ResourceRequest};
use tessera_sched::rules::PlacementRules;
use tessera_sched::schedule::{Config, ElasticRunning, PendingJob, RunningJob, Snapshot, schedule};
use tessera_sched::shapes::ShapeDistribution;

fn request(gpu: u32) -> ResourceRequest {
    ResourceRequest {
        gpu: match gpu {
            0 => GpuRequest::None,
            g if g < 1000 => GpuRequest::Share { milli: g },
            g => GpuRequest::Whole { devices: g / 1000 },
        },
        cpu_milli: 1000,
        memory_bytes: GIB,
        ..Default::default()
    }
}

fn gpu_strategy() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![0u32, 250, 500, 1000, 2000])
}

/// (request, replicas, elastic (min, max) or not, priority, project)
type JobShape = (u32, u32, Option<(u32, u32)>, i32, usize);

fn job_strategy() -> impl Strategy<Value = JobShape> {
    (
        gpu_strategy(),
        1u32..=3,
        prop::option::of((1u32..=2, 0u32..=3)),
        prop::sample::select(vec![25, 50, 75]),
        0usize..2,
    )
        .prop_map(|(gpu, replicas, elastic, priority, project)| {
            let elastic = elastic.map(|(min, more)| (min, min + more));
            (gpu, replicas, elastic, priority, project)
        })
}

const PROJECTS: [&str; 2] = ["a", "b"];

fn snapshot(devices: &[usize], running: &[JobShape], pending: &[JobShape]) -> Snapshot {
    let nodes: Vec<NodeSpec> = devices
        .iter()
        .enumerate()
        .map(|(i, n)| NodeSpec {
            labels: [(
                "region".to_string(),
                if i % 2 == 0 { "eu" } else { "us" }.to_string(),
            )]
            .into(),
            ..NodeSpec::with_devices(
                format!("n{i}"),
                32_000,
                128 * GIB,
                *n,
                DeviceSpec {
                    class: Default::default(),
                    model: "H100".into(),
                    memory_bytes: 80 * GIB,
                },
            )
        })
        .collect();
    // Running work is placed by the engine itself, so that it is consistent.
    let cluster = Cluster::new(nodes.clone()).unwrap();
    let policy = PolicyKind::Tessera.build(&ShapeDistribution::default(), &cluster);
    let mut placer = Placer::new(cluster, policy, 1);
    let mut out = Vec::new();
    for (i, (gpu, replicas, elastic, priority, project)) in running.iter().enumerate() {
        // An elastic job runs between its min and max.
        let count = match elastic {
            Some((min, max)) => (*replicas).clamp(*min, *max),
            None => *replicas,
        };
        let spec = JobSpec {
            name: format!("r{i}"),
            project: PROJECTS[*project].into(),
            priority: *priority,
            replicas: count,
            request: request(*gpu),
        };
        let Ok(allocations) = placer.place_job(&spec) else {
            continue;
        };
        let gpu_milli = allocations.iter().map(|a| a.gpu_milli()).sum();
        out.push(RunningJob {
            id: i as u64 + 1,
            project: spec.project.clone(),
            priority: *priority,
            started: i as u64,
            gpu_milli,
            elastic: elastic.map(|(min, max)| ElasticRunning {
                may_grow: max - count,
                extra: (min..count)
                    .map(|r| (r, allocations[r as usize].clone()))
                    .collect(),
                leaving: vec![],
            }),
            allocations,
            stopping: false,
            preemptible: true,
            request: Some(spec.request),
        });
    }
    let pending = pending
        .iter()
        .enumerate()
        .map(|(i, (gpu, replicas, _, priority, project))| PendingJob {
            id: 100 + i as u64,
            spec: JobSpec {
                name: format!("p{i}"),
                project: PROJECTS[*project].into(),
                priority: *priority,
                replicas: *replicas,
                request: request(*gpu),
            },
        })
        .collect();
    Snapshot {
        nodes,
        running: out,
        pending,
        projects: PROJECTS
            .iter()
            .map(|p| ProjectQuota {
                name: p.to_string(),
                parent: None,
                guaranteed_milli: 2000,
                limit_milli: None,
                over_quota_weight: 1,
            })
            .collect(),
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn what_a_plan_starts_fits_beside_what_runs_and_elastic_bounds_hold(
        devices in prop::collection::vec(0usize..=4, 1..5),
        running in prop::collection::vec(job_strategy(), 0..8),
        pending in prop::collection::vec(job_strategy(), 0..5),
        seed in any::<u64>(),
    ) {
        let snap = snapshot(&devices, &running, &pending);
        let config = Config {
            policy: PolicyKind::Tessera,
            seed,
            shapes: ShapeDistribution::default(),
        };
        let plan = schedule(&snap, &config).unwrap();
        let mut cluster = Cluster::new(snap.nodes.clone()).unwrap();
        for r in &snap.running {
            for a in &r.allocations {
                cluster.allocate(a).unwrap();
            }
        }
        for (_, allocs) in &plan.placements {
            for a in allocs {
                prop_assert!(cluster.allocate(a).is_ok(), "placement beyond capacity: {a:?}");
            }
        }
        for g in &plan.grows {
            for a in &g.allocations {
                prop_assert!(cluster.allocate(a).is_ok(), "growth beyond capacity: {a:?}");
            }
            let r = snap.running.iter().find(|r| r.id == g.job).unwrap();
            let e = r.elastic.as_ref().expect("only elastic jobs grow");
            prop_assert!(g.allocations.len() as u32 <= e.may_grow);
        }
        for s in &plan.shrinks {
            let r = snap.running.iter().find(|r| r.id == s.job).unwrap();
            let e = r.elastic.as_ref().expect("only elastic jobs shrink");
            for index in &s.replicas {
                prop_assert!(
                    e.extra.iter().any(|(i, _)| i == index),
                    "replica {index} of job {} is within its minimum", s.job
                );
            }
            prop_assert!(!plan.grows.iter().any(|g| g.job == s.job), "shrinks and grows at once");
        }
        let preempted: HashSet<u64> = plan.preemptions.iter().map(|p| p.job).collect();
        prop_assert!(plan.moves.iter().all(|m| !preempted.contains(&m.job)));
        let placed: HashSet<u64> = plan.placements.iter().map(|(id, _)| *id).collect();
        prop_assert!(plan.waiting.iter().all(|(id, _)| !placed.contains(id)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Project a may run only in region=eu, project b at most 2 GPUs per job: whatever runs,
    /// waits or arrives, nothing the plan starts or moves breaks its project's rules.
    #[test]
    fn no_job_is_placed_grown_or_moved_outside_its_projects_residency(
        devices in prop::collection::vec(0usize..=4, 1..6),
        running in prop::collection::vec(job_strategy(), 0..8),
        pending in prop::collection::vec(job_strategy(), 0..6),
        seed in any::<u64>(),
    ) {
        let mut snap = snapshot(&devices, &running, &pending);
        let eu = PlacementRules {
            node_selector: [("region".to_string(), "eu".to_string())].into(),
            ..Default::default()
        };
        let small = PlacementRules {
            max_job_gpu_milli: Some(2000),
            ..Default::default()
        };
        snap.rules = [("a".to_string(), eu), ("b".to_string(), small)].into();
        // Running work was placed before the rules (some of a's runs in us): only what the
        // plan starts, grows or moves is held to them.
        let config = Config {
            policy: PolicyKind::Tessera,
            seed,
            shapes: ShapeDistribution::default(),
        };
        let plan = schedule(&snap, &config).unwrap();
        let region = |node: tessera_sched::NodeId| snap.nodes[node.index()].labels["region"].clone();
        let project_of = |id: u64| -> String {
            snap.pending
                .iter()
                .find(|p| p.id == id)
                .map(|p| p.spec.project.clone())
                .or_else(|| snap.running.iter().find(|r| r.id == id).map(|r| r.project.clone()))
                .unwrap()
        };
        for (id, allocs) in &plan.placements {
            if project_of(*id) == "a" {
                for a in allocs {
                    prop_assert_eq!(region(a.node), "eu", "job {} placed outside eu", id);
                }
            }
            if project_of(*id) == "b" {
                let total: u64 = allocs.iter().map(|a| a.gpu_milli()).sum();
                prop_assert!(total <= 2000, "job {id} of b holds {total} milli-GPU");
            }
        }
        for g in &plan.grows {
            if project_of(g.job) == "a" {
                for a in &g.allocations {
                    prop_assert_eq!(region(a.node), "eu");
                }
            }
            if project_of(g.job) == "b" {
                let r = snap.running.iter().find(|r| r.id == g.job).unwrap();
                let total: u64 = r.allocations.iter().chain(&g.allocations).map(|a| a.gpu_milli()).sum();
                prop_assert!(total <= 2000, "job {} of b grows to {total}", g.job);
            }
        }
        for m in &plan.moves {
            if project_of(m.job) == "a" {
                prop_assert_eq!(region(m.to), "eu", "job {} moved outside eu", m.job);
            }
        }
        // Only b's jobs can break a rule by asking (more than 2 GPUs); they are told why.
        for (id, why) in &plan.waiting {
            if let tessera_sched::schedule::WaitReason::Policy { why } = &**why {
                prop_assert!(project_of(*id) == "b" && why.contains("at most 2"), "{why}");
            }
        }
    }
}
