//! `tessera bench`: load generators for the numbers in docs/benchmarks.md.
//!
//! Each benchmark starts its own controller (and agents) as child processes of this binary, on a
//! fresh data dir with the store on, so what it measures is the real pool, and so it can read the
//! controller's memory from /proc. Results print as a table or as JSON (`-o json`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tessera_sched::DeviceSpec;

use crate::protocol::{
    RegisterRequest, RegisterResponse, ReplicaStatus, RunPhase, SyncRequest, SyncResponse,
};

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Submissions accepted per second through the API (every one committed before its 201).
    Api {
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Submit → running latency of a 1-replica job on an idle pool, as the workload sees it.
    Latency {
        #[arg(long, default_value_t = 200)]
        jobs: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Checkpoint and restore of a replica's state through the controller: time and bytes sent
    /// for the first checkpoint, one with 10% of the state changed, and one with all of it.
    Checkpoint {
        /// Size of the state, e.g. 1GiB.
        #[arg(long, default_value = "1GiB")]
        size: String,
        #[command(flatten)]
        common: Common,
    },
    /// Preemption latency: a high-priority job's submission → its workload running, on a GPU
    /// held by a low-priority job that is stopped plainly or checkpointed first.
    Preempt {
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Metering at scale: writing a usage ledger of many replica runs (in group-commit batches,
    /// as the controller does) and reading reports over it.
    Usage {
        /// Replica runs in the ledger, spread over 30 days.
        #[arg(long, default_value_t = 1_000_000)]
        runs: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Failover: two controllers on one PostgreSQL --store (an empty database), a real agent
    /// with a running replica, clients submitting without pause, and the leader killed with
    /// SIGKILL again and again: how long writes stop, and whether anything acknowledged is lost
    /// or a replica started twice.
    Failover {
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// The controllers' --leader-lease.
        #[arg(long, default_value = "5s")]
        leader_lease: String,
        /// Jobs queued first that no node can hold (they wait), so that every takeover reads a
        /// pool of that many jobs.
        #[arg(long, default_value_t = 0)]
        waiting: usize,
        /// Simulated nodes of 8 GPUs registered first (silent: no agent behind them, so the
        /// controllers then judge nodes lost only after an hour), so that every takeover reads
        /// a pool of that many nodes and the jobs placed on them.
        #[arg(long, default_value_t = 0)]
        nodes: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Controller memory with many simulated nodes (protocol-level agents) and many jobs.
    Scale {
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Drive the controller's state, scheduler and apply path in this process, with no
        /// sockets and no agents (for pools larger than the long polls a machine can hold):
        /// memory, the time to build a snapshot, and rounds after one submission.
        #[arg(long)]
        in_process: bool,
        /// With --in-process: rounds timed, each after one more submission.
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(clap::Args, Debug)]
pub struct Common {
    /// Where the benchmark's controller keeps its store (default: a fresh temporary dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Port for the benchmark's controller on 127.0.0.1.
    #[arg(long, default_value_t = 7590)]
    port: u16,
    /// Keep the benchmark's store in this PostgreSQL database (an empty one) instead of SQLite.
    #[arg(long)]
    store: Option<String>,
    /// table or json
    #[arg(short, long, default_value = "table")]
    output: String,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (common, result) = match cmd {
        BenchCommand::Api {
            jobs,
            concurrency,
            common,
        } => {
            let r = rt.block_on(api(&common, jobs, concurrency));
            (common, r)
        }
        BenchCommand::Latency { jobs, common } => {
            let r = rt.block_on(latency(&common, jobs));
            (common, r)
        }
        BenchCommand::Checkpoint { size, common } => {
            let r = rt.block_on(checkpoints(&common, &size));
            (common, r)
        }
        BenchCommand::Preempt { rounds, common } => {
            let r = rt.block_on(preempt(&common, rounds));
            (common, r)
        }
        BenchCommand::Usage { runs, common } => {
            let r = usage(&common, runs);
            (common, r)
        }
        BenchCommand::Failover {
            kills,
            leader_lease,
            waiting,
            nodes,
            common,
        } => {
            let r = match &common.store {
                None => Err(anyhow::anyhow!(
                    "bench failover needs --store postgresql://USER:PASS@HOST:PORT/DB (an empty \
                     database): failover is among controllers sharing one"
                )),
                Some(store) => crate::bench_failover::run(
                    store,
                    common.data_dir.clone(),
                    common.port,
                    kills,
                    &leader_lease,
                    waiting,
                    nodes,
                ),
            };
            (common, r)
        }
        BenchCommand::Scale {
            nodes,
            jobs,
            concurrency,
            in_process,
            rounds,
            common,
        } => {
            let r = match in_process {
                true => rt.block_on(crate::bench_inprocess::run(
                    common.data_dir.clone(),
                    nodes,
                    jobs,
                    rounds,
                )),
                false => rt.block_on(scale(&common, nodes, jobs, concurrency)),
            };
            (common, r)
        }
    };
    let result = result?;
    match common.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&result)?),
        _ => {
            if let Value::Object(map) = &result {
                for (k, v) in map {
                    println!("{k:<28} {v}");
                }
            }
        }
    }
    Ok(())
}

/// A controller (and agents) of this binary, killed on drop; the data dir is removed when it was
/// a temporary one.
struct Pool {
    controller: Child,
    agents: Vec<Child>,
    url: String,
    admin: String,
    dir: PathBuf,
    remove_dir: bool,
    http: reqwest::Client,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for c in self
            .agents
            .iter_mut()
            .chain(std::iter::once(&mut self.controller))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Pool {
    fn start(common: &Common, lease: &str) -> anyhow::Result<Pool> {
        let (dir, remove_dir) = match &common.data_dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("tessera-bench-{}", std::process::id())),
                true,
            ),
        };
        if dir.join("controller").exists() {
            bail!(
                "--data-dir {}: holds an earlier pool; give an empty or new directory",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir)?;
        let listen = format!("127.0.0.1:{}", common.port);
        let mut child = Command::new(std::env::current_exe()?)
            .args(["controller", "--data-dir"])
            .arg(dir.join("controller"))
            .args(["--listen", &listen, "--lease", lease])
            // Every simulated agent long-polls from this one address.
            .args(["--max-connections", "60000"])
            .args(["--max-connections-per-address", "60000"])
            .args(common.store.iter().flat_map(|url| ["--store", url]))
            .env("TESSERA_CONFIG", dir.join("cli.yaml"))
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("controller stdout")?).lines();
        let mut admin = None;
        for _ in 0..3 {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(t) = line.strip_prefix("First admin token (shown once): ") {
                        admin = Some(t.to_string());
                        break;
                    }
                }
                _ => break,
            }
        }
        let Some(admin) = admin else {
            let _ = child.kill();
            bail!(
                "the benchmark's controller did not start (is port {} free? try --port)",
                common.port
            );
        };
        // Keep draining stdout so the controller never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Pool {
            controller: child,
            agents: vec![],
            url: format!("http://{listen}"),
            admin,
            dir,
            remove_dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .pool_max_idle_per_host(usize::MAX)
                .build()?,
        })
    }

    async fn post(&self, path: &str, token: &str, body: String) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {path}: {status}: {body}");
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// The controller's counters at `/metrics` (plain `name value` lines, labels left out).
    async fn counters(&self) -> anyhow::Result<std::collections::HashMap<String, f64>> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains('{'))
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect())
    }

    async fn join_token(&self) -> anyhow::Result<String> {
        self.join_token_for(1).await
    }

    /// A join token that joins `uses` nodes (at most [`JOIN_TOKEN_USES`]).
    async fn join_token_for(&self, uses: usize) -> anyhow::Result<String> {
        let v = self
            .post(
                "/v1/tokens",
                &self.admin,
                json!({"kind": "join", "uses": uses}).to_string(),
            )
            .await?;
        Ok(v["token"].as_str().context("join token")?.to_string())
    }

    /// A real agent process with `gpus` simulated devices.
    async fn add_agent(&mut self, name: &str, gpus: &str) -> anyhow::Result<()> {
        let join = self.join_token().await?;
        let child = Command::new(std::env::current_exe()?)
            .args(["agent", "--join", &self.url, "--token", &join])
            .args([
                "--node-name",
                name,
                "--simulate-gpus",
                gpus,
                "--grace",
                "1s",
            ])
            .arg("--data-dir")
            .arg(self.dir.join(name))
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        self.agents.push(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.get(&format!("/v1/nodes/{name}")).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("agent {name} did not join within 30 s")
    }

    /// Joins a node of `gpus` simulated H100s through the agent protocol (no process behind
    /// it); returns its credential and the lease.
    async fn register_node(
        &self,
        name: &str,
        join: &str,
        gpus: usize,
    ) -> anyhow::Result<(String, u64)> {
        let reg = simulated_node(name, gpus);
        let resp: RegisterResponse = serde_json::from_value(
            self.post("/v1/agent/register", join, serde_json::to_string(&reg)?)
                .await?,
        )?;
        Ok((resp.token.context("no agent credential")?, resp.lease_ms))
    }

    fn controller_memory(&self) -> anyhow::Result<(u64, u64)> {
        process_memory(self.controller.id())
    }
}

