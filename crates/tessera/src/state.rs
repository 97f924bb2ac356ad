//! The controller's model of the pool: what the store holds, kept in memory for fast reads.
//!
//! Every change is made by copying a record, changing the copy, writing it to the store, and only
//! then installing it here (see `store::Store::write`), so memory never shows what the store has
//! not committed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use tessera_sched::cluster::DeviceShare;
use tessera_sched::{NodeSpec, ResourceRequest};

use crate::manifest::JobDef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Member,
    Viewer,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub created_ms: u64,
    /// The user's own uid on the nodes, where the admin maps users to uids (as a site with a
    /// shared directory of accounts does): their replicas run as it, and their files on a
    /// shared file system are theirs. Without one a replica runs as its project's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Project {
    pub name: String,
    pub parent: Option<String>,
    pub guaranteed_milli: u64,
    pub limit_milli: Option<u64>,
    pub over_quota_weight: u32,
    pub members: BTreeSet<String>,
    pub created_ms: u64,
    /// A job of this project runs at least this long before it may be preempted (against
    /// thrashing: a preempted job pays its restart again).
    #[serde(default)]
    pub min_runtime_ms: u64,
    /// Where its jobs may run, what they may request, and when idle ones are reclaimed.
    #[serde(default)]
    pub policy: ProjectPolicy,
}

impl Project {
    /// A project with no guarantee, no limit, no members and no policy (as the pool's first,
    /// `default`, is made).
    pub fn open(name: &str, created_ms: u64) -> Project {
        Project {
            name: name.into(),
            parent: None,
            guaranteed_milli: 0,
            limit_milli: None,
            over_quota_weight: 1,
            members: Default::default(),
            created_ms,
            min_runtime_ms: 0,
            policy: Default::default(),
        }
    }
}

/// A project's policy: residency (node labels), allowed device models, the most GPU one job
/// may ask for, and idle reclaim of interactive jobs. Sub-projects are bound by their
/// ancestors' policies too.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProjectPolicy {
    /// Node labels every node of its jobs must carry, e.g. `region: eu`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub residency: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_job_gpu_milli: Option<u64>,
    /// Interactive jobs whose GPUs stay under this utilisation (percent) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_threshold_pct: Option<f64>,
    /// ... for this long are stopped (0: never) ...
    #[serde(default)]
    pub idle_after_ms: u64,
    /// ... after a warning this long before.
    #[serde(default)]
    pub idle_warning_ms: u64,
    /// Host paths its jobs may mount (see [`crate::volumes`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volumes::Volume>,
}

impl ProjectPolicy {
    /// Utilisation under which a replica is idle when the project names no threshold (percent).
    pub const DEFAULT_IDLE_THRESHOLD_PCT: f64 = 5.0;

    pub fn idle_threshold(&self) -> f64 {
        self.idle_threshold_pct
            .unwrap_or(Self::DEFAULT_IDLE_THRESHOLD_PCT)
    }

    /// In a few words: "region=eu; models H100; <=4 GPU/job; idle 1800s<5%; volumes /d:ro", or "-".
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.residency.is_empty() {
            let labels: Vec<String> = self
                .residency
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            parts.push(labels.join(","));
        }
        if !self.device_models.is_empty() {
            parts.push(format!("models {}", self.device_models.join(",")));
        }
        if let Some(m) = self.max_job_gpu_milli {
            parts.push(format!("<={} GPU/job", m as f64 / 1000.0));
        }
        if self.idle_after_ms > 0 {
            parts.push(format!(
                "idle {}s<{}%",
                self.idle_after_ms / 1000,
                self.idle_threshold()
            ));
        }
        if !self.volumes.is_empty() {
            let list: Vec<String> = self.volumes.iter().map(|v| v.text()).collect();
            parts.push(format!("volumes {}", list.join(",")));
        }
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join("; ")
        }
    }
}

impl State {
    /// The next job id: above every id of the store and every id ever given.
    pub fn take_job_id(&mut self) -> std::io::Result<u64> {
        let floor = self
            .id_ceiling
            .as_ref()
            .map_or(0, IdCeiling::given)
            .max(self.next_job_id);
        let id = floor + 1;
        if let Some(c) = self.id_ceiling.as_mut() {
            c.record(id)?;
        }
        Ok(id)
    }

