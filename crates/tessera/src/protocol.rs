//! What the controller and its agents say to each other (JSON over HTTP).
//!
//! Declarative, like a kubelet: the agent reports what runs on its node, the controller answers
//! with what should run there, and the agent converges.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_sched::DeviceSpec;
use tessera_sched::cluster::DeviceShare;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    /// The devices are simulated (no NVIDIA library on the node).
    pub simulated: bool,
    /// Where the agent serves logs (`http://host:port`).
    pub address: String,
    /// Not used: the controller derives the secret it shows the agent and sends it back in
    /// the answer (kept so that older agents still register).
    #[serde(default)]
    pub callback_secret: String,
    /// How the node confines workloads, in words (`tessera nodes` shows it).
    #[serde(default)]
    pub confinement: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The agent's own credential when it joined with a join token (not used again); `None`
    /// when it re-registered with its own credential.
    pub token: Option<String>,
    pub lease_ms: u64,
    /// What the controller will show when it calls the agent (kept in the agent's memory only).
    #[serde(default)]
    pub callback_secret: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunPhase {
    /// Not started yet: its image is being pulled (or its checkpoint fetched).
    Preparing,
    Running,
    Exited,
}

/// One workload the agent knows about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub key: String,
    pub phase: RunPhase,
    pub exit_code: Option<i32>,
    /// Ended for a reason of the node, not the workload's (see `StopCause::Interrupted`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// In words, e.g. "killed by its memory limit (OOM)".
    pub message: String,
    /// The checkpoint this replica was to resume from, when it failed its integrity check (the
    /// replica started from the beginning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_failed: Option<String>,
    /// The port a service replica was given (`$PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// What it uses now, from the agent's latest sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ReplicaUsage>,
    /// The image it runs, as pulled: `REF as REPO@sha256:… (pulled in N s)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl ReplicaStatus {
    /// Replica `key` in `phase`, with nothing else to say.
    pub fn new(key: impl Into<String>, phase: RunPhase) -> ReplicaStatus {
        ReplicaStatus {
            key: key.into(),
            phase,
            exit_code: None,
            interrupted: false,
            message: String::new(),
            resume_failed: None,
            port: None,
            usage: None,
            image: None,
        }
    }
}

/// One replica's use of what it holds, sampled by its agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaUsage {
    /// Busy time of its GPU share, percent (on a simulated device: the part of its CPU
    /// allocation it uses stands in for it).
    pub gpu_util_pct: f64,
    pub gpu_memory_bytes: u64,
    /// CPU, percent of one core.
    pub cpu_pct: f64,
    pub memory_bytes: u64,
    /// Energy of its share of its devices since it started (millijoules, cumulative).
    pub energy_mj: u64,
    /// The GPU readings are simulated.
    pub simulated: bool,
}

/// One device's readings at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSample {
    pub index: u32,
    pub util_pct: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub power_mw: u64,
}

/// A node's device readings, sent with a sync when there is a new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSample {
    pub at_ms: u64,
    /// Simulated devices: the readings are made up from what runs (see `agent::telemetry`).
    pub simulated: bool,
    pub devices: Vec<DeviceSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// Increases with every request from this agent; stale requests are ignored.
    pub seq: u64,
    /// The revision of the desired set the agent last applied.
    pub revision: u64,
    /// Every workload the agent has started or been told to start and not yet seen acknowledged.
    pub statuses: Vec<ReplicaStatus>,
    /// How long the controller may hold the request when nothing changed.
    pub wait_ms: u64,
    /// The node's newest device readings, when they are new.
    #[serde(default)]
    pub sample: Option<NodeSample>,
    /// The images whose every layer the node's cache holds, as jobs name them (at most 512).
    #[serde(default)]
    pub images: Vec<String>,
}