/// The most nodes one join token may join: benchmarks joining more make one token per this many.
pub const JOIN_TOKEN_USES: usize = crate::controller::api::MAX_JOIN_USES as usize;

/// What a node of `gpus` simulated H100s, 64 CPUs and 512 GiB with no process behind it
/// registers as.
pub fn simulated_node(name: &str, gpus: usize) -> RegisterRequest {
    RegisterRequest {
        name: name.to_string(),
        cpu_milli: 64_000,
        memory_bytes: 512 << 30,
        labels: BTreeMap::new(),
        devices: (0..gpus)
            .map(|_| DeviceSpec {
                class: Default::default(),
                model: "H100-80GB".into(),
                memory_bytes: 80 << 30,
            })
            .collect(),
        simulated: true,
        address: "http://127.0.0.1:9".into(),
        callback_secret: "unused".into(),
        confinement: "simulated by the benchmark".into(),
    }
}

/// Where a benchmark keeps its files: the `--data-dir` given, kept afterwards, or a fresh
/// temporary dir named for `what`, removed when this is dropped.
pub(crate) struct BenchDir {
    pub path: PathBuf,
    temporary: bool,
}

impl BenchDir {
    pub(crate) fn new(given: Option<PathBuf>, what: &str) -> anyhow::Result<BenchDir> {
        let temporary = given.is_none();
        let path = given.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("tessera-{what}-{}", std::process::id()))
        });
        std::fs::create_dir_all(&path)?;
        Ok(BenchDir { path, temporary })
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A directory a benchmark and its workloads share, as a cluster file system would: outside
/// `/tmp` (every workload has a private one) and writable by every workload's uid (1777).
/// Removed on drop.
pub struct SharedDir(pub PathBuf);

