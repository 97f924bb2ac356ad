//! `tessera bench scale --in-process`: the controller's state, scheduler and apply path at a
//! size whose long polls no machine here can hold (these cap open files at 20,000). Nodes and
//! jobs go into the controller's own store and state through the same writes the API makes; a
//! scheduling round is the reconcile loop's own. No sockets, no agents: placed jobs stay placed
//! (nobody reports them running or ended), which is what a round of a full pool looks at.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tessera_sched::{DeviceSpec, NodeSpec};

use crate::bench::{BenchDir, bar, percentile, process_memory, round2};
use crate::controller::{self, ApiError, Controller, ControllerConfig, Ctl, limits, reconcile};
use crate::state::{EventKind, Job, Node, NodeHealth};
use crate::store::{self, Store};
use reconcile::{Phases, Rounds};

/// Nodes or jobs written per store transaction while filling the pool.
const FILL_BATCH: usize = 1_000;

/// Fills a pool of `nodes` nodes of 8 GPUs with `jobs` jobs (a quarter each of 1, 0.5, 2 and 0
/// GPUs, 1 CPU and 1 GiB each), schedules until the rounds place nothing more, then times
/// `rounds` rounds each after one more submission.
pub async fn run(
    data_dir: Option<std::path::PathBuf>,
    nodes: usize,
    jobs: usize,
    rounds: usize,
) -> anyhow::Result<Value> {
    let dir = BenchDir::new(data_dir, "bench-inprocess")?;
    measure(&dir.path, nodes, jobs, rounds).await
}

