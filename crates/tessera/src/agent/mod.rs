//! The node agent: registers the node, reports what runs, receives what should run, converges.
//!
//! Each replica runs under its own `tessera shim` (see [`shim`]) in its own session, so workloads
//! survive an agent restart and are re-adopted from their run directories: no orphan, no double
//! start. The agent keeps its credential and its workloads' records in its data dir.

pub mod cdi;
pub mod cgroup;
pub mod checkpoint;
pub mod confine;
pub mod container;
pub mod criu;
pub mod devices;
pub mod distributed;
pub mod exec;
pub mod gpu;
pub mod image;
pub mod logs;
pub mod shim;
pub mod telemetry;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::extract::{Path as AxPath, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::protocol::{
    Assignment, RegisterRequest, RegisterResponse, ReplicaStatus, RunPhase, SyncRequest,
    SyncResponse,
};
use cgroup::{Backend, Limits};

pub use crate::controller::now_ms;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub controller: String,
    pub join_token: Option<String>,
    pub name: String,
    pub data_dir: PathBuf,
    /// Where the agent serves logs to the controller.
    pub listen: std::net::SocketAddr,
    /// The address the controller should use for `listen` (defaults to it).
    pub advertise: Option<String>,
    pub devices: devices::Inventory,
    pub labels: BTreeMap<String, String>,
    pub cpu_milli: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub grace_ms: u64,
    /// How often devices and workloads are sampled.
    pub telemetry_ms: u64,
    pub ca_cert: Option<PathBuf>,
    /// Transparent checkpoints (CRIU), where this node can do them.
    pub transparent: Option<criu::Transparent>,
    /// How workloads are confined here (decided once at start).
    pub confinement: confine::Mode,
    /// Transparent replicas run as the agent's user: CRIU here cannot dump another uid's
    /// process, and the admin allowed unconfined work.
    pub transparent_unconfined: bool,
    /// More paths hidden from workloads besides the data dir (e.g. a controller's store).
    pub hide: Vec<PathBuf>,
    /// Most processes and threads per replica (`pids.max`).
    pub pids_max: u64,
    /// How long an ended replica's run dir is kept after the controller recorded its end.
    pub keep_runs: Duration,
    /// Most bytes of unpacked image layers kept (see [`image`]).
    pub image_cache: u64,
    /// Free space an unpack leaves on the image disk; `None` for the default share.
    pub image_reserve: Option<u64>,
    /// Registries reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// The OCI runtime that runs images (see [`container`]).
    pub runc: PathBuf,
    /// The CRIU the runtime checkpoints image jobs with, where this node has a working one.
    pub image_criu: Option<PathBuf>,
    /// On real GPUs: the driver described for containers (CDI), or why it could not be.
    pub gpu_driver: Option<Result<cdi::Spec, String>>,
    /// Tessera's Python helpers on this node (see [`distributed::python_dir`]).
    pub python_dir: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct Credential {
    node: String,
    controller: String,
    token: String,
}

/// A workload this agent knows about.
#[derive(Debug, Clone)]
struct Run {
    status: ReplicaStatus,
    shim_pid: Option<i32>,
}

struct Shared {
    runs: Mutex<BTreeMap<String, Run>>,
    exited: Notify,
    runs_dir: PathBuf,
    /// SHA-256 of what the controller shows when it calls (set at registration; the secret
    /// itself is never written to disk).
    callback_hash: std::sync::OnceLock<[u8; 32]>,
    /// The controller, for checkpoints (set once the agent has its credential).
    remote: std::sync::OnceLock<checkpoint::Remote>,
    /// The keys the controller last wanted here (a replica stopped while its checkpoint was
    /// being fetched does not start).
    wanted: Mutex<BTreeSet<String>>,
    /// The replica-set generation last written for each elastic replica.
    replica_sets: Mutex<BTreeMap<String, u64>>,
    /// What the controller last wanted here, by key (for sampling).
    assignments: Mutex<BTreeMap<String, Assignment>>,
    /// The newest sample of the devices and running replicas.
    sample: Mutex<Option<telemetry::Sample>>,
    /// Each project's workload uid on this node (when it confines).
    uids: Mutex<Option<confine::Uids>>,
    /// Most output kept per replica, as the controller last said.
    log_limit: std::sync::atomic::AtomicU64,
    /// The node's images.
    images: Arc<image::ImageStore>,
}

fn read_exit(dir: &Path) -> Option<shim::ExitRecord> {
    serde_json::from_slice(&std::fs::read(dir.join("exit")).ok()?).ok()
}

/// Whether `pid` is alive and is the shim of `key` (not a recycled pid).
fn is_our_shim(pid: i32, key: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let text = String::from_utf8_lossy(&c);
        text.contains("shim") && text.contains(key)
    }) && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // What the agent creates is its own (0600 files, 0700 directories) unless it opens a path
    // to workloads on purpose; each shim gives its workload the usual 022.
    // SAFETY: umask only sets the process's file mode mask.
    unsafe { libc::umask(0o077) };
    let root = config.data_dir.join("agent");
    let runs_dir = root.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .with_context(|| format!("creating {}", runs_dir.display()))?;
    // Others may pass through the data dir (to the simulated driver) but not list it; the
    // agent's own part (credential, run dirs) is its alone.
    crate::controller::restrict(&config.data_dir, 0o711)?;
    crate::controller::restrict(&root, 0o700)?;
    match &config.confinement {
        confine::Mode::Confined(_) => {
            tracing::info!("workloads: {}", config.confinement.describe())
        }
        m => tracing::warn!("workloads: {}", m.describe()),
    }
    let lease_file = root.join("lease");
    let backend = Backend::host();
    match &backend {
        Backend::None { why } => tracing::warn!(
            "workloads will run WITHOUT CPU, memory and pids limits: {why}. Run the agent as root \
             on a host with cgroup v2 (memory, cpu, pids controllers) or v1 hierarchies."
        ),
        b => tracing::info!("workload isolation: {}", b.name()),
    }
    let http = {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &config.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        b.build()?
    };
    let controllers = Arc::new(crate::endpoints::Endpoints::parse(
        "--join",
        &config.controller,
    )?);
    let cred_path = root.join("credential.json");
    let existing: Option<Credential> = std::fs::read(&cred_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|c: &Credential| {
            // The same pool: the credential names one of the controllers given now.
            c.node == config.name
                && crate::endpoints::Endpoints::parse("credential", &c.controller)
                    .is_ok_and(|theirs| theirs.overlaps(&controllers))
        });
    let shared = Arc::new(Shared {
        runs: Mutex::new(BTreeMap::new()),
        exited: Notify::new(),
        runs_dir: runs_dir.clone(),
        callback_hash: std::sync::OnceLock::new(),
        remote: std::sync::OnceLock::new(),
        wanted: Mutex::new(BTreeSet::new()),
        replica_sets: Mutex::new(BTreeMap::new()),
        assignments: Mutex::new(BTreeMap::new()),
        sample: Mutex::new(None),
        uids: Mutex::new(match &config.confinement {
            confine::Mode::Confined(range) => {
                Some(confine::Uids::load(root.join("uids.json"), *range)?)
            }
            _ => None,
        }),
        log_limit: std::sync::atomic::AtomicU64::new(logs::DEFAULT_LIMIT),
        images: Arc::new(image::ImageStore::open(
            &config.data_dir.join("images"),
            config.image_cache,
            config.image_reserve,
            config.insecure_registries.clone(),
        )?),
    });
    spawn_sampler(shared.clone(), config.clone(), backend.clone());

    // The log server, for the controller.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("agent listening on {}", config.listen))?;
    let local = listener.local_addr()?;
    let node = exec::Node {
        shared: shared.clone(),
        config: config.clone(),
        backend: backend.clone(),
    };
    let app = axum::Router::new()
        .route("/v1/logs/{key}", axum::routing::get(serve_logs))
        .with_state(shared.clone())
        .merge(
            axum::Router::new()
                .route("/v1/exec/{key}", axum::routing::get(exec::serve_exec))
                .route("/v1/forward/{key}", axum::routing::get(exec::serve_forward))
                .with_state(node),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let address = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));

    let (cpu_milli, memory_bytes) = devices::host_cpu_memory();
    let register = RegisterRequest {
        name: config.name.clone(),
        cpu_milli: config.cpu_milli.unwrap_or(cpu_milli),
        memory_bytes: config.memory_bytes.unwrap_or(memory_bytes),
        labels: {
            let mut labels = config.labels.clone();
            labels.extend(config.transparent.iter().flat_map(|t| t.labels()));
            if config.image_criu.is_some() {
                labels.insert(criu::IMAGES_LABEL.into(), "true".into());
            }
            labels
        },
        devices: config.devices.devices.clone(),
        simulated: config.devices.simulated,
        address,
        callback_secret: String::new(),
        confinement: if config.transparent_unconfined {
            format!(
                "{}; transparent (CRIU) replicas UNCONFINED, allowed by the admin",
                config.confinement.describe()
            )
        } else {
            config.confinement.describe()
        },
    };
    let (token, callback) = match existing {
        Some(c) => {
            let resp = register_anywhere(&http, &controllers, &c.token, &register)
                .await
                .map_err(|e| {
                    if e.to_string().contains("401") {
                        e.context(format!(
                            "the controller no longer accepts this node's credential (an admin \
                         replaced node {} or revoked it). To join again, remove {} and start \
                         the agent with a new join token (`tessera token create --join`); under \
                         `tessera up`, also remove {}",
                            config.name,
                            cred_path.display(),
                            config.data_dir.join("local-join-token").display()
                        ))
                    } else {
                        e
                    }
                })?;
            (resp.token.unwrap_or(c.token), resp.callback_secret)
        }
        None => {
            let Some(join) = &config.join_token else {
                bail!(
                    "this agent has not joined yet: give it a join token with --token (create one with `tessera token create --join`)"
                );
            };
            let resp = register_anywhere(&http, &controllers, join, &register).await?;
            let token = resp.token.context("the controller gave no credential")?;
            crate::controller::write_private(
                &cred_path,
                &serde_json::to_string(&Credential {
                    node: config.name.clone(),
                    controller: config.controller.clone(),
                    token: token.clone(),
                })?,
            )?;
            (token, resp.callback_secret)
        }
    };
    if callback.is_empty() {
        bail!("the controller gave no callback secret; run the same version of tessera on both");
    }
    {
        use sha2::Digest;
        let _ = shared
            .callback_hash
            .set(sha2::Sha256::digest(callback.as_bytes()).into());
    }
    tracing::info!("node {} registered with {}", config.name, config.controller);
    let _ = shared.remote.set(checkpoint::Remote {
        http: http.clone(),
        controllers: controllers.clone(),
        token: token.clone(),
    });

    adopt(&shared, &runs_dir);
    spawn_pruner(shared.clone(), config.clone(), backend.clone());
    let mut seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1);
    let mut revision = u64::MAX;
    let mut lease_ms = 10_000;
    let mut sample_sent = 0;
    loop {
        seq += 1;
        let (statuses, sample) = statuses_with_usage(&shared, config.devices.simulated);
        let sample = sample.filter(|s| s.at_ms > sample_sent);
        let sample_at = sample.as_ref().map(|s| s.at_ms);
        let req = SyncRequest {
            seq,
            revision,
            statuses,
            wait_ms: lease_ms / 3,
            sample,
            images: shared.images.held(512),
        };
        let sent = now_ms();
        let tried = controllers.current().to_string();
        // The long poll answers within `wait_ms`: a controller silent for half as long again
        // is stuck or paused, and another one given must be asked while the lease still holds.
        let call = post_once::<SyncResponse>(
            &http,
            &controllers,
            "/v1/agent/sync",
            &token,
            &req,
            Some(Duration::from_millis(
                req.wait_ms + (req.wait_ms / 2).max(1000),
            )),
        );
        let resp = tokio::select! {
            r = call => r,
            // A workload ended: report it at once rather than after the long poll.
            _ = shared.exited.notified() => continue,
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("sync with the controller failed: {:#}", e.error);
                // Another controller given is tried almost at once; the same one after a pause.
                let pause = if controllers.current() == tried {
                    300
                } else {
                    50
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
        };
        lease_ms = resp.lease_ms;
        if resp.log_limit_bytes >= logs::MIN_LIMIT {
            shared
                .log_limit
                .store(resp.log_limit_bytes, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(at) = sample_at {
            sample_sent = at;
        }
        // The lease counts from when the request left, so it ends before the controller's view.
        let _ = std::fs::write(
            lease_file.with_extension("tmp"),
            (sent + lease_ms).to_string(),
        )
        .and_then(|_| std::fs::rename(lease_file.with_extension("tmp"), &lease_file));
        revision = resp.revision;
        converge(&shared, &config, &backend, &lease_file, &resp);
    }
}

/// A call that failed: whether asking again (the same controller or the next) may help.
struct Failed {
    again: bool,
    error: anyhow::Error,
}

/// POSTs to the controller in use; when it cannot be reached, or does not answer in time, the
/// next call goes to the next controller given. One that answers 503 (between leaders, or its
/// store away for a moment) is alive and is asked again.
async fn post_once<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    controllers: &crate::endpoints::Endpoints,
    path: &str,
    token: &str,
    body: &impl Serialize,
    timeout: Option<Duration>,
) -> Result<T, Failed> {
    let base = controllers.current().to_string();
    let away = |error: anyhow::Error| {
        controllers.failed(&base);
        Failed { again: true, error }
    };
    let mut request = http.post(format!("{base}{path}")).bearer_auth(token);
    if let Some(t) = timeout {
        request = request.timeout(t);
    }
    let resp = request
        .json(body)
        .send()
        .await
        .map_err(|e| away(anyhow::Error::new(e).context(format!("calling {base}{path}"))))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let error = anyhow::anyhow!("{base}{path}: {status}: {text}");
        return Err(match status.as_u16() {
            502 | 504 => away(error),
            503 => Failed { again: true, error },
            _ => Failed {
                again: false,
                error,
            },
        });
    }
    resp.json().await.map_err(|e| Failed {
        again: false,
        error: e.into(),
    })
}

