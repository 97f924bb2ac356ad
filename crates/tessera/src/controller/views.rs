//! What the API answers about jobs, nodes, projects, tokens and the caller: plain data, shared by
//! the handlers that build it and the CLI that prints it (which compiles against these types, not
//! against the handlers).

use serde::{Deserialize, Serialize};

use std::collections::{BTreeMap, BTreeSet};

use crate::state::{JobState, NodeHealth, ReplicaPhase, Role, TokenKind};

#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicaView {
    pub index: u32,
    pub node: String,
    pub phase: ReplicaPhase,
    pub gpu_milli: u64,
    pub devices: Vec<u32>,
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_message: Option<String>,
    /// Given back by its elastic job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
    /// A remotely attached replica's device node (`node` runs its program).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_node: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub id: u64,
    pub name: String,
    pub project: String,
    pub owner: String,
    pub state: JobState,
    pub reason: String,
    pub priority: i32,
    /// Replicas it runs now (an elastic job between its min and max), or asks for.
    pub replicas: u32,
    /// An elastic job's bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elastic: Option<crate::manifest::Elastic>,
    pub gpu: f64,
    pub gpu_memory_bytes: u64,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub command: Vec<String>,
    pub restart: crate::manifest::RestartPolicy,
    pub attempt: u32,
    pub restarts: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub finished_ms: Option<u64>,
    pub assignments: Vec<ReplicaView>,
    /// The array it is a task of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<crate::batch::ArrayTask>,
    /// The jobs it waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<crate::batch::After>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit_ms: Option<u64>,
    /// Held: it does not start until released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LogChunk {
    pub data: String,
    /// Where `data` starts in the replica's output (later than the offset asked for when
    /// output there was cut, or earlier when it asked past the end).
    #[serde(default)]
    pub offset: u64,
    /// Bytes from the offset asked for up to `offset` that are no longer kept (the pool keeps
    /// only the newest output of each replica, `--log-limit`).
    #[serde(default)]
    pub cut: u64,
    pub next_offset: u64,
    /// No more output will come (the replica has ended).
    pub done: bool,
    /// With `lines=true`: each line with its stream and time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<crate::agent::logs::Line>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceView {
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
    pub allocated_milli: u32,
    pub simulated: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub health: NodeHealth,
    pub cordoned: bool,
    pub simulated: bool,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// How this node can checkpoint: `cooperative` everywhere, `criu-4.1.1` where CRIU works,
    /// `cuda` where it saves GPU state too.
    #[serde(default)]
    pub checkpoint: Vec<String>,
    /// How its agent confines workloads (`confined (uids …)`, or why not).
    #[serde(default)]
    pub confinement: String,
    /// Where its agent serves (the controller calls it for logs).
    #[serde(default)]
    pub address: String,
    pub devices: Vec<DeviceView>,
    pub gpu_allocated_milli: u64,
    pub cpu_allocated_milli: u64,
    pub replicas: u32,
    pub last_seen_ms_ago: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProjectView {
    pub name: String,
    pub parent: Option<String>,
    pub guaranteed_gpu: f64,
    pub limit_gpu: Option<f64>,
    pub over_quota_weight: u32,
    pub members: BTreeSet<String>,
    /// Seconds a job runs before it may be preempted.
    pub min_runtime_s: f64,
    pub used_gpu: f64,
    pub jobs_running: u32,
    pub jobs_pending: u32,
    #[serde(default)]
    pub policy: crate::state::ProjectPolicy,
    /// Its past use as fair share sees it: average GPUs, decayed with the pool's half-life.
    #[serde(default)]
    pub recent_gpu: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub kind: TokenKind,
    pub subject: String,
    pub description: String,
    pub created_ms: u64,
    pub revoked: bool,
    /// Join tokens: nodes it may still join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// When it stops working (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// The token itself: shown once, on creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user: String,
    pub role: Role,
    pub projects: Option<BTreeSet<String>>,
}

/// How the pool is run, for `tessera nodes` and dashboards.
#[derive(Debug, Serialize, Deserialize)]
pub struct PoolView {
    /// The placement policy (`tessera controller --policy`).
    pub policy: String,
    pub nodes: usize,
}
