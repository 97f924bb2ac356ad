//! Constrained variants of a trace: a share of its GPU tasks name the device models they accept,
//! as openb's `gpu_spec` column does (`T4`, `V100M16|V100M32`, …).
//!
//! The FGD paper's own constrained traces (`gpuspec*`) are held out of this repository, so policies
//! are judged on variants made here, several ways, never on one: the share of GPU tasks that pin
//! models, and how a pinned task's allowed set is drawn (see [`SetChoice`]). A task is only ever
//! given models of which some node could hold it (enough devices, CPU and memory on one node of
//! that model), so a variant never turns a placeable task into one no policy could place.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_sched::model::NodeSpec;
use tessera_sched::request::ResourceRequest;

use crate::openb::Trace;

/// How a pinned task's allowed models are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetChoice {
    /// One model, in proportion to its GPUs in the pool: pins follow the fleet, so most go to the
    /// most common model and each model's pinned demand matches its size.
    Plentiful,
    /// One model other than the most common one, in proportion to GPUs among those: the scarce
    /// models receive all the pins and are oversubscribed relative to their size, so whatever
    /// unpinned work lands on them is taken from tasks that can run nowhere else.
    Scarce,
    /// Two or three models drawn without replacement in proportion to GPUs (like
    /// `V100M16|V100M32`): the sets overlap, so a placement on one model competes with several sets.
    Family,
}

impl SetChoice {
    pub const ALL: [SetChoice; 3] = [SetChoice::Plentiful, SetChoice::Scarce, SetChoice::Family];

    pub fn name(self) -> &'static str {
        match self {
            SetChoice::Plentiful => "plentiful",
            SetChoice::Scarce => "scarce",
            SetChoice::Family => "family",
        }
    }
}

impl fmt::Display for SetChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SetChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        SetChoice::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a way to draw allowed models; choose plentiful, scarce or family"
                )
            })
    }
}

/// One constrained variant: which share of GPU tasks pin models, how, and with which seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConstrainSpec {
    /// Share of GPU tasks (by count) that name their models, in 0..=1.
    pub share: f64,
    pub sets: SetChoice,
    pub seed: u64,
}

impl ConstrainSpec {
    /// The variant's trace name: `<base>_spec<percent>_<sets>`.
    pub fn trace_name(&self, base: &str) -> String {
        format!(
            "{base}_spec{:02}_{}",
            (self.share * 100.0).round() as u64,
            self.sets
        )
    }
}

/// What a variant did, for the report and the docs.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstrainReport {
    pub gpu_tasks: usize,
    pub pinned: usize,
    /// GPU tasks that no node of any model could hold, left unpinned.
    pub unplaceable: usize,
    /// Pinned tasks per allowed set, as written in the trace.
    pub sets: BTreeMap<String, usize>,
}

/// One model's GPUs and the node shapes that carry it.
struct ModelPool {
    name: String,
    gpus: u64,
    /// (devices, CPU milli, memory bytes) of each node of this model.
    nodes: Vec<(u32, u64, u64)>,
}

impl ModelPool {
    fn can_hold(&self, r: &ResourceRequest) -> bool {
        let devices = r.gpu.device_count();
        self.nodes
            .iter()
            .any(|&(d, cpu, mem)| d >= devices && cpu >= r.cpu_milli && mem >= r.memory_bytes)
    }
}

/// The pool's models, most GPUs first (name order on ties, so the result is deterministic).
fn model_pools(nodes: &[NodeSpec]) -> Vec<ModelPool> {
    let mut by_name: BTreeMap<&str, ModelPool> = BTreeMap::new();
    for node in nodes {
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for d in &node.devices {
            *counts.entry(d.model.as_str()).or_default() += 1;
        }
        for (model, count) in counts {
            let pool = by_name.entry(model).or_insert_with(|| ModelPool {
                name: model.to_owned(),
                gpus: 0,
                nodes: Vec::new(),
            });
            pool.gpus += u64::from(count);
            pool.nodes.push((count, node.cpu_milli, node.memory_bytes));
        }
    }
    let mut pools: Vec<ModelPool> = by_name.into_values().collect();
    pools.sort_by(|a, b| b.gpus.cmp(&a.gpus).then_with(|| a.name.cmp(&b.name)));
    pools
}

