//! What a policy leaves unallocated on one openb trace, and why: replays the FGD protocol (seeds
//! 42–51) up to the last arrival within 100% of GPU capacity and prints, averaged over the seeds,
//! the free GPU left on partly used devices by remainder size, whole free devices, the shapes of
//! the tasks that found no node, and where the small shares landed (the only tasks that can fill
//! a remainder).
//!
//! ```sh
//! cargo run --release -p tessera-sim --example residue -- NODES.csv PODS.csv [POLICY]
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use tessera_sched::policy::PolicyKind;
use tessera_sched::request::JobSpec;
use tessera_sim::openb::{load_nodes, load_tasks};
use tessera_sim::replay::{prepare, typical_shapes};

const SEEDS: std::ops::Range<u64> = 42..52;

#[derive(Default)]
struct Residue {
    unallocated: f64,
    whole_free: u64,
    /// Free milli-GPU on partly used devices, by the device's free milli.
    remainders: BTreeMap<u32, u64>,
    /// Tasks that found no node: (count, milli-GPU) by shape.
    failed: BTreeMap<String, (u64, u64)>,
    /// Shares under 0.35 GPU placed: count by (share, the device's free milli before).
    landed: BTreeMap<(u32, u32), u64>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(nodes), Some(pods)) = (args.get(1), args.get(2)) else {
        return Err("usage: residue NODES.csv PODS.csv [POLICY]".into());
    };
    let name = args.get(3).map_or("Tessera", String::as_str);
    let policy = PolicyKind::from_name(name).ok_or(format!("no policy named {name}"))?;
    let nodes = load_nodes(Path::new(nodes))?;
    let trace = load_tasks(Path::new(pods))?;
    let shapes = typical_shapes(&trace);
    let mut r = Residue::default();
    for seed in SEEDS {
        let (mut placer, order) = prepare(&nodes, &trace, &shapes, policy, seed)?;
        let capacity = placer.cluster().gpu_capacity_milli();
        let mut arrived = 0u64;
        for &i in &order {
            let request = &trace.tasks[i].request;
            let demand = request.gpu.total_milli();
            if arrived + demand > capacity {
                break;
            }
            arrived += demand;
            let share = request.gpu.per_device_milli();
            match placer.place_job(&JobSpec::single(
                trace.tasks[i].name.clone(),
                request.clone(),
            )) {
                Ok(allocs) if request.gpu.is_share() && share < 350 => {
                    let a = &allocs[0];
                    let device =
                        &placer.cluster().node(a.node).devices[a.devices[0].device as usize];
                    *r.landed
                        .entry((share, device.milli_free + share))
                        .or_default() += 1;
                }
                Ok(_) => {}
                Err(_) => {
                    let shape = format!(
                        "{} x {} milli-GPU, {} CPU, {} GiB",
                        request.gpu.device_count(),
                        share,
                        request.cpu_milli as f64 / 1000.0,
                        request.memory_bytes >> 30
                    );
                    let e = r.failed.entry(shape).or_default();
                    e.0 += 1;
                    e.1 += demand;
                }
            }
        }
        let cluster = placer.cluster();
        r.unallocated += (capacity - cluster.gpu_used_milli()) as f64 / capacity as f64;
        for device in cluster.nodes().iter().flat_map(|n| &n.devices) {
            match device.milli_free {
                1000.. => r.whole_free += 1,
                0 => {}
                free => *r.remainders.entry(free).or_default() += u64::from(free),
            }
        }
    }
    let n = SEEDS.count() as f64;
    // Written at once, so that a reader that stops early (`| head`) ends the run with an error
    // rather than a panic.
    let mut out = String::new();
    writeln!(
        out,
        "{} on {}: unallocated {:.2}% of GPU capacity",
        policy.name(),
        trace.name,
        100.0 * r.unallocated / n
    )?;
    writeln!(out, "whole free devices: {:.1}", r.whole_free as f64 / n)?;
    let partial: u64 = r.remainders.values().sum();
    writeln!(
        out,
        "free on partly used devices: {:.1} GPUs; by remainder (milli: GPUs):",
        partial as f64 / n / 1000.0
    )?;
    let mut remainders: Vec<_> = r.remainders.into_iter().collect();
    remainders.sort_by_key(|&(_, m)| std::cmp::Reverse(m));
    for (free, milli) in remainders.iter().take(12) {
        writeln!(out, "  {free:4}: {:6.1}", *milli as f64 / n / 1000.0)?;
    }
    writeln!(out, "tasks that found no node (per seed: count, GPUs):")?;
    let mut failed: Vec<_> = r.failed.into_iter().collect();
    failed.sort_by_key(|(_, (_, m))| std::cmp::Reverse(*m));
    for (shape, (count, milli)) in failed.iter().take(12) {
        writeln!(
            out,
            "  {shape:42} {:6.1} {:6.1}",
            *count as f64 / n,
            *milli as f64 / n / 1000.0
        )?;
    }
    writeln!(
        out,
        "small shares placed, by the device's free milli before (per seed):"
    )?;
    let mut share_now = None;
    for ((share, before), count) in &r.landed {
        if share_now != Some(*share) {
            write!(
                out,
                "{}  {share:3} on",
                if share_now.is_some() { "\n" } else { "" }
            )?;
            share_now = Some(*share);
        }
        write!(out, " {before}:{:.1}", *count as f64 / n)?;
    }
    writeln!(out)?;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
