//! A pool whose store is PostgreSQL (`--store postgresql://…`): a real throwaway cluster, a real
//! controller and agent. The whole pool suite also runs on PostgreSQL with
//! `TESSERA_TEST_STORE=postgresql cargo test -p tessera --test pool`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Every job in `acked` is in the pool's list, and no job is listed twice.
fn assert_every_one_listed_once(pool: &Pool, acked: &[u64]) {
    let jobs = pool.get("/v1/jobs?limit=100000", &pool.admin).1;
    let stored: Vec<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    let stored_once: HashSet<u64> = stored.iter().copied().collect();
    assert_eq!(stored_once.len(), stored.len(), "a job is listed twice");
    for id in acked {
        assert!(stored_once.contains(id), "acknowledged job {id} is gone");
    }
}

/// A replica that writes a line to a shared file each time it starts, then sleeps: whatever
/// happens to the controllers, it must run on as its first attempt, started once.
struct Long {
    id: u64,
    marks: std::path::PathBuf,
}

impl Long {
    fn start(pool: &Pool) -> Long {
        let marks = pool.shared("starts");
        let id = pool.submit(
            "default",
            0.0,
            1,
            50,
            &format!("echo started >> {}; sleep 600", marks.display()),
        );
        pool.wait_state(id, "running");
        Long { id, marks }
    }

    fn ran_on_once(&self, pool: &Pool) {
        let j = pool.job(self.id);
        assert_eq!(
            (j["state"].as_str(), j["attempt"].as_u64()),
            (Some("running"), Some(1)),
            "{j}"
        );
        assert_eq!(
            std::fs::read_to_string(&self.marks).unwrap(),
            "started\n",
            "the replica started once"
        );
    }
}