/// Registers with the first controller given that answers; one between leaders (503) is
/// asked again for up to half a minute.
async fn register_anywhere(
    http: &reqwest::Client,
    controllers: &crate::endpoints::Endpoints,
    token: &str,
    register: &RegisterRequest,
) -> anyhow::Result<RegisterResponse> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut unreachable = 0;
    loop {
        let base = controllers.current().to_string();
        let error = match post_once(
            http,
            controllers,
            "/v1/agent/register",
            token,
            register,
            None,
        )
        .await
        {
            Ok(resp) => return Ok(resp),
            Err(f) if !f.again => return Err(f.error),
            Err(f) => f.error,
        };
        // Every controller given unreachable in turn: none runs.
        unreachable = if controllers.current() != base {
            unreachable + 1
        } else {
            0
        };
        if unreachable >= controllers.all().len() || std::time::Instant::now() >= deadline {
            return Err(error.context(format!(
                "no controller of the pool answered (tried {controllers})"
            )));
        }
        if controllers.current() == base {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Re-adopts workloads from an earlier life of this agent.
fn adopt(shared: &Arc<Shared>, runs_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(runs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let key = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        if dir.join("acked").exists() {
            continue;
        }
        let status = match read_exit(&dir) {
            Some(exit) => Run {
                status: ReplicaStatus {
                    key: key.clone(),
                    phase: RunPhase::Exited,
                    exit_code: Some(exit.code),
                    interrupted: exit.interrupted,
                    message: exit.message,
                    resume_failed: None,
                    port: None,
                    usage: None,
                    image: None,
                },
                shim_pid: None,
            },
            None => {
                let pid = std::fs::read_to_string(dir.join("shim.pid"))
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok());
                match pid.filter(|p| is_our_shim(*p, &key)) {
                    Some(pid) => {
                        tracing::info!("re-adopted {key} (shim pid {pid})");
                        watch_adopted(shared.clone(), key.clone(), pid);
                        Run {
                            status: ReplicaStatus {
                                key: key.clone(),
                                phase: RunPhase::Running,
                                exit_code: None,
                                interrupted: false,
                                message: "running (re-adopted)".into(),
                                resume_failed: None,
                                port: std::fs::read_to_string(dir.join("port"))
                                    .ok()
                                    .and_then(|p| p.trim().parse().ok()),
                                usage: None,
                                image: None,
                            },
                            shim_pid: Some(pid),
                        }
                    }
                    None => Run {
                        status: ReplicaStatus {
                            key: key.clone(),
                            phase: RunPhase::Exited,
                            exit_code: None,
                            interrupted: true,
                            message: "its supervisor was lost while the agent was down".into(),
                            resume_failed: None,
                            port: None,
                            usage: None,
                            image: None,
                        },
                        shim_pid: None,
                    },
                }
            }
        };
        shared
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, status);
    }
}

