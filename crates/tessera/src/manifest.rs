//! The job manifest users submit: a Kubernetes-style object, strict about what it accepts.
//!
//! Unknown fields are refused rather than ignored, so a typo (`gpus:` for `gpu:`) is an error the
//! user sees at once, not a job that silently runs without its GPU.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_sched::request::parse_priority;
use tessera_sched::validate::validate_job;
use tessera_sched::{GpuAttach, GpuRequest, JobSpec, ResourceRequest, ValidationError};

use crate::units::{Quantity, parse_bytes, parse_cpu, parse_duration, parse_gpu};

/// Most bytes of command and environment one job may carry.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub metadata: Metadata,
    pub spec: ManifestSpec,
    /// What `tessera get job ID -o yaml` shows of the job as it is; ignored when submitted, so
    /// that its output submits again as it is (as `kubectl apply` ignores status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub project: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ManifestSpec {
    /// A number (a gang of that many), or `{min, max}` for an elastic job.
    #[serde(default)]
    pub replicas: Option<Replicas>,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub resources: Resources,
    /// A container image to run it in (`registry/repository:tag` or `@sha256:…`); its
    /// entrypoint runs with `command` as its arguments (Docker's `run IMAGE CMD`).
    #[serde(default)]
    pub image: Option<String>,
    /// The program and its arguments; with an image, what replaces the image's `CMD` (empty:
    /// the image's own).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub restart: Option<Restart>,
    #[serde(default)]
    pub preemptible: Option<bool>,
    /// A person works in it (a notebook, a shell): its project's idle policy may stop it.
    #[serde(default)]
    pub interactive: Option<bool>,
    /// Accept it even though no node of the pool could hold it today (nodes may join).
    #[serde(default)]
    pub wait_for_capacity: Option<bool>,
    /// The job can save and resume its progress (see [`CheckpointManifest`]).
    #[serde(default)]
    pub checkpoint: Option<CheckpointManifest>,
    /// Where the program starts: a directory on one of the job's volumes (default: the
    /// directory it was submitted from when that is on one, else its run dir).
    #[serde(default)]
    pub workdir: Option<String>,
    /// The project's volumes it mounts, `PATH` or `PATH:ro` (default: all of them).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// The directory `tessera submit` ran in (the CLI sets it).
    #[serde(default)]
    pub submit_dir: Option<String>,
    /// `kind: Service` only: port, readiness check and autoscaling.
    #[serde(default)]
    pub service: Option<crate::service::ServiceManifest>,
    /// A job array, as Slurm writes it: `0-99%8` (a task per index, each a job of its own with
    /// `TESSERA_ARRAY_INDEX`, at most 8 running at once).
    #[serde(default)]
    pub array: Option<String>,
    /// Jobs it starts after, once they have started (Slurm's `after`).
    #[serde(default)]
    pub after: Vec<u64>,
    /// Jobs it starts after, once they have succeeded; cancelled if one fails (`afterok`).
    #[serde(default)]
    pub after_ok: Vec<u64>,
    /// Jobs it starts after, once they have ended however (`afterany`).
    #[serde(default)]
    pub after_any: Vec<u64>,
    /// How long it may run (`4h`): then it is stopped as a preemption stops it (its checkpoint
    /// signal and grace first), and fails with the reason "time limit".
    #[serde(default)]
    pub time_limit: Option<String>,
    /// Start no earlier than this: `2026-12-08T09:00:00Z`, or `+2h` from submission.
    #[serde(default)]
    pub begin: Option<String>,
    /// Submitted held: it does not start until released.
    #[serde(default)]
    pub hold: Option<bool>,
    /// A file in its working directory that gets its output (stdout and stderr as they come),
    /// as Slurm's `--output`: `slurm-%j.out`.
    #[serde(default)]
    pub output_file: Option<String>,
}

/// `spec.checkpoint`: how the job saves its progress. To stop it (preemption, a move, a drain),
/// the agent sends `signal` and gives it `grace` to write a checkpoint into
/// `$TESSERA_CHECKPOINT_DIR` and exit; wherever it starts again it finds the last complete
/// checkpoint in `$TESSERA_RESUME_FROM`. With `interval`, the job is asked to checkpoint that
/// often as it runs (`$TESSERA_CHECKPOINT_INTERVAL`, seconds).
///
/// `mode: transparent` is for programs that cannot cooperate: the agent freezes the process tree
/// and saves it whole with CRIU (memory, registers, open files, its work directory), and restores
/// it wherever it runs next; `grace` bounds the dump and `interval` takes periodic dumps while it
/// runs. Such a job runs only on nodes that can do this (`tessera nodes`, CHECKPOINT).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointManifest {
    /// `cooperative` (default) or `transparent`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub signal: Option<String>,
    #[serde(default)]
    pub grace: Option<String>,
    #[serde(default)]
    pub interval: Option<String>,
}

/// A job's checkpoint declaration, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The signal's number and its name (`USR1`).
    pub signal: i32,
    pub signal_name: String,
    pub grace_ms: u64,
    pub interval_ms: Option<u64>,
    /// Saved whole by CRIU rather than by the program itself.
    #[serde(default)]
    pub transparent: bool,
}