    /// The placement rules of a project: its policy and its ancestors', the nearer ancestor's
    /// residency label winning none (a conflict leaves nothing allowed, which describe shows).
    pub fn placement_rules(&self, project: &str) -> tessera_sched::PlacementRules {
        let mut rules = tessera_sched::PlacementRules::default();
        let mut at = self.projects.get(project);
        let mut seen = 0;
        while let Some(p) = at {
            let pol = &p.policy;
            for (k, v) in &pol.residency {
                rules
                    .node_selector
                    .entry(k.clone())
                    .or_insert_with(|| v.clone());
            }
            if !pol.device_models.is_empty() {
                if rules.device_models.is_empty() {
                    rules.device_models = pol.device_models.clone();
                } else {
                    rules
                        .device_models
                        .retain(|m| pol.device_models.contains(m));
                    if rules.device_models.is_empty() {
                        // Nothing is allowed by both: a model no node has.
                        rules.device_models.push("(none allowed)".into());
                    }
                }
            }
            if let Some(max) = pol.max_job_gpu_milli {
                rules.max_job_gpu_milli = Some(rules.max_job_gpu_milli.map_or(max, |m| m.min(max)));
            }
            seen += 1;
            at = p
                .parent
                .as_ref()
                .filter(|_| seen < 64)
                .and_then(|n| self.projects.get(n));
        }
        rules
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Scheduled,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        JobState::ALL.into_iter().find(|s| s.name() == text)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Holds (or is about to hold) resources on nodes.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Scheduled | JobState::Running)
    }
}