fn finish(shared: &Shared, key: &str) {
    let dir = shared.runs_dir.join(key);
    let exit = read_exit(&dir).unwrap_or(shim::ExitRecord {
        code: -1,
        message: "its supervisor ended without a record".into(),
        interrupted: true,
    });
    if let Some(run) = shared
        .runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(key)
    {
        run.status.phase = RunPhase::Exited;
        run.status.exit_code = Some(exit.code);
        run.status.interrupted = exit.interrupted;
        run.status.message = exit.message;
        run.shim_pid = None;
    }
    shared.exited.notify_one();
}

fn watch_adopted(shared: Arc<Shared>, key: String, pid: i32) {
    tokio::spawn(async move {
        while is_our_shim(pid, &key) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        finish(&shared, &key);
    });
}

/// Once a minute (and at start): removes the run dirs of replicas whose end the controller
/// recorded (`acked`) longer ago than `--keep-runs`, so that output of ended work does not fill
/// the node's disk; and the cgroups of this agent that belong to no running replica (left by a
/// fork-heavy workload that outlived the first removal, or by an agent that died).
fn spawn_pruner(shared: Arc<Shared>, config: AgentConfig, backend: Backend) {
    let keep = config.keep_runs;
    tokio::spawn(async move {
        loop {
            let (shared, config, backend) = (shared.clone(), config.clone(), backend.clone());
            let _ = tokio::task::spawn_blocking(move || {
                prune_runs(&shared.runs_dir, keep);
                sweep_cgroups(&shared, &config, &backend);
            })
            .await;
            tokio::time::sleep(Duration::from_secs(60).min(keep.max(Duration::from_secs(1)))).await;
        }
    });
}

fn sweep_cgroups(shared: &Shared, config: &AgentConfig, backend: &Backend) {
    let prefix = cgroup_name(config, "");
    // Held while sweeping: a replica being started holds it too, so its new cgroup is not taken
    // for a stale one.
    let runs = shared.runs.lock().unwrap_or_else(|e| e.into_inner());
    for name in backend.named(&prefix) {
        let key = &name[prefix.len()..];
        let live = runs
            .get(key)
            .is_some_and(|r| r.status.phase == RunPhase::Running);
        if !live {
            if backend.remove(&name) {
                tracing::info!("removed the stale cgroup {name}");
            } else {
                tracing::warn!("the stale cgroup {name} could not be removed");
            }
        }
    }
}

fn prune_runs(runs_dir: &Path, keep: Duration) {
    let Ok(entries) = std::fs::read_dir(runs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let ended = entry
            .path()
            .join("acked")
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if ended.is_some_and(|age| age >= keep) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!("removed the run dir of {:?}", entry.file_name()),
                Err(e) => tracing::warn!("{}: not removed: {e}", entry.path().display()),
            }
        }
    }
}