impl CheckpointManifest {
    fn check(&self) -> Result<Checkpoint, ValidationError> {
        let transparent = match self.mode.as_deref().map(str::trim) {
            None | Some("cooperative") => false,
            Some("transparent") => true,
            Some(other) => {
                return Err(ValidationError::new(
                    "spec.checkpoint.mode",
                    other,
                    "not a checkpoint mode",
                    "use cooperative (the program saves itself on a signal) or transparent (CRIU saves the process)",
                ));
            }
        };
        if transparent && let Some(sig) = &self.signal {
            return Err(ValidationError::new(
                "spec.checkpoint.signal",
                sig,
                "a transparent checkpoint sends the program no signal",
                "remove spec.checkpoint.signal, or use mode: cooperative",
            ));
        }
        let text = self.signal.clone().unwrap_or_else(|| "USR1".into());
        let upper = text.trim().to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper).to_string();
        let signal = match name.parse::<i32>() {
            Ok(n) => nix::sys::signal::Signal::try_from(n).ok(),
            Err(_) => format!("SIG{name}")
                .parse::<nix::sys::signal::Signal>()
                .ok(),
        };
        let signal = signal
            .filter(|s| {
                !matches!(
                    s,
                    nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGSTOP
                )
            })
            .ok_or_else(|| {
                ValidationError::new(
                    "spec.checkpoint.signal",
                    &text,
                    "not a signal a program can catch",
                    "use e.g. USR1, USR2, TERM or INT",
                )
            })?;
        let grace = parse_duration(
            "spec.checkpoint.grace",
            self.grace.as_deref().unwrap_or("30s"),
        )?;
        if grace < std::time::Duration::from_secs(1) || grace > std::time::Duration::from_secs(3600)
        {
            return Err(ValidationError::new(
                "spec.checkpoint.grace",
                self.grace.clone().unwrap_or_default(),
                "out of range",
                "give the job 1s to 1h to write its checkpoint",
            ));
        }
        let interval = match &self.interval {
            Some(i) => {
                let d = parse_duration("spec.checkpoint.interval", i)?;
                if d < std::time::Duration::from_secs(1) {
                    return Err(ValidationError::new(
                        "spec.checkpoint.interval",
                        i,
                        "too short",
                        "checkpoint at most once a second, e.g. interval: 10m",
                    ));
                }
                Some(d.as_millis() as u64)
            }
            None => None,
        };
        Ok(Checkpoint {
            signal: signal as i32,
            signal_name: signal.as_str().trim_start_matches("SIG").to_string(),
            grace_ms: grace.as_millis() as u64,
            interval_ms: interval,
            transparent,
        })
    }
}

/// `spec.replicas`: a fixed gang, or an elastic range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Replicas {
    Count(u32),
    Range(ReplicaRange),
}

/// `replicas: {min, max}`: the job starts once `min` replicas fit together, grows towards `max`
/// into idle capacity, and gives back replicas above `min` when other work needs the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRange {
    pub min: u32,
    pub max: u32,
}

/// An elastic job's bounds, checked (`1 <= min <= max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Elastic {
    pub min: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Priority {
    Number(i32),
    Class(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    #[serde(default)]
    pub gpu: Option<Quantity>,
    #[serde(default)]
    pub gpu_memory: Option<Quantity>,
    #[serde(default)]
    pub cpu: Option<Quantity>,
    #[serde(default)]
    pub memory: Option<Quantity>,
    #[serde(default)]
    pub device_models: Vec<String>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// `local` (the default), `remote` or `any`: whether the replica's GPU may be attached over
    /// the network from another node (docs/remote-gpu.md).
    #[serde(default)]
    pub gpu_attach: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Restart {
    pub policy: RestartPolicy,
    #[serde(default)]
    pub max_restarts: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Never,
    OnFailure,
}

/// A job as the controller keeps it: the scheduler's view plus what the agent needs to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDef {
    pub spec: JobSpec,
    /// The container image it runs in, when it runs in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub restart: RestartPolicy,
    pub max_restarts: u32,
    pub preemptible: bool,
    #[serde(default)]
    pub checkpoint: Option<Box<Checkpoint>>,
    /// A person works in it; its project's idle policy applies.
    #[serde(default)]
    pub interactive: bool,
    /// Accepted although no node could hold it when it was submitted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wait_for_capacity: bool,
    /// Set for an elastic job; `spec.replicas` is then its minimum, the gang it starts with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elastic: Option<Elastic>,
    /// The host paths it mounts, resolved against its project's volumes at submit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volumes::Volume>,
    /// Where it starts (its run dir's `work/` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// What the manifest asked for its volumes and working directory, until resolved.
    #[serde(skip)]
    pub asked: AskedMounts,
    /// Jobs it waits for (see [`crate::batch`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<crate::batch::After>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin: Option<crate::batch::Begin>,
    /// The array it is a task of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<Box<crate::batch::ArrayTask>>,
    /// The array's indexes and limit as asked, until the submit makes its tasks.
    #[serde(skip)]
    pub asked_array: Option<Box<crate::batch::ArraySpec>>,
    /// Submitted held.
    #[serde(skip)]
    pub asked_hold: bool,
    /// Its output file's pattern (see [`crate::batch::check_output`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file: Option<String>,
}

/// A manifest's `volumes`, `workdir` and `submitDir`, resolved at submit (see
/// [`crate::volumes::resolve`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AskedMounts {
    pub volumes: Vec<String>,
    pub workdir: Option<String>,
    pub submit_dir: Option<String>,
}