async fn measure(
    dir: &std::path::Path,
    nodes: usize,
    jobs: usize,
    rounds: usize,
) -> anyhow::Result<Value> {
    let ctl = controller_at(dir)?;
    controller::bootstrap(&ctl.store).await?;

    let started = Instant::now();
    let pb = bar(nodes, "nodes");
    let width = nodes.to_string().len();
    for first in (0..nodes).step_by(FILL_BATCH) {
        let names: Vec<String> = (first..(first + FILL_BATCH).min(nodes))
            .map(|i| format!("sim{i:0width$}"))
            .collect();
        let n = names.len();
        ctl.store
            .write(move |c, s| -> Result<(), ApiError> {
                for name in names {
                    let node = simulated_node(&name, c.now_ms);
                    c.put_node(&node)?;
                    s.nodes.insert(name, node);
                }
                s.changed_for_scheduler();
                Ok(())
            })
            .await
            .map_err(failed)?;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    let nodes_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let pb = bar(jobs, "jobs");
    for first in (0..jobs).step_by(FILL_BATCH) {
        let n = FILL_BATCH.min(jobs - first);
        submit(&ctl, first, n).await?;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    let jobs_s = started.elapsed().as_secs_f64();

    // Schedule until a round places nothing more.
    let started = Instant::now();
    let mut scheduler = Rounds::default();
    let mut first_round = None;
    loop {
        let phases = scheduler.round(&ctl).await.map_err(failed)?;
        first_round.get_or_insert(phases);
        if phases.placed == 0 {
            break;
        }
    }
    let settle_s = started.elapsed().as_secs_f64();
    let (placed, waiting) = ctl.store.read(|s| {
        let placed = s.jobs.values().filter(|j| j.state.is_active()).count();
        (placed, s.jobs.len() - placed)
    });

    // A round after each of `rounds` more submissions, as the loop runs one after a kick (a
    // quarter of them CPU-only jobs, which find room; the rest wait).
    let mut after_one = Timings::default();
    let pb = bar(rounds, "rounds");
    for i in 0..rounds {
        submit(&ctl, jobs + i, 1).await?;
        let began = Instant::now();
        let phases = scheduler.round(&ctl).await.map_err(failed)?;
        after_one.add(began.elapsed(), &phases);
        pb.inc(1);
    }
    pb.finish_and_clear();
    // Full rounds, for comparison: the whole pool read and scheduled, as after a job ends.
    let mut full = Timings::default();
    for i in 0..rounds.min(3) {
        submit(&ctl, jobs + rounds + i, 1).await?;
        ctl.store
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .changed_for_scheduler();
        let began = Instant::now();
        let phases = scheduler.round(&ctl).await.map_err(failed)?;
        full.add(began.elapsed(), &phases);
    }
    let (rss, peak) = process_memory(std::process::id())?;
    let first = first_round.unwrap_or_default();
    Ok(json!({
        "nodes": nodes,
        "gpus": nodes * 8,
        "jobs": jobs,
        "jobs_placed": placed,
        "jobs_waiting": waiting,
        "nodes_written_s": round2(nodes_s),
        "jobs_submitted_s": round2(jobs_s),
        "first_round_build_ms": round2(ms(first.build)),
        "first_round_schedule_ms": round2(ms(first.schedule)),
        "first_round_apply_ms": round2(ms(first.apply)),
        "settle_s": round2(settle_s),
        "rounds_timed": rounds,
        "after_one_submission": after_one.report(),
        "full_rounds": full.report(),
        "rss_mib": rss >> 20,
        "peak_rss_mib": peak >> 20,
    }))
}

/// Rounds' times, whole and by phase.
#[derive(Default)]
struct Timings {
    totals: Vec<f64>,
    builds: Vec<f64>,
    schedules: Vec<f64>,
    /// Rounds that placed their job, and their times.
    placed: Vec<f64>,
    quick: usize,
}

impl Timings {
    fn add(&mut self, took: Duration, phases: &Phases) {
        self.totals.push(ms(took));
        self.builds.push(ms(phases.build));
        self.schedules.push(ms(phases.schedule));
        if phases.placed > 0 {
            self.placed.push(ms(took));
        }
        self.quick += usize::from(phases.quick);
    }

    fn report(mut self) -> Value {
        for v in [
            &mut self.totals,
            &mut self.builds,
            &mut self.schedules,
            &mut self.placed,
        ] {
            v.sort_by(f64::total_cmp);
        }
        let p = |v: &[f64], q: f64| round2(percentile(v, q));
        json!({
            "rounds": self.totals.len(),
            "quick": self.quick,
            "round_p50_ms": p(&self.totals, 50.0),
            "round_p99_ms": p(&self.totals, 99.0),
            "build_p50_ms": p(&self.builds, 50.0),
            "build_p99_ms": p(&self.builds, 99.0),
            "schedule_p50_ms": p(&self.schedules, 50.0),
            "schedule_p99_ms": p(&self.schedules, 99.0),
            "placing": self.placed.len(),
            "placing_round_p99_ms": p(&self.placed, 99.0),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A node of 8 simulated H100s, 64 CPUs and 512 GiB, as `bench scale`'s agents register.
fn simulated_node(name: &str, now_ms: u64) -> Node {
    let device = DeviceSpec {
        class: Default::default(),
        model: "H100-80GB".into(),
        memory_bytes: 80 << 30,
    };
    Node {
        spec: NodeSpec::with_devices(name, 64_000, 512 << 30, 8, device),
        simulated: true,
        address: "http://127.0.0.1:9".into(),
        cordoned: false,
        health: NodeHealth::Ready,
        registered_ms: now_ms,
        confinement: "simulated by the benchmark".into(),
        last_seen_ms: now_ms,
        last_seq: 0,
        heartbeats: 0,
    }
}

/// Submits jobs `first..first + n` in one transaction, each as the API's submission makes it.
async fn submit(ctl: &Ctl, first: usize, n: usize) -> anyhow::Result<()> {
    const SHAPES: [(f64, &str); 4] = [
        (1.0, "train.py"),
        (0.5, "serve.py"),
        (2.0, "torchrun.py"),
        (0.0, "etl.sh"),
    ];
    let mut defs = Vec::with_capacity(n);
    for i in first..first + n {
        let (gpu, cmd) = SHAPES[i % SHAPES.len()];
        let body = crate::bench::manifest(&format!("b{i}"), gpu, &["python3", cmd]);
        let def = controller::ops::parse_manifest(body.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}", e.message))?
            .into_def("default")?;
        defs.push(def);
    }
    ctl.store
        .write(move |c, s| -> Result<(), ApiError> {
            for def in defs {
                let id = s
                    .take_job_id()
                    .map_err(|e| ApiError::internal(format!("reserving a job id: {e}")))?;
                let job = Job::new(id, "admin", def, c.now_ms);
                s.remember_request(&job.def.spec.request);
                let note = (EventKind::Submitted, "submitted by admin".to_string());
                controller::ops::save_job(c, s, job, vec![note], c.now_ms)?;
                s.next_job_id = id;
            }
            Ok(())
        })
        .await
        .map_err(failed)?;
    Ok(())
}

fn failed(e: ApiError) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message)
}

/// A controller on a SQLite store in `dir`, with no listener and no loops running: the
/// benchmark runs its rounds itself.
fn controller_at(dir: &std::path::Path) -> anyhow::Result<Ctl> {
    let config = ControllerConfig {
        data_dir: dir.to_path_buf(),
        store: None,
        advertise: None,
        leader_lease: Duration::from_secs(5),
        listen: "127.0.0.1:0".parse()?,
        lease: Duration::from_secs(3600),
        tls: None,
        seed: 42,
        policy: tessera_sched::PolicyKind::from_name("tessera").context("the default policy")?,
        gateway: None,
        rates: Default::default(),
        fair_share_half_life: None,
        log_limit: 64 << 20,
        disk_reserve: 0,
        max_connections: 16_384,
        max_connections_per_address: 1_024,
        gateway_body_budget: 256 << 20,
        rendezvous_ports: 29_500..=30_499,
    };
    let backend = store::sqlite::Sqlite::open(&config.store_path())
        .with_context(|| format!("opening a store in {}", dir.display()))?;
    let state = store::Backend::load(&backend, crate::controller::now_ms())?;
    let connections = limits::Connections::new(config.max_connections, 1_024);
    Ok(std::sync::Arc::new(Controller {
        store: Store::start(Box::new(backend), state),
        tokens: Default::default(),
        metrics: controller::metrics::Metrics::new(),
        http: reqwest::Client::new(),
        gateway: std::sync::Arc::new(controller::gateway::Gateway::new(
            config.gateway_body_budget,
        )),
        telemetry: Default::default(),
        connections: [("api", connections.clone()), ("gateway", connections)],
        callback_key: crate::auth::random_secret().into_bytes(),
        blobs: std::sync::Arc::new(store::blobs::Dir(dir.join("blobs"))),
        leadership: store::lease::Leadership::sole(),
        config,
    }))
}
