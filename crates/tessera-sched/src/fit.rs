//! Whether any node of the pool could ever hold one replica of a request, however long it waited:
//! what lets the controller refuse at submit a job that would otherwise wait forever, naming the
//! resource no node has enough of and the largest node that exists.
//!
//! Each node is taken empty. Node selectors are not judged (labels change while a pool runs);
//! models, device counts, device memory, CPU and memory are what a node is built with.

use crate::model::{DeviceSpec, NodeSpec};
use crate::request::{GpuRequest, ResourceRequest};

const GIB: f64 = (1u64 << 30) as f64;

/// Why no node could hold the request: the manifest field to change and the words for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    pub field: &'static str,
    pub why: String,
}

fn allowed(r: &ResourceRequest, d: &DeviceSpec) -> bool {
    r.device_models.is_empty() || r.device_models.iter().any(|n| d.matches(n))
}

/// Device memory one replica needs of each of its devices (0: any).
fn device_memory(r: &ResourceRequest) -> u64 {
    r.gpu_memory_bytes
}

/// Devices of `n` that one replica of `r` could use.
fn usable<'a>(r: &'a ResourceRequest, n: &'a NodeSpec) -> impl Iterator<Item = &'a DeviceSpec> {
    n.devices
        .iter()
        .filter(move |d| allowed(r, d) && d.memory_bytes >= device_memory(r))
}

fn gpus_needed(r: &ResourceRequest) -> usize {
    match r.gpu {
        GpuRequest::None => 0,
        GpuRequest::Share { .. } => 1,
        GpuRequest::Whole { devices } => devices as usize,
    }
}

/// Whether node `n`, empty, holds one replica of `r`.
pub fn holds(r: &ResourceRequest, n: &NodeSpec) -> bool {
    n.cpu_milli >= r.cpu_milli
        && n.memory_bytes >= r.memory_bytes
        && usable(r, n).count() >= gpus_needed(r)
}

/// `None` when some node of `nodes` could hold one replica of `r`, or when there are no nodes
/// yet (they may still join); otherwise what no node has enough of, checked one resource at a
/// time so that the answer names the one to change.
pub fn never_fits(r: &ResourceRequest, nodes: &[&NodeSpec]) -> Option<Misfit> {
    if nodes.is_empty() || nodes.iter().any(|n| holds(r, n)) {
        return None;
    }
    let largest = |key: &dyn Fn(&NodeSpec) -> u64| {
        nodes
            .iter()
            .copied()
            .max_by_key(|n| (key(n), std::cmp::Reverse(n.name.clone())))
            .map(|n| (key(n), n.name.clone()))
            .unwrap_or_default()
    };
    let wanted = gpus_needed(r);
    if wanted > 0 {
        if !r.device_models.is_empty()
            && !nodes.iter().flat_map(|n| &n.devices).any(|d| allowed(r, d))
        {
            let mut carried: Vec<&str> = nodes
                .iter()
                .flat_map(|n| n.devices.iter().map(|d| d.model.as_str()))
                .collect();
            carried.sort_unstable();
            carried.dedup();
            return Some(Misfit {
                field: "spec.resources.deviceModels",
                why: format!(
                    "asks for {}, a model no node of the pool carries (they carry {})",
                    r.device_models.join(" or "),
                    if carried.is_empty() {
                        "no GPUs".to_string()
                    } else {
                        carried.join(", ")
                    }
                ),
            });
        }
        let (most, at) =
            largest(&|n: &NodeSpec| n.devices.iter().filter(|d| allowed(r, d)).count() as u64);
        if (most as usize) < wanted {
            return Some(Misfit {
                field: "spec.resources.gpu",
                why: format!(
                    "asks {wanted} GPUs on one node{}; the most any node has is {most} ({at})",
                    models_words(r)
                ),
            });
        }
        let (memory, at) = largest(&|n: &NodeSpec| {
            n.devices
                .iter()
                .filter(|d| allowed(r, d))
                .map(|d| d.memory_bytes)
                .max()
                .unwrap_or(0)
        });
        if memory < device_memory(r) {
            return Some(Misfit {
                field: "spec.resources.gpuMemory",
                why: format!(
                    "asks {:.1} GiB of GPU memory per device{}; the largest device has {:.1} GiB \
                     ({at})",
                    device_memory(r) as f64 / GIB,
                    models_words(r),
                    memory as f64 / GIB
                ),
            });
        }
        let (enough, at) = largest(&|n: &NodeSpec| usable(r, n).count() as u64);
        if (enough as usize) < wanted {
            return Some(Misfit {
                field: "spec.resources.gpu",
                why: format!(
                    "asks {wanted} GPUs of {:.1} GiB or more on one node{}; the most any node has \
                     is {enough} ({at})",
                    device_memory(r) as f64 / GIB,
                    models_words(r)
                ),
            });
        }
    }
    let (cpu, at) = largest(&|n: &NodeSpec| n.cpu_milli);
    if cpu < r.cpu_milli {
        return Some(Misfit {
            field: "spec.resources.cpu",
            why: format!(
                "asks {} CPUs per replica; the largest node has {} ({at})",
                r.cpu_milli as f64 / 1000.0,
                cpu as f64 / 1000.0
            ),
        });
    }
    let (memory, at) = largest(&|n: &NodeSpec| n.memory_bytes);
    if memory < r.memory_bytes {
        return Some(Misfit {
            field: "spec.resources.memory",
            why: format!(
                "asks {:.1} GiB of memory per replica; the largest node has {:.1} GiB ({at})",
                r.memory_bytes as f64 / GIB,
                memory as f64 / GIB
            ),
        });
    }
    // Each resource exists somewhere, but never all on one node.
    let (cpu, at) = largest(&|n: &NodeSpec| {
        if usable(r, n).count() >= wanted && n.memory_bytes >= r.memory_bytes {
            n.cpu_milli
        } else {
            0
        }
    });
    Some(Misfit {
        field: "spec.resources",
        why: if cpu > 0 {
            format!(
                "asks {} CPUs beside its GPUs and memory; the nodes that have those have at most {} \
                 CPUs ({at})",
                r.cpu_milli as f64 / 1000.0,
                cpu as f64 / 1000.0
            )
        } else {
            format!(
                "asks {wanted} GPU(s){} with {:.1} GiB of memory on one node; no node has both",
                models_words(r),
                r.memory_bytes as f64 / GIB
            )
        },
    })
}