impl SharedDir {
    pub fn new(what: &str) -> anyhow::Result<SharedDir> {
        let dir = PathBuf::from(format!("/var/tmp/tessera-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
        Ok(SharedDir(dir))
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process's resident memory now and at its peak, in bytes.
pub fn process_memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

pub(crate) fn manifest(name: &str, gpu: f64, command: &[&str]) -> String {
    let mut resources = serde_json::Map::new();
    if gpu > 0.0 {
        resources.insert("gpu".into(), json!(gpu));
    }
    resources.insert("cpu".into(), json!(1));
    resources.insert("memory".into(), json!("1GiB"));
    json!({
        "metadata": {"name": name},
        "spec": {"resources": resources, "command": command},
    })
    .to_string()
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(crate) fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Sends `count` submissions with `concurrency` in flight; returns per-request latencies (ms) and
/// the wall time.
async fn submit_many(
    pool: &Arc<Pool>,
    count: usize,
    concurrency: usize,
    shapes: &[(f64, &'static [&'static str])],
    what: &str,
) -> anyhow::Result<(Vec<f64>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let pb = bar(count, what);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let pool = pool.clone();
        let next = next.clone();
        let pb = pb.clone();
        let shapes: Vec<(f64, Vec<&'static str>)> =
            shapes.iter().map(|(g, c)| (*g, c.to_vec())).collect();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(lat);
                }
                let (gpu, cmd) = &shapes[i % shapes.len()];
                let body = manifest(&format!("b{i}"), *gpu, cmd);
                let t = Instant::now();
                pool.post("/v1/jobs", &pool.admin, body).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                pb.inc(1);
            }
        }));
    }
    let mut all = Vec::with_capacity(count);
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = started.elapsed();
    pb.finish_and_clear();
    all.sort_by(f64::total_cmp);
    Ok((all, wall))
}