/// Defaults applied where a manifest is silent.
pub const DEFAULT_CPU_MILLI: u64 = 1000;
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
/// The least memory a replica may ask for (what a shim and a small program need).
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
pub const DEFAULT_MAX_RESTARTS: u32 = 3;

impl Manifest {
    /// Parses YAML or JSON (JSON is YAML), naming the offending field on error.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_yaml::from_str(text).map_err(|e| format!("manifest: {e}"))
    }

    /// Whether this manifest describes a service (`kind: Service`).
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
    }

    /// Checks every field and turns the manifest into a job definition.
    pub fn into_def(self, default_project: &str) -> Result<JobDef, ValidationError> {
        match self.kind.as_deref() {
            None | Some("Job") => {}
            Some("Service") => {
                return Err(ValidationError::new(
                    "kind",
                    "Service",
                    "a service is not a job",
                    "submit it with `tessera submit -f` (it goes to /v1/services)",
                ));
            }
            Some(kind) => {
                return Err(ValidationError::new(
                    "kind",
                    kind,
                    "unknown kind",
                    "write kind: Job or kind: Service",
                ));
            }
        }
        if self.spec.service.is_some() {
            return Err(ValidationError::new(
                "spec.service",
                "...",
                "only a Service has spec.service",
                "write kind: Service, or remove spec.service",
            ));
        }
        self.into_job_def(default_project)
    }

    /// Checks a `kind: Service` manifest: one replica's job definition (replicas are placed one
    /// by one) and the service's own settings.
    pub fn into_service(
        mut self,
        default_project: &str,
    ) -> Result<(JobDef, crate::service::ServiceDef), ValidationError> {
        if !self.is_service() {
            return Err(ValidationError::new(
                "kind",
                self.kind.clone().unwrap_or_default(),
                "not a service",
                "write kind: Service",
            ));
        }
        let batch_only = [
            ("spec.array", self.spec.array.is_some()),
            ("spec.after", !self.spec.after.is_empty()),
            ("spec.afterOk", !self.spec.after_ok.is_empty()),
            ("spec.afterAny", !self.spec.after_any.is_empty()),
            ("spec.timeLimit", self.spec.time_limit.is_some()),
            ("spec.begin", self.spec.begin.is_some()),
            ("spec.hold", self.spec.hold.is_some()),
            ("spec.outputFile", self.spec.output_file.is_some()),
        ];
        if let Some((field, _)) = batch_only.iter().find(|(_, set)| *set) {
            return Err(ValidationError::new(
                *field,
                "...",
                "a service runs until it is deleted; arrays, dependencies, time limits, start \
                 times and holds are for jobs",
                format!("remove {field}, or submit it as kind: Job"),
            ));
        }
        let svc = self.spec.service.take().unwrap_or_default();
        let replicas = match self.spec.replicas.take() {
            None => None,
            Some(Replicas::Count(n)) => Some(n),
            Some(Replicas::Range(r)) => {
                return Err(ValidationError::new(
                    "spec.replicas",
                    format!("{{min: {}, max: {}}}", r.min, r.max),
                    "a service scales by its autoscale settings, not by a replica range",
                    "write spec.replicas: N and spec.service.autoscale: {min, max, ...}",
                ));
            }
        };
        // A service keeps running: it restarts when it fails, and is not preempted unless it
        // says so.
        if self.spec.restart.is_none() {
            self.spec.restart = Some(Restart {
                policy: RestartPolicy::OnFailure,
                max_restarts: None,
            });
        }
        self.spec.preemptible = Some(self.spec.preemptible.unwrap_or(false));
        let def = self.into_job_def(default_project)?;
        let svc = svc.check(replicas)?;
        Ok((def, svc))
    }

    fn into_job_def(self, default_project: &str) -> Result<JobDef, ValidationError> {
        if let Some(v) = &self.api_version
            && v != "tessera/v1"
        {
            return Err(ValidationError::new(
                "apiVersion",
                v,
                "unknown API version",
                "write apiVersion: tessera/v1",
            ));
        }
        let name = self.metadata.name.trim().to_string();
        check_name("metadata.name", &name)?;
        let project = self
            .metadata
            .project
            .unwrap_or_else(|| default_project.to_string());
        check_name("metadata.project", &project)?;
        let spec = self.spec;
        let r = &spec.resources;
        let gpu = match &r.gpu {
            Some(q) => {
                GpuRequest::from_gpus(parse_gpu("spec.resources.gpu", q)?).map_err(|mut e| {
                    e.field = "spec.resources.gpu".into();
                    e
                })?
            }
            None => GpuRequest::None,
        };
        let gpu_attach = match r.gpu_attach.as_deref() {
            None | Some("local") => GpuAttach::Local,
            Some("remote") => GpuAttach::Remote,
            Some("any") => GpuAttach::Any,
            Some(other) => {
                return Err(ValidationError::new(
                    "spec.resources.gpuAttach",
                    other,
                    "not a way to attach a GPU",
                    "write local (its own node), remote (another node's, over the network) or \
                     any (its own when that fits, else another's)",
                ));
            }
        };
        if gpu_attach != GpuAttach::Local && matches!(spec.replicas, Some(Replicas::Range(_))) {
            return Err(ValidationError::new(
                "spec.resources.gpuAttach",
                r.gpu_attach.clone().unwrap_or_default(),
                "an elastic job's replicas are placed one node each",
                "leave gpuAttach out (local) for an elastic job",
            ));
        }
        let request = ResourceRequest {
            gpu_attach,
            gpu,
            gpu_memory_bytes: match &r.gpu_memory {
                Some(q) => parse_bytes("spec.resources.gpuMemory", q)?,
                None => 0,
            },
            cpu_milli: match &r.cpu {
                Some(q) => parse_cpu("spec.resources.cpu", q)?,
                None => DEFAULT_CPU_MILLI,
            },
            memory_bytes: match &r.memory {
                Some(q) => parse_bytes("spec.resources.memory", q)?,
                None => DEFAULT_MEMORY_BYTES,
            },
            device_models: r.device_models.clone(),
            node_selector: r.node_selector.clone(),
        };
        let priority = match &spec.priority {
            None => 50,
            Some(Priority::Number(n)) => *n,
            Some(Priority::Class(c)) => parse_priority(c).map_err(|mut e| {
                e.field = "spec.priority".into();
                e
            })?,
        };
        let image = spec.image.as_deref().map(check_image).transpose()?;
        if image.is_none() && (spec.command.is_empty() || spec.command[0].trim().is_empty()) {
            return Err(ValidationError::new(
                "spec.command",
                "[]",
                "a job needs a program to run",
                "give the command as a list, e.g. command: [python, train.py], or an image \
                 whose entrypoint runs (image: registry/team/train:1.0)",
            ));
        }
        let size: usize = spec.command.iter().map(String::len).sum::<usize>()
            + spec
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > MAX_COMMAND_BYTES {
            return Err(ValidationError::new(
                "spec.command",
                format!("{size} bytes"),
                "command and environment are too large",
                "keep them under 64 KiB; put large inputs in files",
            ));
        }
        if let Some(i) = spec.command.iter().position(|a| a.contains('\0')) {
            return Err(ValidationError::new(
                format!("spec.command[{i}]"),
                format!("{:?}", spec.command[i]),
                "a NUL byte cannot be passed to a program",
                "remove the NUL byte",
            ));
        }
        if let Some((key, _)) = spec.env.iter().find(|(_, v)| v.contains('\0')) {
            return Err(ValidationError::new(
                format!("spec.env.{key}"),
                "a value with a NUL byte",
                "a NUL byte cannot be passed in the environment",
                "remove the NUL byte",
            ));
        }
        if request.memory_bytes < MIN_MEMORY_BYTES {
            return Err(ValidationError::new(
                "spec.resources.memory",
                request.memory_bytes.to_string(),
                "a replica needs at least 16 MiB of memory to start",
                "ask for 16MiB or more, e.g. memory: 512MiB",
            ));
        }
        for key in spec.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ValidationError::new(
                    format!("spec.env.{key}"),
                    key,
                    "not a valid variable name",
                    "use letters, digits and underscores",
                ));
            }
            if key.starts_with("TESSERA_") || key == "CUDA_VISIBLE_DEVICES" || key == "LD_PRELOAD" {
                return Err(ValidationError::new(
                    format!("spec.env.{key}"),
                    key,
                    "this variable is set by Tessera for the job's allocation",
                    "remove it from env",
                ));
            }
        }
        let (restart, max_restarts) = match &spec.restart {
            None => (RestartPolicy::Never, 0),
            Some(r) => (r.policy, r.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS)),
        };
        if max_restarts > 1000 {
            return Err(ValidationError::new(
                "spec.restart.maxRestarts",
                max_restarts.to_string(),
                "too many restarts",
                "use at most 1000",
            ));
        }
        let (replicas, elastic) = match spec.replicas {
            None => (1, None),
            Some(Replicas::Count(n)) => (n, None),
            Some(Replicas::Range(r)) => {
                if r.min == 0 || r.min > r.max || r.max > tessera_sched::validate::MAX_REPLICAS {
                    return Err(ValidationError::new(
                        "spec.replicas",
                        format!("{{min: {}, max: {}}}", r.min, r.max),
                        format!(
                            "an elastic job needs 1 <= min <= max <= {}",
                            tessera_sched::validate::MAX_REPLICAS
                        ),
                        "e.g. replicas: {min: 1, max: 8}",
                    ));
                }
                (
                    r.min,
                    Some(Elastic {
                        min: r.min,
                        max: r.max,
                    }),
                )
            }
        };
        let job = JobSpec {
            name,
            project,
            priority,
            replicas,
            request,
        };
        validate_job(&job).map_err(|mut e| {
            e.field = match e.field.as_str() {
                "replicas" => "spec.replicas".into(),
                "priority" => "spec.priority".into(),
                other => format!("spec.resources.{other}"),
            };
            e
        })?;
        let checkpoint = spec
            .checkpoint
            .as_ref()
            .map(CheckpointManifest::check)
            .transpose()?;
        if image.is_some()
            && checkpoint.as_ref().is_some_and(|c| c.transparent)
            && job.request.gpu != GpuRequest::None
        {
            return Err(ValidationError::new(
                "spec.checkpoint.mode",
                "transparent",
                "transparent checkpoints of image jobs with GPUs are not supported yet (the \
                 device's state would have to be saved inside the container)",
                "use a cooperative checkpoint (the program saves on a signal), or run it \
                 without an image",
            ));
        }
        if checkpoint.as_ref().is_some_and(|c| c.transparent)
            && job.request.gpu_attach != GpuAttach::Local
        {
            return Err(ValidationError::new(
                "spec.checkpoint.mode",
                "transparent",
                "a transparent checkpoint cannot save a GPU attached over the network (its state \
                 is on the other node)",
                "use a cooperative checkpoint (the program saves on a signal), or gpuAttach: local",
            ));
        }
        let mut after = Vec::new();
        for (ids, on, field) in [
            (&spec.after, crate::batch::AfterKind::Start, "spec.after"),
            (&spec.after_ok, crate::batch::AfterKind::Ok, "spec.afterOk"),
            (
                &spec.after_any,
                crate::batch::AfterKind::Any,
                "spec.afterAny",
            ),
        ] {
            if after.len() + ids.len() > crate::batch::MAX_DEPENDENCIES {
                return Err(ValidationError::new(
                    field,
                    format!("{} jobs", after.len() + ids.len()),
                    "too many dependencies",
                    "depend on at most 100 jobs (an array counts as one: depend on its tasks' \
                     last job, or on the array's id)",
                ));
            }
            after.extend(ids.iter().map(|&job| crate::batch::After { job, on }));
        }
        let time_limit_ms = match &spec.time_limit {
            None => None,
            Some(t) => {
                let d = parse_duration("spec.timeLimit", t)?;
                if d.as_millis() < 1000 {
                    return Err(ValidationError::new(
                        "spec.timeLimit",
                        t,
                        "a time limit under a second",
                        "write a limit such as 30m, 4h or 2d",
                    ));
                }
                Some(d.as_millis() as u64)
            }
        };
        let begin = spec
            .begin
            .as_deref()
            .map(|b| crate::batch::parse_begin("spec.begin", b))
            .transpose()?;
        let asked_array = spec
            .array
            .as_deref()
            .map(|a| crate::batch::parse_array("spec.array", a))
            .transpose()?;
        if asked_array.is_some() && elastic.is_some() {
            return Err(ValidationError::new(
                "spec.array",
                spec.array.clone().unwrap_or_default(),
                "an elastic job cannot be an array",
                "give the tasks a fixed number of replicas, or leave out spec.array",
            ));
        }
        let output_file = spec
            .output_file
            .as_deref()
            .map(|o| crate::batch::check_output("spec.outputFile", o))
            .transpose()?;
        if output_file.is_some()
            && (image.is_some() || checkpoint.as_ref().is_some_and(|c| c.transparent))
        {
            return Err(ValidationError::new(
                "spec.outputFile",
                spec.output_file.clone().unwrap_or_default(),
                "an output file is written for jobs run as processes, not yet for image jobs or \
                 transparent checkpoints",
                "read its output with `tessera logs`, or leave out spec.outputFile",
            ));
        }
        Ok(JobDef {
            output_file,
            after,
            time_limit_ms,
            begin,
            array: None,
            asked_array: asked_array.map(Box::new),
            asked_hold: spec.hold.unwrap_or(false),
            spec: job,
            image,
            command: spec.command,
            env: spec.env,
            restart,
            max_restarts,
            preemptible: spec.preemptible.unwrap_or(true),
            checkpoint: checkpoint.map(Box::new),
            elastic,
            interactive: spec.interactive.unwrap_or(false),
            wait_for_capacity: spec.wait_for_capacity.unwrap_or(false),
            volumes: Vec::new(),
            workdir: None,
            asked: AskedMounts {
                volumes: spec.volumes,
                workdir: spec.workdir,
                submit_dir: spec.submit_dir,
            },
        })
    }
}