/// Samples devices and running replicas every `telemetry_ms`, on a thread of its own (NVML
/// calls block).
fn spawn_sampler(shared: Arc<Shared>, config: AgentConfig, backend: Backend) {
    let spawned = std::thread::Builder::new()
        .name("tessera-telemetry".into())
        .spawn(move || {
            let mut sampler = telemetry::Sampler::new(&config);
            loop {
                let running: Vec<Assignment> = {
                    let runs = shared.runs.lock().unwrap_or_else(|e| e.into_inner());
                    let wanted = shared.assignments.lock().unwrap_or_else(|e| e.into_inner());
                    wanted
                        .values()
                        .filter(|a| {
                            runs.get(&a.key)
                                .is_some_and(|r| r.status.phase == RunPhase::Running)
                        })
                        .cloned()
                        .collect()
                };
                let sample =
                    sampler.sample(&config, &backend, &shared.runs_dir, &running, now_ms());
                *shared.sample.lock().unwrap_or_else(|e| e.into_inner()) = Some(sample);
                std::thread::sleep(Duration::from_millis(config.telemetry_ms));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no telemetry: {e}");
    }
}

/// What to report: every run's status with its latest use (an ended run: its final energy
/// count), and the newest device sample.
fn statuses_with_usage(
    shared: &Shared,
    simulated: bool,
) -> (Vec<ReplicaStatus>, Option<crate::protocol::NodeSample>) {
    let latest = shared.sample.lock().unwrap_or_else(|e| e.into_inner());
    let runs = shared.runs.lock().unwrap_or_else(|e| e.into_inner());
    let statuses = runs
        .values()
        .map(|r| {
            let mut st = r.status.clone();
            st.usage = match st.phase {
                RunPhase::Preparing => None,
                RunPhase::Running => latest
                    .as_ref()
                    .and_then(|s| s.replicas.get(&st.key))
                    .cloned(),
                RunPhase::Exited => Some(crate::protocol::ReplicaUsage {
                    energy_mj: telemetry::read_energy(&shared.runs_dir.join(&st.key)) as u64,
                    simulated,
                    ..Default::default()
                }),
            };
            st
        })
        .collect();
    (statuses, latest.as_ref().map(|s| s.node.clone()))
}

fn converge(
    shared: &Arc<Shared>,
    config: &AgentConfig,
    backend: &Backend,
    lease_file: &Path,
    resp: &SyncResponse,
) {
    let want: BTreeSet<&str> = resp.desired.iter().map(|a| a.key.as_str()).collect();
    let mut runs = shared.runs.lock().unwrap_or_else(|e| e.into_inner());
    for key in &resp.acked {
        if runs
            .get(key)
            .is_some_and(|r| r.status.phase == RunPhase::Exited)
        {
            runs.remove(key);
            let _ = std::fs::write(shared.runs_dir.join(key).join("acked"), "");
            let bundle = container::bundle_dir(&config.data_dir, key);
            if bundle.exists() {
                let state = config.data_dir.join("agent").join("runc");
                let id = format!("tessera-{}", cgroup_name(config, key));
                container::remove(&config.runc, &state, &bundle, &id);
            }
            if !backend.remove(&cgroup_name(config, key)) {
                tracing::warn!("{key}: its cgroup could not be removed yet; retried later");
            }
            gpu::forget(config, key);
        }
    }
    // Stop what should not run.
    for (key, run) in runs.iter() {
        if run.status.phase == RunPhase::Running
            && !want.contains(key.as_str())
            && let Some(pid) = run.shim_pid
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    *shared.wanted.lock().unwrap_or_else(|e| e.into_inner()) =
        want.iter().map(|k| k.to_string()).collect();
    *shared.assignments.lock().unwrap_or_else(|e| e.into_inner()) = resp
        .desired
        .iter()
        .map(|a| (a.key.clone(), a.clone()))
        .collect();
    // Tell running elastic replicas that their replica set changed.
    {
        let mut written = shared
            .replica_sets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        written.retain(|key, _| want.contains(key.as_str()));
        for a in &resp.desired {
            let Some(set) = &a.elastic else { continue };
            if !runs.contains_key(&a.key) || written.get(&a.key) == Some(&set.generation) {
                continue;
            }
            match write_replica_set(&shared.runs_dir.join(&a.key), set) {
                Ok(()) => {
                    written.insert(a.key.clone(), set.generation);
                }
                Err(e) => tracing::warn!("{}: replica set not written: {e}", a.key),
            }
        }
    }
    // Start what should, once: a key with a run directory was started before.
    for a in &resp.desired {
        let dir = shared.runs_dir.join(&a.key);
        if runs.contains_key(&a.key) {
            continue;
        }
        if dir.exists() {
            // This node ran that replica key to its end before: the controller's store was
            // restored from an older copy. Never run a key twice; the job goes on under a new
            // attempt (a new key).
            tracing::warn!("{}: this key already ran here; reported back", a.key);
            let mut run = without_shim(
                &a.key,
                RunPhase::Exited,
                "this node already ran this replica key (the pool's store was restored from an \
                 older copy?)",
            );
            run.status.interrupted = true;
            runs.insert(a.key.clone(), run);
            shared.exited.notify_one();
            continue;
        }
        let fetch = a.checkpoint.is_some() && a.resume.is_some() && shared.remote.get().is_some();
        if a.image.is_some() || fetch {
            // A pull or a checkpoint's fetch can take minutes: it runs beside the sync loop,
            // which must keep renewing the lease meanwhile; the replica says what it waits for.
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::warn!("{}: {e}", a.key);
                continue;
            }
            let waiting = match &a.image {
                Some(img) => without_shim(
                    &a.key,
                    RunPhase::Preparing,
                    &format!("pulling image {}", img.reference),
                ),
                None => without_shim(&a.key, RunPhase::Running, "restoring its checkpoint"),
            };
            runs.insert(a.key.clone(), waiting);
            let (shared, config, backend) = (shared.clone(), config.clone(), backend.clone());
            let (lease_file, a) = (lease_file.to_path_buf(), a.clone());
            tokio::spawn(async move {
                let run =
                    prepare_and_start(&shared, &config, &backend, &lease_file, &a, &dir).await;
                shared
                    .runs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(a.key.clone(), run);
                shared.exited.notify_one();
            });
            continue;
        }
        let run = started(
            &a.key,
            start(
                shared,
                config,
                backend,
                lease_file,
                a,
                &dir,
                Prepared {
                    restored: Restored::None,
                    image: None,
                },
            ),
        );
        runs.insert(a.key.clone(), run);
    }
}

/// Pulls a replica's image and fetches its checkpoint, as it has them, then starts it unless it
/// was stopped meanwhile; the run record to keep.
async fn prepare_and_start(
    shared: &Arc<Shared>,
    config: &AgentConfig,
    backend: &Backend,
    lease_file: &Path,
    a: &Assignment,
    dir: &Path,
) -> Run {
    let pulled = match &a.image {
        None => None,
        Some(img) => match prepare_image(shared, a, dir).await {
            Ok(pulled) => Some(pulled),
            Err(e) => {
                let message = format!("could not pull image {}: {e:#}", img.reference);
                let mut run = without_shim(&a.key, RunPhase::Exited, &message);
                run.status.exit_code = Some(127);
                let _ = logs::note(dir, &message);
                return run;
            }
        },
    };
    let restored = match (&a.checkpoint, &a.resume, shared.remote.get()) {
        (Some(_), Some(id), Some(remote)) => fetch_checkpoint(remote, a, id, dir).await,
        _ => Restored::None,
    };
    let wanted = shared
        .wanted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&a.key);
    if !wanted {
        return without_shim(&a.key, RunPhase::Exited, "stopped before it started");
    }
    let prepared = Prepared {
        restored,
        image: pulled.as_ref(),
    };
    let mut run = started(
        &a.key,
        start(shared, config, backend, lease_file, a, dir, prepared),
    );
    run.status.image = pulled.map(|p| p.note);
    run
}

/// Fetches the checkpoint `id` a replica resumes from into its run dir.
async fn fetch_checkpoint(
    remote: &checkpoint::Remote,
    a: &Assignment,
    id: &str,
    dir: &Path,
) -> Restored {
    let into = dir.join("resume");
    match checkpoint::restore(remote, id, &into).await {
        Ok(()) => Restored::From(into),
        Err(e) => {
            tracing::warn!("{}: checkpoint {id} not restored: {e:#}", a.key);
            let _ = std::fs::remove_dir_all(&into);
            Restored::Failed(id.to_string())
        }
    }
}

/// The file in a run dir that names the image a replica runs (its layers stay in use).
const IMAGE_FILE: &str = "image.json";

/// Pulls a replica's image, saying how far it got in its status and its log, then collects
/// layers no replica here uses past the cache's limit.
async fn prepare_image(
    shared: &Arc<Shared>,
    a: &Assignment,
    dir: &Path,
) -> anyhow::Result<image::Pulled> {
    let img = a.image.as_ref().context("no image")?;
    let began = std::time::Instant::now();
    let (key, reference) = (a.key.clone(), img.reference.clone());
    let _ = logs::note(dir, &format!("pulling image {reference}"));
    let said = Mutex::new(std::time::Instant::now());
    let progress = {
        let (shared, dir) = (shared.clone(), dir.to_path_buf());
        move |p: image::Progress| {
            let mut last = said.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < Duration::from_millis(500) && p.done_bytes < p.total_bytes {
                return;
            }
            *last = std::time::Instant::now();
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let text = format!(
                "pulling image {reference} ({:.1} of {:.1} MiB, {} layer(s) left)",
                mib(p.done_bytes),
                mib(p.total_bytes),
                p.layers_left
            );
            if let Some(run) = shared
                .runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&key)
                .filter(|r| r.status.phase == RunPhase::Preparing)
            {
                run.status.message = text.clone();
            }
            let _ = logs::note(&dir, &text);
        }
    };
    let mut pulled = shared
        .images
        .pull(&img.reference, img.credentials.as_ref(), progress)
        .await?;
    pulled.note = format!(
        "{} as {} (ready in {:.1} s)",
        img.reference,
        pulled.resolved,
        began.elapsed().as_secs_f64()
    );
    let _ = logs::note(dir, &format!("pulled {}", pulled.note));
    crate::controller::write_file(
        &dir.join(IMAGE_FILE),
        &serde_json::to_string(&pulled)?,
        false,
    )?;
    let in_use = images_in_use(shared);
    let images = shared.images.clone();
    let removed = tokio::task::spawn_blocking(move || images.collect(&in_use, now_ms())).await?;
    if !removed.is_empty() {
        tracing::info!(
            "image cache: removed {} layer(s) past its limit",
            removed.len()
        );
    }
    Ok(pulled)
}