fn models_words(r: &ResourceRequest) -> String {
    if r.device_models.is_empty() {
        String::new()
    } else {
        format!(" of {}", r.device_models.join(" or "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkit::node;

    fn pool() -> Vec<NodeSpec> {
        vec![
            node("a100-1", 64, 512, 8, "A100-40GB", 40),
            node("t4-1", 16, 64, 4, "T4", 16),
            node("cpu-1", 128, 1024, 0, "", 0),
        ]
    }

    fn refs(nodes: &[NodeSpec]) -> Vec<&NodeSpec> {
        nodes.iter().collect()
    }

    fn ask(
        gpu: GpuRequest,
        gpu_gib: u64,
        cpus: u64,
        mem_gib: u64,
        models: &[&str],
    ) -> ResourceRequest {
        ResourceRequest {
            gpu,
            gpu_memory_bytes: gpu_gib << 30,
            cpu_milli: cpus * 1000,
            memory_bytes: mem_gib << 30,
            device_models: models.iter().map(|m| m.to_string()).collect(),
            ..ResourceRequest::default()
        }
    }

    #[test]
    fn what_some_node_holds_fits_and_an_empty_pool_refuses_nothing() {
        let whole = |n| GpuRequest::Whole { devices: n };
        assert_eq!(
            never_fits(&ask(whole(8), 0, 64, 512, &[]), &refs(&pool())),
            None
        );
        assert_eq!(
            never_fits(&ask(whole(4), 16, 16, 64, &["T4"]), &refs(&pool())),
            None
        );
        assert_eq!(
            never_fits(&ask(GpuRequest::None, 0, 128, 1024, &[]), &refs(&pool())),
            None
        );
        assert_eq!(never_fits(&ask(whole(64), 0, 1, 1, &[]), &[]), None);
        // A class of devices instead of a model; no node has devices of another class.
        assert_eq!(
            never_fits(&ask(whole(4), 16, 16, 64, &["nvidia/gpu"]), &refs(&pool())),
            None
        );
        assert_eq!(
            never_fits(&ask(whole(1), 0, 1, 1, &["amd/gpu"]), &refs(&pool())).map(|m| m.field),
            Some("spec.resources.deviceModels")
        );
    }

    #[test]
    fn each_refusal_names_the_resource_and_the_largest_node() {
        let whole = |n| GpuRequest::Whole { devices: n };
        let half = GpuRequest::Share { milli: 500 };
        let cases: [(ResourceRequest, &str, &str); 7] = [
            (
                ask(whole(16), 0, 1, 1, &[]),
                "spec.resources.gpu",
                "the most any node has is 8 (a100-1)",
            ),
            (
                ask(whole(1), 0, 1, 1, &["H100-80GB"]),
                "spec.resources.deviceModels",
                "they carry A100-40GB, T4",
            ),
            (
                ask(half, 80, 1, 1, &[]),
                "spec.resources.gpuMemory",
                "the largest device has 40.0 GiB (a100-1)",
            ),
            (
                ask(whole(8), 0, 1, 1, &["T4"]),
                "spec.resources.gpu",
                "the most any node has is 4 (t4-1)",
            ),
            (
                ask(GpuRequest::None, 0, 256, 1, &[]),
                "spec.resources.cpu",
                "the largest node has 128 (cpu-1)",
            ),
            (
                ask(GpuRequest::None, 0, 1, 4096, &[]),
                "spec.resources.memory",
                "the largest node has 1024.0 GiB (cpu-1)",
            ),
            // GPUs on one node and CPUs on another, never both.
            (
                ask(whole(1), 0, 100, 1, &[]),
                "spec.resources",
                "at most 64 CPUs (a100-1)",
            ),
        ];
        for (r, field, words) in cases {
            let m = never_fits(&r, &refs(&pool())).unwrap_or_else(|| panic!("{r:?} fits"));
            assert_eq!(m.field, field, "{m:?}");
            assert!(m.why.contains(words), "{m:?}");
        }
    }
}