impl JobDef {
    /// The manifest that makes this job again (`tessera get job ID -o yaml | tessera submit -f
    /// -`): camelCase, what the pool filled in written out (resolved volumes and working
    /// directory, the restart count), nothing of the pool's own (ids, state, the variables it
    /// sets). An array's first task gives the array; another task, a job of its own.
    pub fn to_manifest(&self, id: u64, held: bool) -> serde_json::Value {
        let r = &self.spec.request;
        let gpu = match r.gpu {
            GpuRequest::None => None,
            GpuRequest::Share { milli } => Some(Quantity::Number(f64::from(milli) / 1000.0)),
            GpuRequest::Whole { devices } => Some(Quantity::Number(f64::from(devices))),
        };
        let bytes = |b: u64| Quantity::Text(crate::units::bytes_text(b));
        let array = self.array.as_ref().filter(|t| t.id == id);
        let mut env = self.env.clone();
        if self.array.is_some() {
            env.retain(|k, _| !k.starts_with("TESSERA_ARRAY_") && !k.starts_with("SLURM_ARRAY_"));
        }
        let mut after = (Vec::new(), Vec::new(), Vec::new());
        for a in &self.after {
            match a.on {
                crate::batch::AfterKind::Start => after.0.push(a.job),
                crate::batch::AfterKind::Ok => after.1.push(a.job),
                crate::batch::AfterKind::Any => after.2.push(a.job),
            }
        }
        let spec = ManifestSpec {
            replicas: Some(match &self.elastic {
                Some(e) => Replicas::Range(ReplicaRange {
                    min: e.min,
                    max: e.max,
                }),
                None => Replicas::Count(self.spec.replicas),
            }),
            priority: Some(Priority::Number(self.spec.priority)),
            resources: Resources {
                gpu,
                gpu_memory: (r.gpu_memory_bytes > 0).then(|| bytes(r.gpu_memory_bytes)),
                cpu: Some(Quantity::Text(format!("{}m", r.cpu_milli))),
                memory: Some(bytes(r.memory_bytes)),
                device_models: r.device_models.clone(),
                node_selector: r.node_selector.clone(),
                gpu_attach: match r.gpu_attach {
                    GpuAttach::Local => None,
                    GpuAttach::Remote => Some("remote".into()),
                    GpuAttach::Any => Some("any".into()),
                },
            },
            image: self.image.clone(),
            command: self.command.clone(),
            env,
            // Without a restart block a job never restarts.
            restart: (self.restart == RestartPolicy::OnFailure).then_some(Restart {
                policy: self.restart,
                max_restarts: Some(self.max_restarts),
            }),
            preemptible: Some(self.preemptible),
            interactive: self.interactive.then_some(true),
            wait_for_capacity: self.wait_for_capacity.then_some(true),
            checkpoint: self.checkpoint.as_ref().map(|c| CheckpointManifest {
                mode: c.transparent.then(|| "transparent".into()),
                signal: (!c.transparent).then(|| c.signal_name.clone()),
                grace: Some(crate::units::duration_text(c.grace_ms)),
                interval: c.interval_ms.map(crate::units::duration_text),
            }),
            workdir: self.workdir.clone(),
            volumes: self
                .volumes
                .iter()
                .map(|v| match v.read_only {
                    true => format!("{}:ro", v.path),
                    false => v.path.clone(),
                })
                .collect(),
            submit_dir: None,
            service: None,
            array: array.map(|t| t.text.clone()),
            after: after.0,
            after_ok: after.1,
            after_any: after.2,
            time_limit: self.time_limit_ms.map(crate::units::duration_text),
            begin: self.begin.map(|b| match b {
                crate::batch::Begin::AtMs(t) => crate::controller::api::rfc3339(t),
                crate::batch::Begin::AfterMs(d) => format!("+{}", crate::units::duration_text(d)),
            }),
            hold: held.then_some(true),
            output_file: self.output_file.clone(),
        };
        let m = Manifest {
            api_version: Some("tessera/v1".into()),
            kind: Some("Job".into()),
            metadata: Metadata {
                name: self.spec.name.clone(),
                project: Some(self.spec.project.clone()),
            },
            spec,
            status: None,
        };
        let mut v = serde_json::to_value(m).unwrap_or_default();
        prune(&mut v);
        v
    }
}