/// One replica the node should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub key: String,
    pub job_id: u64,
    pub job_name: String,
    pub project: String,
    pub replica: u32,
    pub replicas: u32,
    pub attempt: u32,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub devices: Vec<DeviceShare>,
    /// Device memory of the devices (index → bytes), for whole-device caps.
    pub device_memory: Vec<u64>,
    /// How the job checkpoints, when it does: stopping it sends this signal and waits its grace.
    #[serde(default)]
    pub checkpoint: Option<crate::manifest::Checkpoint>,
    /// The checkpoint to resume from (its id), when the replica saved one before.
    #[serde(default)]
    pub resume: Option<String>,
    /// A service replica: the port its program must listen on, or 0 for one the agent picks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// An elastic job's replica set now; the agent keeps it in the file the program watches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elastic: Option<ReplicaSet>,
    /// The uid the admin mapped the job's owner to; the project's uid on the node otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Where a gang's replicas meet (`torchrun`, DeepSpeed, MPI); absent for a lone replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous: Option<Rendezvous>,
    /// Host paths it sees, read-only where marked (its project's volumes it mounts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volumes::Volume>,
    /// Other projects' volumes, hidden from it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_volumes: Vec<String>,
    /// Where the program starts (its run dir's `work/` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The container image it runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRun>,
    /// Its device is attached over the network from another node (a remote GPU): `devices` are
    /// that node's, and this node puts the remote client in front of the program instead of a
    /// driver of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_device: Option<RemoteDevice>,
    /// The device half of a remote attachment: this node serves `devices` to a replica on
    /// another node, so the agent runs the GPU server on `address` (under the slice library, as
    /// any program on these devices) instead of a command of the job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serves_device: Option<RemoteDevice>,
    /// A file in its working directory that also gets its output (`--output-file`), its
    /// placeholders filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file: Option<String>,
}

/// Where a replica's remotely attached device is served (or, for the serving side, where to
/// listen), and the secret that proves the replica to that server (the attachment's own; never
/// logged).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteDevice {
    /// The GPU node's server, `ADDR:PORT`.
    pub address: String,
    pub secret: String,
}

impl std::fmt::Debug for RemoteDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDevice")
            .field("address", &self.address)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// A replica's image and what its agent needs to pull it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRun {
    pub reference: String,
    /// The project's login for the image's registry, when the admin stored one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<crate::agent::image::Credentials>,
}

/// How the replicas of one job find each other: rank 0's host and a port the controller reserved
/// there for this job (so that every replica agrees on it before any starts), and every replica in
/// rank order (a replica's rank is its position here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendezvous {
    pub master_addr: String,
    pub master_port: u16,
    pub members: Vec<Peer>,
}

/// One replica of a gang as its peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub index: u32,
    pub node: String,
    /// The node's address (the host its agent listens on).
    pub host: String,
    /// Its devices (a fraction counts as one): a hostfile's `slots`.
    pub gpus: u32,
}

/// An elastic job's replicas as its programs see them (`$TESSERA_REPLICA_SET_FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSet {
    /// Grows by one or more with every change of the set.
    pub generation: u64,
    pub min: u32,
    pub max: u32,
    /// Every replica in the set, by index; a program's rank is its position here.
    pub replicas: Vec<Member>,
}

/// One replica of an elastic job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub index: u32,
    pub node: String,
    /// The node's address (the host its agent listens on).
    pub host: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncResponse {
    pub revision: u64,
    pub lease_ms: u64,
    /// Most output kept per replica started from now on (0: the agent's default).
    #[serde(default)]
    pub log_limit_bytes: u64,
    pub desired: Vec<Assignment>,
    /// Exited workloads whose end is now durable; the agent may forget them.
    pub acked: Vec<String>,
}

/// An exit code in words, for users.
pub fn exit_words(code: i32) -> String {
    match code {
        137 => "code 137 (killed by SIGKILL, e.g. its memory limit)".into(),
        c if c > 128 && c < 160 => format!("code {c} (signal {})", c - 128),
        -1 => "an unknown status (its supervisor was lost)".into(),
        c => format!("code {c}"),
    }
}