/// Submissions from three clients at once until the controller dies; returns what each client
/// was acknowledged.
fn submit_until_refused(pool: &Pool) -> Vec<std::thread::JoinHandle<Vec<u64>>> {
    (0..3)
        .map(|client| {
            let (url, token) = (pool.url.clone(), pool.admin.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut acked = vec![];
                for i in 0..2000 {
                    let name = format!("c{client}-{i}");
                    let r = http
                        .post(format!("{url}/v1/jobs"))
                        .bearer_auth(&token)
                        .json(&json!({"metadata": {"name": name},
                                      "spec": {"command": ["true"],
                                               "resources": {"cpu": "100m", "memory": "16MiB"}}}))
                        .send();
                    match r {
                        Ok(resp) if resp.status().as_u16() == 201 => {
                            acked.push(resp.json::<Value>().unwrap()["id"].as_u64().unwrap());
                        }
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect()
}

#[test]
fn a_pool_on_postgresql_runs_jobs_keeps_every_acknowledged_one_across_kill_9_and_reads_its_ledgers()
{
    let mut pool = Pool::start_on_postgresql(&[]);
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let first = pool.submit("default", 0.0, 1, 50, "echo on-postgresql");
    pool.wait_state(first, "succeeded");
    assert_eq!(logs(&pool, first), "on-postgresql\n");

    // kill -9 in the middle of a burst from three clients.
    let clients = submit_until_refused(&pool);
    std::thread::sleep(Duration::from_millis(1500));
    pool.kill_controller();
    let acked: Vec<u64> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        acked.len() > 30,
        "only {} submissions before the kill",
        acked.len()
    );
    let unique: HashSet<u64> = acked.iter().copied().collect();
    assert_eq!(unique.len(), acked.len(), "an id was given twice");
    pool.start_controller_again();

    assert_every_one_listed_once(&pool, &acked);
    let last = *acked.iter().max().unwrap();
    pool.wait_state(last, "succeeded");

    // The store is the database: nothing of it in the controller's data dir.
    let data = pool.data_root.join("controller");
    for f in ["tessera.db", "tessera.db-wal"] {
        assert!(!data.join(f).exists(), "{f} in the controller's data dir");
    }
    // The ledgers are read back from the database: the first job's run and its audit trail.
    let (s, usage) = pool.get("/v1/usage?since=1h&by=job", &pool.admin);
    assert_eq!(s, 200, "{usage}");
    assert!(
        usage["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["key"].as_str() == Some(first.to_string().as_str())),
        "{usage}"
    );
    let (s, audit) = pool.get(&format!("/v1/audit?job={first}"), &pool.admin);
    assert_eq!(s, 200, "{audit}");
    assert!(!audit.as_array().unwrap().is_empty(), "{audit}");

    // A bad store is refused with the form to use, and nothing starts.
    let out = std::process::Command::new(bin())
        .args(["controller", "--store", "mysql://root:hunter2@db/tessera"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--store") && err.contains("postgresql://USER:PASS@HOST:PORT/DB"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password is not echoed: {err}"
    );
}

/// Jobs whose command is `sh -c CMD`, submitted to `url`; the acknowledged ids.
fn submit_to(pool: &Pool, url: &str, cmd: &str) -> (u16, Value) {
    let r = pool
        .http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(&pool.admin)
        .json(&json!({"metadata": {"name": "ha"},
                      "spec": {"command": ["sh", "-c", cmd],
                               "resources": {"cpu": "100m", "memory": "16MiB"}}}))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

#[test]
fn a_standby_takes_over_from_a_killed_leader_with_every_acknowledged_job_and_no_replica_twice() {
    // Agents keep their workloads for 6 s without a word from a controller (10 s by default):
    // the failover must fit well inside it.
    let mut pool = Pool::start_on_postgresql(&["--leader-lease", "3s", "--lease", "6s"]);
    let standby = pool.start_standby();
    // A standby answers for the leader: its health says who leads; reads and writes sent to it
    // are the leader's.
    let health = pool
        .http
        .get(format!("{}/healthz", standby.url))
        .send()
        .unwrap();
    assert_eq!(health.status().as_u16(), 503);
    let health: Value = health.json().unwrap();
    assert_eq!(health["status"], "standby", "{health}");
    assert_eq!(
        health["leader"].as_str(),
        Some(pool.url.as_str()),
        "{health}"
    );
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let (s, via_standby) = submit_to(&pool, &standby.url, "echo through-the-standby");
    assert_eq!(s, 201, "{via_standby}");
    let via_standby = via_standby["id"].as_u64().unwrap();
    pool.wait_state(via_standby, "succeeded");
    assert_eq!(logs(&pool, via_standby), "through-the-standby\n");
    // A service answers through either controller's gateway.
    let server = pool.shared("server.py");
    std::fs::write(
        &server,
        r#"import os
from http.server import HTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"served")
    def log_message(self, *a):
        pass
HTTPServer((os.environ["TESSERA_HOST"], int(os.environ["PORT"])), H).serve_forever()
"#,
    )
    .unwrap();
    let (s, v) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "web"},
               "spec": {"resources": {"cpu": 0.2, "memory": "64MiB"},
                        "command": ["python3", server]}}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    let http = pool.http.clone();
    let through = move |gateway: &str| -> Option<String> {
        let r = http.get(format!("http://{gateway}/web/")).send().ok()?;
        (r.status().as_u16() == 200).then(|| r.text().unwrap())
    };
    pool.wait_for("the service through the leader's gateway", || {
        through(&pool.gateway).is_some()
    });
    assert_eq!(through(&standby.gateway).as_deref(), Some("served"));

    let long = Long::start(&pool);

    // kill -9 of the leader in the middle of a burst from three clients.
    let clients = submit_until_refused(&pool);
    std::thread::sleep(Duration::from_millis(1000));
    let killed = std::time::Instant::now();
    pool.kill_controller();
    let acked: Vec<u64> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(acked.len() > 10, "only {} submissions", acked.len());
    standby.wait_line("Leading the pool", Duration::from_secs(30));
    let took_over = killed.elapsed();
    // The new leader takes writes.
    pool.url = standby.url.clone();
    let after = pool.submit("default", 0.0, 1, 50, "echo after-the-failover");
    eprintln!(
        "the standby led {:.2} s after the kill; the first write after it took {:.2} s in all",
        took_over.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    // The agent follows the new leader: new work runs, and the service answers through the
    // new leader's gateway.
    pool.wait_state(after, "succeeded");
    pool.wait_for("the service through the new leader's gateway", || {
        through(&standby.gateway).is_some()
    });
    assert_eq!(logs(&pool, after), "after-the-failover\n");

    // Nothing acknowledged was lost, nothing is listed twice.
    let mut every = acked.clone();
    every.extend([via_standby, long.id]);
    assert_every_one_listed_once(&pool, &every);
    // The long replica ran on through the failover: still its first attempt, started once.
    std::thread::sleep(Duration::from_secs(3));
    long.ran_on_once(&pool);
    let last = *acked.iter().max().unwrap();
    pool.wait_state(last, "succeeded");

    // The old leader, started again, is a standby of the new one.
    let data = pool.data_root.join("controller");
    let again = std::process::Command::new(bin())
        .args(["controller", "--data-dir"])
        .arg(&data)
        .args(["--listen", &pool.listen, "--leader-lease", "3s"])
        .args(["--store", &pool.postgresql.as_ref().unwrap().url()])
        .args(["--gateway-listen", &format!("127.0.0.1:{}", port())])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut again = Proc(again);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(again.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(
        line.contains("standby") && line.contains(&standby.url),
        "{line}"
    );
}

#[test]
fn a_paused_leader_is_replaced_after_its_lease_and_stops_when_it_wakes_having_written_nothing() {
    let mut pool = Pool::start_on_postgresql(&["--leader-lease", "2s", "--lease", "8s"]);
    let standby = pool.start_standby();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let long = Long::start(&pool);
    let leader = pool.controller.as_ref().unwrap().0.id() as i32;
    let pid = nix::unistd::Pid::from_raw(leader);

    // SIGSTOP: the leader's session stays open, so only its lease's end frees the lease.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let paused = std::time::Instant::now();
    standby.wait_line("Leading the pool", Duration::from_secs(30));
    let took_over = paused.elapsed();
    // The lease ends 2 s after its last renewal, which came at most a third of it before the
    // pause: a live session's lease is not taken before that.
    assert!(
        took_over >= Duration::from_millis(1300),
        "a live session's lease holds to its end ({took_over:?})"
    );
    pool.url = standby.url.clone();
    let after = pool.submit("default", 0.0, 1, 50, "echo while-the-old-leader-sleeps");
    pool.wait_state(after, "succeeded");
    let jobs_before_waking = pool.get("/v1/jobs?limit=1000", &pool.admin).1;

    // Woken, the old leader finds its lease gone: it answers nothing and stops by itself.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let old = pool.controller.as_mut().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = old.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old leader still runs after waking"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let err = std::fs::read_to_string(pool.dir.path().join("controller.err")).unwrap();
    assert!(err.contains("lost the leader's lease"), "{err}");
    pool.controller = None;
    eprintln!(
        "a paused leader (lease 2 s) was replaced {:.2} s after SIGSTOP",
        took_over.as_secs_f64()
    );

    // Nothing changed behind the new leader's back; the long replica ran on, started once.
    std::thread::sleep(Duration::from_secs(2));
    let jobs_after = pool.get("/v1/jobs?limit=1000", &pool.admin).1;
    let ids = |v: &Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(&jobs_before_waking), ids(&jobs_after));
    long.ran_on_once(&pool);
}

#[test]
fn checkpoints_stored_under_one_leader_restore_under_the_next() {
    let mut pool = Pool::start_on_postgresql(&["--leader-lease", "3s", "--lease", "6s"]);
    let standby = pool.start_standby();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");
    let helper = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
    // A training loop with the Python helper: a step every 50 ms, a checkpoint every second.
    let script = format!(
        r#"import sys, time
sys.path.insert(0, {helper:?})
from tessera_checkpoint import Checkpointer
ckpt = Checkpointer()
state = ckpt.load_json() or {{"step": 0}}
print("start", state["step"], flush=True)
while state["step"] < 400:
    time.sleep(0.05)
    state["step"] += 1
    if ckpt.due():
        ckpt.save_json(state)
print("done", state["step"], flush=True)
"#,
        helper = helper.display().to_string(),
    );
    let (status, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "train"},
               "spec": {"resources": {"gpu": 1, "cpu": 0.5, "memory": "256MiB"},
                        "checkpoint": {"interval": "1s", "grace": "5s"},
                        "command": ["python3", "-c", script]}}),
        &pool.admin,
    );
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    let running = pool.wait_state(id, "running");
    let node = running["assignments"][0]["node"]
        .as_str()
        .unwrap()
        .to_string();
    pool.wait_for("two checkpoints", || {
        events(&pool, id)
            .iter()
            .filter(|e| e["kind"] == "Checkpoint")
            .count()
            >= 2
    });
    // The leader that stored the checkpoint's chunks goes; the next one must serve them.
    pool.kill_controller();
    standby.wait_line("Leading the pool", Duration::from_secs(30));
    pool.url = standby.url.clone();
    pool.kill_agent(&node);
    let done = pool.wait_state(id, "succeeded");
    assert_ne!(done["assignments"][0]["node"].as_str().unwrap(), node);
    let out = logs(&pool, id);
    let resumed: u32 = out
        .strip_prefix("start ")
        .and_then(|r| r.lines().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(resumed >= 20, "resumed from {resumed}: {out}");
    assert!(out.ends_with("done 400\n"), "{out}");
    // The chunks are in the database, not in either controller's data dir.
    for dir in ["controller", "controller-1"] {
        assert!(
            !pool.data_root.join(dir).join("blobs").exists(),
            "chunks in {dir}'s data dir"
        );
    }
}

#[test]
fn a_postgresql_restart_mid_burst_loses_nothing_and_the_controller_leads_on() {
    let mut pool = Pool::start_on_postgresql(&["--leader-lease", "2s", "--lease", "30s"]);
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let long = pool.submit("default", 0.0, 1, 50, "sleep 600");
    pool.wait_state(long, "running");
    // Three clients submit, retrying on refusals, while PostgreSQL goes away for longer than
    // the leader's lease and comes back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|client| {
            let (url, token, stop) = (pool.url.clone(), pool.admin.clone(), stop.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let (mut acked, mut refused) = (vec![], 0);
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let r = http
                        .post(format!("{url}/v1/jobs"))
                        .bearer_auth(&token)
                        .json(&json!({"metadata": {"name": format!("c{client}-{i}")},
                                      "spec": {"command": ["true"],
                                               "resources": {"cpu": "100m", "memory": "16MiB"}}}))
                        .send();
                    match r {
                        Ok(resp) if resp.status().as_u16() == 201 => {
                            acked.push(resp.json::<Value>().unwrap()["id"].as_u64().unwrap());
                        }
                        _ => {
                            refused += 1;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
                (acked, refused)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let pg = pool.postgresql.as_ref().unwrap();
    pg.stop();
    std::thread::sleep(Duration::from_secs(4));
    pg.start_again();
    // Writes resume by themselves.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (s, _) = pool.post(
            "/v1/jobs",
            json!({"metadata": {"name": "after"},
                   "spec": {"command": ["true"], "resources": {"cpu": "100m", "memory": "16MiB"}}}),
            &pool.admin,
        );
        if s == 201 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "writes never resumed ({s})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut refused) = (vec![], 0);
    for c in clients {
        let (a, r) = c.join().unwrap();
        acked.extend(a);
        refused += r;
    }
    assert!(refused > 0, "the outage refused some writes");
    // The controller is still the leader (nobody else could take the lease), nothing
    // acknowledged is lost, and the running replica ran on.
    assert!(
        pool.controller
            .as_mut()
            .unwrap()
            .0
            .try_wait()
            .unwrap()
            .is_none()
    );
    assert_every_one_listed_once(&pool, &acked);
    let j = pool.job(long);
    assert_eq!(
        (j["state"].as_str(), j["attempt"].as_u64()),
        (Some("running"), Some(1)),
        "{j}"
    );
}

#[test]
fn of_three_controllers_exactly_one_standby_takes_over_and_the_other_follows_it() {
    let mut pool = Pool::start_on_postgresql(&["--leader-lease", "3s", "--lease", "6s"]);
    let standbys = [pool.start_standby(), pool.start_standby()];
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let first = pool.submit("default", 0.0, 1, 50, "echo before");
    pool.wait_state(first, "succeeded");
    pool.kill_controller();
    // One of the two leads; the other stays a standby and names it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (leader, other) = loop {
        let mut led = None;
        for (i, s) in standbys.iter().enumerate() {
            while let Ok(line) = s.lines.try_recv() {
                if line.contains("Leading the pool") {
                    assert!(led.is_none(), "two controllers lead");
                    led = Some(i);
                }
            }
        }
        if let Some(i) = led {
            break (&standbys[i], &standbys[1 - i]);
        }
        assert!(std::time::Instant::now() < deadline, "no standby took over");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The other reads who leads at its next campaign round (every 250 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let health: Value = pool
            .http
            .get(format!("{}/healthz", other.url))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(health["status"], "standby", "{health}");
        if health["leader"].as_str() == Some(leader.url.as_str()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the other standby still names another leader: {health}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Writes through the remaining standby reach the new leader; the agent runs them.
    pool.url = other.url.clone();
    let after = pool.submit("default", 0.0, 1, 50, "echo after");
    pool.wait_state(after, "succeeded");
    assert_eq!(logs(&pool, after), "after\n");
    // Nobody else claims to lead a second later.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !other
            .lines
            .try_iter()
            .any(|l| l.contains("Leading the pool")),
        "the other standby led too"
    );
}

/// A GET through `url` with the admin's token, within `timeout`: its status, whether a standby
/// answered it itself, and its body.
fn read_at(pool: &Pool, url: &str, path: &str, timeout: Duration) -> (u16, bool, Value) {
    let resp = pool
        .http
        .get(format!("{url}{path}"))
        .bearer_auth(&pool.admin)
        .timeout(timeout)
        .send()
        .unwrap();
    let by_standby = resp
        .headers()
        .get("x-tessera-read-from")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("standby {url}"));
    (resp.status().as_u16(), by_standby, resp.json().unwrap())
}

#[test]
fn a_standby_answers_reads_from_the_state_it_follows_and_its_clients_read_their_writes() {
    // A lease longer than the test: the paused leader below is not replaced.
    let mut pool = Pool::start_on_postgresql(&["--leader-lease", "60s", "--lease", "60s"]);
    let standby = pool.start_standby();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let leader = pool.url.clone();
    // Writes through the standby go to the leader; its next read (from its own copy) has them.
    pool.url = standby.url.clone();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(pool.submit("default", 0.0, 1, 50, &format!("echo {i}")));
        let (status, by_standby, jobs) = read_at(&pool, &standby.url, "/v1/jobs", SECOND);
        assert_eq!(status, 200, "{jobs}");
        assert!(by_standby, "the standby answers a job list itself");
        let listed: HashSet<u64> = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|j| j["id"].as_u64())
            .collect();
        assert!(
            ids.iter().all(|id| listed.contains(id)),
            "read after write {i}: {ids:?} not all in {listed:?}"
        );
    }
    let last = *ids.last().unwrap();
    pool.wait_state(last, "succeeded");
    // The leader's later changes (the jobs ran) reach the standby by themselves.
    pool.wait_for("the standby to see the last job succeed", || {
        let (_, _, jobs) = read_at(&pool, &standby.url, "/v1/jobs?state=succeeded", SECOND);
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"].as_u64() == Some(last))
    });

    // With the leader paused, the standby still answers what it follows; what only the leader
    // knows (a job's own view, writes) is not answered.
    let pid = nix::unistd::Pid::from_raw(pool.controller.as_ref().unwrap().0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (status, by_standby, jobs) = read_at(&pool, &standby.url, "/v1/jobs", SECOND);
    assert_eq!((status, by_standby), (200, true), "{jobs}");
    assert_eq!(jobs.as_array().unwrap().len(), ids.len());
    let (status, by_standby, nodes) = read_at(&pool, &standby.url, "/v1/nodes/n1", SECOND);
    assert_eq!((status, by_standby), (200, true), "{nodes}");
    assert_eq!(nodes["health"], "ready", "{nodes}");
    let path = format!("/v1/jobs/{last}/events");
    let (status, by_standby, events) = read_at(&pool, &standby.url, &path, SECOND);
    assert_eq!((status, by_standby), (200, true), "{events}");
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"Submitted") && kinds.contains(&"Succeeded"),
        "{kinds:?}"
    );
    let sent_on = pool
        .http
        .get(format!("{}/v1/jobs/{last}", standby.url))
        .bearer_auth(&pool.admin)
        .timeout(SECOND)
        .send();
    assert!(
        sent_on.is_err(),
        "a job's own view waits on the paused leader"
    );
    // The standby checks tokens as the leader does: an unknown one reads nothing.
    let (status, _, _) = {
        let resp = pool
            .http
            .get(format!("{}/v1/jobs", standby.url))
            .bearer_auth(
                "tsr_000000000000_0000000000000000000000000000000000000000000000000000000000000000",
            )
            .send()
            .unwrap();
        (resp.status().as_u16(), (), ())
    };
    assert_eq!(status, 401);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let (status, by_standby, _) = read_at(&pool, &leader, "/v1/jobs", 10 * SECOND);
    assert_eq!(
        (status, by_standby),
        (200, false),
        "the leader answers its own reads"
    );

    // A standby that cannot follow the store (here: PostgreSQL stopped) stops answering from
    // its aging copy and sends reads on; the leader answers them from memory.
    pool.postgresql.as_ref().unwrap().stop();
    std::thread::sleep(2 * SECOND);
    let (status, by_standby, jobs) = read_at(&pool, &standby.url, "/v1/jobs", 10 * SECOND);
    assert_eq!((status, by_standby), (200, false), "{jobs}");
    assert_eq!(jobs.as_array().unwrap().len(), ids.len());
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn a_leader_cut_off_by_the_network_is_replaced_keeps_nothing_running_twice_and_steps_down() {
    // The leader runs in a network namespace of its own; the standby, the agent, the clients
    // and PostgreSQL on the host.
    let ns = NetNs::new();
    let mut pool = Pool::start_on_postgresql_in(&ns, &["--leader-lease", "2s", "--lease", "8s"]);
    let standby = pool.start_standby();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let long = Long::start(&pool);

    // The cut: the leader still runs, its database session stays open, but nothing passes.
    ns.cut();
    let cut = std::time::Instant::now();
    standby.wait_line("Leading the pool", Duration::from_secs(30));
    let took_over = cut.elapsed();
    // Its session looks alive to PostgreSQL, so only the lease's end frees the lease: at least
    // two thirds of it after the cut (the last renewal came at most a third before).
    assert!(
        took_over > Duration::from_millis(1300) && took_over < Duration::from_secs(6),
        "a leader cut off (lease 2 s) was replaced {took_over:?} after the cut"
    );
    // Writes go on through the standby; the agent found it; the replica ran on.
    pool.url = standby.url.clone();
    let acked: Vec<u64> = (0..20)
        .map(|i| pool.submit("default", 0.0, 1, 50, &format!("echo {i}")))
        .collect();
    pool.wait_state(*acked.last().unwrap(), "succeeded");
    long.ran_on_once(&pool);

    // The link back: the old leader learns that another leads, and stops without having
    // written anything (its next batch would be fenced).
    ns.heal();
    let old = &mut pool.controller.as_mut().unwrap().0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = old.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cut-off leader still runs 30 s after the link came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "it exits saying it lost the lease");
    let err = std::fs::read_to_string(pool.dir.path().join("controller.err")).unwrap();
    assert!(err.contains("lost the leader's lease"), "{err}");
    assert_every_one_listed_once(&pool, &acked);
    long.ran_on_once(&pool);
}

/// A request body that trickles in: a space every 250 ms, `spaces` times, then `rest`.
struct Trickle {
    spaces: usize,
    rest: Vec<u8>,
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.spaces > 0 {
            std::thread::sleep(Duration::from_millis(250));
            self.spaces -= 1;
            buf[0] = b' ';
            return Ok(1);
        }
        let n = self.rest.len().min(buf.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest.drain(..n);
        Ok(n)
    }
}

#[test]
fn a_client_flooding_through_a_standby_spends_its_own_places_at_the_leader_not_the_standbys() {
    // The leader admits four connections per address; the standby, on its own address, the
    // default.
    let mut pool = Pool::start_on_postgresql(&["--max-connections-per-address", "4"]);
    let mut args = pool.controller_args.clone();
    let cap = args
        .iter()
        .position(|a| a == "--max-connections-per-address")
        .unwrap();
    args.drain(cap..cap + 2);
    let standby = pool.start_standby_at("127.0.0.5", &args);
    // The standby reads the pool's key at start (then every second until it is there).
    std::thread::sleep(Duration::from_secs(2));
    let job = |name: &str| {
        json!({"metadata": {"name": name, "project": "default"},
               "spec": {"resources": {"cpu": 0.5, "memory": "128MiB"},
                        "command": ["true"]}})
    };
    let client_at = |ip: &str| {
        reqwest::blocking::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    };
    let submit_url = format!("{}/v1/jobs", standby.url);
    let flooder = client_at("127.0.0.2");
    // Four slow submissions through the standby: each holds a connection to the leader while
    // its body trickles in (6 s).
    let slow: Vec<_> = (0..4)
        .map(|i| {
            let (client, url, token) = (flooder.clone(), submit_url.clone(), pool.admin.clone());
            let body = serde_json::to_vec(&job(&format!("slow-{i}"))).unwrap();
            std::thread::spawn(move || {
                let resp = client
                    .post(url)
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(reqwest::blocking::Body::new(Trickle {
                        spaces: 24,
                        rest: body,
                    }))
                    .send()
                    .unwrap();
                (resp.status().as_u16(), resp.text().unwrap())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    // A submission from `client` to `url` with `headers`: its status and answer.
    let submit =
        |client: &reqwest::blocking::Client, url: &str, name: &str, headers: &[(&str, &str)]| {
            let mut req = client.post(url).bearer_auth(&pool.admin).json(&job(name));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = req.send().unwrap();
            (resp.status().as_u16(), resp.text().unwrap())
        };
    // Another client of the same standby is served meanwhile: the four count against the
    // flooder's address at the leader, not the standby's.
    let (status, text) = submit(&client_at("127.0.0.3"), &submit_url, "other", &[]);
    assert_eq!(status, 201, "{text}");
    // The flooder's fifth at once is refused by the leader, which names its address.
    let (status, text) = submit(&flooder, &submit_url, "fifth", &[]);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("127.0.0.2"), "{text}");
    // A client cannot name another address itself: sent straight to the leader while the
    // flooder's address is full, a claim to be it (without the pool's key there is no valid
    // proof) is ignored and the request counted as its own.
    let claim = [
        ("x-tessera-forwarded-client", "127.0.0.2"),
        ("x-tessera-forwarded-proof", "1.00"),
    ];
    let leader_url = format!("{}/v1/jobs", pool.url);
    let (status, text) = submit(&client_at("127.0.0.6"), &leader_url, "claims", &claim);
    assert_eq!(status, 201, "{text}");
    // The flooder's slow ones are answered, and then it is served again.
    for handle in slow {
        let (status, text) = handle.join().unwrap();
        assert_eq!(status, 201, "{text}");
    }
    let (status, text) = submit(&flooder, &submit_url, "later", &[]);
    assert_eq!(status, 201, "{text}");
}