/// Drops nulls, empty lists and empty maps: what a person would not write.
fn prune(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for x in m.values_mut() {
                prune(x);
            }
            m.retain(|_, x| match x {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            });
        }
        Value::Array(a) => a.iter_mut().for_each(prune),
        _ => {}
    }
}

/// An image reference as the registry protocol reads it (`[registry/]repository[:tag][@digest]`),
/// trimmed; refused with the form to write otherwise.
pub fn check_image(text: &str) -> Result<String, ValidationError> {
    let image = text.trim();
    let well_formed = !image.is_empty()
        && image.len() <= 512
        && !image.chars().any(|c| c.is_whitespace() || c.is_control())
        && image.parse::<oci_client::Reference>().is_ok();
    if !well_formed {
        return Err(ValidationError::new(
            "spec.image",
            text,
            "not an image reference",
            "write registry.example.com/team/train:1.0, or pin a digest with \
             @sha256:<64 hex digits>",
        ));
    }
    Ok(image.to_string())
}

/// Names of jobs, projects, users and nodes: what fits in a path, a label and a table cell.
pub fn check_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            name,
            "not a valid name",
            "use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a job's manifest says comes back as the same job: `tessera get job ID -o yaml |
    /// tessera submit -f -` makes the job again.
    #[test]
    fn a_jobs_manifest_makes_the_same_job_again() {
        for text in [
            "metadata: {name: a}\nspec: {command: [\"true\"]}",
            "metadata: {name: b, project: vision}\nspec:\n  command: [python3, t.py]\n  replicas: 4\n  priority: high\n  resources: {gpu: 2, gpuMemory: 20GiB, cpu: 2.5, memory: 1.5GiB, deviceModels: [H100-80GB], nodeSelector: {zone: a}}\n  env: {A: '1', B: x y}\n  restart: {policy: on-failure, maxRestarts: 5}\n  preemptible: false\n  checkpoint: {signal: TERM, grace: 90s, interval: 10m}\n  timeLimit: 4h\n  begin: '+2h'\n  afterOk: [3, 4]\n  after: [5]\n  afterAny: [6]\n  hold: true\n  interactive: true\n  waitForCapacity: true",
            "metadata: {name: c}\nspec:\n  image: registry.example.com/t/train:1.0\n  replicas: {min: 1, max: 8}\n  resources: {cpu: 250m}\n  checkpoint: {mode: transparent, grace: 1500ms}\n  begin: 2026-12-08T09:00:00Z",
            "metadata: {name: d}\nspec:\n  command: [sh]\n  resources: {gpu: 0.5, gpuAttach: any}",
        ] {
            let def = Manifest::parse(text).unwrap().into_def("default").unwrap();
            let exported = def.to_manifest(1, def.asked_hold);
            let again: Manifest = serde_json::from_value(exported.clone()).unwrap();
            let def2 = again.into_def("other").unwrap();
            assert_eq!(def, def2, "{text}\n{exported:#}");
            // What the pool adds is not written out; what a person would not write either.
            let yaml = serde_yaml::to_string(&exported).unwrap();
            assert!(
                !yaml.contains("null") && !yaml.contains("submitDir"),
                "{yaml}"
            );
        }
        // An array's first task gives the array, without the variables the pool sets; another
        // task, a job of its own.
        let mut def = Manifest::parse("metadata: {name: s}\nspec: {command: [x], array: 0-9%2}")
            .unwrap()
            .into_def("p")
            .unwrap();
        let asked = def.asked_array.take().unwrap();
        def.array = Some(Box::new(crate::batch::ArrayTask {
            id: 7,
            index: 0,
            count: 10,
            limit: asked.limit,
            text: asked.text,
        }));
        def.env.insert("TESSERA_ARRAY_INDEX".into(), "0".into());
        let first = def.to_manifest(7, false);
        assert_eq!(first["spec"]["array"], "0-9%2");
        assert!(first["spec"].get("env").is_none(), "{first}");
        assert!(def.to_manifest(8, false)["spec"].get("array").is_none());
        // A status, as `get` shows it, is ignored when submitted.
        let mut shown = first.clone();
        shown["status"] = serde_json::json!({"id": 7, "state": "running"});
        let m: Manifest = serde_json::from_value(shown).unwrap();
        assert!(m.into_def("p").is_ok());
    }

    const GOOD: &str = r#"