/// The layers of the images of every replica this agent has not finished with.
fn images_in_use(shared: &Shared) -> BTreeSet<String> {
    let keys: Vec<String> = shared
        .runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    keys.iter()
        .filter_map(|k| std::fs::read(shared.runs_dir.join(k).join(IMAGE_FILE)).ok())
        .filter_map(|b| serde_json::from_slice::<image::Pulled>(&b).ok())
        .flat_map(|p| p.layers)
        .collect()
}

/// The run record of a replica that has no shim (yet, or at all).
fn without_shim(key: &str, phase: RunPhase, message: &str) -> Run {
    Run {
        status: ReplicaStatus {
            key: key.to_string(),
            phase,
            exit_code: None,
            interrupted: false,
            message: message.to_string(),
            resume_failed: None,
            port: None,
            usage: None,
            image: None,
        },
        shim_pid: None,
    }
}

/// The run record of a replica whose start returned `result`.
fn started(key: &str, result: anyhow::Result<Started>) -> Run {
    match result {
        Ok(Started {
            shim_pid: pid,
            resume_failed,
            port,
        }) => Run {
            status: ReplicaStatus {
                key: key.to_string(),
                phase: RunPhase::Running,
                exit_code: None,
                interrupted: false,
                message: "running".into(),
                resume_failed,
                port,
                usage: None,
                image: None,
            },
            shim_pid: Some(pid),
        },
        Err(e) => {
            tracing::warn!("starting {key} failed: {e:#}");
            // A full disk is the node's problem, not the workload's: it is queued again.
            let interrupted = e
                .chain()
                .filter_map(|c| c.downcast_ref::<std::io::Error>())
                .any(shim::out_of_space);
            Run {
                status: ReplicaStatus {
                    key: key.to_string(),
                    phase: RunPhase::Exited,
                    exit_code: Some(127),
                    interrupted,
                    message: format!("could not start: {e:#}"),
                    resume_failed: None,
                    port: None,
                    usage: None,
                    image: None,
                },
                shim_pid: None,
            }
        }
    }
}

/// A replica whose shim runs.
struct Started {
    shim_pid: i32,
    /// The checkpoint that failed its check (the replica started from the beginning).
    resume_failed: Option<String>,
    /// A service replica's port.
    port: Option<u16>,
}

/// A port for a service replica: the one it asked for, or one free on the agent's address. A
/// fixed port must be free here now: the gateway routes to this address and port, so a port
/// that something else listens on (the controller's API, another replica) would hand that
/// listener to whoever calls the service.
fn service_port(ip: std::net::IpAddr, wanted: u16) -> anyhow::Result<u16> {
    if wanted != 0 && wanted < 1024 {
        bail!("port {wanted}: a workload cannot listen below 1024; use 1024-65535 or auto");
    }
    let l = std::net::TcpListener::bind((ip, wanted)).with_context(|| match wanted {
        0 => "finding a free port for a service replica".to_string(),
        p => format!("port {p} is taken on this node ({ip}); choose another or use auto"),
    })?;
    Ok(l.local_addr()?.port())
}

/// What became of a replica's checkpoint before it started.
/// What was made ready for a replica before its start.
struct Prepared<'a> {
    restored: Restored,
    /// The image it runs in, pulled.
    image: Option<&'a image::Pulled>,
}

enum Restored {
    /// None to restore.
    None,
    /// Restored and verified in this directory.
    From(PathBuf),
    /// This checkpoint failed its check: start from the beginning, and say so.
    Failed(String),
}

/// A replica's cgroup name: unique per agent, since several agents may share a host (and a parent
/// cgroup), and the shim kills every process in its cgroup. The node name alone is not enough:
/// agents of two pools on one host may both be `n1`, and then one pool's job 2 would kill the
/// other's. The agent's data dir is unique on the host and survives restarts (re-adoption).
/// The file in a replica's run directory that holds its elastic job's replica set.
const REPLICA_SET_FILE: &str = "replicas.json";

/// Replaces the replica-set file whole (write, then rename), so a reader never sees half of it.
fn write_replica_set(dir: &Path, set: &crate::protocol::ReplicaSet) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join(format!("{REPLICA_SET_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(set)?)?;
    // The workload reads it (the agent's umask would make it private).
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, dir.join(REPLICA_SET_FILE))
}

fn cgroup_name(config: &AgentConfig, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let dir = std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    format!("{}-{}_{key}", config.name, hex::encode(&digest[..4]))
}

