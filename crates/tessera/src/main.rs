//! `tessera`: one binary for the pool: `up`, `controller`, `agent`, the user verbs, and the trace
//! simulator (`sim`).

use tessera::{agent, bench, cli, controller, endpoints, manifest, metering, sim, store, units};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Tessera makes a room of accelerator machines one pool.
#[derive(Parser)]
#[command(name = "tessera", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// Where the store (SQLite, unless --store names PostgreSQL) and local state live.
    #[arg(long, default_value = "tessera-data")]
    data_dir: PathBuf,
    /// A PostgreSQL store, postgresql://USER:PASS@HOST:PORT/DB, for controllers that share one
    /// database; SQLite in --data-dir when absent.
    #[arg(long, env = "TESSERA_STORE")]
    store: Option<String>,
    #[arg(long, default_value = "127.0.0.1:7480")]
    listen: SocketAddr,
    /// The URL other controllers, agents and clients reach this controller's API at, e.g.
    /// http://ctl-2.example:7480 (default: the --listen address's URL). With several
    /// controllers on one --store, a standby sends requests on to the leader's.
    #[arg(long)]
    advertise: Option<String>,
    /// How long the leader's lease lasts unrenewed among controllers sharing a PostgreSQL
    /// --store: a paused or cut-off leader is replaced after it (a killed one at once). It is
    /// renewed every third of it.
    #[arg(long, default_value = "5s")]
    leader_lease: String,
    /// Agent lease, e.g. 10s: an agent unheard for longer is lost and its work moves.
    #[arg(long, default_value = "10s")]
    lease: String,
    /// TLS certificate (PEM); with --tls-key, the API is served over HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The placement policy of the live pool: tessera (the default), fgd, bestfit, packing,
    /// clustering, dotprod or random (the simulator's names, case-insensitive).
    #[arg(long, default_value = "tessera")]
    policy: String,
    /// Where the service gateway listens (`http://ADDR/SERVICE/...`), or `off`.
    #[arg(long, default_value = "127.0.0.1:7481")]
    gateway_listen: String,
    /// Chargeback: the price of one GPU-hour of a device model, MODEL=PRICE (repeatable; `*=P`
    /// for models not listed). `tessera usage` shows the cost.
    #[arg(long = "gpu-hour-rate")]
    gpu_hour_rates: Vec<String>,
    /// Grams of CO2 per kWh of the pool's electricity; `tessera usage` then shows CO2.
    #[arg(long)]
    carbon_intensity: Option<f64>,
    /// Half-life of past use in fair share between projects (over-quota access), e.g. 7d;
    /// `off` counts only current use.
    #[arg(long, default_value = "7d")]
    fair_share_half_life: String,
    /// Most output kept per replica (stdout and stderr together); older output rotates away
    /// and `tessera logs` says so.
    #[arg(long, default_value = "64MiB")]
    log_limit: String,
    /// Free space kept on the store's file system: below it new work (submissions, services,
    /// scaling up) is refused with 507 while running work and reads go on.
    #[arg(long, default_value = "1GiB")]
    disk_reserve: String,
    /// Most open connections to the API (agents' long polls included; the gateway has as many
    /// again). Raise it with the process's open-file limit for pools of more than ~15,000 nodes.
    #[arg(long, default_value_t = 16384)]
    max_connections: usize,
    /// Most open connections from one address (raise it when many agents reach the controller
    /// through one NAT address).
    #[arg(long, default_value_t = 1024)]
    max_connections_per_address: usize,
    /// Most bytes of request bodies the gateway holds at once (each until it is answered); past
    /// it, requests get 503 with Retry-After. One request may send at most 64 MiB.
    #[arg(long, default_value = "256MiB")]
    gateway_body_budget: String,
    /// Ports kept free for Tessera on every node, FIRST-LAST: each gang of replicas gets one on
    /// its rank 0's node for its rendezvous (MASTER_PORT), and each remotely attached GPU one
    /// on its device's node for its server, unique on that node.
    #[arg(long, default_value = "29500-30499")]
    rendezvous_ports: String,
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// Simulated devices where no GPU is found, e.g. 4xH100-80GB (shown as simulated everywhere).
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Node labels KEY=VALUE (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// CPUs to offer (default: all).
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory to offer, e.g. 64GiB (default: all).
    #[arg(long)]
    memory: Option<String>,
    /// Grace period between SIGTERM and SIGKILL when a workload is stopped.
    #[arg(long, default_value = "5s")]
    grace: String,
    /// CRIU 4.x for transparent checkpoints (default: $TESSERA_CRIU, /usr/local/sbin/criu, then
    /// the PATH; scripts/install-criu.sh builds it). Without one the node does cooperative
    /// checkpoints only.
    #[arg(long)]
    criu: Option<PathBuf>,
    /// Where transparent replicas keep their files: the same path on every node, since CRIU
    /// restores files by path.
    #[arg(long, default_value = "/var/lib/tessera/transparent")]
    transparent_root: PathBuf,
    /// How often the agent samples its devices' and workloads' use (sent with its sync).
    #[arg(long, default_value = "5s")]
    telemetry_interval: String,
    /// The uids (and gids) this agent gives projects' workloads, one per project, FIRST-LAST;
    /// no account of the host may use them.
    #[arg(long, default_value = "200000-265535")]
    workload_uids: String,
    /// Run workloads unconfined (as the agent's user, without namespaces) where this node cannot
    /// confine them. Without it such a node refuses every replica. Shown in `tessera nodes`.
    #[arg(long)]
    allow_unconfined: bool,
    /// More paths to hide from workloads, besides the data dir (repeatable).
    #[arg(long = "hide")]
    hide: Vec<PathBuf>,
    /// Most processes and threads one replica may have.
    #[arg(long, default_value_t = 16384)]
    pids_max: u64,
    /// How long the run dir (output, work dir) of an ended replica stays on the node, e.g. 3d;
    /// `tessera logs` reads it until then.
    #[arg(long, default_value = "3d")]
    keep_runs: String,
    /// Most disk the image cache keeps (unpacked layers); least recently used layers not in
    /// use go past it.
    #[arg(long, default_value = "50GiB")]
    image_cache: String,
    /// Free space an image unpack leaves on the image cache's disk for the node's other work
    /// (run dirs, logs, checkpoints); default 5% of that disk, at most 4GiB.
    #[arg(long)]
    image_reserve: Option<String>,
    /// A registry (HOST:PORT) reached over plain HTTP (repeatable); registries on a loopback
    /// address are always allowed to, as with Docker.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// The OCI runtime that runs images.
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// A pool on this machine: controller and a local agent in one process.
    Up {
        #[command(flatten)]
        controller: Box<ControllerArgs>,
        #[command(flatten)]
        node: Box<NodeArgs>,
    },
    /// The controller alone. Several controllers given one PostgreSQL --store make one pool:
    /// one leads, the others stand by and take over within seconds when it goes.
    Controller {
        #[command(flatten)]
        controller: Box<ControllerArgs>,
    },
    /// A node agent that joins a controller.
    Agent {
        /// The controller's URL, or several of one pool's controllers as URL1,URL2 (the agent
        /// moves to the next when one cannot be reached).
        #[arg(long)]
        join: String,
        /// A join token (only needed the first time).
        #[arg(long)]
        token: Option<String>,
        #[arg(long, default_value = "tessera-agent")]
        data_dir: PathBuf,
        /// Where the agent serves logs to the controller.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// CA certificate to trust for an HTTPS controller.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
    },
    #[command(hide = true)]
    Shim(agent::shim::ShimArgs),
    /// The GPU server of a remote attachment (`serve`), which the agent runs on the device's
    /// node, and a latency-adding `relay` for tests; inside tessera so that it ships with it.
    #[command(hide = true)]
    RemoteGpu {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A node's image cache: pull an image ahead of its jobs (as `crictl pull`), list layers.
    Images {
        #[command(subcommand)]
        cmd: agent::image::ImagesCmd,
    },
    /// Submit a job from flags or a manifest (-f job.yaml).
    Submit {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(flatten)]
        args: Box<cli::SubmitArgs>,
    },
    /// List jobs.
    Jobs {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(flatten)]
        args: cli::JobsArgs,
    },
    /// Explain a job: state, reason (why it waits), replicas, events.
    Describe {
        #[command(flatten)]
        conn: cli::Conn,
        /// `job`, `node` or `project`
        kind: String,
        /// The job's id, or the node's or project's name.
        id: String,
        /// Describe it again whenever it changes, until interrupted.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// A replica's output.
    Logs {
        #[command(flatten)]
        conn: cli::Conn,
        id: u64,
        #[arg(long, default_value_t = 0)]
        replica: u32,
        /// Only standard output (default: both streams, interleaved as they came).
        #[arg(long, conflicts_with = "stderr")]
        stdout: bool,
        /// Only standard error.
        #[arg(long)]
        stderr: bool,
        /// Only lines from this time on: a duration back (10m, 2h) or Unix milliseconds.
        #[arg(long)]
        since: Option<String>,
        /// Start each line with the time it was written (RFC 3339, UTC).
        #[arg(long)]
        timestamps: bool,
        /// Keep streaming until the replica ends.
        #[arg(short, long)]
        follow: bool,
        /// The output of an earlier attempt (a preempted, moved or restarted job's first run is 1).
        #[arg(long, conflicts_with = "previous")]
        attempt: Option<u32>,
        /// The output of the attempt before the current one.
        #[arg(long)]
        previous: bool,
        /// Only the last N lines (then follow from there with -f).
        #[arg(long, value_name = "N", conflicts_with = "all_replicas")]
        tail: Option<usize>,
        /// Every replica's output, each line prefixed with `[REPLICA]`.
        #[arg(long, conflicts_with = "replica")]
        all_replicas: bool,
    },
    /// Run a command inside a running replica (`-it` for a shell with a terminal), as
    /// `kubectl exec`; exits with its exit code.
    Exec {
        #[command(flatten)]
        conn: cli::Conn,
        id: u64,
        #[arg(long, default_value_t = 0)]
        replica: u32,
        /// Send this terminal's input to it.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Give it a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        /// The command, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Forward a local port to one a running replica listens on: LOCAL:REMOTE (0 for any free
    /// local port), until interrupted.
    PortForward {
        #[command(flatten)]
        conn: cli::Conn,
        id: u64,
        ports: String,
        #[arg(long, default_value_t = 0)]
        replica: u32,
    },
    /// Run a command with a terminal in a job of its own, as `srun --pty`: submit (the flags of
    /// `submit`), wait, run it inside, cancel the job when it ends.
    Run {
        #[command(flatten)]
        conn: cli::Conn,
        /// Send this terminal's input to it.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Give it a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        #[command(flatten)]
        args: Box<cli::SubmitArgs>,
    },
    /// Jupyter in an interactive job of its own (the flags of `submit`: --gpu, --image ...),
    /// its port forwarded to this machine: prints the URL to open; Ctrl-C cancels the job.
    Notebook {
        #[command(flatten)]
        conn: cli::Conn,
        /// The local port (default: any free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        #[command(flatten)]
        args: Box<cli::SubmitArgs>,
    },
    /// A job as the manifest that makes it again, with its status (YAML; `-o json`):
    /// `tessera get job 5 | tessera submit -f -` submits it again.
    Get {
        #[command(flatten)]
        conn: cli::Conn,
        /// `job`.
        kind: String,
        id: u64,
        /// Only the manifest: without the status.
        #[arg(long)]
        export: bool,
    },
    /// Cancel jobs (their process trees are killed); an array's id cancels all its tasks,
    /// ARRAY_INDEX one of them.
    Cancel {
        #[command(flatten)]
        conn: cli::Conn,
        ids: Vec<String>,
    },
    /// Hold pending jobs: they do not start until released (an array's id: all its tasks).
    Hold {
        #[command(flatten)]
        conn: cli::Conn,
        ids: Vec<String>,
    },
    /// Release held jobs.
    Release {
        #[command(flatten)]
        conn: cli::Conn,
        ids: Vec<String>,
    },
    /// Queue jobs again: a running one is stopped first (through its checkpoint, without using
    /// a restart), an ended one starts a new attempt.
    Requeue {
        #[command(flatten)]
        conn: cli::Conn,
        ids: Vec<String>,
    },
    /// Move a running job to another node (a checkpointing job saves first and resumes there).
    Migrate {
        #[command(flatten)]
        conn: cli::Conn,
        id: u64,
        /// The node to move to (default: wherever the scheduler places it).
        #[arg(long)]
        to: Option<String>,
    },
    /// Usage over a window by project, user, device model, job or node: GPU-hours, memory,
    /// CPU, energy and cost (`-o csv|json` for scripts).
    Usage {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(flatten)]
        args: cli::UsageArgs,
    },
    /// The audit log: placements, preemptions, moves, policy decisions, admin actions.
    Audit {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(flatten)]
        args: cli::AuditArgs,
    },
    /// Nodes: list, cordon, uncordon, drain.
    Nodes {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: Option<cli::NodesCmd>,
    },
    /// Services behind the gateway: list, scale, move, delete (create with `submit -f`).
    Services {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: Option<cli::ServicesCmd>,
    },
    /// Projects and quotas.
    Projects {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: Option<cli::ProjectsCmd>,
    },
    /// Users and roles (admin).
    Users {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: Option<cli::UsersCmd>,
    },
    /// API and join tokens.
    Token {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: cli::TokenCmd,
    },
    /// Which controller the CLI talks to: `config use URL`, `config view`.
    Config {
        #[command(subcommand)]
        cmd: cli::session::ConfigCmd,
        #[arg(short, long, global = true, value_enum, default_value_t = cli::Output::Table)]
        output: cli::Output,
    },
    /// Who the controller takes you for: user, role, projects.
    Whoami {
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// This program's version and the controller's.
    Version {
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// A shell's completion script: `source <(tessera completion bash)`.
    Completion { shell: clap_complete::Shell },
    /// Replay production traces through Tessera's placement engine.
    #[command(subcommand)]
    Sim(sim::SimCommand),
    /// Measure the pool: API throughput, submit-to-running latency, controller memory at scale.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// `FIRST-LAST`, unprivileged ports (1024 and up), at least one.
fn port_range(flag: &str, text: &str) -> anyhow::Result<std::ops::RangeInclusive<u16>> {
    let parsed = text
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
    match parsed {
        Some((first, last)) if first >= 1024 && first <= last => Ok(first..=last),
        _ => anyhow::bail!(
            "{flag} {text}: write FIRST-LAST with 1024 <= FIRST <= LAST <= 65535, e.g. 29500-30499"
        ),
    }
}

fn controller_config(a: &ControllerArgs) -> anyhow::Result<controller::ControllerConfig> {
    let lease = units::parse_duration("--lease", &a.lease)?;
    if lease < Duration::from_millis(500) {
        anyhow::bail!("--lease {}: use at least 500ms", a.lease);
    }
    let mut rates = metering::Rates::default();
    for r in &a.gpu_hour_rates {
        rates.add_rate(r).map_err(anyhow::Error::msg)?;
    }
    if let Some(g) = a.carbon_intensity {
        if !g.is_finite() || g < 0.0 {
            anyhow::bail!("--carbon-intensity {g}: give grams of CO2 per kWh, zero or more");
        }
        rates.carbon_g_per_kwh = Some(g);
    }
    let fair_share_half_life = match a.fair_share_half_life.as_str() {
        "off" => None,
        h => Some(units::parse_duration("--fair-share-half-life", h)?).filter(|d| !d.is_zero()),
    };
    let size =
        |flag: &str, text: &str| units::parse_bytes(flag, &units::Quantity::Text(text.to_string()));
    let log_limit = size("--log-limit", &a.log_limit)?;
    if log_limit < agent::logs::MIN_LIMIT {
        anyhow::bail!("--log-limit {}: use at least 64KiB", a.log_limit);
    }
    Ok(controller::ControllerConfig {
        log_limit,
        disk_reserve: size("--disk-reserve", &a.disk_reserve)?,
        gateway_body_budget: match size("--gateway-body-budget", &a.gateway_body_budget)? {
            n if n < 1 << 20 => anyhow::bail!(
                "--gateway-body-budget {}: use at least 1MiB",
                a.gateway_body_budget
            ),
            n => usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(usize::MAX >> 4),
        },
        max_connections: match a.max_connections {
            0 => anyhow::bail!("--max-connections 0: allow at least one connection"),
            n => n,
        },
        max_connections_per_address: match a.max_connections_per_address {
            0 => anyhow::bail!("--max-connections-per-address 0: allow at least one"),
            n => n,
        },
        rendezvous_ports: port_range("--rendezvous-ports", &a.rendezvous_ports)?,
        rates,
        fair_share_half_life,
        data_dir: a.data_dir.clone(),
        store: match &a.store {
            None => None,
            Some(url) if url.starts_with("postgresql://") || url.starts_with("postgres://") => {
                Some(url.clone())
            }
            Some(other) => anyhow::bail!(
                "--store {}: give a PostgreSQL URL (postgresql://USER:PASS@HOST:PORT/DB), or \
                 leave it out for SQLite in --data-dir",
                store::postgres::redact(other)
            ),
        },
        listen: a.listen,
        advertise: match &a.advertise {
            None => None,
            Some(url) => Some(
                endpoints::Endpoints::parse("--advertise", url)?
                    .all()
                    .first()
                    .cloned()
                    .unwrap_or_default(),
            ),
        },
        leader_lease: match units::parse_duration("--leader-lease", &a.leader_lease)? {
            d if d < Duration::from_secs(1) => {
                anyhow::bail!("--leader-lease {}: use at least 1s", a.leader_lease)
            }
            d => d,
        },
        lease,
        tls: a.tls_cert.clone().zip(a.tls_key.clone()),
        seed: a.seed,
        policy: tessera_sched::PolicyKind::from_name(&a.policy).ok_or_else(|| {
            let names: Vec<&str> = tessera_sched::PolicyKind::ALL
                .iter()
                .map(|k| k.name())
                .collect();
            anyhow::anyhow!(
                "--policy {}: not a placement policy; use one of {}",
                a.policy,
                names.join(", ")
            )
        })?,
        gateway: match a.gateway_listen.as_str() {
            "off" => None,
            addr => Some(addr.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--gateway-listen {addr}: write HOST:PORT, e.g. 127.0.0.1:7481, or off"
                )
            })?),
        },
    })
}