async fn api(common: &Common, jobs: usize, concurrency: usize) -> anyhow::Result<Value> {
    let mut pool = Pool::start(common, "10s")?;
    pool.add_agent("n1", "8xH100-80GB").await?;
    let pool = Arc::new(pool);
    let before = pool.counters().await?;
    let (lat, wall) = submit_many(
        &pool,
        jobs,
        concurrency,
        &[(1.0, &["true"]), (0.5, &["true"]), (0.0, &["true"])],
        "submit",
    )
    .await?;
    // What group commit achieved meanwhile: writes per batch, and a commit's time.
    let after = pool.counters().await?;
    let grew = |name: &str| after.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0);
    let batches = grew("tessera_store_batches_total").max(1.0);
    // Every acknowledged submission must be in the store.
    let listed = pool.get("/v1/jobs?limit=1000000").await?;
    let stored = listed.as_array().map_or(0, Vec::len);
    if stored != jobs {
        bail!("{jobs} submissions were acknowledged but the controller lists {stored} jobs");
    }
    Ok(json!({
        "jobs": jobs,
        "concurrency": concurrency,
        "wall_s": round2(wall.as_secs_f64()),
        "submissions_per_s": (jobs as f64 / wall.as_secs_f64()).round(),
        "request_p50_ms": round2(percentile(&lat, 50.0)),
        "request_p99_ms": round2(percentile(&lat, 99.0)),
        "jobs_listed_after": stored,
        "store_writes_per_batch": round2(grew("tessera_store_batched_writes_total") / batches),
        "store_commit_ms_mean": round2(grew("tessera_store_commit_seconds_total") * 1e3 / batches),
    }))
}