/// The uid a replica runs as here, `None` where the admin allowed unconfined work; an error
/// (the replica is refused) where the node cannot confine it.
fn workload_uid(
    shared: &Shared,
    config: &AgentConfig,
    a: &Assignment,
) -> anyhow::Result<Option<u32>> {
    match &config.confinement {
        confine::Mode::Refused { why } => bail!(
            "this node cannot confine workloads, so it runs none: {why}. Run the agent as root \
             on a host with namespaces, or let the node run unconfined work with \
             `--allow-unconfined` (then shown in `tessera nodes`)"
        ),
        confine::Mode::Unconfined { .. } => Ok(None),
        confine::Mode::Confined(range)
            if a.uid
                .is_some_and(|u| (range.first..=range.last).contains(&u)) =>
        {
            bail!(
                "the job's owner is mapped to uid {}, inside this node's --workload-uids {}-{} (the \
             projects' uids); map users to uids outside it",
                a.uid.unwrap_or_default(),
                range.first,
                range.last
            )
        }
        confine::Mode::Confined(_) if a.uid.is_some() => Ok(a.uid),
        confine::Mode::Confined(_) => {
            let mut uids = shared.uids.lock().unwrap_or_else(|e| e.into_inner());
            let uids = uids.as_mut().context("the agent has no workload uids")?;
            Ok(Some(uids.of(&a.project)?))
        }
    }
}

/// Refuses volumes this node cannot give as asked: one missing here, one inside what the agent
/// hides (its data dir), or, for a confined replica without a mount namespace (`transparent`),
/// any volume to keep read-only or to hide, which it could not enforce.
fn check_volumes(config: &AgentConfig, a: &Assignment, transparent: bool) -> anyhow::Result<()> {
    for v in &a.volumes {
        let path = Path::new(&v.path);
        if !path.is_dir() {
            bail!(
                "volume {} is not a directory on node {}; create it there, or take it out of                  project {}'s volumes",
                v.path,
                config.name,
                a.project
            );
        }
        let real = std::fs::canonicalize(path)?;
        let secret = std::iter::once(&config.data_dir)
            .chain(&config.hide)
            .find(|h| {
                real.starts_with(std::fs::canonicalize(h).unwrap_or_else(|_| h.to_path_buf()))
            });
        if let Some(h) = secret {
            bail!(
                "volume {} lies inside {}, which this node hides from every workload",
                v.path,
                h.display()
            );
        }
    }
    let enforced = a.volumes.iter().any(|v| v.read_only) || !a.hidden_volumes.is_empty();
    if transparent && enforced {
        bail!(
            "a transparent checkpoint runs without a mount namespace, so this node could not keep              read-only volumes read-only or hide other projects' volumes ({}); use a cooperative              checkpoint",
            a.hidden_volumes.join(", ")
        );
    }
    Ok(())
}

/// A path as an environment variable's value.
fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The environment of one replica's allocation.
pub fn allocation_env(a: &Assignment, node: &str) -> BTreeMap<String, String> {
    let mut env = a.env.clone();
    // Python's output reaches the logs as it is written, in order with stderr (a pipe would
    // make it block-buffered); the job may say otherwise.
    env.entry("PYTHONUNBUFFERED".into())
        .or_insert_with(|| "1".into());
    env.insert("TESSERA_JOB_ID".into(), a.job_id.to_string());
    env.insert("TESSERA_JOB_NAME".into(), a.job_name.clone());
    env.insert("TESSERA_PROJECT".into(), a.project.clone());
    env.insert("TESSERA_REPLICA".into(), a.replica.to_string());
    env.insert("TESSERA_REPLICAS".into(), a.replicas.to_string());
    env.insert("TESSERA_ATTEMPT".into(), a.attempt.to_string());
    env.insert("TESSERA_NODE".into(), node.to_string());
    env.insert("TESSERA_CPU_MILLI".into(), a.cpu_milli.to_string());
    env.insert("TESSERA_MEMORY_BYTES".into(), a.memory_bytes.to_string());
    if let Some(d) = a.devices.first() {
        let share = d.milli < 1000;
        env.insert("TESSERA_GPU_MILLI".into(), d.milli.to_string());
        env.insert(
            "TESSERA_COMPUTE_SHARE".into(),
            format!("{:.3}", f64::from(d.milli) / 1000.0),
        );
        env.insert(
            "TESSERA_GPU_MEMORY_BYTES".into(),
            d.memory_bytes.to_string(),
        );
        env.insert(
            "TESSERA_SLICE".into(),
            if share { "fraction" } else { "whole" }.into(),
        );
    } else {
        env.insert("TESSERA_GPU_MILLI".into(), "0".into());
    }
    env
}