apiVersion: tessera/v1
kind: Job
metadata: {name: train, project: vision}
spec:
  replicas: 4
  priority: high
  resources: {gpu: 0.5, gpuMemory: 20GiB, cpu: 2, memory: 8GiB}
  command: [python, train.py]
  restart: {policy: on-failure}
"#;

    #[test]
    fn a_full_manifest_becomes_a_job() {
        let def = Manifest::parse(GOOD).unwrap().into_def("default").unwrap();
        assert_eq!(def.spec.project, "vision");
        assert_eq!(def.spec.priority, 75);
        assert_eq!(def.spec.replicas, 4);
        assert_eq!(def.spec.request.gpu, GpuRequest::Share { milli: 500 });
        assert_eq!(def.spec.request.gpu_memory_bytes, 20 << 30);
        assert_eq!(def.spec.request.cpu_milli, 2000);
        assert_eq!(def.restart, RestartPolicy::OnFailure);
        assert_eq!(def.max_restarts, DEFAULT_MAX_RESTARTS);
    }

    #[test]
    fn gpu_attach_is_one_of_three_words_and_refused_where_it_cannot_hold() {
        let with = |attach: &str, more: &str| {
            Manifest::parse(
                &GOOD
                    .replace(
                        "memory: 8GiB}",
                        &format!("memory: 8GiB, gpuAttach: {attach}}}"),
                    )
                    .replace("  restart:", &format!("{more}  restart:")),
            )
            .unwrap()
            .into_def("d")
        };
        for (word, want) in [
            ("local", GpuAttach::Local),
            ("remote", GpuAttach::Remote),
            ("any", GpuAttach::Any),
        ] {
            assert_eq!(with(word, "").unwrap().spec.request.gpu_attach, want);
        }
        let def = Manifest::parse(GOOD).unwrap().into_def("d").unwrap();
        assert_eq!(def.spec.request.gpu_attach, GpuAttach::Local, "the default");
        let err = with("network", "").unwrap_err();
        assert_eq!(err.field, "spec.resources.gpuAttach");
        assert!(err.to_string().contains("remote"), "{err}");
        let err = with("any", "  checkpoint: {mode: transparent}\n").unwrap_err();
        assert_eq!(err.field, "spec.checkpoint.mode");
        assert!(with("any", "  checkpoint: {signal: USR1}\n").is_ok());
        let elastic = Manifest::parse(
            &GOOD
                .replace("replicas: 4", "replicas: {min: 1, max: 3}")
                .replace("memory: 8GiB}", "memory: 8GiB, gpuAttach: remote}"),
        )
        .unwrap()
        .into_def("d")
        .unwrap_err();
        assert_eq!(elastic.field, "spec.resources.gpuAttach");
    }

    #[test]
    fn checkpoint_modes_are_checked() {
        let with = |c: &str| {
            Manifest::parse(&GOOD.replace("  restart:", &format!("  checkpoint: {c}\n  restart:")))
                .unwrap()
                .into_def("d")
        };
        let def = with("{mode: transparent, interval: 10m}").unwrap();
        let c = def.checkpoint.unwrap();
        assert!(c.transparent);
        assert_eq!(c.interval_ms, Some(600_000));
        assert!(!with("{}").unwrap().checkpoint.unwrap().transparent);
        let err = with("{mode: transparent, signal: USR2}").unwrap_err();
        assert_eq!(err.field, "spec.checkpoint.signal");
        let err = with("{mode: freeze}").unwrap_err();
        assert_eq!(err.field, "spec.checkpoint.mode");
        // An image job's container is saved by the runtime, without its GPU's state.
        let image = |resources: &str| {
            Manifest::parse(
                &GOOD
                    .replace(
                        "  restart:",
                        "  image: r.example/t:1\n  checkpoint: {mode: transparent}\n  restart:",
                    )
                    .replace(
                        "{gpu: 0.5, gpuMemory: 20GiB, cpu: 2, memory: 8GiB}",
                        resources,
                    ),
            )
            .unwrap()
            .into_def("d")
        };
        assert!(
            image("{cpu: 2, memory: 8GiB}")
                .unwrap()
                .checkpoint
                .unwrap()
                .transparent
        );
        let err = image("{gpu: 1, cpu: 2}").unwrap_err();
        assert_eq!(err.field, "spec.checkpoint.mode");
        assert!(err.to_string().contains("with GPUs"), "{err}");
    }

    #[test]
    fn replicas_are_a_number_or_an_elastic_range() {
        let with = |r: &str| {
            Manifest::parse(&GOOD.replace("replicas: 4", &format!("replicas: {r}")))
                .map_err(|e| e.to_string())
                .and_then(|m| m.into_def("d").map_err(|e| e.field))
        };
        let def = with("{min: 2, max: 6}").unwrap();
        assert_eq!(
            def.spec.replicas, 2,
            "an elastic job starts with its minimum"
        );
        assert_eq!(def.elastic, Some(Elastic { min: 2, max: 6 }));
        assert_eq!(with("3").unwrap().elastic, None);
        for bad in [
            "{min: 0, max: 2}",
            "{min: 3, max: 2}",
            "{min: 1, max: 5000}",
        ] {
            assert_eq!(with(bad).unwrap_err(), "spec.replicas", "{bad}");
        }
        assert!(with("{min: 1, most: 2}").is_err());
        let svc = Manifest::parse(
            "kind: Service\nmetadata: {name: s}\nspec: {replicas: {min: 1, max: 2}, command: [x]}",
        )
        .unwrap()
        .into_service("d")
        .unwrap_err();
        assert_eq!(svc.field, "spec.replicas");
    }

    #[test]
    fn unknown_fields_and_wrong_units_are_refused_with_the_field_named() {
        let err = Manifest::parse(&GOOD.replace("gpu: 0.5", "gpus: 0.5")).unwrap_err();
        assert!(err.contains("unknown field `gpus`"), "{err}");
        let err = Manifest::parse(&GOOD.replace("8GiB", "8 gigs"))
            .unwrap()
            .into_def("d")
            .unwrap_err();
        assert_eq!(err.field, "spec.resources.memory");
        let err = Manifest::parse(&GOOD.replace("gpu: 0.5", "gpu: 1.5"))
            .unwrap()
            .into_def("d")
            .unwrap_err();
        assert_eq!(err.field, "spec.resources.gpu");
        let err = Manifest::parse(&GOOD.replace("priority: high", "priority: urgent"))
            .unwrap()
            .into_def("d")
            .unwrap_err();
        assert_eq!(err.field, "spec.priority");
        let err = Manifest::parse(&GOOD.replace("[python, train.py]", "[]"))
            .unwrap()
            .into_def("d")
            .unwrap_err();
        assert_eq!(err.field, "spec.command");
    }
}
