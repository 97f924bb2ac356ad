//! `tessera bench failover`: two controllers on one PostgreSQL store, one real agent with a
//! long-running replica, clients submitting without pause, and the leader killed with SIGKILL
//! again and again. Measures how long the pool takes no writes after each kill (from the kill to
//! the first submission acknowledged by the new leader), and checks that nothing acknowledged was
//! lost and that the running replica was never started twice.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// One controller process and what it prints.
struct Controller {
    child: Child,
    url: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    fn start(dir: &Path, port: u16, store: &str, leases: [&str; 2]) -> anyhow::Result<Controller> {
        let [leader_lease, lease] = leases;
        let listen = format!("127.0.0.1:{port}");
        let mut child = Command::new(std::env::current_exe()?)
            .args(["controller", "--data-dir"])
            .arg(dir)
            .args(["--listen", &listen, "--store", store])
            .args(["--leader-lease", leader_lease, "--lease", lease])
            .args(["--gateway-listen", "off"])
            .env("TESSERA_CONFIG", dir.join("cli.yaml"))
            .env("TESSERA_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let lines = BufReader::new(child.stdout.take().context("controller stdout")?).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ok(Controller {
            child,
            url: format!("http://{listen}"),
            lines: rx,
        })
    }

    /// The next printed line containing `text`.
    fn wait_line(&self, text: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("the controller at {} never printed {text:?}", self.url),
            }
        }
    }
}

/// Runs `one(http, i)` for every `i` below `count`, on 16 threads with a client each, behind a
/// progress bar named `what`.
fn sixteen_at_a_time(
    what: &str,
    count: usize,
    one: impl Fn(&reqwest::blocking::Client, usize) -> anyhow::Result<()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    if count == 0 {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(count as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} {{per_sec}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let one = Arc::new(one);
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (next, bar, one) = (next.clone(), bar.clone(), one.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok(());
                    }
                    one(&http, i)?;
                    bar.inc(1);
                }
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a {what} thread failed"))??;
    }
    bar.finish_and_clear();
    Ok(())
}

/// Submits `count` jobs that wait for capacity.
fn queue_waiting(url: &str, admin: &str, count: usize) -> anyhow::Result<()> {
    let (url, admin) = (url.to_string(), admin.to_string());
    sixteen_at_a_time("queueing", count, move |http, i| {
        http.post(format!("{url}/v1/jobs"))
            .bearer_auth(&admin)
            .json(&json!({"metadata": {"name": format!("w{i}")},
                          "spec": {"command": ["true"], "waitForCapacity": true,
                                   "resources": {"gpu": 8, "cpu": "100m", "memory": "16MiB"}}}))
            .send()?
            .error_for_status()?;
        Ok(())
    })
}

/// Registers `count` silent simulated nodes of 8 GPUs.
fn register_nodes(url: &str, admin: &str, count: usize) -> anyhow::Result<()> {
    const USES: usize = crate::bench::JOIN_TOKEN_USES;
    let http = reqwest::blocking::Client::new();
    let mut joins = Vec::new();
    for first in (0..count).step_by(USES) {
        let token = http
            .post(format!("{url}/v1/tokens"))
            .bearer_auth(admin)
            .json(&json!({"kind": "join", "uses": USES.min(count - first)}))
            .send()?
            .error_for_status()?
            .json::<Value>()?["token"]
            .as_str()
            .context("a join token")?
            .to_string();
        joins.push(token);
    }
    let url = url.to_string();
    sixteen_at_a_time("registering", count, move |http, i| {
        http.post(format!("{url}/v1/agent/register"))
            .bearer_auth(&joins[i / USES])
            .json(&crate::bench::simulated_node(&format!("sim{i:06}"), 8))
            .send()?
            .error_for_status()?;
        Ok(())
    })
}

fn submission(i: usize) -> Value {
    json!({"metadata": {"name": format!("f{i}")},
           "spec": {"command": ["true"], "resources": {"cpu": "100m", "memory": "16MiB"}}})
}