fn start(
    shared: &Arc<Shared>,
    config: &AgentConfig,
    backend: &Backend,
    lease_file: &Path,
    a: &Assignment,
    dir: &Path,
    prepared: Prepared,
) -> anyhow::Result<Started> {
    let Prepared { restored, image } = prepared;
    // The workload passes through its run dir to its work, checkpoint and temp dirs (its own);
    // it cannot list it, and the agent's files in it are 0600.
    crate::controller::restrict(dir, 0o711)?;
    // Kept for re-adoption and people; a registry password is not written down.
    let mut kept = a.clone();
    if let Some(img) = kept.image.as_mut() {
        img.credentials = None;
    }
    crate::controller::write_file(
        &dir.join("assignment.json"),
        &serde_json::to_string(&kept)?,
        false,
    )?;
    let transparent = a.checkpoint.as_ref().is_some_and(|c| c.transparent);
    // An image's container is checkpointed by the runtime, confined like any other.
    let uid = if transparent && config.transparent_unconfined && image.is_none() {
        None
    } else {
        workload_uid(shared, config, a)?
    };
    let cg = cgroup_name(config, &a.key);
    let procs = backend
        .create(
            &cg,
            Limits {
                cpu_milli: a.cpu_milli,
                memory_bytes: a.memory_bytes.max(16 << 20),
                pids: config.pids_max,
            },
        )
        .unwrap_or_else(|e| {
            tracing::warn!(
                "cgroup for {} not created, running without limits: {e:#}",
                a.key
            );
            vec![]
        });
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("shim")
        .arg("--run-dir")
        .arg(dir)
        .arg("--lease-file")
        .arg(lease_file)
        .arg("--grace-ms")
        .arg(
            a.checkpoint
                .as_ref()
                .map_or(config.grace_ms, |c| c.grace_ms)
                .to_string(),
        )
        .arg("--stop-signal")
        .arg(a.checkpoint.as_ref().map_or(15, |c| c.signal).to_string())
        .arg("--log-limit")
        .arg(
            shared
                .log_limit
                .load(std::sync::atomic::Ordering::Relaxed)
                .to_string(),
        );
    for p in &procs {
        cmd.arg("--cgroup-procs").arg(p);
    }
    let oom_file = match backend {
        Backend::V2 { base } => Some(base.join(&cg).join("memory.events")),
        Backend::V1 { memory, .. } => Some(memory.join(&cg).join("memory.oom_control")),
        Backend::None { .. } => None,
    };
    if let Some(f) = oom_file {
        cmd.arg("--oom-file").arg(f);
    }
    if let Some(f) = gpu::lost_device_file(config, a) {
        cmd.arg("--device-lost-file").arg(f);
    }
    // The workload's environment, beside the shim's options.
    let mut wenv: BTreeMap<String, String> = BTreeMap::new();
    let mut resume_failed = None;
    let mut resume_from = None;
    match restored {
        Restored::None => {}
        Restored::From(into) => resume_from = Some(into),
        Restored::Failed(id) => resume_failed = Some(id),
    }
    // A cooperative job reads its checkpoint itself; a container's stays the runtime's (root's).
    if let (Some(uid), Some(from), false) = (uid, &resume_from, transparent && image.is_some()) {
        confine::own_tree(from, uid)?;
    }
    if let Some(c) = &a.checkpoint {
        let ckpt = dir.join("checkpoint");
        std::fs::create_dir_all(&ckpt)?;
        // The program writes cooperative checkpoints itself; CRIU (root) writes transparent ones.
        if let (Some(uid), false) = (uid, c.transparent) {
            confine::own(&ckpt, uid)?;
        }
        if c.transparent && image.is_some() {
            // The runtime saves and restores the container (below); the program is told nothing.
        } else if c.transparent {
            // The shim saves and restores the whole tree; the program is told nothing.
            let t = config.transparent.as_ref().context(
                "this node cannot checkpoint transparently (no working CRIU 4.x; see the agent's log)",
            )?;
            cmd.arg("--criu")
                .arg(&t.criu)
                .arg("--home")
                .arg(t.home(a.job_id, a.replica))
                .arg("--checkpoint-dir")
                .arg(&ckpt);
            if let (Some(p), false) = (&t.cuda_plugins, a.devices.is_empty()) {
                cmd.arg("--criu-plugins").arg(p);
            }
            if let Some(i) = c.interval_ms {
                cmd.arg("--checkpoint-interval-ms").arg(i.to_string());
            }
            if let Some(from) = &resume_from {
                cmd.arg("--restore-from").arg(from);
            }
        } else {
            if let Some(from) = &resume_from {
                wenv.insert("TESSERA_RESUME_FROM".into(), path_text(from));
            }
            wenv.insert("TESSERA_CHECKPOINT_DIR".into(), path_text(&ckpt));
            wenv.insert("TESSERA_CHECKPOINT_SIGNAL".into(), c.signal_name.clone());
            if let Some(i) = c.interval_ms {
                wenv.insert(
                    "TESSERA_CHECKPOINT_INTERVAL".into(),
                    (i / 1000).max(1).to_string(),
                );
            }
        }
    }
    let mut device_env = gpu::device_env(config, a)?;
    let command = gpu::command(config, a, &mut device_env)?;
    check_volumes(config, a, uid.is_some() && transparent && image.is_none())?;
    if let (Some(dir), None) = (&a.workdir, image) {
        cmd.arg("--workdir").arg(dir);
    }
    if let (Some(file), None) = (&a.output_file, image) {
        cmd.arg("--output-file").arg(file);
    }
    // An image's container is confined by the runtime (below), not by the shim.
    if let (Some(uid), None) = (uid, image) {
        cmd.arg("--uid").arg(uid.to_string());
        // CRIU would have to dump and restore the namespaces with their mounts.
        if !transparent {
            let tmp = dir.join("tmp");
            std::fs::create_dir_all(&tmp)?;
            confine::own(&tmp, uid)?;
            cmd.arg("--namespaces").arg("--private-tmp").arg(&tmp);
            // Its home is its own work dir, not the agent's (a program that keeps files in
            // ~/.local or ~/.cache, as Jupyter and pip do, could not write the agent's).
            if !a.env.contains_key("HOME") {
                let work = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
                wenv.insert("HOME".into(), path_text(&work.join("work")));
            }
            for m in std::iter::once(&config.data_dir).chain(&config.hide) {
                cmd.arg("--mask").arg(m);
            }
            cmd.arg("--expose").arg(dir);
            for p in gpu::confined_paths(config, &device_env, uid)? {
                cmd.arg("--expose").arg(p);
            }
            for hidden in &a.hidden_volumes {
                cmd.arg("--mask").arg(hidden);
            }
            for v in &a.volumes {
                cmd.arg("--expose").arg(&v.path);
                if v.read_only {
                    cmd.arg("--read-only").arg(&v.path);
                }
            }
        }
    }
    wenv.extend(allocation_env(a, &config.name));
    if let Some(r) = distributed::rendezvous_of(a, &config.name) {
        if a.rendezvous.is_some() && distributed::place(&r, a.replica).is_some_and(|p| p.rank == 0)
        {
            distributed::check_port(&r)?;
        }
        wenv.extend(distributed::env(a, &r, config.python_dir.as_deref()));
        let hostfile = distributed::write_hostfile(dir, &r, uid)?;
        let hostfile = std::fs::canonicalize(&hostfile).unwrap_or(hostfile);
        wenv.insert("TESSERA_HOSTFILE".into(), path_text(&hostfile));
    }
    if let Some(set) = &a.elastic {
        write_replica_set(dir, set)?;
        shared
            .replica_sets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(a.key.clone(), set.generation);
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        wenv.insert(
            "TESSERA_REPLICA_SET_FILE".into(),
            path_text(&dir.join(REPLICA_SET_FILE)),
        );
        wenv.insert("TESSERA_REPLICAS_MIN".into(), set.min.to_string());
        wenv.insert("TESSERA_REPLICAS_MAX".into(), set.max.to_string());
    }
    let port = match a.port {
        Some(wanted) => {
            let port = service_port(config.listen.ip(), wanted)?;
            std::fs::write(dir.join("port"), port.to_string())?;
            wenv.insert("PORT".into(), port.to_string());
            wenv.insert("TESSERA_PORT".into(), port.to_string());
            wenv.insert("TESSERA_HOST".into(), config.listen.ip().to_string());
            Some(port)
        }
        None => None,
    };
    let binds: Vec<container::Bind> = match (image, uid) {
        (Some(_), _) => gpu::confined_paths(config, &device_env, uid.unwrap_or(0))?
            .into_iter()
            .map(|path| container::Bind {
                path,
                read_only: false,
            })
            .chain(
                gpu::library_files(config, &device_env)
                    .into_iter()
                    .map(|path| container::Bind {
                        path,
                        read_only: true,
                    }),
            )
            .chain(a.volumes.iter().map(|v| container::Bind {
                path: PathBuf::from(&v.path),
                read_only: v.read_only,
            }))
            // An elastic replica's torchrun follows its set through Tessera's Python helpers.
            .chain(
                a.elastic
                    .as_ref()
                    .and(config.python_dir.clone())
                    .map(|path| container::Bind {
                        path,
                        read_only: true,
                    }),
            )
            .collect(),
        (None, _) => vec![],
    };
    wenv.extend(device_env);
    // `import tessera` in every process-mode job; in a container, only where its torchrun
    // follows an elastic set (the image's own PYTHONPATH is otherwise left as it is).
    if let Some(python) = &config.python_dir
        && (image.is_none() || a.elastic.is_some())
    {
        distributed::add_python_path(&mut wenv, python);
    }
    match image {
        None => {
            cmd.arg("--").args(&command);
            cmd.envs(&wenv);
        }
        Some(pulled) => {
            let tmp = dir.join("tmp");
            std::fs::create_dir_all(&tmp)?;
            if let Some(uid) = uid {
                confine::own(&tmp, uid)?;
            }
            let id = format!("tessera-{cg}");
            let state = config.data_dir.join("agent").join("runc");
            let runtime = match &a.checkpoint {
                Some(c) if c.transparent => {
                    let criu = config.image_criu.clone().context(
                        "this node cannot checkpoint image jobs transparently (no working CRIU \
                         4.x; see the agent's log)",
                    )?;
                    let ckpt = dir.join("checkpoint");
                    cmd.arg("--container-id")
                        .arg(&id)
                        .arg("--runc")
                        .arg(&config.runc)
                        .arg("--runc-root")
                        .arg(&state)
                        .arg("--container-criu")
                        .arg(&criu)
                        .arg("--checkpoint-dir")
                        .arg(&ckpt);
                    if let Some(i) = c.interval_ms {
                        cmd.arg("--checkpoint-interval-ms").arg(i.to_string());
                    }
                    Some((
                        container::RuntimeCheckpoint {
                            runc: config.runc.clone(),
                            state: state.clone(),
                            id: id.clone(),
                            criu,
                        },
                        container::Checkpointing {
                            dir: ckpt,
                            restore_from: resume_from.clone(),
                        },
                    ))
                }
                _ => None,
            };
            let (runtime, checkpointing) = match runtime {
                Some((r, c)) => (Some(r), Some(c)),
                None => (None, None),
            };
            // Real GPUs: their nodes and the driver's libraries, as the NVIDIA toolkit would.
            let gpu = match (&config.gpu_driver, a.devices.is_empty()) {
                (_, true) => None,
                (Some(Ok(spec)), false) => {
                    let indices: Vec<u32> = a.devices.iter().map(|d| d.device).collect();
                    Some(cdi::edits_for(spec, &indices)?)
                }
                (Some(Err(why)), false) => bail!(
                    "this node could not describe its GPU driver for containers, so it runs no \
                     GPU image job: {why}"
                ),
                (None, false) => None,
            };
            let plan = container::Plan {
                bundle: container::bundle_dir(&config.data_dir, &a.key),
                id: id.clone(),
                run_dir: dir,
                layers: pulled
                    .layers
                    .iter()
                    .map(|l| shared.images.layer_dir(l))
                    .collect(),
                image: pulled,
                command: &command,
                env: &wenv,
                workdir: a.workdir.as_deref(),
                uid,
                binds,
                tmp,
                cgroups_path: backend.relative_path(&cg),
                checkpointing,
                gpu,
            };
            let (bundle, restore_images) = container::prepare(&plan)?;
            match (&runtime, &restore_images) {
                (Some(r), Some(images)) => {
                    cmd.arg("--restore-images").arg(images).arg("--");
                    cmd.args(container::restore_command(
                        r,
                        &bundle,
                        images,
                        &dir.join("criu-work"),
                    ))
                }
                _ => cmd
                    .arg("--")
                    .args(container::command(&config.runc, &state, &bundle, &id)),
            };
        }
    }
    let log = std::fs::File::create(dir.join("shim.log"))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid in the forked child before exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().context("starting the shim")?;
    let pid = child.id().context("the shim has no pid")? as i32;
    std::fs::write(dir.join("shim.pid"), pid.to_string())?;
    let key = a.key.clone();
    let shared = shared.clone();
    let ckpt = a.checkpoint.as_ref().map(|_| dir.join("checkpoint"));
    tokio::spawn(async move {
        match ckpt {
            None => {
                let _ = child.wait().await;
            }
            Some(ckpt) => {
                // Send each complete checkpoint as it appears, and the last one before the exit
                // is reported: a requeued replica then resumes from it.
                let mut sent = None;
                loop {
                    let ended = tokio::select! {
                        _ = child.wait() => true,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                    };
                    let stamp = checkpoint::marker_stamp(&ckpt);
                    if stamp.is_some()
                        && stamp != sent
                        && let Some(remote) = shared.remote.get()
                    {
                        match checkpoint::upload(remote, &key, &ckpt).await {
                            Ok(Some(_)) => sent = stamp,
                            Ok(None) => {}
                            Err(e) => tracing::warn!("{key}: checkpoint not sent: {e:#}"),
                        }
                    }
                    if ended {
                        break;
                    }
                }
            }
        }
        finish(&shared, &key);
    });
    Ok(Started {
        shim_pid: pid,
        resume_failed,
        port,
    })
}