/// Writes `runs` segments (50 projects, 500 users, 4 models, 1,000 nodes, over 30 days) into a
/// fresh store, then times reports over them.
fn usage(common: &Common, runs: usize) -> anyhow::Result<Value> {
    use crate::metering::{GroupBy, Rates, Segment, Window, report};
    let dir = BenchDir::new(common.data_dir.clone(), "bench-usage")?;
    let path = dir.path.join("tessera.db");
    let mut store = crate::store::sqlite::Sqlite::open(&path)?;
    let day = 86_400_000u64;
    let now = 40 * day;
    let models = ["H100-80GB", "A100-80GB", "L4-24GB", ""];
    let mut seed = 42u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let segment = |i: usize, r: u64| {
        let start = 10 * day + r % (30 * day);
        let milli = [250, 500, 1000, 2000, 8000][(r >> 40) as usize % 5];
        Segment {
            job: i as u64 / 2 + 1,
            attempt: 1,
            replica: (i % 2) as u32,
            user: format!("user{}", (r >> 8) % 500),
            project: format!("project{}", (r >> 20) % 50),
            model: models[(r >> 30) as usize % 4].to_string(),
            node: format!("node{}", (r >> 34) % 1000),
            gpu_milli: milli,
            gpu_memory_bytes: milli * (80 << 20),
            cpu_milli: 4000,
            memory_bytes: 32 << 30,
            start_ms: start,
            end_ms: (start + (r >> 12) % (8 * 3_600_000)).min(now),
            energy_mj: (r >> 16) % 1_000_000_000,
            simulated: false,
            idle_gpu_milli_ms: 0,
        }
    };
    let pb = bar(runs, "runs written");
    let started = Instant::now();
    let mut seq = 0u64;
    for chunk_start in (0..runs).step_by(1024) {
        let batch: Vec<Segment> = (chunk_start..(chunk_start + 1024).min(runs))
            .map(|i| segment(i, next()))
            .collect();
        seq = store.in_transaction(|tx| crate::controller::usage::record(tx, seq, &batch))?;
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    let write_s = started.elapsed().as_secs_f64();
    let rates = Rates {
        gpu_hour: [("H100-80GB".to_string(), 2.5), ("*".to_string(), 1.0)].into(),
        carbon_g_per_kwh: Some(300.0),
    };
    let timed = |days: u64, by: GroupBy| -> anyhow::Result<(f64, usize, usize)> {
        let t = Instant::now();
        let window = Window {
            since_ms: now - days * day,
            until_ms: now,
        };
        let segments =
            crate::store::Ledger::usage(&crate::store::sqlite::read_only(&path)?, seq, window)?;
        let r = report(&segments, window, by, &rates);
        Ok((
            t.elapsed().as_secs_f64() * 1000.0,
            segments.len(),
            r.rows.len(),
        ))
    };
    let (week_project_ms, week_runs, _) = timed(7, GroupBy::Project)?;
    let (month_project_ms, month_runs, _) = timed(30, GroupBy::Project)?;
    let (month_job_ms, _, month_jobs) = timed(30, GroupBy::Job)?;
    let bytes = std::fs::metadata(&path)?.len()
        + std::fs::metadata(dir.path.join("tessera.db-wal")).map_or(0, |m| m.len());
    drop(store);
    Ok(json!({
        "runs": runs,
        "ledger_write_runs_per_s": round2(runs as f64 / write_s),
        "store_mib": round2(bytes as f64 / (1 << 20) as f64),
        "report_7d_by_project_ms": round2(week_project_ms),
        "runs_in_7d": week_runs,
        "report_30d_by_project_ms": round2(month_project_ms),
        "runs_in_30d": month_runs,
        "report_30d_by_job_ms": round2(month_job_ms),
        "jobs_in_30d": month_jobs,
    }))
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn latency(common: &Common, jobs: usize) -> anyhow::Result<Value> {
    let mut pool = Pool::start(common, "10s")?;
    pool.add_agent("n1", "8xH100-80GB").await?;
    let shared = SharedDir::new("latency")?;
    let marks = &shared.0;
    let script = format!("date +%s%N > {}/$TESSERA_JOB_ID", marks.display());
    let pb = bar(jobs, "jobs");
    let mut lat = Vec::with_capacity(jobs);
    for i in 0..jobs {
        let body = manifest(&format!("l{i}"), 1.0, &["sh", "-c", &script]);
        let t0 = now_ns();
        let job = pool.post("/v1/jobs", &pool.admin, body).await?;
        let id = job["id"].as_u64().context("job id")?;
        let started = wait_for_mark(&marks.join(id.to_string())).await?;
        lat.push((started.saturating_sub(t0)) as f64 / 1e6);
        // Idle pool for the next one: wait until this job is over.
        wait_state(&pool, id, &["succeeded"]).await?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    lat.sort_by(f64::total_cmp);
    Ok(json!({
        "jobs": jobs,
        "submit_to_running_p50_ms": round2(percentile(&lat, 50.0)),
        "submit_to_running_p90_ms": round2(percentile(&lat, 90.0)),
        "submit_to_running_p99_ms": round2(percentile(&lat, 99.0)),
        "submit_to_running_max_ms": round2(lat.last().copied().unwrap_or(f64::NAN)),
    }))
}

/// The workload's own clock reading at its start (nanoseconds since the epoch).
async fn wait_for_mark(path: &Path) -> anyhow::Result<u128> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(ns) = text.trim().parse::<u128>()
        {
            return Ok(ns);
        }
        if Instant::now() > deadline {
            bail!("the workload never wrote {}", path.display());
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Counters shared by the protocol-level agents of the scale benchmark.
#[derive(Default)]
struct AgentStats {
    syncs: AtomicU64,
    running: AtomicU64,
    errors: AtomicU64,
}

/// A node that speaks the agent protocol but runs nothing: it reports every assignment as
/// running, so the controller holds the state of a busy pool.
async fn protocol_agent(
    pool: Arc<Pool>,
    name: String,
    join: String,
    stats: Arc<AgentStats>,
) -> anyhow::Result<()> {
    let (token, lease_ms) = pool.register_node(&name, &join, 8).await?;
    let mut seq = 0u64;
    let mut revision = 0u64;
    let mut running: Vec<String> = Vec::new();
    loop {
        seq += 1;
        let req = SyncRequest {
            seq,
            revision,
            statuses: running
                .iter()
                .map(|key| ReplicaStatus::new(key.clone(), RunPhase::Running))
                .collect(),
            wait_ms: lease_ms / 3,
            sample: None,
            images: vec![],
        };
        match pool
            .post("/v1/agent/sync", &token, serde_json::to_string(&req)?)
            .await
        {
            Ok(v) => {
                let s: SyncResponse = serde_json::from_value(v)?;
                stats.syncs.fetch_add(1, Ordering::Relaxed);
                revision = s.revision;
                let before = running.len() as u64;
                running = s.desired.into_iter().map(|a| a.key).collect();
                let now = running.len() as u64;
                if now >= before {
                    stats.running.fetch_add(now - before, Ordering::Relaxed);
                } else {
                    stats.running.fetch_sub(before - now, Ordering::Relaxed);
                }
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn scale(
    common: &Common,
    nodes: usize,
    jobs: usize,
    concurrency: usize,
) -> anyhow::Result<Value> {
    // A long lease: the point is memory, not heartbeat load; 10,000 long polls stay open.
    let pool = Arc::new(Pool::start(common, "60s")?);
    const USES: usize = JOIN_TOKEN_USES;
    let mut joins = Vec::new();
    for first in (0..nodes).step_by(USES) {
        joins.push(pool.join_token_for(USES.min(nodes - first)).await?);
    }
    let stats = Arc::new(AgentStats::default());
    let started = Instant::now();
    let pb = bar(nodes, "nodes");
    let width = nodes.to_string().len();
    let mut handles = Vec::new();
    for i in 0..nodes {
        let name = format!("sim{i:0width$}");
        handles.push(tokio::spawn(protocol_agent(
            pool.clone(),
            name,
            joins[i / USES].clone(),
            stats.clone(),
        )));
        // Registration is one store write per node; pace it so that it does not all queue up.
        if i % 256 == 255 {
            loop {
                let n = pool.get("/v1/nodes").await?.as_array().map_or(0, Vec::len);
                pb.set_position(n as u64);
                if n + 256 > i {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    loop {
        let n = pool.get("/v1/nodes").await?.as_array().map_or(0, Vec::len);
        pb.set_position(n as u64);
        if n >= nodes {
            break;
        }
        if handles.iter().any(|h| h.is_finished()) {
            bail!("a simulated node failed to register");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pb.finish_and_clear();
    let nodes_s = started.elapsed().as_secs_f64();
    let (lat, wall) = submit_many(
        &pool,
        jobs,
        concurrency,
        &[
            (1.0, &["python3", "train.py"]),
            (0.5, &["python3", "serve.py"]),
            (2.0, &["torchrun", "train.py"]),
            (0.0, &["sh", "etl.sh"]),
        ],
        "jobs",
    )
    .await?;
    // Let the scheduler and the agents settle: wait until the running count has not changed for
    // 10 s (a round placing tens of thousands of jobs takes seconds before any of them is
    // reported running, so a shorter quiet spell can end the wait half-way).
    let settle = Instant::now();
    let (mut last, mut quiet) = (u64::MAX, 0);
    while quiet < 5 && settle.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = stats.running.load(Ordering::Relaxed);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    let (rss, peak) = pool.controller_memory()?;
    let store_bytes: u64 = std::fs::read_dir(pool.dir.join("controller"))?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    let listed = pool.get("/v1/jobs?limit=1000000").await?;
    let mut states: BTreeMap<String, u64> = BTreeMap::new();
    for j in listed.as_array().into_iter().flatten() {
        *states
            .entry(j["state"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    for h in &handles {
        h.abort();
    }
    Ok(json!({
        "nodes": nodes,
        "gpus": nodes * 8,
        "jobs": jobs,
        "jobs_by_state": states,
        "replicas_reported_running": stats.running.load(Ordering::Relaxed),
        "agent_syncs": stats.syncs.load(Ordering::Relaxed),
        "agent_sync_errors": stats.errors.load(Ordering::Relaxed),
        "nodes_joined_s": round2(nodes_s),
        "submissions_per_s": (jobs as f64 / wall.as_secs_f64()).round(),
        "request_p99_ms": round2(percentile(&lat, 99.0)),
        "controller_rss_mib": rss >> 20,
        "controller_peak_rss_mib": peak >> 20,
        "store_mib": store_bytes >> 20,
    }))
}

/// Fills `buf` with fast pseudo-random bytes (xorshift), so chunks do not repeat.
fn scramble(buf: &mut [u8], seed: &mut u64) {
    for word in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        word.copy_from_slice(&b[..word.len()]);
    }
}

/// Rewrites every `every`-th MiB of the state file with new bytes, then marks the checkpoint
/// complete again.
fn change_state(dir: &Path, size: u64, every: u64, seed: &mut u64) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let _ = std::fs::remove_file(dir.join("COMPLETE"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("state.bin"))?;
    let mut buf = vec![0u8; 1 << 20];
    let chunks = size.div_ceil(1 << 20);
    for i in (0..chunks).filter(|i| i % every == 0) {
        let len = (size - i * (1 << 20)).min(1 << 20) as usize;
        scramble(&mut buf[..len], seed);
        f.seek(SeekFrom::Start(i << 20))?;
        f.write_all(&buf[..len])?;
    }
    f.sync_all()?;
    std::thread::sleep(Duration::from_millis(10));
    std::fs::write(dir.join("COMPLETE"), b"")?;
    Ok(())
}

async fn checkpoints(common: &Common, size: &str) -> anyhow::Result<Value> {
    let size = crate::units::parse_bytes("--size", &crate::units::Quantity::Text(size.into()))?;
    let pool = Arc::new(Pool::start(common, "60s")?);
    // A node that speaks the agent protocol, and a checkpointing job placed on it.
    let join = pool.join_token().await?;
    let (token, _) = pool.register_node("bench", &join, 1).await?;
    let job = json!({"metadata": {"name": "ckpt"},
                     "spec": {"resources": {"gpu": 1}, "checkpoint": {"grace": "30s"},
                              "command": ["true"]}});
    pool.post("/v1/jobs", &pool.admin, job.to_string()).await?;
    let mut key = None;
    for seq in 1..200u64 {
        let req = SyncRequest {
            seq,
            revision: 0,
            statuses: vec![],
            wait_ms: 0,
            sample: None,
            images: vec![],
        };
        let s: SyncResponse = serde_json::from_value(
            pool.post("/v1/agent/sync", &token, serde_json::to_string(&req)?)
                .await?,
        )?;
        if let Some(a) = s.desired.first() {
            key = Some(a.key.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let key = key.context("the job was never placed on the benchmark's node")?;
    let remote = crate::agent::checkpoint::Remote {
        http: pool.http.clone(),
        controllers: std::sync::Arc::new(crate::endpoints::Endpoints::parse(
            "the pool's URL",
            &pool.url,
        )?),
        token,
    };
    let dir = pool.dir.join("checkpoint");
    std::fs::create_dir_all(&dir)?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rows = Vec::new();
    for (what, every) in [("first", 1), ("10% changed", 10), ("all changed", 1)] {
        change_state(&dir, size, every, &mut seed)?;
        let t = Instant::now();
        let (id, sent) = crate::agent::checkpoint::upload(&remote, &key, &dir)
            .await?
            .context("the checkpoint was not complete")?;
        let secs = t.elapsed().as_secs_f64();
        rows.push((what, id, sent, secs));
    }
    let into = pool.dir.join("restored");
    let t = Instant::now();
    crate::agent::checkpoint::restore(&remote, &rows[2].1, &into).await?;
    let restore_s = t.elapsed().as_secs_f64();
    if std::fs::read(into.join("state.bin"))? != std::fs::read(dir.join("state.bin"))? {
        bail!("the restored state differs from the checkpointed one");
    }
    let mib = |b: u64| round2(b as f64 / f64::from(1 << 20));
    let mut out = serde_json::Map::new();
    out.insert("state_mib".into(), json!(mib(size)));
    for (what, _, sent, secs) in &rows {
        out.insert(format!("{what}: sent_mib"), json!(mib(*sent)));
        out.insert(format!("{what}: seconds"), json!(round2(*secs)));
    }
    out.insert("restore_seconds".into(), json!(round2(restore_s)));
    out.insert("restored_identical".into(), json!(true));
    Ok(Value::Object(out))
}

async fn wait_state(pool: &Pool, id: u64, states: &[&str]) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = pool.get(&format!("/v1/jobs/{id}")).await?;
        if states.iter().any(|s| j["state"] == *s) {
            return Ok(j);
        }
        if Instant::now() > deadline {
            bail!("job {id} never reached {states:?}: {j}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn preempt(common: &Common, rounds: usize) -> anyhow::Result<Value> {
    let mut pool = Pool::start(common, "10s")?;
    pool.add_agent("n1", "1xH100-80GB").await?;
    let shared = SharedDir::new("preempt")?;
    let marks = &shared.0;
    let mark = format!("date +%s%N > {}/$TESSERA_JOB_ID", marks.display());
    let saver = "trap 'echo 1 > \"$TESSERA_CHECKPOINT_DIR/state\"; : > \"$TESSERA_CHECKPOINT_DIR/COMPLETE\"; exit 0' USR1; while true; do sleep 0.05; done";
    let mut out = serde_json::Map::new();
    for checkpoint in [false, true] {
        let mut lat = Vec::new();
        for i in 0..rounds {
            let mut low = json!({"metadata": {"name": format!("low{i}")},
                                 "spec": {"priority": 10, "resources": {"gpu": 1},
                                          "command": ["sh", "-c", saver]}});
            if checkpoint {
                low["spec"]["checkpoint"] = json!({"grace": "30s"});
            }
            let low = pool.post("/v1/jobs", &pool.admin, low.to_string()).await?;
            let low = low["id"].as_u64().context("job id")?;
            wait_state(&pool, low, &["running"]).await?;
            let high = json!({"metadata": {"name": format!("high{i}")},
                              "spec": {"priority": 90, "resources": {"gpu": 1},
                                       "command": ["sh", "-c", mark]}});
            let t0 = now_ns();
            let high = pool.post("/v1/jobs", &pool.admin, high.to_string()).await?;
            let high = high["id"].as_u64().context("job id")?;
            let started = wait_for_mark(&marks.join(high.to_string())).await?;
            lat.push(started.saturating_sub(t0) as f64 / 1e6);
            wait_state(&pool, high, &["succeeded"]).await?;
            pool.post(&format!("/v1/jobs/{low}/cancel"), &pool.admin, "{}".into())
                .await?;
            wait_state(&pool, low, &["cancelled", "succeeded", "failed"]).await?;
        }
        lat.sort_by(f64::total_cmp);
        let what = if checkpoint {
            "with checkpoint"
        } else {
            "plain stop"
        };
        out.insert(
            format!("{what}: p50_ms"),
            json!(round2(percentile(&lat, 50.0))),
        );
        out.insert(
            format!("{what}: max_ms"),
            json!(round2(*lat.last().unwrap_or(&f64::NAN))),
        );
    }
    out.insert("rounds".into(), json!(rounds));
    Ok(Value::Object(out))
}
