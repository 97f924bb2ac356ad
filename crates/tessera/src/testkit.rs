//! Builders of the records unit tests of the controller and the store share.

use crate::manifest::JobDef;
use crate::state::{Job, Node, NodeHealth};
use tessera_sched::{DeviceSpec, JobSpec, NodeSpec, ResourceRequest};

/// A simulated node with two 80 GiB H100s, 8 CPUs and 64 GiB of memory.
pub fn node(name: &str, health: NodeHealth, cordoned: bool) -> Node {
    Node {
        spec: NodeSpec::with_devices(
            name,
            8000,
            64 << 30,
            2,
            DeviceSpec {
                class: Default::default(),
                model: "H100-80GB".into(),
                memory_bytes: 80 << 30,
            },
        ),
        simulated: true,
        address: String::new(),
        cordoned,
        health,
        registered_ms: 0,
        confinement: String::new(),
        last_seen_ms: 0,
        last_seq: 0,
        heartbeats: 0,
    }
}

/// A pending job of user ana asking for `request`, running `true`.
pub fn job(id: u64, request: ResourceRequest) -> Job {
    let def = JobDef {
        spec: JobSpec::single("j", request),
        image: None,
        command: vec!["true".into()],
        env: Default::default(),
        restart: crate::manifest::RestartPolicy::Never,
        max_restarts: 0,
        preemptible: true,
        checkpoint: None,
        elastic: None,
        interactive: false,
        wait_for_capacity: false,
        volumes: vec![],
        workdir: None,
        asked: Default::default(),
        after: vec![],
        time_limit_ms: None,
        begin: None,
        array: None,
        asked_array: None,
        asked_hold: false,
        output_file: None,
    };
    Job::new(id, "ana", def, 0)
}

/// One replica's allocation on node `node` (by its index in the snapshot): 1 CPU, 1 GiB.
pub fn alloc(node: u32) -> tessera_sched::Allocation {
    tessera_sched::Allocation {
        gpu_node: None,
        node: tessera_sched::NodeId(node),
        cpu_milli: 1000,
        memory_bytes: 1 << 30,
        devices: vec![],
        affinity: None,
    }
}