#[derive(Deserialize)]
struct LogQuery {
    /// `stdout`, `stderr`, or both (absent or `all`).
    stream: Option<String>,
    offset: Option<u64>,
    /// Only lines read at or after this time (Unix ms).
    since_ms: Option<u64>,
}

/// Most bytes of output read for one answer.
const LOG_CHUNK: u64 = 1 << 20;

async fn serve_logs(
    AxState(shared): AxState<Arc<Shared>>,
    headers: HeaderMap,
    AxPath(key): AxPath<String>,
    Query(q): Query<LogQuery>,
) -> axum::response::Response {
    let answer = |status: StatusCode, text: &str| (status, text.to_string()).into_response();
    if !exec::from_controller(&shared, &headers) {
        return answer(
            StatusCode::UNAUTHORIZED,
            "the controller's secret is required",
        );
    }
    if crate::state::parse_key(&key).is_none() {
        return answer(StatusCode::BAD_REQUEST, "not a replica key");
    }
    let stream = match q.stream.as_deref() {
        None | Some("all") => None,
        Some("stdout") => Some(logs::Stream::Stdout),
        Some("stderr") => Some(logs::Stream::Stderr),
        Some(_) => {
            return answer(
                StatusCode::BAD_REQUEST,
                "stream must be stdout, stderr or all",
            );
        }
    };
    let dir = shared.runs_dir.join(&key);
    if !dir.exists() {
        return answer(
            StatusCode::GONE,
            "this run's output is no longer on its node (run dirs of ended replicas are removed \
             after the node's --keep-runs)",
        );
    }
    let (offset, since) = (q.offset.unwrap_or(0), q.since_ms.unwrap_or(0));
    let read = tokio::task::spawn_blocking(move || {
        logs::read_page(&dir, stream, since, offset, LOG_CHUNK)
    })
    .await;
    match read {
        Ok(Ok(page)) => axum::Json(page).into_response(),
        Ok(Err(e)) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reading the log failed: {e}"),
        ),
        Err(_) => answer(StatusCode::INTERNAL_SERVER_ERROR, "reading the log failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_cannot_claim_a_port_another_listener_holds() {
        let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        // What the gateway would otherwise reach: e.g. the controller's API on this address.
        let api = std::net::TcpListener::bind((ip, 0)).unwrap();
        let taken = api.local_addr().unwrap().port();
        let e = service_port(ip, taken).unwrap_err().to_string();
        assert!(e.contains(&format!("port {taken} is taken")), "{e}");
        assert!(
            service_port(ip, 80)
                .unwrap_err()
                .to_string()
                .contains("below 1024")
        );
        let free = service_port(ip, 0).unwrap();
        assert_ne!(free, 0);
        drop(api);
        assert_eq!(service_port(ip, taken).unwrap(), taken);
    }
}