/// Runs the benchmark; `store` must name an empty PostgreSQL database. `waiting` jobs that no
/// node can hold are queued first, so that each takeover reads a pool of that size.
pub fn run(
    store: &str,
    data_dir: Option<PathBuf>,
    port: u16,
    kills: usize,
    leader_lease: &str,
    waiting: usize,
    nodes: usize,
) -> anyhow::Result<Value> {
    let dir = crate::bench::BenchDir::new(data_dir, "failover")?;
    measure(store, &dir.path, port, kills, leader_lease, waiting, nodes)
}

fn measure(
    store: &str,
    dir: &Path,
    port: u16,
    kills: usize,
    leader_lease: &str,
    waiting: usize,
    nodes: usize,
) -> anyhow::Result<Value> {
    let ports = [port, port + 1];
    // Silent nodes must not be judged lost while the benchmark runs.
    let leases = [leader_lease, if nodes > 0 { "1h" } else { "10s" }];
    let mut controllers: Vec<Option<Controller>> = vec![None, None];
    let first = Controller::start(&dir.join("c0"), ports[0], store, leases)?;
    first.wait_line("Tessera API at", Duration::from_secs(60))?;
    let admin = first
        .wait_line("First admin token", Duration::from_secs(10))
        .context("the store must be an empty database")?
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let second = Controller::start(&dir.join("c1"), ports[1], store, leases)?;
    second.wait_line("as a standby", Duration::from_secs(60))?;
    let urls = [first.url.clone(), second.url.clone()];
    controllers[0] = Some(first);
    controllers[1] = Some(second);
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;

    // A real agent that knows both controllers, and a replica that counts its starts.
    let join = http
        .post(format!("{}/v1/tokens", urls[0]))
        .bearer_auth(&admin)
        .json(&json!({"kind": "join"}))
        .send()?
        .error_for_status()?
        .json::<Value>()?["token"]
        .as_str()
        .context("a join token")?
        .to_string();
    let mut agent = Command::new(std::env::current_exe()?)
        .args(["agent", "--join", &urls.join(","), "--token", &join])
        .args(["--node-name", "n1", "--simulate-gpus", "1xH100-80GB"])
        .args(["--grace", "1s", "--cpus", "8", "--memory", "16GiB"])
        .arg("--data-dir")
        .arg(dir.join("n1"))
        .env("TESSERA_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    // Where the replica (its project's own uid, with a /tmp of its own) may write.
    let shared = crate::bench::SharedDir::new("failover")?;
    let starts = shared.0.join("starts");
    let long = http
        .post(format!("{}/v1/jobs", urls[0]))
        .bearer_auth(&admin)
        .json(&json!({"metadata": {"name": "long"},
                      "spec": {"command": ["sh", "-c",
                               format!("echo started >> {}; sleep 100000", starts.display())],
                               "resources": {"cpu": "100m", "memory": "16MiB"}}}))
        .send()?
        .error_for_status()?
        .json::<Value>()?["id"]
        .as_u64()
        .context("a job id")?;
    let started = Instant::now();
    while std::fs::read_to_string(&starts)
        .unwrap_or_default()
        .is_empty()
    {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = agent.kill();
            let job: Value = http
                .get(format!("{}/v1/jobs/{long}", urls[0]))
                .bearer_auth(&admin)
                .send()?
                .json()?;
            bail!("the long replica never started: {}", job["reason"]);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // Silent nodes, and a queue of jobs that wait for 8 GPUs (n1 has one; each silent node
    // takes one of them), for the takeovers to read.
    let registering = Instant::now();
    register_nodes(&urls[0], &admin, nodes)?;
    let registered_s = registering.elapsed().as_secs_f64();
    let queued = Instant::now();
    queue_waiting(&urls[0], &admin, waiting)?;
    let queued_s = queued.elapsed().as_secs_f64();
    // Give the standby a few follow rounds, then weigh both.
    std::thread::sleep(Duration::from_secs(3));
    let rss = |c: &Option<Controller>| -> anyhow::Result<u64> {
        let c = c.as_ref().context("a controller")?;
        Ok(crate::bench::process_memory(c.child.id())?.0 >> 20)
    };
    let (leader_rss_mib, standby_rss_mib) = (rss(&controllers[0])?, rss(&controllers[1])?);

    // Clients that submit without pause, to whichever controller answers.
    let stop = Arc::new(AtomicBool::new(false));
    // (sent, answered, id) of every acknowledged submission.
    let acked = Arc::new(Mutex::new(Vec::<(Instant, Instant, u64)>::new()));
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let (stop, acked, urls, admin) =
                (stop.clone(), acked.clone(), urls.clone(), admin.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("an HTTP client");
                let mut at = c;
                let mut i = c * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let sent = Instant::now();
                    let r = http
                        .post(format!("{}/v1/jobs", urls[at % 2]))
                        .bearer_auth(&admin)
                        .json(&submission(i))
                        .send();
                    match r {
                        Ok(resp) if resp.status().as_u16() == 201 => {
                            if let Some(id) =
                                resp.json::<Value>().ok().and_then(|v| v["id"].as_u64())
                            {
                                acked.lock().unwrap_or_else(|e| e.into_inner()).push((
                                    sent,
                                    Instant::now(),
                                    id,
                                ));
                            }
                        }
                        _ => {
                            at += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
        })
        .collect();

    let bar = indicatif::ProgressBar::new(kills as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("failovers {bar:40} {pos}/{len} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut leader = 0;
    let mut outages = Vec::new();
    let mut takeovers = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(1500));
        let killed = Instant::now();
        drop(controllers[leader].take());
        let next = 1 - leader;
        let survivor = controllers[next].as_ref().context("a standby")?;
        survivor.wait_line("Leading the pool", Duration::from_secs(60))?;
        takeovers.push(killed.elapsed().as_secs_f64());
        // The first submission sent after the kill and acknowledged.
        let deadline = killed + Duration::from_secs(60);
        let first_write = loop {
            let after = acked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(sent, _, _)| *sent > killed)
                .map(|(_, answered, _)| *answered);
            if let Some(at) = after {
                break at;
            }
            if Instant::now() > deadline {
                bail!("no submission was acknowledged within 60 s of a kill");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        outages.push((first_write - killed).as_secs_f64());
        // The killed one comes back as a standby.
        let again = Controller::start(
            &dir.join(format!("c{leader}")),
            ports[leader],
            store,
            leases,
        )?;
        again.wait_line("as a standby", Duration::from_secs(60))?;
        controllers[leader] = Some(again);
        leader = next;
        bar.inc(1);
    }
    bar.finish_and_clear();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }

    // Everything acknowledged is there, once; the long replica ran through every failover.
    let url = &urls[leader];
    let jobs: Value = http
        .get(format!("{url}/v1/jobs?limit=10000000"))
        .bearer_auth(&admin)
        .timeout(Duration::from_secs(120))
        .send()?
        .error_for_status()?
        .json()?;
    let stored: Vec<u64> = jobs
        .as_array()
        .context("a job list")?
        .iter()
        .filter_map(|j| j["id"].as_u64())
        .collect();
    let stored_once: HashSet<u64> = stored.iter().copied().collect();
    let acked: Vec<u64> = acked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(_, _, id)| *id)
        .collect();
    let lost = acked.iter().filter(|id| !stored_once.contains(id)).count();
    let long_job: Value = http
        .get(format!("{url}/v1/jobs/{long}"))
        .bearer_auth(&admin)
        .send()?
        .json()?;
    let long_starts = std::fs::read_to_string(&starts)?.lines().count();
    let _ = agent.kill();
    let _ = agent.wait();
    drop(controllers);

    let summary = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        json!({
            "p50": crate::bench::round2(crate::bench::percentile(&v, 50.0)),
            "max": crate::bench::round2(v.last().copied().unwrap_or(0.0)),
        })
    };
    Ok(json!({
        "kills": kills,
        "nodes": nodes,
        "nodes_registered_s": crate::bench::round2(registered_s),
        "waiting_jobs": waiting,
        "waiting_queued_s": crate::bench::round2(queued_s),
        "leader_rss_mib": leader_rss_mib,
        "standby_rss_mib": standby_rss_mib,
        "leader_lease": leader_lease,
        "takeover_s": summary(takeovers),
        "write_outage_s": summary(outages),
        "acknowledged": acked.len(),
        "acknowledged_lost": lost,
        "listed_twice": stored.len() - stored_once.len(),
        "long_replica_starts": long_starts,
        "long_replica_state": long_job["state"],
        "long_replica_attempt": long_job["attempt"],
    }))
}
