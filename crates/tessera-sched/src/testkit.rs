//! Builders shared by every unit test of the crate: nodes, requests, jobs, running work, quotas.

use crate::cluster::{Allocation, DeviceShare, NodeId};
use crate::model::{DeviceSpec, GIB, NodeSpec};
use crate::quota::ProjectQuota;
use crate::request::{GpuRequest, JobSpec, ResourceRequest};
use crate::schedule::RunningJob;

/// A node: `cpus` CPUs, `mem_gib` GiB, `devices` devices of `model` with `gpu_gib` GiB each.
pub fn node(
    name: &str,
    cpus: u64,
    mem_gib: u64,
    devices: usize,
    model: &str,
    gpu_gib: u64,
) -> NodeSpec {
    NodeSpec::with_devices(
        name,
        cpus * 1000,
        mem_gib * GIB,
        devices,
        DeviceSpec {
            class: Default::default(),
            model: model.into(),
            memory_bytes: gpu_gib * GIB,
        },
    )
}

/// The schedulers' usual node: 64 CPUs, 256 GiB, `devices` H100s of 80 GiB.
pub fn h100_node(name: &str, devices: usize) -> NodeSpec {
    node(name, 64, 256, devices, "H100", 80)
}

/// A request for `gpu` with `cpus` CPUs and 1 GiB of memory.
pub fn request(gpu: GpuRequest, cpus: u64) -> ResourceRequest {
    ResourceRequest {
        gpu,
        cpu_milli: cpus * 1000,
        memory_bytes: GIB,
        ..Default::default()
    }
}

/// A job of `replicas` replicas of `devices` whole GPUs (1 CPU, 1 GiB) in project `p`.
pub fn whole(name: &str, priority: i32, devices: u32, replicas: u32) -> JobSpec {
    JobSpec {
        name: name.into(),
        project: "p".into(),
        priority,
        replicas,
        request: request(GpuRequest::Whole { devices }, 1),
    }
}

/// Running work with these allocations.
pub fn running(
    id: u64,
    project: &str,
    priority: i32,
    started: u64,
    allocations: Vec<Allocation>,
) -> RunningJob {
    RunningJob {
        id,
        project: project.into(),
        priority,
        started,
        gpu_milli: allocations.iter().map(|a| a.gpu_milli()).sum(),
        allocations,
        stopping: false,
        preemptible: true,
        request: None,
        elastic: None,
    }
}

/// One whole 80 GiB device `device` of node `node`, with 1 CPU and 1 GiB.
pub fn one_gpu_on(node: u32, device: u32) -> Allocation {
    Allocation {
        gpu_node: None,
        node: NodeId(node),
        cpu_milli: 1000,
        memory_bytes: GIB,
        devices: vec![DeviceShare {
            device,
            milli: 1000,
            memory_bytes: 80 * GIB,
        }],
        affinity: None,
    }
}

/// A project with a guarantee and an optional hard limit (milli-GPU).
pub fn quota(name: &str, guaranteed: u64, limit: Option<u64>) -> ProjectQuota {
    ProjectQuota {
        name: name.into(),
        parent: None,
        guaranteed_milli: guaranteed,
        limit_milli: limit,
        over_quota_weight: 1,
    }
}
