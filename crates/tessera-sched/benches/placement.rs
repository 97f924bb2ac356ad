//! Placement throughput: decisions/s and latency per decision while filling a synthetic pool from
//! empty to full with an openb-like mix. A benchmark, not a test: numbers go to
//! docs/benchmarks.md. Run with `cargo bench -p tessera-sched --bench placement`.
//!
//! Pool: N nodes × 8 GPUs (96 CPUs, 768 GiB each). Mix per job, drawn from a seeded stream:
//! 13% CPU-only, 38% a share (openb's common sizes), 42% one whole GPU, 4% 2 or 4 GPUs, 2% one
//! 8-GPU node, 1% a gang of 2–4 replicas × 8 GPUs. The pool is full when 500 jobs in a row fail.
//! One decision = one job (a whole gang), successful or not.
//!
//! The pinned mix (`pinned 30%`) runs the same stream on a heterogeneous pool (60% H100, 25%
//! A100, 15% L4 nodes) where 30% of GPU jobs name the models they accept (one model, or two
//! neighbouring ones). `TESSERA_BENCH_NODES=1000,10000` picks sizes; `TESSERA_BENCH_MAX_DECISIONS`
//! stops a fill early (for 100,000 nodes, whose full fill takes over a million decisions).

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_sched::cluster::{Cluster, NodeId};
use tessera_sched::model::{DeviceSpec, GIB, NodeSpec};
use tessera_sched::place::Placer;
use tessera_sched::policy::PolicyKind;
use tessera_sched::request::{GpuRequest, JobSpec, ResourceRequest};
use tessera_sched::shapes::ShapeDistribution;

const SHARES: [u32; 10] = [50, 100, 200, 250, 300, 460, 470, 500, 600, 810];
const CPUS: [u64; 6] = [1000, 2000, 4000, 6000, 8000, 12000];

const MODELS: [&str; 3] = ["H100-80GB", "A100-40GB", "L4"];
/// Allowed sets of a pinned job, drawn uniformly.
const PINS: [&[&str]; 5] = [
    &["H100-80GB"],
    &["A100-40GB"],
    &["L4"],
    &["H100-80GB", "A100-40GB"],
    &["A100-40GB", "L4"],
];

fn job(rng: &mut ChaCha8Rng, i: usize, pinned: f64) -> JobSpec {
    let roll = rng.random_range(0..100);
    let (gpu, replicas) = match roll {
        0..13 => (GpuRequest::None, 1),
        13..51 => (
            GpuRequest::Share {
                milli: SHARES[rng.random_range(0..SHARES.len())],
            },
            1,
        ),
        51..93 => (GpuRequest::Whole { devices: 1 }, 1),
        93..97 => (
            GpuRequest::Whole {
                devices: if rng.random() { 2 } else { 4 },
            },
            1,
        ),
        97..99 => (GpuRequest::Whole { devices: 8 }, 1),
        _ => (GpuRequest::Whole { devices: 8 }, rng.random_range(2..=4)),
    };
    let cpu = CPUS[rng.random_range(0..CPUS.len())] * u64::from(gpu.device_count().max(1));
    let device_models = if gpu != GpuRequest::None && rng.random_bool(pinned) {
        PINS[rng.random_range(0..PINS.len())]
            .iter()
            .map(|m| (*m).to_owned())
            .collect()
    } else {
        Vec::new()
    };
    JobSpec {
        name: format!("j{i}"),
        project: "bench".into(),
        priority: 50,
        replicas,
        request: ResourceRequest {
            gpu,
            cpu_milli: cpu.min(96_000),
            memory_bytes: rng.random_range(4..=64) * GIB,
            device_models,
            ..Default::default()
        },
    }
}

/// `mixed`: 60% H100, 25% A100, 15% L4 nodes; otherwise all H100.
fn pool(n: usize, mixed: bool) -> Vec<NodeSpec> {
    (0..n)
        .map(|i| {
            let (model, gib) = match i % 20 {
                _ if !mixed => (MODELS[0], 80),
                0..12 => (MODELS[0], 80),
                12..17 => (MODELS[1], 40),
                _ => (MODELS[2], 24),
            };
            NodeSpec::with_devices(
                format!("node-{i:06}"),
                96_000,
                768 * GIB,
                8,
                DeviceSpec {
                    class: Default::default(),
                    model: model.into(),
                    memory_bytes: gib * GIB,
                },
            )
        })
        .collect()
}

struct Outcome {
    decisions: usize,
    placed: usize,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    gpu_used_pct: f64,
}

fn fill(nodes: usize, policy: PolicyKind, seed: u64, pinned: f64, cap: usize) -> Outcome {
    let specs = pool(nodes, pinned > 0.0);
    // The pool's history: the shape distribution of a sample of the same mix.
    let mut hist_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let history: Vec<ResourceRequest> = (0..20_000)
        .map(|i| job(&mut hist_rng, i, pinned).request)
        .collect();
    let shapes = ShapeDistribution::typical(&history, 0.95);
    let mut cluster = Cluster::new(specs).unwrap();
    let mut order: Vec<NodeId> = (0..nodes as u32).map(NodeId).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
    cluster.set_tie_order(&order).unwrap();
    let built = policy.build(&shapes, &cluster);
    let mut placer = Placer::new(cluster, built, seed);
    let mut latencies_ns: Vec<u64> = Vec::new();
    let (mut placed, mut streak, mut i) = (0usize, 0usize, 0usize);
    let start = Instant::now();
    while streak < 500 && i < cap {
        let j = job(&mut rng, i, pinned);
        i += 1;
        let t = Instant::now();
        let ok = placer.place_job(&j).is_ok();
        latencies_ns.push(t.elapsed().as_nanos() as u64);
        if ok {
            placed += 1;
            streak = 0;
        } else {
            streak += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies_ns.sort_unstable();
    let q = |p: f64| latencies_ns[((latencies_ns.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    let c = placer.cluster();
    Outcome {
        decisions: latencies_ns.len(),
        placed,
        seconds,
        p50_us: q(0.50),
        p99_us: q(0.99),
        gpu_used_pct: c.gpu_used_milli() as f64 / c.gpu_capacity_milli() as f64 * 100.0,
    }
}

fn main() {
    // `cargo bench` passes --bench; a plain `cargo test --benches` passes nothing and gets a
    // one-size smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let chosen: Vec<usize> = std::env::var("TESSERA_BENCH_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default();
    let sizes: &[usize] = if !chosen.is_empty() {
        &chosen
    } else if full {
        &[1_000, 5_000, 10_000]
    } else {
        &[200]
    };
    let cap: usize = std::env::var("TESSERA_BENCH_MAX_DECISIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    println!(
        "| nodes × 8 GPUs | mix | policy | decisions | placed | decisions/s | p50 µs | p99 µs | GPU allocated |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in sizes {
        for (mix, pinned) in [("unpinned", 0.0), ("pinned 30%", 0.3)] {
            for policy in [PolicyKind::Fgd, PolicyKind::Tessera] {
                let o = fill(n, policy, 42, pinned, cap);
                println!(
                    "| {n} | {mix} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.2}% |",
                    policy.name(),
                    o.decisions,
                    o.placed,
                    o.decisions as f64 / o.seconds,
                    o.p50_us,
                    o.p99_us,
                    o.gpu_used_pct
                );
            }
        }
    }
}