/// Why an active job's replicas are being stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopCause {
    Cancel {
        by: String,
    },
    Preempt {
        for_job: u64,
        reason: String,
    },
    ReplicaFailed {
        replica: u32,
        exit_code: i32,
    },
    NodeLost {
        node: String,
    },
    Drain {
        node: String,
    },
    /// Its GPUs stayed idle past its project's idle policy.
    Idle {
        idle_ms: u64,
    },
    /// Moved by request: checkpointed (when the job checkpoints) and started again, on `to` when
    /// given.
    Migrate {
        by: String,
        to: Option<String>,
    },
    /// A replica could not run for a reason of its node, not its own (the node's disk was full,
    /// its supervisor was lost): the job is queued again without using a restart.
    Interrupted {
        replica: u32,
        why: String,
    },
    /// It ran as long as its time limit allows (`--time`): it fails.
    TimeLimit {
        limit_ms: u64,
    },
    /// Its owner or an admin asked for it to be queued again (`tessera requeue`).
    Requeue {
        by: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaPhase {
    /// Sent to the node's agent, not yet reported running.
    Assigned,
    Running,
    Exited,
    /// Its node was lost; the agent's own lease has stopped it.
    Lost,
    /// Stopped before its agent ever started it.
    NotStarted,
}

impl ReplicaPhase {
    pub fn is_done(self) -> bool {
        matches!(
            self,
            ReplicaPhase::Exited | ReplicaPhase::Lost | ReplicaPhase::NotStarted
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replica {
    pub index: u32,
    pub node: String,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub devices: Vec<DeviceShare>,
    pub phase: ReplicaPhase,
    pub exit_code: Option<i32>,
    /// How it ended, in the agent's words (e.g. "killed by its memory limit (OOM)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_message: Option<String>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// The port its program listens on (services), as the agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// An elastic job's replica given back (checkpointed where the job checkpoints): it is out of
    /// the replica set, and its end is neither a failure nor part of the job's success.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
    /// A replica added to an elastic job that starts from the checkpoint of this departed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_of: Option<u32>,
    /// A remotely attached replica: the node its `devices` are on (its program runs on `node`).
    /// That node's agent runs the GPU server for it (see docs/remote-gpu.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_node: Option<String>,
    /// The port the GPU server listens on, reserved on `gpu_node`'s host at placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_port: Option<u16>,
    /// The GPU server has started (its agent said so): the program may start now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gpu_serving: bool,
}

impl Replica {
    /// A replica just placed by `alloc` on `node`, not yet started.
    pub fn assigned(index: u32, node: &str, alloc: &tessera_sched::Allocation) -> Replica {
        Replica {
            index,
            node: node.to_string(),
            cpu_milli: alloc.cpu_milli,
            memory_bytes: alloc.memory_bytes,
            devices: alloc.devices.clone(),
            phase: ReplicaPhase::Assigned,
            exit_code: None,
            exit_message: None,
            started_ms: None,
            finished_ms: None,
            port: None,
            leaving: false,
            resume_of: None,
            gpu_node: None,
            gpu_port: None,
            gpu_serving: false,
        }
    }

    /// A replica the scheduler placed: `alloc`'s nodes (its program's, and its devices' for a
    /// remote pair) named by `names`, the scheduler's node list.
    pub fn placed(index: u32, alloc: &tessera_sched::Allocation, names: &[String]) -> Replica {
        let mut r = Replica::assigned(index, &names[alloc.node.index()], alloc);
        r.gpu_node = alloc
            .gpu_node
            .filter(|g| *g != alloc.node)
            .map(|g| names[g.index()].clone());
        r
    }

    /// The nodes it holds something on: its own, and its devices' when they are remote.
    pub fn nodes(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.node).chain(self.gpu_node.as_ref())
    }

    /// The node its devices are on.
    pub fn device_node(&self) -> &str {
        self.gpu_node.as_deref().unwrap_or(&self.node)
    }

    /// Whether it holds anything on `node`.
    pub fn is_on(&self, node: &str) -> bool {
        self.nodes().any(|n| n == node)
    }

    pub fn gpu_milli(&self) -> u64 {
        self.devices.iter().map(|d| u64::from(d.milli)).sum()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub owner: String,
    pub def: JobDef,
    pub state: JobState,
    /// Why it is in its state, in words.
    pub reason: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Placements so far; replicas of attempt `a` are keyed `{id}.{a}.{index}`.
    pub attempt: u32,
    /// Restarts after failures (preemption and node loss do not count).
    pub restarts: u32,
    /// Not to be placed before this time (restart backoff).
    pub not_before_ms: u64,
    pub replicas: Vec<Replica>,
    pub stop: Option<Box<StopCause>>,
    /// Order of the last start, for "newest first" preemption.
    pub started_seq: u64,
    /// When it last entered the queue, for queue-wait metrics.
    pub queued_ms: u64,
    pub finished_ms: Option<u64>,
    /// The node its next start must be on (`tessera migrate --to`), cleared once placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_node: Option<String>,
    /// The service this job is a replica of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A service replica started to take over from this one (a move): it becomes a full
    /// replica once ready, and the old one drains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
    /// A service replica being removed: it takes no new requests and stops once its requests
    /// are done (or its drain time is up), from `draining_since_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since_ms: Option<u64>,
    /// Bumped whenever an elastic job's replica set changes, so its replicas can tell.
    #[serde(default)]
    pub generation: u64,
    /// A gang's rendezvous port on its rank 0's node (`MASTER_PORT`), reserved at placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous_port: Option<u16>,
    /// Held by its owner or an admin (`tessera hold`): it does not start until released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

impl From<Box<Job>> for Job {
    fn from(job: Box<Job>) -> Job {
        *job
    }
}

impl Job {
    /// A job just submitted: pending, waiting for the scheduler.
    pub fn new(id: u64, owner: &str, def: JobDef, now: u64) -> Job {
        // `--begin`: not placed before then.
        let not_before_ms = def.begin.map_or(0, |b| b.at(now));
        let held = def.asked_hold;
        Job {
            id,
            owner: owner.to_string(),
            def,
            state: JobState::Pending,
            reason: "submitted; waiting for the scheduler".into(),
            created_ms: now,
            updated_ms: now,
            attempt: 0,
            restarts: 0,
            not_before_ms,
            held,
            replicas: vec![],
            stop: None,
            started_seq: 0,
            queued_ms: now,
            finished_ms: None,
            pin_node: None,
            service: None,
            replaces: None,
            draining_since_ms: None,
            generation: 0,
            rendezvous_port: None,
        }
    }

    /// Replicas in its replica set now: not given back and not finished.
    pub fn members(&self) -> impl Iterator<Item = &Replica> {
        self.replicas
            .iter()
            .filter(|r| !r.leaving && !r.phase.is_done())
    }

    pub fn project(&self) -> &str {
        &self.def.spec.project
    }

    pub fn key(&self, replica: u32) -> String {
        format!("{}.{}.{}", self.id, self.attempt, replica)
    }

    /// The key of a remotely attached replica's other half: its GPU server on `gpu_node`.
    pub fn device_key(&self, replica: u32) -> String {
        format!("{}{DEVICE_KEY_SUFFIX}", self.key(replica))
    }

    /// Milli-GPU held now by replicas that have not finished.
    pub fn gpu_milli_held(&self) -> u64 {
        self.replicas
            .iter()
            .filter(|r| !r.phase.is_done())
            .map(Replica::gpu_milli)
            .sum()
    }

    pub fn all_replicas_done(&self) -> bool {
        self.replicas.iter().all(|r| r.phase.is_done())
    }
}

/// What ends the key of a remote attachment's GPU server (`{job}.{attempt}.{index}.gpu`).
pub const DEVICE_KEY_SUFFIX: &str = ".gpu";

/// Splits the key of a remote attachment's GPU server (see [`Job::device_key`]).
pub fn parse_device_key(key: &str) -> Option<(u64, u32, u32)> {
    parse_key(key.strip_suffix(DEVICE_KEY_SUFFIX)?)
}

/// Splits a replica's key or its GPU server's: the replica, and whether it is the server's.
pub fn parse_either_key(key: &str) -> Option<((u64, u32, u32), bool)> {
    match parse_device_key(key) {
        Some(k) => Some((k, true)),
        None => parse_key(key).map(|k| (k, false)),
    }
}

/// Splits a replica key `{job}.{attempt}.{index}`.
pub fn parse_key(key: &str) -> Option<(u64, u32, u32)> {
    let mut it = key.split('.');
    let job = it.next()?.parse().ok()?;
    let attempt = it.next()?.parse().ok()?;
    let index = it.next()?.parse().ok()?;
    it.next().is_none().then_some((job, attempt, index))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeHealth {
    Ready,
    /// Missed heartbeats for longer than its lease; its work was rescheduled.
    Lost,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub spec: NodeSpec,
    pub simulated: bool,
    /// Where the agent serves logs.
    pub address: String,
    pub cordoned: bool,
    pub health: NodeHealth,
    pub registered_ms: u64,
    /// How its agent confines workloads, in its words.
    #[serde(default)]
    pub confinement: String,
    /// Not persisted: a restarted controller gives every node a fresh lease.
    #[serde(skip)]
    pub last_seen_ms: u64,
    #[serde(skip)]
    pub last_seq: u64,
    #[serde(skip)]
    pub heartbeats: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A person's API token.
    User,
    /// Lets a new agent join the pool once per use.
    Join,
    /// One agent's own credential.
    Agent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub kind: TokenKind,
    /// Owner user (user tokens) or node name (agent tokens); the creator for join tokens.
    pub subject: String,
    pub description: String,
    /// argon2 PHC string of the secret part.
    pub hash: String,
    pub created_ms: u64,
    pub revoked: bool,
    /// Join tokens: how many more nodes it may join (`None`: no limit, tokens from before
    /// limits existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// When it stops working (Unix ms), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

impl TokenRecord {
    /// Whether the token still lets its holder in at `now`.
    pub fn usable(&self, now: u64) -> bool {
        !self.revoked && self.uses_left != Some(0) && self.expires_ms.is_none_or(|e| now < e)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub job: u64,
    pub ts_ms: u64,
    pub kind: EventKind,
    pub message: String,
}

/// What happened to a job. Stored and shown by name; the names are part of the API (`tessera
/// describe`, the events endpoint, the dashboard). A kind that records a decision names its
/// audit action here, so that a new kind cannot silently miss the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Submitted,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelling,
    Cancelled,
    Preempting,
    Preempted,
    Requeued,
    Restarting,
    ReplicaFailed,
    Replica,
    Ready,
    Draining,
    Migrating,
    Migrated,
    Grown,
    Shrinking,
    NodeLost,
    Checkpoint,
    CheckpointCorrupt,
    IdleWarning,
    IdleStop,
    TimeLimit,
    Held,
    Released,
}

impl EventKind {
    pub const ALL: [EventKind; 27] = [
        EventKind::Submitted,
        EventKind::Scheduled,
        EventKind::Running,
        EventKind::Succeeded,
        EventKind::Failed,
        EventKind::Cancelling,
        EventKind::Cancelled,
        EventKind::Preempting,
        EventKind::Preempted,
        EventKind::Requeued,
        EventKind::Restarting,
        EventKind::ReplicaFailed,
        EventKind::Replica,
        EventKind::Ready,
        EventKind::Draining,
        EventKind::Migrating,
        EventKind::Migrated,
        EventKind::Grown,
        EventKind::Shrinking,
        EventKind::NodeLost,
        EventKind::Checkpoint,
        EventKind::CheckpointCorrupt,
        EventKind::IdleWarning,
        EventKind::IdleStop,
        EventKind::TimeLimit,
        EventKind::Held,
        EventKind::Released,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Submitted => "Submitted",
            EventKind::Scheduled => "Scheduled",
            EventKind::Running => "Running",
            EventKind::Succeeded => "Succeeded",
            EventKind::Failed => "Failed",
            EventKind::Cancelling => "Cancelling",
            EventKind::Cancelled => "Cancelled",
            EventKind::Preempting => "Preempting",
            EventKind::Preempted => "Preempted",
            EventKind::Requeued => "Requeued",
            EventKind::Restarting => "Restarting",
            EventKind::ReplicaFailed => "ReplicaFailed",
            EventKind::Replica => "Replica",
            EventKind::Ready => "Ready",
            EventKind::Draining => "Draining",
            EventKind::Migrating => "Migrating",
            EventKind::Migrated => "Migrated",
            EventKind::Grown => "Grown",
            EventKind::Shrinking => "Shrinking",
            EventKind::NodeLost => "NodeLost",
            EventKind::Checkpoint => "Checkpoint",
            EventKind::CheckpointCorrupt => "CheckpointCorrupt",
            EventKind::IdleWarning => "IdleWarning",
            EventKind::IdleStop => "IdleStop",
            EventKind::TimeLimit => "TimeLimit",
            EventKind::Held => "Held",
            EventKind::Released => "Released",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The audit action of an event that records a decision (`by_user`: a user's request made
    /// it), or `None` for one that only reports.
    pub fn audit_action(self, by_user: bool) -> Option<&'static str> {
        use EventKind::*;
        Some(match self {
            Submitted => "submit",
            Scheduled => "place",
            Preempting => "preempt",
            Migrating if by_user => "migrate",
            Migrating => "consolidate",
            Grown => "grow",
            Shrinking => "shrink",
            Cancelling => "cancel",
            Cancelled if by_user => "cancel",
            Requeued => "requeue",
            IdleWarning => "idle-warning",
            IdleStop => "idle-stop",
            TimeLimit => "time-limit",
            Held => "hold",
            Released => "release",
            Running | Succeeded | Failed | Cancelled | Preempted | Restarting | ReplicaFailed
            | Replica | Ready | Draining | Migrated | NodeLost | Checkpoint | CheckpointCorrupt => {
                return None;
            }
        })
    }
}

/// A service: its replicas are jobs with `service` set to its name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub owner: String,
    /// One replica's job definition (its project, resources, command).
    pub template: JobDef,
    pub def: crate::service::ServiceDef,
    pub created_ms: u64,
}

/// How long a replica's GPU share has sat idle, from its agent's readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdleCount {
    /// When its last reading came.
    pub last_at: u64,
    pub last_util_pct: f64,
    /// Milli-GPU-milliseconds under the idle threshold so far.
    pub idle_gpu_milli_ms: u64,
}

/// Job ids are never given twice, even after the store is restored from an older copy (a
/// reused id would reuse replica keys that agents have already run): the highest id given is
/// also kept in a file beside the store, not in it, so that a restored store does not roll it
/// back. It is written with every id (one small write, not synced: a restore is an admin's act
/// long after the page cache reached the disk, and after a crash the store's own ids count).
#[derive(Debug)]
pub struct IdCeiling {
    file: std::fs::File,
    given: u64,
}

impl IdCeiling {
    /// Opens (creating) the record at `path`.
    pub fn load(path: &std::path::Path) -> std::io::Result<IdCeiling> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let given = match text.trim() {
            "" => 0,
            t => t.parse().map_err(|_| {
                std::io::Error::other(format!(
                    "{} does not hold a job id; restore it, or remove it if the store is intact",
                    path.display()
                ))
            })?,
        };
        Ok(IdCeiling { file, given })
    }

    /// The highest id given.
    pub fn given(&self) -> u64 {
        self.given
    }

    fn record(&mut self, id: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if id > self.given {
            self.file
                .write_all_at(format!("{id:020}\n").as_bytes(), 0)?;
            self.given = id;
        }
        Ok(())
    }
}

/// A job's newest events that its events are read as (all are in the store; none are kept in
/// memory: at 100,000 jobs they took about 45 MiB there).
pub const EVENTS_PER_JOB: usize = 200;
/// Requests remembered for the pool's shape history.
pub const SHAPE_HISTORY: usize = 2000;

#[derive(Debug, Default)]
pub struct State {
    /// Where job ids are reserved (see [`IdCeiling`]); none in tests and benchmarks that make
    /// a state in memory.
    pub id_ceiling: Option<IdCeiling>,
    pub users: BTreeMap<String, User>,
    pub projects: BTreeMap<String, Project>,
    pub services: BTreeMap<String, Service>,
    /// Boxed: a `Job` is several hundred bytes, and a map filled in ascending id order keeps its
    /// nodes about half full, so that inline records waste half a kilobyte a job.
    pub jobs: BTreeMap<u64, Box<Job>>,
    pub nodes: BTreeMap<String, Node>,
    pub tokens: BTreeMap<String, TokenRecord>,
    pub next_job_id: u64,
    pub next_start_seq: u64,
    /// Per node, bumped whenever what should run there changes.
    pub node_revision: HashMap<String, u64>,
    /// Set by writes: run the scheduler after the commit.
    pub kick: bool,
    /// What changed for the scheduler since its last round (derived, not stored).
    pub sched_changes: SchedChanges,
    /// Nodes whose desired set changed in this batch: wake their agents after the commit.
    pub dirty_nodes: BTreeSet<String>,
    pub recent_requests: VecDeque<ResourceRequest>,
    /// Reasons of waiting jobs from the last scheduling round (derived, not stored); jobs of
    /// one shape share one.
    pub wait_reasons: HashMap<u64, std::sync::Arc<tessera_sched::schedule::WaitReason>>,
    /// The last usage segment committed (see `controller::usage`).
    pub usage_seq: u64,
    /// Each running replica's latest use as its agent reported it, by replica key (derived, not
    /// stored: the agent reports cumulative counts again after a restart).
    pub replica_usage: HashMap<String, crate::protocol::ReplicaUsage>,
    /// Each project's past use for fair share (average milli-GPU, decayed; derived from the usage
    /// ledger every half a minute).
    pub usage_history: BTreeMap<String, f64>,
    /// Each running replica's idle count, by replica key (derived, like `replica_usage`).
    pub replica_idle: HashMap<String, IdleCount>,
    /// The latest complete checkpoint of each (job, replica).
    pub checkpoints: HashMap<(u64, u32), CheckpointManifest>,
    /// The container images each node holds in its cache, as its agent last reported them
    /// (derived, not stored): the scheduler prefers them among equal placements.
    pub node_images: HashMap<String, BTreeSet<String>>,
    /// Projects' registry logins, by (project, registry) (see `controller::registries`).
    pub registry_logins: BTreeMap<(String, String), crate::controller::registries::RegistryLogin>,
    /// Active jobs with a replica on each node (derived, kept by [`State::insert_job`]), so that
    /// a heartbeat or a node view costs the node's jobs, not the pool's.
    jobs_by_node: HashMap<String, BTreeSet<u64>>,
}

/// One file of a checkpoint: its path inside the checkpoint directory and its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointFile {
    pub path: String,
    pub size: u64,
    /// SHA-256 (hex) of each chunk, in order.
    pub chunks: Vec<String>,
}

/// A complete checkpoint of one replica, as an agent uploaded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointManifest {
    /// SHA-256 of the file list (set by the controller).
    #[serde(default)]
    pub id: String,
    pub job: u64,
    pub attempt: u32,
    pub replica: u32,
    pub files: Vec<CheckpointFile>,
    #[serde(default)]
    pub created_ms: u64,
}

/// What changed for the scheduler since its last round: the jobs written, and whether anything
/// else it reads changed (a node, a project, a service). A round that finds only jobs submitted
/// since can decide them alone (`controller::reconcile`'s quick rounds); anything else, or more
/// than [`SchedChanges::MAX_JOBS`] jobs, takes a full one. A new state starts as "everything".
#[derive(Debug)]
pub struct SchedChanges {
    pub jobs: Vec<u64>,
    pub other: bool,
}

impl SchedChanges {
    /// Jobs written between two rounds beyond which a full round is cheaper than looking at each.
    pub const MAX_JOBS: usize = 4096;

    pub fn none() -> Self {
        SchedChanges {
            jobs: Vec::new(),
            other: false,
        }
    }
}

impl Default for SchedChanges {
    fn default() -> Self {
        SchedChanges {
            jobs: Vec::new(),
            other: true,
        }
    }
}

impl State {
    /// Something the scheduler reads besides a job changed (a node, a project, a service):
    /// the next round is a full one.
    pub fn changed_for_scheduler(&mut self) {
        self.kick = true;
        self.sched_changes.other = true;
        self.sched_changes.jobs = Vec::new();
    }

    /// Inserts or replaces a job, keeping the per-node index.
    pub fn insert_job(&mut self, job: impl Into<Box<Job>>) {
        let job: Box<Job> = job.into();
        let changes = &mut self.sched_changes;
        if !changes.other {
            if changes.jobs.len() >= SchedChanges::MAX_JOBS {
                changes.other = true;
                changes.jobs = Vec::new();
            } else {
                changes.jobs.push(job.id);
            }
        }
        if let Some(old) = self.jobs.get(&job.id) {
            for n in old.replicas.iter().flat_map(Replica::nodes) {
                if let Some(ids) = self.jobs_by_node.get_mut(n) {
                    ids.remove(&job.id);
                    if ids.is_empty() {
                        self.jobs_by_node.remove(n);
                    }
                }
            }
        }
        if job.state.is_active() {
            for n in job.replicas.iter().flat_map(Replica::nodes) {
                self.jobs_by_node
                    .entry(n.clone())
                    .or_default()
                    .insert(job.id);
            }
        }
        self.jobs.insert(job.id, job);
    }

    /// The active jobs with a replica (of their current attempt) on `node`, or a remote
    /// replica's devices.
    pub fn jobs_on(&self, node: &str) -> impl Iterator<Item = &Job> {
        self.jobs_by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id).map(|j| &**j))
    }

    pub fn touch_node(&mut self, node: &str) {
        *self.node_revision.entry(node.to_string()).or_default() += 1;
        self.dirty_nodes.insert(node.to_string());
    }

    pub fn remember_request(&mut self, request: &ResourceRequest) {
        if self.recent_requests.len() >= SHAPE_HISTORY {
            self.recent_requests.pop_front();
        }
        self.recent_requests.push_back(request.clone());
    }

    /// Projects a user may see and act in; `None` means all.
    pub fn visible_projects(&self, user: &str, role: Role) -> Option<BTreeSet<String>> {
        match role {
            Role::Admin | Role::Viewer => None,
            Role::Member => Some(
                self.projects
                    .values()
                    .filter(|p| p.members.contains(user))
                    .map(|p| p.name.clone())
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_are_stored_by_the_names_users_see_and_decisions_name_their_audit_action() {
        for kind in EventKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(
            EventKind::parse("Scheduld"),
            None,
            "a misspelt kind is not a kind"
        );
        let action = |k: EventKind, by_user| k.audit_action(by_user);
        assert_eq!(action(EventKind::Scheduled, false), Some("place"));
        assert_eq!(action(EventKind::Migrating, true), Some("migrate"));
        assert_eq!(action(EventKind::Migrating, false), Some("consolidate"));
        assert_eq!(action(EventKind::Cancelled, true), Some("cancel"));
        assert_eq!(action(EventKind::Cancelled, false), None);
        assert_eq!(action(EventKind::Running, true), None);
    }
}

#[cfg(test)]
mod budget {
    /// A job's inline size, kept on purpose: every byte is paid once per job the pool holds
    /// (100,000 jobs: 100 KB a byte), and the memory benchmark's runs vary too much (±30 MiB at
    /// 10,000 nodes) to notice a field added to every job. A field most jobs do not set goes
    /// behind a `Box` in an `Option` (8 bytes when unset), as `stop`, `array`, `asked_array` and
    /// `checkpoint` do. Raise this only knowing what it costs (docs/benchmarks.md).
    #[test]
    fn a_job_stays_within_its_inline_budget() {
        let size = std::mem::size_of::<super::Job>();
        assert!(
            size <= 720,
            "a Job is {size} bytes inline; its budget is 720"
        );
    }
}