fn agent_config(
    node: &NodeArgs,
    controller: String,
    join_token: Option<String>,
    data_dir: PathBuf,
    listen: SocketAddr,
    ca_cert: Option<PathBuf>,
) -> anyhow::Result<agent::AgentConfig> {
    // Real devices win: --simulate-gpus only describes hosts where NVML finds none.
    let devices = match (agent::devices::nvml_inventory()?, &node.simulate_gpus) {
        (Some(real), _) if !real.devices.is_empty() => {
            if node.simulate_gpus.is_some() {
                tracing::warn!(
                    "--simulate-gpus is ignored: NVML found {} GPU(s)",
                    real.devices.len()
                );
            }
            real
        }
        (_, Some(spec)) => agent::devices::parse_simulated(spec)?,
        (real, None) => real.unwrap_or_default(),
    };
    let mut labels = std::collections::BTreeMap::new();
    for l in &node.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label {l}: write KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let name = node.node_name.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "node".into())
    });
    manifest::check_name("--node-name", &name)?;
    // Workloads run in their own directories: every path handed to them (checkpoints, the
    // simulated driver, slice regions) must not depend on the agent's working directory.
    let data_dir = std::path::absolute(&data_dir)
        .with_context(|| format!("--data-dir {}", data_dir.display()))?;
    let devices_simulated = devices.simulated || devices.devices.is_empty();
    let confinement = agent::confine::Mode::detect(
        agent::confine::UidRange::parse("--workload-uids", &node.workload_uids)?,
        node.allow_unconfined,
    );
    let mut transparent = match agent::criu::detect(
        node.criu.as_deref(),
        &node.transparent_root,
        !devices_simulated,
    ) {
        Ok(t) => {
            tracing::info!(
                "transparent checkpoints: CRIU {} at {}",
                t.version,
                t.criu.display()
            );
            Some(t)
        }
        Err(e) => {
            tracing::info!("no transparent checkpoints on this node: {e:#}");
            None
        }
    };
    // Image jobs on real GPUs get the driver as the NVIDIA container toolkit would give it.
    let gpu_driver = (!devices_simulated).then(|| {
        agent::cdi::discover(std::path::Path::new("/"), devices.devices.len())
            .and_then(|spec| {
                let path = agent::cdi::write(&spec, &data_dir)?;
                tracing::info!(
                    "the GPU driver for containers is described in {}",
                    path.display()
                );
                Ok(spec)
            })
            .map_err(|e| {
                tracing::warn!("no GPU image jobs on this node: {e:#}");
                format!("{e:#}")
            })
    });
    // The runtime checkpoints image jobs with the same CRIU, confined (their root is the
    // container's), so they need no more than a working CRIU and the runtime.
    let image_criu = transparent.as_ref().map(|t| t.criu.clone());
    // CRIU reads a process's limits, which needs CAP_SYS_RESOURCE for another uid's.
    let confined = matches!(confinement, agent::confine::Mode::Confined(_));
    let transparent_unconfined =
        transparent.is_some() && confined && !agent::confine::has_cap_sys_resource();
    if transparent_unconfined && !node.allow_unconfined {
        tracing::warn!(
            "no transparent checkpoints on this node: the agent lacks CAP_SYS_RESOURCE, without \
             which CRIU cannot dump a workload that runs as its own uid; give the agent that \
             capability, or let transparent replicas run unconfined with --allow-unconfined"
        );
        transparent = None;
    }
    Ok(agent::AgentConfig {
        controller,
        join_token,
        name,
        data_dir,
        listen,
        advertise: None,
        devices,
        labels,
        cpu_milli: node.cpus.map(|c| (c * 1000.0) as u64),
        memory_bytes: match &node.memory {
            Some(m) => Some(units::parse_bytes(
                "--memory",
                &units::Quantity::Text(m.clone()),
            )?),
            None => None,
        },
        grace_ms: units::parse_duration("--grace", &node.grace)?.as_millis() as u64,
        telemetry_ms: {
            let t = units::parse_duration("--telemetry-interval", &node.telemetry_interval)?;
            if t < Duration::from_millis(200) {
                anyhow::bail!(
                    "--telemetry-interval {}: sample at most every 200ms",
                    node.telemetry_interval
                );
            }
            t.as_millis() as u64
        },
        ca_cert,
        confinement,
        transparent_unconfined: transparent_unconfined && transparent.is_some(),
        hide: node
            .hide
            .iter()
            .map(|p| std::path::absolute(p).with_context(|| format!("--hide {}", p.display())))
            .collect::<anyhow::Result<_>>()?,
        pids_max: match node.pids_max {
            0 => anyhow::bail!("--pids-max 0: a replica needs at least one process"),
            n => n,
        },
        keep_runs: units::parse_duration("--keep-runs", &node.keep_runs)?,
        image_cache: match units::parse_bytes(
            "--image-cache",
            &units::Quantity::Text(node.image_cache.clone()),
        )? {
            n if n < 64 << 20 => anyhow::bail!(
                "--image-cache {}: keep at least 64MiB for images",
                node.image_cache
            ),
            n => n,
        },
        image_reserve: node
            .image_reserve
            .as_ref()
            .map(|r| units::parse_bytes("--image-reserve", &units::Quantity::Text(r.clone())))
            .transpose()?,
        insecure_registries: node.insecure_registries.clone(),
        runc: node.runc.clone(),
        image_criu,
        gpu_driver,
        python_dir: agent::distributed::python_dir(),
        transparent,
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(controller: ControllerArgs, node: Option<NodeArgs>) -> anyhow::Result<()> {
    let config = controller_config(&controller)?;
    runtime()?.block_on(async move {
        let mut told = false;
        let running = controller::start_telling(config.clone(), &mut |leader| {
            let leader = match leader {
                Some(url) => format!("the leader is at {url}"),
                None => "no controller leads yet".to_string(),
            };
            if !told {
                println!(
                    "Tessera API at {} as a standby ({leader}; requests are sent on to it, and \
                     this controller takes over if it goes)",
                    config.listen
                );
                told = true;
            } else {
                println!("Standby: {leader}");
            }
        })
        .await?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let host = if running.addr.ip().is_unspecified() {
            SocketAddr::new([127, 0, 0, 1].into(), running.addr.port())
        } else {
            running.addr
        };
        let url = format!("{scheme}://{host}");
        if told {
            println!("Leading the pool from now on: Tessera API at {url}");
        } else {
            println!("Tessera API at {url} (OpenAPI: {url}/openapi.json)");
        }
        if let Some(token) = &running.first_admin_token {
            println!("First admin token (shown once): {token}");
            let path = cli::config_path();
            if !path.exists() {
                let file = cli::ConfigFile {
                    url: url.clone(),
                    token: token.clone(),
                    ca_cert: None,
                };
                let path = cli::session::write(&file)?;
                println!("Wrote {} for the CLI.", path.display());
            }
        } else if let Some(mut file) = std::fs::read_to_string(cli::config_path())
            .ok()
            .and_then(|t| serde_yaml::from_str::<cli::ConfigFile>(&t).ok())
            .filter(|f| f.url != url && node.is_some())
        {
            // A second `tessera up` of the same pool, on another address: the CLI follows it
            // (the token, kept in the config file, is the pool's).
            let was = std::mem::replace(&mut file.url, url.clone());
            let path = cli::session::write(&file)?;
            println!("Updated {}: url {url} (was {was}).", path.display());
        }
        if let Some(gw) = running.gateway {
            println!("Service gateway at http://{gw}/SERVICE/");
        }
        if let Some(node) = node {
            let join = controller::local_join_token(&running.ctl.store, &config.data_dir).await?;
            let mut node = node;
            let has_gpus = agent::devices::nvml_inventory()
                .ok()
                .flatten()
                .is_some_and(|i| !i.devices.is_empty());
            if node.simulate_gpus.is_none() && !has_gpus {
                node.simulate_gpus = Some("4xH100-80GB".into());
                println!(
                    "No GPU found: the local node offers 4 simulated H100-80GB (marked simulated)."
                );
            }
            let acfg = agent_config(
                &node,
                url.clone(),
                Some(join),
                config.data_dir.clone(),
                "127.0.0.1:0".parse()?,
                None,
            )?;
            tokio::spawn(async move {
                if let Err(e) = agent::run(acfg).await {
                    tracing::error!("the local agent stopped: {e:#}");
                }
            });
        }
        let leadership = running.ctl.leadership.clone();
        tokio::select! {
            served = running.server => served??,
            _ = leadership.lost() => anyhow::bail!(
                "this controller lost the leader's lease (another controller took it, or it could \
                 not be renewed in time) and stops so that it cannot act on a pool it no longer \
                 leads; start it again to rejoin as a standby"
            ),
        }
        Ok(())
    })
}

/// Makes glibc return large freed blocks to the system, and keep one heap. By default glibc
/// raises its mmap threshold to the size of the last freed large block, after which argon2's 19
/// MiB working areas (one per token hashed or verified) come from the heap and stay there: a
/// controller that saw a thousand agents join held 700 MiB it no longer used. A fixed threshold
/// keeps them mmapped. And by default each thread that meets contention gets an arena of its own
/// (up to 8 per core), each keeping its freed memory: a controller holding 10,000 agents' long
/// polls peaked 60-100 MiB higher with them (docs/benchmarks.md). Small blocks are still cached
/// per thread (glibc's tcache); an operator of a many-core controller who finds the one arena
/// contended sets MALLOC_ARENA_MAX, which is then left alone.
fn keep_large_allocations_returnable() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called once, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// A command whose reader went away (`tessera jobs | head`) ends quietly, as Unix tools do,
/// instead of panicking in `println!`. Servers keep SIGPIPE ignored (a closed socket is an error
/// to handle, not a reason to die).
fn exit_quietly_on_a_closed_pipe() {
    // SAFETY: restores the default disposition of one signal; no handler of ours is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    keep_large_allocations_returnable();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour for a person at a terminal; none in a redirected log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Up { .. }
            | Command::Controller { .. }
            | Command::Agent { .. }
            | Command::Shim(_)
            | Command::RemoteGpu { .. }
    ) {
        exit_quietly_on_a_closed_pipe();
    }
    let result = match cli.command {
        Command::Sim(cmd) => sim::run(cmd),
        Command::Images { cmd } => runtime().and_then(|rt| rt.block_on(agent::image::command(cmd))),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Up { controller, node } => serve(*controller, Some(*node)),
        Command::Controller { controller } => serve(*controller, None),
        Command::Agent {
            join,
            token,
            data_dir,
            listen,
            ca_cert,
            node,
        } => agent_config(
            &node,
            join.trim_end_matches('/').to_string(),
            token,
            data_dir,
            listen,
            ca_cert,
        )
        .and_then(|cfg| runtime()?.block_on(agent::run(cfg))),
        Command::Shim(args) => agent::shim::run(args),
        Command::RemoteGpu { args } => {
            tessera_remote::cli::main(args);
            Ok(())
        }
        Command::Submit { conn, args } => {
            cli::Client::new(&conn).and_then(|c| cli::submit(&c, &args))
        }
        Command::Jobs { conn, args } => cli::Client::new(&conn).and_then(|c| cli::jobs(&c, &args)),
        Command::Describe {
            conn,
            kind,
            id,
            watch,
        } => cli::Client::new(&conn).and_then(|c| cli::describe::describe(&c, &kind, &id, watch)),
        Command::Logs {
            conn,
            id,
            replica,
            stdout,
            stderr,
            since,
            timestamps,
            follow,
            attempt,
            previous,
            tail,
            all_replicas,
        } => cli::Client::new(&conn).and_then(|c| {
            let attempt = match (attempt, previous) {
                (Some(a), _) => Some(a),
                (None, true) => Some(cli::previous_attempt(&c, id)?),
                (None, false) => None,
            };
            let opts = cli::LogOptions {
                stream: match (stdout, stderr) {
                    (true, _) => "stdout",
                    (_, true) => "stderr",
                    _ => "all",
                },
                since,
                timestamps,
                attempt,
            };
            if all_replicas {
                return cli::logs_of_every_replica(&c, id, &opts, follow);
            }
            cli::logs(&c, id, replica, &opts, follow, tail)
        }),
        Command::Exec {
            conn,
            id,
            replica,
            stdin,
            tty,
            command,
        } => cli::Client::new(&conn)
            .and_then(|c| cli::interactive::exec(&c, id, replica, stdin, tty, &command))
            .map(|code| std::process::exit(code)),
        Command::PortForward {
            conn,
            id,
            ports,
            replica,
        } => cli::Client::new(&conn)
            .and_then(|c| cli::interactive::port_forward(&c, id, replica, &ports, |_| {})),
        Command::Run {
            conn,
            stdin,
            tty,
            args,
        } => cli::Client::new(&conn)
            .and_then(|c| cli::interactive::run(&c, &args, stdin, tty))
            .map(|code| std::process::exit(code)),
        Command::Notebook { conn, port, args } => {
            cli::Client::new(&conn).and_then(|c| cli::interactive::notebook(&c, &args, port))
        }
        Command::Get {
            conn,
            kind,
            id,
            export,
        } => match kind.as_str() {
            "job" | "jobs" => {
                cli::Client::new(&conn).and_then(|c| cli::batch::get_job(&c, id, export))
            }
            _ => Err(anyhow::anyhow!(
                "get {kind}: get job ID (nodes and projects: `tessera describe`)"
            )),
        },
        Command::Cancel { conn, ids } => cli::Client::new(&conn)
            .and_then(|c| cli::batch::act(&c, cli::batch::Verb::Cancel, &ids)),
        Command::Hold { conn, ids } => {
            cli::Client::new(&conn).and_then(|c| cli::batch::act(&c, cli::batch::Verb::Hold, &ids))
        }
        Command::Release { conn, ids } => cli::Client::new(&conn)
            .and_then(|c| cli::batch::act(&c, cli::batch::Verb::Release, &ids)),
        Command::Requeue { conn, ids } => cli::Client::new(&conn)
            .and_then(|c| cli::batch::act(&c, cli::batch::Verb::Requeue, &ids)),
        Command::Migrate { conn, id, to } => {
            cli::Client::new(&conn).and_then(|c| cli::migrate(&c, id, to.as_deref()))
        }
        Command::Nodes { conn, cmd } => cli::Client::new(&conn).and_then(|c| cli::nodes(&c, cmd)),
        Command::Audit { conn, args } => {
            cli::Client::new(&conn).and_then(|c| cli::audit(&c, &args))
        }
        Command::Usage { conn, args } => {
            cli::Client::new(&conn).and_then(|c| cli::usage(&c, &args))
        }
        Command::Services { conn, cmd } => {
            cli::Client::new(&conn).and_then(|c| cli::services(&c, cmd))
        }
        Command::Projects { conn, cmd } => {
            cli::Client::new(&conn).and_then(|c| cli::projects(&c, cmd))
        }
        Command::Users { conn, cmd } => cli::Client::new(&conn).and_then(|c| cli::users(&c, cmd)),
        Command::Token { conn, cmd } => cli::Client::new(&conn).and_then(|c| cli::token(&c, cmd)),
        Command::Config { cmd, output } => cli::session::config(cmd, output),
        Command::Whoami { conn } => cli::Client::new(&conn).and_then(|c| cli::session::whoami(&c)),
        Command::Version { conn } => cli::session::version(cli::Client::new(&conn), conn.output),
        Command::Completion { shell } => {
            cli::session::completion(shell, &mut <Cli as clap::CommandFactory>::command())
        }
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