/// Draws one index of `candidates` in proportion to `weight`.
fn weighted(candidates: &[usize], weight: impl Fn(usize) -> u64, rng: &mut ChaCha8Rng) -> usize {
    let total: u64 = candidates.iter().map(|&c| weight(c)).sum();
    let mut at = rng.random_range(0..total.max(1));
    for (i, &c) in candidates.iter().enumerate() {
        let w = weight(c);
        if at < w {
            return i;
        }
        at -= w;
    }
    candidates.len() - 1
}

/// Makes a constrained variant of `trace` for the pool `nodes`.
///
/// Errors (with the field to fix) when the share is outside 0..=1 or the pool has fewer models than
/// the set choice needs (two for `scarce`, two for `family`).
pub fn constrain(
    trace: &Trace,
    nodes: &[NodeSpec],
    spec: &ConstrainSpec,
) -> Result<(Trace, ConstrainReport), String> {
    if !(0.0..=1.0).contains(&spec.share) || spec.share.is_nan() {
        return Err(format!(
            "share {}: not a share of GPU tasks; give a number from 0 to 1 (0.25 = a quarter)",
            spec.share
        ));
    }
    let pools = model_pools(nodes);
    let needed = match spec.sets {
        SetChoice::Plentiful => 1,
        SetChoice::Scarce | SetChoice::Family => 2,
    };
    if pools.len() < needed {
        return Err(format!(
            "sets {}: the node list has {} GPU model(s); {} needs at least {needed}",
            spec.sets,
            pools.len(),
            spec.sets
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut out = trace.clone();
    out.name = spec.trace_name(&trace.name);
    let mut gpu_tasks: Vec<usize> = (0..out.tasks.len())
        .filter(|&i| out.tasks[i].request.gpu.device_count() > 0)
        .collect();
    let mut report = ConstrainReport {
        gpu_tasks: gpu_tasks.len(),
        pinned: 0,
        unplaceable: 0,
        sets: BTreeMap::new(),
    };
    gpu_tasks.shuffle(&mut rng);
    let wanted = (spec.share * gpu_tasks.len() as f64).round() as usize;
    for &i in &gpu_tasks {
        if report.pinned == wanted {
            break;
        }
        let request = &mut out.tasks[i].request;
        let feasible: Vec<usize> = (0..pools.len())
            .filter(|&m| pools[m].can_hold(request))
            .collect();
        if feasible.is_empty() {
            report.unplaceable += 1;
            continue;
        }
        let gpus = |m: usize| pools[m].gpus;
        let mut allowed: Vec<usize> = match spec.sets {
            SetChoice::Plentiful => vec![feasible[weighted(&feasible, gpus, &mut rng)]],
            SetChoice::Scarce => {
                // The most common model (index 0) takes no pins unless it alone can hold the task.
                let scarce: Vec<usize> = feasible.iter().copied().filter(|&m| m != 0).collect();
                let from = if scarce.is_empty() {
                    &feasible
                } else {
                    &scarce
                };
                vec![from[weighted(from, gpus, &mut rng)]]
            }
            SetChoice::Family => {
                let size = rng.random_range(2..=3usize).min(pools.len());
                let mut left: Vec<usize> = (0..pools.len()).collect();
                let mut set = Vec::new();
                // The first member is one that can hold the task; the rest may be any model.
                let first = feasible[weighted(&feasible, gpus, &mut rng)];
                set.push(first);
                left.retain(|&m| m != first);
                while set.len() < size && !left.is_empty() {
                    let at = weighted(&left, gpus, &mut rng);
                    set.push(left.remove(at));
                }
                set
            }
        };
        allowed.sort_by(|&a, &b| pools[a].name.cmp(&pools[b].name));
        request.device_models = allowed.iter().map(|&m| pools[m].name.clone()).collect();
        *report
            .sets
            .entry(request.device_models.join("|"))
            .or_default() += 1;
        report.pinned += 1;
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openb::TraceTask;
    use tessera_sched::model::{DeviceSpec, GIB};
    use tessera_sched::request::GpuRequest;

    fn node(name: &str, model: &str, devices: usize) -> NodeSpec {
        NodeSpec::with_devices(
            name,
            32_000,
            64 * GIB,
            devices,
            DeviceSpec {
                class: Default::default(),
                model: model.into(),
                memory_bytes: 0,
            },
        )
    }

    fn pool() -> Vec<NodeSpec> {
        let mut nodes: Vec<NodeSpec> = (0..6).map(|i| node(&format!("big{i}"), "G2", 8)).collect();
        nodes.push(node("t4", "T4", 2));
        nodes.push(node("p100", "P100", 4));
        nodes
    }

    fn trace() -> Trace {
        let tasks = (0..1000)
            .map(|i| TraceTask {
                name: format!("t{i:04}"),
                request: ResourceRequest {
                    cpu_milli: 4000,
                    memory_bytes: GIB,
                    gpu: match i % 4 {
                        0 => GpuRequest::None,
                        1 => GpuRequest::Share { milli: 500 },
                        2 => GpuRequest::Whole { devices: 1 },
                        _ => GpuRequest::Whole { devices: 8 },
                    },
                    ..Default::default()
                },
            })
            .collect();
        Trace {
            name: "base".into(),
            tasks,
        }
    }

    #[test]
    fn the_share_of_gpu_tasks_is_pinned_and_only_to_models_that_can_hold_them() {
        let nodes = pool();
        for sets in SetChoice::ALL {
            let spec = ConstrainSpec {
                share: 0.3,
                sets,
                seed: 7,
            };
            let (variant, report) = constrain(&trace(), &nodes, &spec).unwrap();
            assert_eq!(variant.name, "base_spec30_".to_owned() + sets.name());
            assert_eq!(report.gpu_tasks, 750);
            assert_eq!(report.pinned, 225, "{sets}");
            let pinned: Vec<_> = variant
                .tasks
                .iter()
                .filter(|t| !t.request.device_models.is_empty())
                .collect();
            assert_eq!(pinned.len(), 225);
            for t in &pinned {
                assert!(
                    t.request.gpu.device_count() > 0,
                    "CPU-only tasks stay unpinned"
                );
                // An 8-GPU task fits only the G2 nodes, so G2 is in its set whatever the choice.
                if t.request.gpu.device_count() == 8 {
                    assert!(t.request.device_models.contains(&"G2".to_owned()), "{sets}");
                }
                match sets {
                    SetChoice::Plentiful | SetChoice::Scarce => {
                        assert_eq!(t.request.device_models.len(), 1)
                    }
                    SetChoice::Family => {
                        let n = t.request.device_models.len();
                        assert!((2..=3).contains(&n), "{n}");
                    }
                }
            }
            if sets == SetChoice::Scarce {
                // Tasks small enough for T4 or P100 nodes never pin the common model.
                assert!(
                    pinned
                        .iter()
                        .filter(|t| t.request.gpu.device_count() == 1)
                        .all(|t| t.request.device_models[0] != "G2")
                );
            }
            // Same spec, same variant; another seed, another one.
            let (again, _) = constrain(&trace(), &nodes, &spec).unwrap();
            assert_eq!(again.tasks, variant.tasks);
            let (other, _) =
                constrain(&trace(), &nodes, &ConstrainSpec { seed: 8, ..spec }).unwrap();
            assert_ne!(other.tasks, variant.tasks);
        }
    }

    #[test]
    fn bad_specs_name_what_to_fix() {
        let one_model = vec![node("a", "G2", 8)];
        let spec = ConstrainSpec {
            share: 1.5,
            sets: SetChoice::Plentiful,
            seed: 1,
        };
        let err = constrain(&trace(), &one_model, &spec).unwrap_err();
        assert!(err.contains("share 1.5") && err.contains("0 to 1"), "{err}");
        let spec = ConstrainSpec {
            share: 0.5,
            sets: SetChoice::Scarce,
            seed: 1,
        };
        let err = constrain(&trace(), &one_model, &spec).unwrap_err();
        assert!(
            err.contains("1 GPU model") && err.contains("scarce"),
            "{err}"
        );
        assert!("SCARCE".parse::<SetChoice>().is_ok());
        let err = "rare".parse::<SetChoice>().unwrap_err();
        assert!(err.contains("plentiful, scarce or family"), "{err}");
    }
}
