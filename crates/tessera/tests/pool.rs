//! The pool end to end: a real controller and real agents as separate processes on 127.0.0.x,
//! simulated GPUs, real child processes, real SQLite. Nothing of Tessera's own is mocked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::*;

#[test]
fn a_job_runs_its_output_is_in_the_logs_and_gangs_span_nodes_or_wait_whole() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "2xH100-80GB");
    let id = pool.submit(
        "default",
        0.5,
        1,
        50,
        "echo hello from $TESSERA_JOB_ID share $TESSERA_COMPUTE_SHARE",
    );
    pool.wait_state(id, "succeeded");
    assert_eq!(logs(&pool, id), format!("hello from {id} share 0.500\n"));

    // The CLI reads the same output.
    let out = Command::new(bin())
        .args([
            "logs",
            &id.to_string(),
            "--url",
            &pool.url,
            "--token",
            &pool.admin,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hello from {id} share 0.500\n")
    );

    // Four one-GPU replicas need both nodes.
    let gang = pool.submit(
        "default",
        1.0,
        4,
        50,
        "echo rank $TESSERA_REPLICA; echo done $TESSERA_REPLICA; sleep 1",
    );
    let running = pool.wait_state(gang, "running");
    let mut nodes: Vec<&str> = running["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes, vec!["n1", "n2"]);
    // Every replica's output, line by line with its replica.
    pool.wait_state(gang, "succeeded");
    let (ok, out, err) = cli(&pool, &["logs", "--all-replicas", &gang.to_string()]);
    assert!(ok, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    let want: Vec<String> = (0..4)
        .flat_map(|r| [format!("[{r}] done {r}"), format!("[{r}] rank {r}")])
        .collect();
    assert_eq!(lines, want, "{out}");
    // Five cannot fit at all: the gang waits whole, and says why.
    let big = pool.submit("default", 1.0, 5, 50, "true");
    pool.wait_state(gang, "succeeded");
    pool.wait_for("the gang's reason", || {
        pool.job(big)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the pool has 4 GPU free for it"))
    });
    let waiting = pool.job(big);
    assert_eq!(waiting["state"], "pending");
    assert!(waiting["assignments"].as_array().unwrap().is_empty());
    let reason = waiting["reason"].as_str().unwrap();
    assert!(
        reason.contains("needs 5 replicas, each 1 whole GPU"),
        "{reason}"
    );
    assert!(
        reason.contains("a gang starts whole or not at all"),
        "{reason}"
    );
    // True at the gang level: what the pool has for it, and what binds the fifth replica.
    assert!(
        reason.contains("the pool has 4 GPU free for it, on 2 nodes"),
        "{reason}"
    );
    assert!(
        reason.contains("with 4 replicas in place, GPU binds: 2 nodes have the CPU and memory but not 1 whole GPU free"),
        "{reason}"
    );
    let (ok, out, err) = cli(&pool, &["describe", "job", &big.to_string()]);
    assert!(ok, "{err}");
    assert!(out.contains("GPU binds"), "{out}");
}

#[test]
fn bad_requests_are_refused_with_the_problem_named_and_change_nothing() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let count = |pool: &Pool| {
        pool.get("/v1/jobs", &pool.admin)
            .1
            .as_array()
            .unwrap()
            .len()
    };
    let before = count(&pool);
    let cases = [
        (
            json!({"metadata": {"name": "x"}, "spec": {"command": ["true"], "resources": {"gpus": 1}}}),
            "unknown field `gpus`",
        ),
        (
            json!({"metadata": {"name": "x"}, "spec": {"command": ["true"], "resources": {"memory": "8 gigs"}}}),
            "spec.resources.memory",
        ),
        (
            json!({"metadata": {"name": "x"}, "spec": {"command": ["true"], "resources": {"gpu": 1.5}}}),
            "spec.resources.gpu",
        ),
        (
            json!({"metadata": {"name": "x"}, "spec": {"command": []}}),
            "spec.command",
        ),
        (
            json!({"metadata": {"name": "x", "project": "nope"}, "spec": {"command": ["true"]}}),
            "no such project",
        ),
        (
            json!({"spec": {"command": ["true"]}}),
            "missing field `metadata`",
        ),
    ];
    for (body, expect) in cases {
        let (status, v) = pool.post("/v1/jobs", body.clone(), &pool.admin);
        assert!((400..500).contains(&status), "{body} -> {status} {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(expect), "{body}: {msg}");
    }
    // Not JSON at all.
    let resp = pool
        .http
        .post(format!("{}/v1/jobs", pool.url))
        .bearer_auth(&pool.admin)
        .body("{{{")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    // No token, a wrong token.
    assert_eq!(pool.post("/v1/jobs", json!({}), "").0, 401);
    assert_eq!(
        pool.get(
            "/v1/jobs",
            "tsr_000000000000_0000000000000000000000000000000000000000000000000000000000000000"
        )
        .0,
        401
    );
    assert_eq!(count(&pool), before);

    // A member sees and acts on their own projects only.
    assert_eq!(
        pool.post(
            "/v1/users",
            json!({"name": "ana", "role": "member"}),
            &pool.admin
        )
        .0,
        201
    );
    assert_eq!(
        pool.post(
            "/v1/projects",
            json!({"name": "vision", "members": ["ana"]}),
            &pool.admin
        )
        .0,
        201
    );
    let ana = pool
        .post("/v1/tokens", json!({"user": "ana"}), &pool.admin)
        .1["token"]
        .as_str()
        .unwrap()
        .to_string();
    let other = pool.submit("default", 0.0, 1, 50, "sleep 30");
    assert_eq!(pool.get(&format!("/v1/jobs/{other}"), &ana).0, 404);
    assert_eq!(
        pool.post(&format!("/v1/jobs/{other}/cancel"), json!({}), &ana)
            .0,
        404
    );
    let (status, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "x"}, "spec": {"command": ["true"]}}),
        &ana,
    );
    assert_eq!(status, 403, "{v}");
    assert!(pool.get("/v1/jobs", &ana).1.as_array().unwrap().is_empty());
    let (status, _) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "x", "project": "vision"}, "spec": {"command": ["true"]}}),
        &ana,
    );
    assert_eq!(status, 201);
    // Members cannot administer.
    assert_eq!(
        pool.post("/v1/projects", json!({"name": "mine"}), &ana).0,
        403
    );
    assert_eq!(
        pool.post("/v1/tokens", json!({"kind": "join"}), &ana).0,
        403
    );
    // The other tenant's job was not cancelled by the refused call: it goes on to run (it may
    // still be starting on a loaded machine, so wait for it rather than read it once).
    assert_ne!(pool.job(other)["state"], "cancelled");
    pool.wait_state(other, "running");
    // The OpenAPI document names every endpoint the router serves.
    let doc = pool.get("/openapi.json", "").1;
    for p in [
        "/v1/jobs",
        "/v1/jobs/{id}/logs",
        "/v1/nodes/{name}/drain",
        "/v1/projects/{name}",
        "/v1/tokens/{id}",
        "/v1/agent/sync",
        "/v1/usage",
        "/v1/telemetry",
        "/v1/audit",
    ] {
        assert!(
            doc["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
}

/// A list longer than one chunk of the streamed answer comes whole, newest first, once each, and
/// its limit and filters hold across chunks.
#[test]
fn long_job_lists_stream_whole_newest_first_with_limits_and_filters() {
    let pool = Pool::start();
    // No agent: every job stays pending.
    let ids: Vec<u64> = (0..300)
        .map(|_| pool.submit("default", 0.0, 1, 50, "true"))
        .collect();
    let listed = |query: &str| -> Vec<u64> {
        let (status, v) = pool.get(&format!("/v1/jobs{query}"), &pool.admin);
        assert_eq!(status, 200, "{v}");
        v.as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_u64().unwrap())
            .collect()
    };
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed("?limit=1000"), newest_first);
    assert_eq!(listed("?limit=7"), newest_first[..7]);
    assert_eq!(listed("?limit=1000&state=pending"), newest_first);
    assert!(listed("?state=running").is_empty());
    assert_eq!(listed("?limit=1000&project=default").len(), 300);
    assert!(listed("?project=nope").is_empty());
}

#[test]
fn quota_reclaim_preempts_the_lowest_priority_newest_jobs_and_no_more() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "4xH100-80GB");
    for (name, g) in [("research", 2.0), ("batch", 0.0)] {
        let (s, v) = pool.post(
            "/v1/projects",
            json!({"name": name, "guaranteed_gpu": g}),
            &pool.admin,
        );
        assert_eq!(s, 201, "{v}");
    }
    let old_low = pool.submit("batch", 1.0, 1, 25, "sleep 60");
    pool.wait_state(old_low, "running");
    let high = pool.submit("batch", 1.0, 1, 75, "sleep 60");
    pool.wait_state(high, "running");
    let new_low = pool.submit("batch", 1.0, 1, 25, "sleep 60");
    pool.wait_state(new_low, "running");
    let normal = pool.submit("batch", 1.0, 1, 50, "sleep 60");
    pool.wait_state(normal, "running");
    // The pool is full; research is under its guarantee of 2 and asks for 2.
    let claim = pool.submit("research", 1.0, 2, 50, "sleep 60");
    pool.wait_state(claim, "running");
    // The two low-priority batch jobs went back to the queue; the others kept running.
    for victim in [old_low, new_low] {
        let j = pool.job(victim);
        if j["state"] != "pending" {
            for id in [old_low, high, new_low, normal, claim] {
                eprintln!("job {id}: {}\n  {:?}", pool.job(id), events(&pool, id));
            }
        }
        assert_eq!(j["state"], "pending", "{j}");
        assert!(
            j["reason"].as_str().unwrap().contains("quota")
                || j["reason"].as_str().unwrap().contains("preempted")
                || j["reason"].as_str().unwrap().contains("needs"),
            "{j}"
        );
    }
    for kept in [high, normal] {
        assert_eq!(pool.job(kept)["state"], "running");
    }
    let events = pool
        .get(&format!("/v1/jobs/{new_low}/events"), &pool.admin)
        .1;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "Preempted"),
        "{events}"
    );
}

/// Appends "attempt ns" lines to a file every 50 ms, forever.
fn ticker(file: &Path) -> String {
    format!(
        "while true; do echo \"$TESSERA_ATTEMPT $(date +%s%N)\" >> {}; sleep 0.05; done",
        file.display()
    )
}

/// (attempt, first ns, last ns) of each attempt's ticks.
fn spans(file: &Path) -> Vec<(u32, u128, u128)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut out: Vec<(u32, u128, u128)> = vec![];
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(a), Some(t)) = (it.next(), it.next()) else {
            continue;
        };
        let (a, t): (u32, u128) = (a.parse().unwrap(), t.parse().unwrap());
        match out.iter_mut().find(|s| s.0 == a) {
            Some(s) => s.2 = s.2.max(t),
            None => out.push((a, t, t)),
        }
    }
    out
}

#[test]
fn an_agent_killed_or_cut_off_never_leaves_a_replica_running_twice_and_its_work_moves() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");

    // SIGSTOP: the agent cannot renew its lease; its shim stops the workload before the
    // controller moves it.
    let file = pool.shared("ticks-stop");
    let id = pool.submit("default", 1.0, 1, 50, &ticker(&file));
    let first = pool.wait_state(id, "running");
    let node = first["assignments"][0]["node"]
        .as_str()
        .unwrap()
        .to_string();
    pool.wait_for("ticks", || !spans(&file).is_empty());
    let pid = nix::unistd::Pid::from_raw(pool.agent_pid(&node));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    pool.wait_for("the job to run elsewhere", || {
        let j = pool.job(id);
        j["state"] == "running" && j["attempt"] == 2
    });
    pool.wait_for("ticks of attempt 2", || {
        spans(&file).iter().any(|s| s.0 == 2)
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let s = spans(&file);
    let a1 = s.iter().find(|x| x.0 == 1).unwrap();
    let a2 = s.iter().find(|x| x.0 == 2).unwrap();
    assert!(
        a1.2 < a2.1,
        "attempt 1 ticked until {} but attempt 2 started at {}",
        a1.2,
        a2.1
    );
    assert_ne!(
        pool.job(id)["assignments"][0]["node"].as_str().unwrap(),
        node
    );
    let (_, c) = pool.post(&format!("/v1/jobs/{id}/cancel"), json!({}), &pool.admin);
    assert!(c["state"].is_string());
    pool.wait_state(id, "cancelled");

    // kill -9 of the agent running a job: the job finishes elsewhere.
    let done = pool.submit("default", 1.0, 1, 50, "sleep 4; echo finished");
    let j = pool.wait_state(done, "running");
    let victim = j["assignments"][0]["node"].as_str().unwrap().to_string();
    pool.kill_agent(&victim);
    let j = pool.wait_state(done, "succeeded");
    assert_ne!(j["assignments"][0]["node"].as_str().unwrap(), victim);
    assert_eq!(j["attempt"], 2);
}

#[test]
fn a_controller_killed_mid_stream_keeps_every_acknowledged_job() {
    // Agents keep their replicas for 6 s without a word from the controller: a restart on a
    // loaded test machine can take longer than the suite's usual 2 s, and then replicas that
    // were running would rightly run again (attempt 2), which is not what this test is about.
    let mut pool = Pool::start_in(false, None, &["--lease", "6s"]);
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let url = pool.url.clone();
    let token = pool.admin.clone();
    let submitter = std::thread::spawn(move || {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut acked = vec![];
        for _ in 0..2000 {
            let r = http
                .post(format!("{url}/v1/jobs"))
                .bearer_auth(&token)
                .json(&json!({"metadata": {"name": "s"}, "spec": {"command": ["true"], "resources": {"cpu": "100m", "memory": "16MiB"}}}))
                .send();
            match r {
                Ok(resp) if resp.status().as_u16() == 201 => {
                    acked.push(resp.json::<Value>().unwrap()["id"].as_u64().unwrap());
                }
                _ => break,
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(700));
    let mut c = pool.controller.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = c.0.wait();
    std::mem::forget(c);
    let acked = submitter.join().unwrap();
    assert!(
        acked.len() > 10,
        "only {} submissions before the kill",
        acked.len()
    );
    assert!(
        pool.start_controller().is_none(),
        "a restart must not mint another admin token"
    );
    pool.wait_for("the controller", || {
        pool.http
            .get(format!("{}/healthz", pool.url))
            .send()
            .is_ok()
    });
    let jobs = pool.get("/v1/jobs?limit=100000", &pool.admin).1;
    let ids: std::collections::HashSet<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    for id in &acked {
        assert!(
            ids.contains(id),
            "acknowledged job {id} is gone after the restart"
        );
    }
    // Everything acknowledged runs to the end, once.
    let last = *acked.last().unwrap();
    pool.wait_state(last, "succeeded");
    for id in acked.iter().take(20) {
        let j = pool.wait_state(*id, "succeeded");
        assert_eq!(j["attempt"], 1, "{j}");
    }
}

/// The job's events tell of a move that carried a checkpoint.
fn assert_moved_with_a_checkpoint(pool: &Pool, id: u64) {
    let kinds: Vec<String> = events(pool, id)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for k in ["Migrating", "Checkpoint", "Migrated"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
}

/// Whether this host lets us create memory-limited cgroups (v2 with the memory controller, or a
/// v1 memory hierarchy), as root.
fn memory_cgroups_usable() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    root && (v1 || v2)
}

#[test]
fn failed_jobs_restart_with_backoff_memory_hogs_are_oom_killed_and_the_cli_speaks_yaml() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");

    // Fails twice, then succeeds: two restarts, 1 s and then 2 s apart.
    let counter = pool.shared("attempts");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo attempt $n; [ $n -ge 3 ]",
        c = counter.display()
    );
    let (ok, out, err) = cli(
        &pool,
        &[
            "submit",
            "--restart",
            "on-failure",
            "--max-restarts",
            "3",
            "--cpu",
            "0.5",
            "--memory",
            "64MiB",
            "-o",
            "yaml",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(ok, "{err}");
    let created: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
    let id = created["id"].as_u64().expect("the YAML names the job's id");
    assert_eq!(created["restart"].as_str(), Some("on-failure"), "{out}");
    let done = pool.wait_state(id, "succeeded");
    assert_eq!(done["restarts"], 2, "{done}");
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "3");
    let ev = events(&pool, id);
    let restarts: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "Restarting").collect();
    assert_eq!(restarts.len(), 2, "{ev:?}");
    assert!(
        restarts[0]["message"]
            .as_str()
            .unwrap()
            .contains("restart 1 of 3 after 1 s"),
        "{ev:?}"
    );
    // The second attempt began no sooner than the backoff allowed.
    let started: Vec<u64> = ev
        .iter()
        .filter(|e| e["kind"] == "Replica" && e["message"].as_str().unwrap().contains("started"))
        .map(|e| e["ts_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(started.len(), 3, "{ev:?}");
    let r1 = restarts[0]["ts_ms"].as_u64().unwrap();
    let r2 = restarts[1]["ts_ms"].as_u64().unwrap();
    assert!(started[1] >= r1 + 1000, "{ev:?}");
    assert!(started[2] >= r2 + 2000, "{ev:?}");

    // Out of restarts: failed, with the exit code in words.
    let id = cli_submit(
        &pool,
        &[
            "--restart",
            "on-failure",
            "--max-restarts",
            "1",
            "--",
            "sh",
            "-c",
            "echo attempt $TESSERA_ATTEMPT; echo 'Traceback (most recent call last):' >&2; \
             echo 'ValueError: the learning rate must be positive' >&2; exit 3",
        ],
    );
    let failed = pool.wait_state(id, "failed");
    assert_eq!(failed["restarts"], 1, "{failed}");
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("code 3") && reason.contains("no restarts left"),
        "{reason}"
    );
    // The reason quotes what the program last said on stderr: why it failed.
    assert!(
        reason.contains("its last error output: ValueError: the learning rate must be positive"),
        "{reason}"
    );
    // The last attempt's output, and the one before it.
    let (ok, out, err) = cli(&pool, &["logs", &id.to_string()]);
    let both = "attempt 2\nTraceback (most recent call last):\n\
                ValueError: the learning rate must be positive\n";
    assert!(ok && out == both, "{out} {err}");
    let (ok, out, err) = cli(&pool, &["logs", "--stdout", "--previous", &id.to_string()]);
    assert!(ok && out == "attempt 1\n", "{out} {err}");
    let (ok, out, err) = cli(
        &pool,
        &["logs", "--stderr", "--attempt", "1", &id.to_string()],
    );
    assert!(ok && out.ends_with("must be positive\n"), "{out} {err}");
    // Following a job that has not started says so, with its reason, and waits.
    let waiting = cli_submit(&pool, &["--cpu", "64", "--queue-anyway", "--", "true"]);
    let mut follow = Command::new(bin())
        .args(["logs", "-f", "--url", &pool.url, "--token", &pool.admin])
        .arg(waiting.to_string())
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(follow.try_wait().unwrap().is_none(), "it waits");
    follow.kill().unwrap();
    let err = follow.wait_with_output().unwrap().stderr;
    let err = String::from_utf8_lossy(&err);
    assert!(
        err.contains(&format!("job {waiting} has not started (")),
        "{err}"
    );

    // A memory hog is stopped by its memory limit, and the reason says so.
    assert!(
        memory_cgroups_usable(),
        "this test needs memory cgroups (v1 or v2), i.e. running as root on a host that has \
         them; the README's test command does so"
    );
    let id = cli_submit(
        &pool,
        &["--memory", "64MiB", "--", "sh", "-c", "tail /dev/zero"],
    );
    let oom = pool.wait_state(id, "failed");
    let reason = oom["reason"].as_str().unwrap();
    assert!(reason.contains("OOM"), "{oom}");
    assert_eq!(oom["assignments"][0]["exit_code"], 137, "{oom}");
}

/// Starts `tessera port-forward` with `args` after its connection flags, and the local port it
/// says it listens on.
fn port_forward(pool: &Pool, args: &[&str]) -> (Proc, u16) {
    let mut forward = Command::new(bin())
        .args(["port-forward", "--url", &pool.url, "--token", &pool.admin])
        .args(args)
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(forward.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).unwrap();
    let local: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (Proc(forward), local)
}

#[test]
fn over_tls_agents_join_jobs_run_and_the_cli_trusts_only_the_given_ca() {
    let mut pool = Pool::start_with(true);
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let id = pool.submit("default", 1.0, 1, 50, "echo over tls");
    pool.wait_state(id, "succeeded");
    assert_eq!(logs(&pool, id), "over tls\n");

    let cert = pool.cert.clone().unwrap();
    let (ok, out, err) = cli(
        &pool,
        &["jobs", "-o", "json", "--ca-cert", cert.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["id"], id);

    // Without the CA the CLI refuses the server's certificate, and says it could not connect.
    let (ok, _, err) = cli(&pool, &["jobs"]);
    assert!(!ok);
    assert!(err.contains("calling the controller at https://"), "{err}");
    // Plain HTTP to the TLS port gets no API answer.
    let plain = reqwest::blocking::Client::new()
        .get(format!("http://{}/v1/jobs", pool.listen))
        .bearer_auth(&pool.admin)
        .send();
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // exec and port-forward reach a running replica over wss://, trusting the given CA only.
    let web_port = port();
    let page = pool.shared("served-tls");
    std::fs::create_dir_all(&page).unwrap();
    std::fs::write(page.join("hello.txt"), "through tls\n").unwrap();
    let server = pool.submit(
        "default",
        0.0,
        1,
        50,
        &format!(
            "exec python3 -m http.server {web_port} --bind 127.0.0.1 --directory {}",
            page.display()
        ),
    );
    pool.wait_state(server, "running");
    pool.wait_for("the replica's server to listen", || {
        replica_logs(&pool, server, 0).contains("Serving HTTP")
    });
    let sid = server.to_string();
    let ca = cert.to_str().unwrap();
    let (ok, out, err) = cli(
        &pool,
        &[
            "exec",
            "--ca-cert",
            ca,
            &sid,
            "--",
            "sh",
            "-c",
            "echo inside over tls",
        ],
    );
    assert!(ok && out == "inside over tls\n", "{out}{err}");
    let (ok, _, err) = cli(&pool, &["exec", &sid, "--", "true"]);
    assert!(
        !ok && err.contains("calling the controller at https://"),
        "without the CA: {err}"
    );
    let (_forward, local) = port_forward(&pool, &["--ca-cert", ca, &sid, &format!("0:{web_port}")]);
    let body = reqwest::blocking::get(format!("http://127.0.0.1:{local}/hello.txt"))
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(body, "through tls\n");
}

#[test]
fn a_fractional_job_runs_with_its_slice_enforced_on_simulated_gpus() {
    let probe = Path::new(bin()).with_file_name("tessera-vgpu-probe");
    assert!(
        probe.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        probe.display()
    );
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let p = probe.display();
    // Half a GPU with 1 GiB: the unmodified program sees 1 GiB and is refused past it.
    let (status, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "slice"},
               "spec": {"resources": {"gpu": 0.5, "gpuMemory": "1GiB", "cpu": 0.5, "memory": "256MiB"},
                        "command": ["sh", "-c", format!("{p} meminfo && {p} oom")]}}),
        &pool.admin,
    );
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    pool.wait_state(id, "succeeded");
    let out = logs(&pool, id);
    assert!(
        out.contains("free_bytes=1073741824 total_bytes=1073741824"),
        "{out}"
    );
    assert!(
        out.contains("allocated_bytes=1073741824 result=CUDA_ERROR_OUT_OF_MEMORY"),
        "{out}"
    );
    // A whole GPU on the same simulated node: the simulated driver, no slice library.
    let whole = pool.submit(
        "default",
        1.0,
        1,
        50,
        &format!("{p} meminfo; echo preload=$LD_PRELOAD"),
    );
    pool.wait_state(whole, "succeeded");
    let out = logs(&pool, whole);
    assert!(out.contains("total_bytes=85899345920"), "{out}");
    assert!(out.contains("preload=\n"), "{out}");
}

/// The GPU server of job `id`'s remote replica 0 on node `node`'s agent (by its secret file,
/// which names the node's data dir and the replica's key).
fn gpu_server_pid(pool: &Pool, node: &str, id: u64, attempt: u64) -> Option<i32> {
    let secret = pool
        .path(node)
        .join("gpu")
        .join(format!("remote-{id}.{attempt}.0.gpu.secret"));
    let out = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!("^[^ ]*tessera remote-gpu serve .*{}", secret.display()),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
}

/// Submits `manifest` and waits until it runs as a pair: its program on node c, its GPU on g.
fn run_attached(pool: &Pool, manifest: Value) -> u64 {
    let (status, v) = pool.post("/v1/jobs", manifest, &pool.admin);
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    let job = pool.wait_state(id, "running");
    let r = &job["assignments"][0];
    assert_eq!(
        (r["node"].as_str(), r["gpu_node"].as_str()),
        (Some("c"), Some("g")),
        "{job}"
    );
    id
}

#[test]
fn a_job_on_a_cpu_only_node_uses_the_gpu_of_a_node_whose_cpus_are_taken() {
    let probe = Path::new(bin()).with_file_name("tessera-vgpu-probe");
    let p = probe.display();
    let mut pool = Pool::start();
    pool.add_agent("g", "127.0.0.61", "1xH100-80GB");
    pool.add_agent("c", "127.0.0.62", "");
    // Every CPU of the GPU node is taken by a job without a GPU.
    let (status, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "cpu-hog"},
               "spec": {"resources": {"cpu": 8, "memory": "128MiB",
                                      "nodeSelector": {"tessera.io/node": "g"}},
                        "command": ["sleep", "600"]}}),
        &pool.admin,
    );
    assert_eq!(status, 201, "{v}");
    let hog = v["id"].as_u64().unwrap();
    pool.wait_state(hog, "running");

    // Half the GPU with 1 GiB, attached from wherever it fits: the program runs on c, unmodified,
    // its device on g under g's slice library; then it keeps the device in use.
    let id = run_attached(
        &pool,
        json!({"metadata": {"name": "attached"},
               "spec": {"resources": {"gpu": 0.5, "gpuMemory": "1GiB", "cpu": 0.5,
                                      "memory": "256MiB", "gpuAttach": "any"},
                        "command": ["sh", "-c", format!("{p} meminfo && {p} oom && {p} check && exec {p} launch --seconds 599")]}}),
    );
    pool.wait_for("the remote program's checks", || {
        logs(&pool, id).contains("graph_ok=1")
    });
    let out = logs(&pool, id);
    // The program sees the slice, is refused past it, and its launches, copies, events and
    // graphs work over the network.
    assert!(
        out.contains("free_bytes=1073741824 total_bytes=1073741824"),
        "{out}"
    );
    assert!(
        out.contains("allocated_bytes=1073741824 result=CUDA_ERROR_OUT_OF_MEMORY"),
        "{out}"
    );
    for key in [
        "fill_ok=1",
        "memset_ok=1",
        "copy_ok=1",
        "events_ok=1",
        "pinned_ok=1",
        "copy2d_ok=1",
    ] {
        assert!(out.contains(key), "{key} in {out}");
    }
    let said: Vec<String> = events(&pool, id)
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        said.iter().any(|m| m.contains("GPU server started on g")),
        "{said:?}"
    );
    // The device is g's: its node view counts the share there, and c holds the CPU.
    let (ok, out, err) = cli(&pool, &["describe", "node", "g"]);
    assert!(ok, "{err}");
    assert!(out.contains("replica 0's GPU (attached from c)"), "{out}");
    let (ok, out, err) = cli(&pool, &["describe", "node", "c"]);
    assert!(
        ok && out.contains("replica 0") && !out.contains("GPU (attached"),
        "{out}{err}"
    );
    let (_, nodes) = pool.get("/v1/nodes", &pool.admin);
    let view = |n: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(view("c")["replicas"], 1, "{nodes}");

    // The GPU server dies: the job is queued again without a restart of its own, and placed
    // again as a pair.
    let server = gpu_server_pid(&pool, "g", id, 1).expect("the GPU server runs on g");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    pool.wait_for("job to be placed again", || pool.job(id)["attempt"] == 2);
    let job = pool.wait_state(id, "running");
    assert_eq!(job["restarts"], 0, "{job}");
    let said: Vec<String> = events(&pool, id)
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    // Said by whichever saw it first: the server's agent, or the program's (its client).
    assert!(
        said.iter().any(|m| m.contains("GPU server on g ended")
            || m.contains("its remote GPU went away (the GPU server at 127.0.0.61:")),
        "{said:?}"
    );

    // The GPU node is lost: the job is queued again (by its program, whose calls fail at once,
    // or by the node's lease, whichever comes first), never failed; the program on c is
    // stopped, and the job waits for a GPU.
    pool.wait_for("the second server", || {
        gpu_server_pid(&pool, "g", id, 2).is_some()
    });
    pool.kill_agent("g");
    pool.wait_for("job to be queued again", || {
        pool.job(id)["state"] == "pending"
    });
    let job = pool.job(id);
    assert_eq!(job["restarts"], 0, "{job}");
    let said: Vec<String> = events(&pool, id)
        .iter()
        .map(|e| format!("{} {}", e["kind"], e["message"]))
        .collect();
    let last = said.last().unwrap();
    assert!(last.contains("Requeued"), "{said:?}");
    assert!(
        last.contains("node g")
            || last.contains("its remote GPU went away (the GPU server at 127.0.0.61:"),
        "{said:?}"
    );
    // Both losses are in the audit log.
    let lost: Vec<Value> = audit(&pool, "action=remote-gpu-lost")
        .into_iter()
        .filter(|e| e["job"] == id)
        .collect();
    assert_eq!(lost.len(), 2, "{lost:?}");
    pool.wait_for("the program on c to be stopped", || {
        let out = std::process::Command::new("pgrep")
            .args(["-f", "tessera-vgpu-probe launch --seconds 599"])
            .output()
            .unwrap();
        out.stdout.is_empty()
    });
}

#[test]
fn the_cli_says_who_and_where_it_talks_to_and_completes_itself() {
    let pool = Pool::start();
    let (ok, out, err) = cli(&pool, &["whoami", "-o", "json"]);
    assert!(ok, "{err}");
    let me: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (me["user"].as_str(), me["role"].as_str()),
        (Some("admin"), Some("admin")),
        "{me}"
    );
    let (ok, out, err) = cli(&pool, &["version"]);
    assert!(ok, "{err}");
    let v = env!("CARGO_PKG_VERSION");
    assert!(out.contains(&format!("Client:      tessera {v}")), "{out}");
    assert!(out.contains(&format!("Controller:  tessera {v}")), "{out}");

    // The config file: `config use` writes it (0600), keeps the token, says what changed.
    let config = pool.path("cli-config.yaml");
    let tessera = |args: &[&str]| cli_with_config(Command::new(bin()).args(args), &config);
    let (ok, _, err) = tessera(&["config", "use", &pool.url]);
    assert!(!ok && err.contains("--token"), "no token yet: {err}");
    assert!(!config.exists(), "a refused command writes nothing");
    let (ok, _, err) = tessera(&[
        "config",
        "use",
        "http://127.0.0.1:9",
        "--token",
        &pool.admin,
    ]);
    assert!(ok, "{err}");
    // Nothing listens at that URL: the error says where the URL came from and how to change it.
    let (ok, _, err) = tessera(&["jobs"]);
    assert!(!ok);
    assert!(
        err.contains("calling the controller at http://127.0.0.1:9"),
        "{err}"
    );
    assert!(
        err.contains("tessera config use URL") && err.contains("came from the config file"),
        "{err}"
    );
    let (ok, out, err) = tessera(&["config", "use", &pool.url]);
    assert!(ok, "{err}");
    assert!(out.contains("(was http://127.0.0.1:9)"), "{out}");
    let (ok, out, err) = tessera(&["jobs", "-o", "json"]);
    assert!(ok && out.trim() == "[]", "{out}{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (ok, out, _) = tessera(&["config", "view", "-o", "json"]);
    assert!(ok);
    let view: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["url"], pool.url.as_str());
    let secret = pool.admin.rsplit_once('_').unwrap().1;
    assert!(
        !out.contains(secret),
        "the token's secret is not shown: {out}"
    );
    assert!(view["token"].as_str().unwrap().ends_with('…'), "{view}");

    // A wrong field of a manifest is reported at its line and column in the file.
    let manifest = pool.path("bad.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: tessera/v1\nkind: Job\nmetadata: {name: t}\nspec:\n  resources: {gpu: 1}\n  gpus: 2\n  command: [\"true\"]\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&pool, &["submit", "-f", manifest.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("unknown field `gpus`") && err.contains("line 6"),
        "{err}"
    );

    // describe project: its quota in words; describe of what does not exist says so.
    let (ok, out, err) = cli(&pool, &["describe", "project", "default"]);
    assert!(ok, "{err}");
    assert!(out.contains("Quota:       no quota"), "{out}");
    let (ok, _, err) = cli(&pool, &["describe", "node", "nowhere"]);
    assert!(!ok && err.contains("nowhere"), "{err}");
    let (ok, _, err) = cli(&pool, &["describe", "job", "web"]);
    assert!(!ok && err.contains("a job's id is a number"), "{err}");

    // Usage by job names the jobs; a watch shows the job's states as they come.
    let mut pool = pool;
    pool.add_agent("n1", "127.0.0.65", "1xH100-80GB");
    let (watch, lines) = cli_lines(&pool, &["jobs", "-w"]);
    let id = cli_submit(
        &pool,
        &[
            "--name",
            "named-run",
            "--gpu",
            "1",
            "--model",
            "H100-80GB",
            "--node-selector",
            "tessera.io/node=n1",
            "--",
            "sleep",
            "4",
        ],
    );
    // A selector no node matches waits, saying so (labels may change); a malformed one never
    // leaves the CLI.
    let elsewhere = cli_submit(
        &pool,
        &["--node-selector", "tessera.io/node=n9", "--", "true"],
    );
    pool.wait_for("the job to say why it waits", || {
        pool.job(elsewhere)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("do not match the node selector"))
    });
    assert!(cli(&pool, &["cancel", &elsewhere.to_string()]).0);
    let (ok, _, err) = cli(&pool, &["submit", "--node-selector", "n1", "--", "true"]);
    assert!(!ok && err.contains("write KEY=VALUE"), "{err}");
    pool.wait_state(id, "succeeded");
    let mut states = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    while !states.contains(&"succeeded".to_string()) && Instant::now() < until {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            let cells: Vec<&str> = line.split_whitespace().collect();
            if cells.first() == Some(&id.to_string().as_str()) {
                states.push(cells[4].to_string());
            }
        }
    }
    assert!(states.contains(&"running".to_string()), "{states:?}");
    assert_eq!(
        states.last().map(String::as_str),
        Some("succeeded"),
        "{states:?}"
    );
    drop(watch);
    // `get job` writes the manifest that makes the job again: piped into `submit -f -`, it
    // makes a job whose manifest is the same.
    let (ok, yaml, err) = cli(&pool, &["get", "job", &id.to_string()]);
    assert!(ok, "{err}");
    for part in [
        "name: named-run",
        "tessera.io/node: n1",
        "H100-80GB",
        "status:",
        "state: succeeded",
    ] {
        assert!(yaml.contains(part), "{part}: {yaml}");
    }
    let mut again = Command::new(bin())
        .args([
            "submit",
            "-f",
            "-",
            "-o",
            "json",
            "--url",
            &pool.url,
            "--token",
            &pool.admin,
        ])
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut again.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
    let out = again.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copy: Value = serde_json::from_slice(&out.stdout).unwrap();
    let copy = copy["id"].as_u64().unwrap();
    let export = |id: u64| {
        let (ok, out, err) = cli(
            &pool,
            &["get", "job", &id.to_string(), "--export", "-o", "json"],
        );
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let (first, second) = (export(id), export(copy));
    assert!(first.get("status").is_none(), "{first}");
    assert_eq!(first["spec"]["command"], json!(["sleep", "4"]));
    assert_eq!(first, second);
    pool.wait_state(copy, "succeeded");
    let (ok, out, err) = cli(&pool, &["usage", "--since", "1h", "--by", "job"]);
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("no row of job {id}: {out}"));
    assert_eq!(row.split_whitespace().nth(1), Some("named-run"), "{out}");

    // Completion scripts know the commands and their flags.
    for shell in ["bash", "zsh", "fish"] {
        let (ok, out, err) = tessera(&["completion", shell]);
        assert!(ok, "{err}");
        assert!(
            out.contains("submit") && out.contains("gpu-attach"),
            "{shell}: {}",
            &out[..out.len().min(300)]
        );
    }
    let (ok, _, err) = tessera(&["completion", "cmd.exe"]);
    assert!(!ok && err.contains("bash"), "{err}");
}

#[test]
fn a_moved_remote_job_saves_from_its_device_before_its_gpu_server_stops() {
    let probe = Path::new(bin()).with_file_name("tessera-vgpu-probe");
    let mut pool = Pool::start();
    pool.add_agent("g", "127.0.0.63", "1xH100-80GB");
    pool.add_agent("c", "127.0.0.64", "");
    // Checkpointing reads the device (here: its memory), through the attachment.
    let script = format!(
        r#"if [ -n "${{TESSERA_RESUME_FROM:-}}" ]; then echo "resumed: $(cat "$TESSERA_RESUME_FROM/device")"; exit 0; fi
trap '{p} meminfo > "$TESSERA_CHECKPOINT_DIR/device" 2>&1; : > "$TESSERA_CHECKPOINT_DIR/COMPLETE"; exit 0' USR1
echo started
while true; do sleep 0.1; done"#,
        p = probe.display()
    );
    let id = run_attached(
        &pool,
        json!({"metadata": {"name": "moved"},
               "spec": {"resources": {"gpu": 0.5, "gpuMemory": "1GiB", "cpu": 0.5,
                                      "memory": "256MiB", "gpuAttach": "remote"},
                        "checkpoint": {"signal": "USR1", "grace": "20s"},
                        "command": ["sh", "-c", script]}}),
    );
    pool.wait_for("the program to start", || {
        logs(&pool, id).contains("started")
    });
    let (s, v) = pool.post(&format!("/v1/jobs/{id}/migrate"), json!({}), &pool.admin);
    assert_eq!(s, 200, "{v}");
    let done = pool.wait_state(id, "succeeded");
    assert_eq!(done["attempt"], 2, "{done}");
    let out = logs(&pool, id);
    assert!(
        out.contains("resumed: free_bytes=1073741824 total_bytes=1073741824"),
        "the checkpoint read the device while the program stopped: {out}"
    );
}

/// A counting "training" job that checkpoints its count when asked (USR1) and resumes from it.
/// A job that counts to `to` (20 a second) into `worklog`, saving its count on USR1.
fn counting_job(pool: &Pool, worklog: &Path, to: u32) -> u64 {
    let script = format!(
        r#"n=0
if [ -n "${{TESSERA_RESUME_FROM:-}}" ]; then n=$(cat "$TESSERA_RESUME_FROM/count"); echo "resumed from $n"; else echo "fresh start"; fi
trap 'echo $n > "$TESSERA_CHECKPOINT_DIR/count"; : > "$TESSERA_CHECKPOINT_DIR/COMPLETE"; exit 0' USR1
while [ $n -lt {to} ]; do n=$((n+1)); echo $n >> {log}; sleep 0.05; done
echo "done $n""#,
        log = worklog.display()
    );
    let (status, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "train"},
               "spec": {"priority": 25,
                        "resources": {"gpu": 1, "cpu": 0.5, "memory": "128MiB"},
                        "checkpoint": {"signal": "USR1", "grace": "10s"},
                        "command": ["sh", "-c", script]}}),
        &pool.admin,
    );
    assert_eq!(status, 201, "{v}");
    v["id"].as_u64().unwrap()
}

fn worklog_lines(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn a_preempted_job_resumes_from_its_checkpoint_and_a_corrupt_checkpoint_means_a_fresh_start() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    for corrupt in [false, true] {
        let worklog = pool.shared(if corrupt { "work-b" } else { "work-a" });
        let low = counting_job(&pool, &worklog, 60);
        pool.wait_state(low, "running");
        pool.wait_for("some progress", || worklog_lines(&worklog).len() >= 15);
        // A high-priority job of the same project takes the only GPU.
        let high = pool.submit("default", 1.0, 1, 75, "sleep 2");
        pool.wait_for("the checkpoint", || {
            events(&pool, low).iter().any(|e| e["kind"] == "Checkpoint")
        });
        if corrupt {
            // Damage every stored chunk while the job waits to come back: files beside SQLite,
            // rows in PostgreSQL.
            match &pool.postgresql {
                Some(pg) => pg.sql("UPDATE blobs SET data = 'not the checkpoint'::bytea"),
                None => {
                    for dir in std::fs::read_dir(pool.path("controller").join("blobs")).unwrap() {
                        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                            std::fs::write(f.unwrap().path(), b"not the checkpoint").unwrap();
                        }
                    }
                }
            }
        }
        pool.wait_state(high, "succeeded");
        let done = pool.wait_state(low, "succeeded");
        assert_eq!(done["attempt"], 2, "{done}");
        let ev = events(&pool, low);
        let kinds: Vec<&str> = ev.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert!(kinds.contains(&"Preempted"), "{kinds:?}");
        let out = logs(&pool, low);
        let lines = worklog_lines(&worklog);
        if corrupt {
            assert!(kinds.contains(&"CheckpointCorrupt"), "{kinds:?}");
            assert!(out.starts_with("fresh start\n"), "{out}");
            // Counted from 1 again.
            assert_eq!(lines.iter().filter(|n| **n == 1).count(), 2, "{lines:?}");
        } else {
            let resumed: u32 = out
                .strip_prefix("resumed from ")
                .and_then(|r| r.lines().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("the second attempt did not resume: {out}"));
            assert!(resumed >= 15, "resumed from {resumed}");
            // Nothing redone from the start: every step ran, at most one of them twice (a
            // signal between a step's count and its log line), and 1 was counted only once.
            let missing = (1..=60).filter(|n| !lines.contains(n)).count();
            assert!(missing <= 1 && lines.len() <= 61, "{lines:?}");
            assert_eq!(lines.iter().filter(|n| **n == 1).count(), 1, "{lines:?}");
        }
        assert!(out.ends_with("done 60\n"), "{out}");
    }
}

#[test]
fn a_job_that_checkpoints_on_an_interval_resumes_elsewhere_when_its_node_is_killed() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
    let worklog = pool.shared("work");
    // A training loop with the Python helper: a step every 50 ms, a checkpoint every second.
    let script = format!(
        r#"import sys, time
sys.path.insert(0, {helper:?})
from tessera_checkpoint import Checkpointer
ckpt = Checkpointer()
state = ckpt.load_json() or {{"step": 0}}
print("start", state["step"], flush=True)
log = open({log:?}, "a")
while state["step"] < 120:
    time.sleep(0.05)
    state["step"] += 1
    log.write(f"{{state['step']}}\n"); log.flush()
    if ckpt.due():
        ckpt.save_json(state)
print("done", state["step"], flush=True)
"#,
        helper = helper.display().to_string(),
        log = worklog.display().to_string(),
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
    pool.kill_agent_after_two_checkpoints(id, &node);
    let reached = worklog_lines(&worklog).into_iter().max().unwrap();
    let done = pool.wait_state(id, "succeeded");
    assert_ne!(done["assignments"][0]["node"].as_str().unwrap(), node);
    assert_eq!(done["attempt"], 2, "{done}");
    let out = logs(&pool, id);
    let resumed: u32 = out
        .strip_prefix("start ")
        .and_then(|r| r.lines().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    // It resumed from a checkpoint, losing at most the work of one interval (20 steps) and of
    // one upload poll (20 more).
    assert!(resumed >= 20, "resumed from {resumed}");
    assert!(
        resumed + 40 >= reached,
        "resumed from {resumed}, but had reached {reached}"
    );
    assert!(out.ends_with("done 120\n"), "{out}");
}

#[test]
fn a_project_minimum_runtime_holds_off_preemption_until_it_has_passed() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let (s, v) = pool.post(
        "/v1/projects",
        json!({"name": "batch", "min_runtime": "3s"}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["min_runtime_s"], 3.0, "{v}");
    let (s, v) = pool.post(
        "/v1/projects",
        json!({"name": "bad", "min_runtime": "soon"}),
        &pool.admin,
    );
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "min_runtime", "{v}");
    let low = pool.submit("batch", 1.0, 1, 25, "sleep 60");
    pool.wait_state(low, "running");
    let high = pool.submit("batch", 1.0, 1, 75, "sleep 0.1");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        pool.job(high)["state"],
        "pending",
        "preempted before its minimum runtime"
    );
    assert_eq!(pool.job(low)["state"], "running");
    pool.wait_state(high, "succeeded");
    let started = |id: u64| {
        events(&pool, id)
            .iter()
            .find(|e| e["kind"] == "Replica" && e["message"].as_str().unwrap().contains("started"))
            .map(|e| e["ts_ms"].as_u64().unwrap())
            .unwrap()
    };
    assert!(
        started(high) >= started(low) + 3000,
        "the high-priority job started {} ms after the low one",
        started(high) - started(low)
    );
    assert!(events(&pool, low).iter().any(|e| e["kind"] == "Preempted"));
}

#[test]
fn a_migrated_job_checkpoints_and_resumes_on_the_node_it_was_sent_to() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let worklog = pool.shared("work");
    // Long enough that it is still running when the second node has joined on a busy machine.
    let id = counting_job(&pool, &worklog, 200);
    pool.wait_state(id, "running");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");
    pool.wait_for("some progress", || worklog_lines(&worklog).len() >= 10);
    // Bad requests change nothing.
    let (s, v) = pool.post(
        &format!("/v1/jobs/{id}/migrate"),
        json!({"to": "n9"}),
        &pool.admin,
    );
    assert_eq!(s, 422, "{v}");
    let (s, v) = pool.post(
        &format!("/v1/jobs/{id}/migrate"),
        json!({"to": "n1"}),
        &pool.admin,
    );
    assert_eq!(s, 409, "{v}");
    assert_eq!(pool.job(id)["attempt"], 1);
    let (ok, out, err) = cli(&pool, &["migrate", &id.to_string(), "--to", "n2"]);
    assert!(ok, "{err}");
    assert!(out.contains("n2"), "{out}");
    let done = pool.wait_state(id, "succeeded");
    assert_eq!(done["assignments"][0]["node"], "n2", "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
    let out = logs(&pool, id);
    assert!(out.starts_with("resumed from "), "{out}");
    let lines = worklog_lines(&worklog);
    assert_eq!(lines.iter().filter(|n| **n == 1).count(), 1, "{lines:?}");
    assert_moved_with_a_checkpoint(&pool, id);
}

#[test]
fn consolidation_moves_a_small_job_so_that_a_waiting_whole_node_job_runs() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let a = pool.submit("default", 1.0, 1, 50, "sleep 30");
    pool.wait_state(a, "running");
    // The second small job must land on the other node: keep n1 out of placement meanwhile.
    pool.add_agent("n2", "127.0.0.3", "2xH100-80GB");
    let (s, v) = pool.post("/v1/nodes/n1/cordon", json!({}), &pool.admin);
    assert_eq!(s, 200, "{v}");
    let b = pool.submit("default", 1.0, 1, 50, "sleep 30");
    let on = pool.wait_state(b, "running")["assignments"][0]["node"].clone();
    assert_eq!(on, "n2");
    let (s, v) = pool.post("/v1/nodes/n1/uncordon", json!({}), &pool.admin);
    assert_eq!(s, 200, "{v}");
    // Two GPUs are free, one on each node: a job needing two on one node fits only after a move.
    let big = pool.submit("default", 2.0, 1, 50, "sleep 0.2");
    let done = pool.wait_state(big, "succeeded");
    let moved: Vec<u64> = [a, b]
        .into_iter()
        .filter(|id| events(&pool, *id).iter().any(|e| e["kind"] == "Migrated"))
        .collect();
    assert_eq!(moved.len(), 1, "exactly one small job moves");
    let moved = pool.job(moved[0]);
    assert_ne!(
        moved["assignments"][0]["node"], done["assignments"][0]["node"],
        "the moved job left the node the big job took: {moved}"
    );
    assert!(events(&pool, big).iter().any(|e| e["kind"] == "Scheduled"),);
}

#[test]
fn a_transparent_job_keeps_its_memory_across_a_move_and_only_capable_nodes_take_it() {
    require_criu();
    let mut pool = Pool::start();
    // CRIU cannot dump another uid's process without CAP_SYS_RESOURCE, which some hosts (these
    // build machines) do not give even to root: there the admin must allow transparent replicas
    // to run unconfined, or the node offers no transparent checkpoints.
    for (name, ip) in [("n1", "127.0.0.2"), ("n2", "127.0.0.3")] {
        pool.add_agent_with(name, ip, "1xH100-80GB", &["--allow-unconfined"]);
    }
    let (ok, out, err) = cli(&pool, &["nodes"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("CHECKPOINT") && out.contains("cooperative,criu-4."),
        "{out}"
    );
    // A program that knows nothing of Tessera: its count lives only in its memory.
    let worklog = pool.shared("counts");
    let program = format!(
        "import time\nn = 0\nwhile n < 120:\n    n += 1\n    print(n, flush=True)\n    with open({log:?}, 'a') as f: f.write(f'{{n}}\\n')\n    time.sleep(0.03)\n",
        log = worklog.display().to_string()
    );
    let transparent = |extra: [&str; 2], program: &str| {
        let mut args = vec!["--cpu", "0.5", "--memory", "256MiB"];
        args.extend(["--checkpoint-mode", "transparent", extra[0], extra[1]]);
        args.extend(["--", "python3", "-c", program]);
        cli_submit(&pool, &args)
    };
    let id = transparent(["--checkpoint-grace", "30s"], &program);
    let first = pool.wait_state(id, "running")["assignments"][0]["node"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if first == "n1" { "n2" } else { "n1" };
    pool.wait_for("some progress", || worklog_lines(&worklog).len() >= 20);
    let (ok, _, err) = cli(&pool, &["migrate", &id.to_string(), "--to", other]);
    assert!(ok, "{err}");
    let done = pool.wait_state(id, "succeeded");
    assert_eq!(done["assignments"][0]["node"], other, "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
    // Restored, not restarted: every count once, in order, across the move.
    let lines = worklog_lines(&worklog);
    assert_eq!(
        lines,
        (1..=120).collect::<Vec<u32>>(),
        "{:?}",
        events(&pool, id)
    );
    // Its output moved with it: the log of the new attempt holds the whole count.
    let out = logs(&pool, id);
    assert!(out.starts_with("1\n2\n") && out.ends_with("120\n"), "{out}");
    assert_moved_with_a_checkpoint(&pool, id);
    // With an interval, a dump is taken every second as it runs: kill -9 of its node and it
    // goes on elsewhere from the last one, memory and all.
    let worklog2 = pool.shared("counts2");
    // (Slower, so that two dumps travel before it ends even on a busy two-core machine.)
    let program2 = program
        .replace(
            &worklog.display().to_string(),
            &worklog2.display().to_string(),
        )
        .replace("time.sleep(0.03)", "time.sleep(0.15)");
    let id2 = transparent(["--checkpoint-interval", "1s"], &program2);
    let node = pool.wait_state(id2, "running")["assignments"][0]["node"]
        .as_str()
        .unwrap()
        .to_string();
    pool.kill_agent_after_two_checkpoints(id2, &node);
    let done = pool.wait_state(id2, "succeeded");
    assert_ne!(done["assignments"][0]["node"].as_str().unwrap(), node);
    let lines = worklog_lines(&worklog2);
    // Counting went on from a dump, not from the start: 1 appears once, every count is there,
    // and what ran after the last dump ran again.
    assert_eq!(lines.iter().filter(|n| **n == 1).count(), 1, "{lines:?}");
    let restart = lines
        .windows(2)
        .position(|w| w[1] <= w[0])
        .expect("a resumed count");
    assert!(lines[restart + 1] > 1, "{lines:?}");
    let mut seen: Vec<u32> = lines.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, (1..=120).collect::<Vec<u32>>());
    // A pool without CRIU nodes keeps such a job waiting, and says why.
    let mut plain = Pool::start();
    plain.add_agent_without_criu("m1", "127.0.0.4", "1xH100-80GB");
    let waiting = cli_submit(&plain, &["--checkpoint-mode", "transparent", "--", "true"]);
    plain.wait_for("a reason", || {
        plain.job(waiting)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("tessera.io/criu"))
    });
    let (ok, _, err) = cli(
        &plain,
        &["submit", "--checkpoint-mode", "magic", "--", "true"],
    );
    assert!(!ok && err.contains("spec.checkpoint.mode"), "{err}");
}

/// A small HTTP service: `/healthz` answers once it has started, `/` answers with its job id
/// after `delay` seconds. It listens where Tessera tells it ($TESSERA_HOST:$PORT).
fn write_service(pool: &Pool, delay: f64) -> PathBuf {
    let path = pool.shared(&format!("server-{delay}.py"));
    std::fs::write(
        &path,
        format!(
            r#"import os, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path != "/healthz":
            time.sleep({delay})
        body = ("job " + os.environ["TESSERA_JOB_ID"]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((os.environ["TESSERA_HOST"], int(os.environ["PORT"])), H).serve_forever()
"#
        ),
    )
    .unwrap();
    path
}

/// Requests from `threads` threads to the gateway until stopped: (answers by job, failures).
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(Vec<String>, Vec<String>)>>,
}

impl Load {
    fn start(url: String, threads: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let (stop, url) = (stop.clone(), url.clone());
                std::thread::spawn(move || {
                    let http = reqwest::blocking::Client::new();
                    let (mut ok, mut failed) = (vec![], vec![]);
                    while !stop.load(Ordering::SeqCst) {
                        match http.get(&url).send() {
                            Ok(r) if r.status().is_success() => ok.push(r.text().unwrap()),
                            Ok(r) => failed.push(format!("{}: {}", r.status(), r.text().unwrap())),
                            Err(e) => failed.push(e.to_string()),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut ok, mut failed) = (vec![], vec![]);
        for t in self.threads {
            let (o, f) = t.join().unwrap();
            ok.extend(o);
            failed.extend(f);
        }
        (ok, failed)
    }
}

fn service(pool: &Pool, name: &str) -> Value {
    pool.get(&format!("/v1/services/{name}"), &pool.admin).1
}

/// Ready, not draining replicas of a service, by job id.
fn ready_jobs(pool: &Pool, name: &str) -> Vec<u64> {
    service(pool, name)["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ready"] == true && e["draining"] == false)
        .map(|e| e["job"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_service_under_load_moves_and_scales_without_a_failed_request_and_autoscales() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");
    let server = write_service(&pool, 0.005);
    let manifest = pool.path("web.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: tessera/v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  replicas: 1\n  \
             resources: {{cpu: 0.2, memory: 128MiB}}\n  command: [python3, {server:?}]\n  \
             service: {{readiness: {{path: /healthz, period: 200ms}}}}\n",
            server = server.display().to_string()
        ),
    )
    .unwrap();
    let (ok, out, err) = cli(&pool, &["submit", "-f", manifest.to_str().unwrap()]);
    assert!(ok && out.contains("service web created"), "{out}{err}");
    pool.wait_for("a ready replica", || ready_jobs(&pool, "web").len() == 1);
    let first = ready_jobs(&pool, "web")[0];
    let first_node = pool.job(first)["assignments"][0]["node"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if first_node == "n1" { "n2" } else { "n1" };
    let load = Load::start(format!("http://{}/web/", pool.gateway), 4);
    std::thread::sleep(Duration::from_millis(500));
    // Move: the new replica starts on the other node, takes the traffic, the old one drains.
    let (ok, out, err) = cli(&pool, &["services", "move", "web", "--to", other]);
    assert!(
        out.starts_with(&format!("service web: moving a replica to {other};")),
        "{out}"
    );
    assert!(ok, "{err}");
    pool.wait_for("the move", || {
        let ready = ready_jobs(&pool, "web");
        ready.len() == 1 && ready[0] != first && pool.job(first)["state"] == "cancelled"
    });
    let moved = ready_jobs(&pool, "web")[0];
    assert_eq!(pool.job(moved)["assignments"][0]["node"], other);
    // Scale up, then down, under the same load.
    let (ok, out, err) = cli(&pool, &["services", "scale", "web", "3"]);
    assert!(
        out.starts_with("service web: scaled to 3 replica(s)"),
        "{out}"
    );
    assert!(ok, "{err}");
    pool.wait_for("three replicas", || ready_jobs(&pool, "web").len() == 3);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _, err) = cli(&pool, &["services", "scale", "web", "1"]);
    assert!(ok, "{err}");
    pool.wait_for("one replica left", || {
        service(&pool, "web")["jobs"].as_array().unwrap().len() == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    let (answers, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Traffic flowed all along (how much depends on how busy the machine is: speed is for the
    // benchmarks; the replicas that answered are checked below).
    assert!(
        answers.len() > 50,
        "only {} requests went through",
        answers.len()
    );
    let by: std::collections::BTreeSet<&String> = answers.iter().collect();
    assert!(
        by.len() >= 3,
        "traffic reached the moved and the added replicas: {by:?}"
    );
    let (ok, out, _) = cli(&pool, &["services"]);
    assert!(ok && out.contains("web") && out.contains("1/1"), "{out}");

    // Autoscaling on requests in flight: slow answers and 6 callers need more than one replica;
    // when the load stops, it shrinks back after the delay.
    let slow = write_service(&pool, 0.2);
    let (s, v) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "slow"},
               "spec": {"resources": {"cpu": 0.2, "memory": "128MiB"},
                        "command": ["python3", slow],
                        "service": {"readiness": {"path": "/healthz", "period": "200ms"},
                                    "autoscale": {"min": 1, "max": 3, "targetInFlight": 2,
                                                  "scaleDownDelay": "1s"}}}}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    pool.wait_for("a ready slow replica", || {
        ready_jobs(&pool, "slow").len() == 1
    });
    let load = Load::start(format!("http://{}/slow/", pool.gateway), 6);
    pool.wait_for("scaled up", || ready_jobs(&pool, "slow").len() == 3);
    let (_, failed) = load.finish();
    assert!(failed.is_empty(), "{failed:?}");
    pool.wait_for("scaled down", || {
        service(&pool, "slow")["replicas"] == 1
            && service(&pool, "slow")["jobs"].as_array().unwrap().len() == 1
    });
    // Bad requests name the problem and change nothing.
    let (s, v) = pool.post(
        "/v1/services/slow/scale",
        json!({"replicas": 9}),
        &pool.admin,
    );
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("autoscale range"), "{v}");
    let (s, _) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "slow"},
        "spec": {"command": ["true"]}}),
        &pool.admin,
    );
    assert_eq!(s, 409);
    let (s, v) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "x"},
        "spec": {"command": ["true"], "service": {"port": 70000}}}),
        &pool.admin,
    );
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("spec.service.port"), "{v}");
    let r = reqwest::blocking::get(format!("http://{}/nosuch/", pool.gateway)).unwrap();
    assert_eq!(r.status(), 404);
    let (ok, out, err) = cli(&pool, &["services", "delete", "slow"]);
    assert!(
        out.starts_with("service slow: deleted; its replicas are stopping"),
        "{out}"
    );
    assert!(ok, "{err}");
}

/// Indexes of an elastic job's replicas in its set now (running, not given back).
fn members(job: &Value) -> Vec<u64> {
    job["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["phase"] == "running" && r["leaving"] != true)
        .map(|r| r["index"].as_u64().unwrap())
        .collect()
}

#[test]
fn an_elastic_job_grows_into_idle_gpus_gives_one_back_for_a_waiting_job_and_grows_again() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "2xH100-80GB");
    // Each replica reports the replica set it sees and checkpoints its step count when given
    // back, with the Python helpers a user would use.
    let script = pool.shared("elastic.py");
    std::fs::write(
        &script,
        r#"import sys, time
from pathlib import Path
from tessera_checkpoint import Checkpointer
from tessera_elastic import ReplicaSet
stop = Path(sys.argv[1])
ckpt = Checkpointer()
state = ckpt.load_json()
print("resumed" if state else "fresh", flush=True)
state = state or {"steps": 0}
replicas = ReplicaSet()
def show(world):
    print(f"generation={world['generation']} n={len(world['replicas'])} rank={replicas.rank(world)}", flush=True)
show(replicas.current())
while not stop.exists():
    state["steps"] += 1
    if ckpt.due():
        print("checkpointing", flush=True)
        ckpt.save_json(state)
    if replicas.changed():
        show(replicas.current())
    time.sleep(0.05)
print("done", flush=True)
"#,
    )
    .unwrap();
    let stop = pool.shared("stop");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
    let id = cli_submit(
        &pool,
        &[
            "--name",
            "elastic",
            "--gpu",
            "1",
            "--replicas",
            "1-3",
            "--checkpoint-signal",
            "USR1",
            "--checkpoint-grace",
            "10s",
            "--env",
            &format!("PYTHONPATH={}", python.canonicalize().unwrap().display()),
            "--",
            "python3",
            script.to_str().unwrap(),
            stop.to_str().unwrap(),
        ],
    );
    // It starts with its minimum and grows into the idle GPUs up to its maximum.
    pool.wait_for("the job to grow to 3 replicas", || {
        members(&pool.job(id)).len() == 3
    });
    let job = pool.job(id);
    assert_eq!(
        (job["replicas"].as_u64(), job["elastic"]["max"].as_u64()),
        (Some(3), Some(3))
    );
    pool.wait_for("replica 0 to see 3 replicas", || {
        replica_logs(&pool, id, 0).contains("n=3 rank=0")
    });
    let (ok, out, err) = cli(&pool, &["jobs"]);
    assert!(ok && out.contains("3 (elastic 1-3)"), "{out}{err}");
    // (A program that is sent its checkpoint signal before it set its handler just dies.)
    pool.wait_for("every replica to be up", || {
        members(&pool.job(id))
            .iter()
            .all(|i| replica_logs(&pool, id, *i as u32).contains("generation="))
    });

    // A job needing two GPUs on one node: one GPU is free, so one replica is given back (from
    // the node with the free GPU) and checkpoints on its way out.
    let big = pool.submit("default", 2.0, 1, 50, "sleep 2");
    pool.wait_state(big, "running");
    let ev = events(&pool, id);
    let shrinking: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "Shrinking").collect();
    assert_eq!(shrinking.len(), 1, "{ev:?}");
    assert!(
        shrinking[0]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("for job {big}")),
        "{ev:?}"
    );
    let job = pool.job(id);
    let gone: Vec<u64> = job["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["leaving"] == true)
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(gone.len(), 1, "{job}");
    assert!(
        gone[0] >= 1,
        "the minimum replica 0 is never given back: {job}"
    );
    pool.wait_for("the checkpoint of the replica given back", || {
        events(&pool, id).iter().any(|e| e["kind"] == "Checkpoint")
    });
    assert!(replica_logs(&pool, id, gone[0] as u32).contains("checkpointing"));
    pool.wait_for("replica 0 to see 2 replicas", || {
        replica_logs(&pool, id, 0).contains("n=2 rank=0")
    });
    assert_eq!(
        pool.job(id)["state"],
        "running",
        "giving back is not failing"
    );

    // Once the big job is done, the job grows back; the new replica starts from the checkpoint
    // of the one that left.
    pool.wait_state(big, "succeeded");
    pool.wait_for("the job to grow back to 3", || {
        members(&pool.job(id)).len() == 3
    });
    let grown: Vec<u64> = members(&pool.job(id))
        .into_iter()
        .filter(|i| *i > 2)
        .collect();
    assert_eq!(grown.len(), 1, "{}", pool.job(id));
    pool.wait_for("the new replica to start", || {
        replica_logs(&pool, id, grown[0] as u32).contains("generation=")
    });
    assert!(
        replica_logs(&pool, id, grown[0] as u32).starts_with("resumed\n"),
        "{}",
        replica_logs(&pool, id, grown[0] as u32)
    );
    pool.wait_for("replica 0 to see 3 replicas again", || {
        replica_logs(&pool, id, 0).matches("n=3 rank=0").count() == 2
    });

    // Done: every replica in the set exits 0, and the one given back does not count.
    std::fs::write(&stop, "").unwrap();
    pool.wait_state(id, "succeeded");
    let kinds: Vec<String> = events(&pool, id)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "Grown").count(),
        2,
        "{kinds:?}"
    );
}

#[test]
fn an_elastic_range_that_cannot_be_is_refused_by_field() {
    let pool = Pool::start();
    let (status, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "e"},
               "spec": {"replicas": {"min": 4, "max": 2}, "command": ["true"]}}),
        &pool.admin,
    );
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["field"], "spec.replicas", "{v}");
    assert_eq!(pool.get("/v1/jobs", &pool.admin).1, json!([]));
    let (ok, _, err) = cli(&pool, &["submit", "--replicas", "2-", "--", "true"]);
    assert!(!ok && err.contains("MIN-MAX"), "{err}");
}

#[test]
fn a_job_no_node_could_ever_hold_is_refused_by_resource_unless_it_waits_for_capacity() {
    let mut pool = Pool::start();
    // An empty pool refuses nothing: its nodes may not have joined yet.
    let early = cli_submit(&pool, &["--gpu", "4", "--", "true"]);
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let refused = |args: &[&str], field: &str, words: &str| {
        let mut all = vec!["submit"];
        all.extend_from_slice(args);
        all.extend(["--", "true"]);
        let (ok, _, err) = cli(&pool, &all);
        assert!(!ok, "{args:?} was accepted");
        assert!(
            err.contains(field) && err.contains(words) && err.contains("--queue-anyway"),
            "{args:?}: {err}"
        );
    };
    refused(
        &["--gpu", "2"],
        "spec.resources.gpu",
        "the most any node has is 1 (n1)",
    );
    refused(
        &["--cpu", "32"],
        "spec.resources.cpu",
        "the largest node has 8 (n1)",
    );
    refused(
        &["--memory", "64GiB"],
        "spec.resources.memory",
        "the largest node has 16.0 GiB (n1)",
    );
    refused(
        &["--gpu", "0.5", "--gpu-memory", "100GiB"],
        "spec.resources.gpuMemory",
        "the largest device has 80.0 GiB (n1)",
    );
    let (status, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "t4"},
               "spec": {"resources": {"gpu": 1, "deviceModels": ["T4-16GB"]}, "command": ["true"]}}),
        &pool.admin,
    );
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["field"], "spec.resources.deviceModels", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("they carry H100-80GB"),
        "{v}"
    );
    // A service's replicas are jobs: the same refusal.
    let (status, v) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "huge"},
               "spec": {"resources": {"cpu": 32}, "command": ["true"], "service": {}}}),
        &pool.admin,
    );
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (422, Some("spec.resources.cpu")),
        "{v}"
    );
    assert_eq!(pool.get("/v1/services", &pool.admin).1, json!([]));
    // A project whose hard limit is below what the gang needs at once: no node changes that.
    let (ok, _, err) = cli(&pool, &["projects", "create", "capped", "--limit", "1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &pool,
        &[
            "submit",
            "--project",
            "capped",
            "--replicas",
            "2",
            "--gpu",
            "1",
            "--cpu",
            "0.5",
            "--",
            "true",
        ],
    );
    assert!(
        !ok && err.contains("needs 2 GPU at once and project capped's hard limit is 1 GPU"),
        "{err}"
    );
    let listed = pool.get("/v1/jobs", &pool.admin).1;
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "nothing refused was kept: {listed}"
    );

    // Asked to wait, it waits, and says why; a node that can hold it joins, and it runs.
    let waiting = cli_submit(&pool, &["--gpu", "2", "--queue-anyway", "--", "true"]);
    pool.wait_for("its reason", || {
        pool.job(waiting)["reason"].as_str().is_some_and(|r| {
            r.contains("cannot fit any node of the pool today")
                && r.contains("the most any node has is 1 (n1)")
        })
    });
    pool.add_agent("n2", "127.0.0.3", "4xH100-80GB");
    pool.wait_state(waiting, "succeeded");
    pool.wait_state(early, "succeeded");
}

#[test]
fn the_live_pool_runs_the_policy_it_is_given_and_says_which() {
    let mut pool = Pool::start_in(false, None, &["--policy", "fgd"]);
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let (ok, out, err) = cli(&pool, &["nodes"]);
    assert!(ok && out.contains("placement policy: FGD"), "{out}{err}");
    let (status, v) = pool.get("/v1/pool", &pool.admin);
    assert_eq!(
        (status, v["policy"].as_str(), v["nodes"].as_u64()),
        (200, Some("FGD"), Some(1))
    );
    // It places work.
    let id = pool.submit("default", 0.5, 1, 50, "true");
    pool.wait_state(id, "succeeded");
    // The default is Tessera's; a name that is no policy is refused with the names that are.
    let plain = Pool::start();
    let (ok, out, _) = cli(&plain, &["nodes"]);
    assert!(ok && out.contains("placement policy: Tessera"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["controller", "--policy", "nope", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--policy nope") && err.contains("FGD, Tessera"),
        "{err}"
    );
}

/// The row of `key` in a usage report.
fn usage_row(report: &Value, key: &str) -> Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .unwrap_or_else(|| panic!("no row {key} in {report}"))
        .clone()
}

/// Milli-GPU-milliseconds a one-replica, one-GPU job ran, from its own events: each "started"
/// event to the next end of that replica (the controller stamps both with the same clock it
/// meters with).
fn metered_from_events(pool: &Pool, id: u64) -> u64 {
    let mut total = 0;
    let mut started = None;
    for e in events(pool, id) {
        let msg = e["message"].as_str().unwrap();
        let ts = e["ts_ms"].as_u64().unwrap();
        if e["kind"] != "Replica" {
            continue;
        }
        if msg.starts_with("replica 0 started on") {
            started = Some(ts);
        } else if let Some(t0) = started.take() {
            total += 1000 * (ts - t0);
        }
    }
    assert!(started.is_none(), "job {id} still runs");
    total
}

#[test]
fn usage_is_metered_exactly_through_preemption_restart_and_a_controller_restart() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let low = pool.submit("default", 1.0, 1, 25, "sleep 60");
    pool.wait_state(low, "running");
    std::thread::sleep(Duration::from_millis(400));
    // Preempted by a high-priority job, then started again once it is done.
    let high = pool.submit("default", 1.0, 1, 75, "sleep 1");
    pool.wait_state(high, "succeeded");
    let again = pool.wait_state(low, "running");
    assert_eq!(again["attempt"], 2, "{again}");
    // The controller dies while the job runs; the run is metered whole once it ends.
    pool.restart_controller();
    std::thread::sleep(Duration::from_millis(300));
    let (s, v) = pool.post(&format!("/v1/jobs/{low}/cancel"), json!({}), &pool.admin);
    assert_eq!(s, 200, "{v}");
    pool.wait_state(low, "cancelled");

    let usage = |pool: &Pool, by: &str| {
        pool.get(&format!("/v1/usage?since=1d&by={by}"), &pool.admin)
            .1
    };
    let by_job = usage(&pool, "job");
    let row = usage_row;
    for id in [low, high] {
        let r = row(&by_job, &id.to_string());
        assert_eq!(
            r["gpu_milli_ms"].as_u64().unwrap(),
            metered_from_events(&pool, id),
            "job {id}: {r}"
        );
    }
    assert_eq!(row(&by_job, &low.to_string())["segments"], 2);
    assert!(
        row(&by_job, &high.to_string())["gpu_milli_ms"]
            .as_u64()
            .unwrap()
            >= 1_000_000
    );
    // Totals equal the sum over jobs, whatever the grouping.
    let sum: u64 = by_job["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["gpu_milli_ms"].as_u64().unwrap())
        .sum();
    assert_eq!(by_job["total"]["gpu_milli_ms"].as_u64().unwrap(), sum);
    for by in ["project", "user", "model", "node"] {
        assert_eq!(usage(&pool, by)["total"], by_job["total"], "{by}");
    }
    assert_eq!(
        row(&usage(&pool, "model"), "H100-80GB")["gpu_milli_ms"].as_u64(),
        Some(sum)
    );

    // The ledger survives a restart unchanged, and fair share reads its past use from it.
    pool.restart_controller();
    assert_eq!(usage(&pool, "job")["rows"], by_job["rows"]);
    pool.wait_for("the fair-share history", || {
        pool.get("/v1/projects/default", &pool.admin).1["recent_gpu"]
            .as_f64()
            .is_some_and(|g| g > 0.0)
    });

    // For scripts: CSV with the total last; bad groupings are refused by name.
    let (ok, out, err) = cli(
        &pool,
        &["usage", "--since", "1d", "--by", "user", "-o", "csv"],
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    let col = header.iter().position(|h| *h == "gpu_milli_ms").unwrap();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[1].starts_with("admin,"), "{out}");
    assert!(lines[2].starts_with("total,"), "{out}");
    assert_eq!(lines[2].split(',').nth(col), Some(sum.to_string().as_str()));
    let (ok, out, _) = cli(&pool, &["usage", "--since", "1d"]);
    assert!(
        ok && out.contains("GPU-HOURS") && out.contains("default"),
        "{out}"
    );
    let (s, v) = pool.get("/v1/usage?by=color", &pool.admin);
    assert_eq!(s, 400, "{v}");
    assert!(
        v.to_string().contains("project, user, model, job or node"),
        "{v}"
    );
}

/// The points of a telemetry series now.
fn series(pool: &Pool, name: &str) -> Vec<Value> {
    let (status, v) = pool.get(&format!("/v1/telemetry?name={name}&since=1h"), &pool.admin);
    assert_eq!(status, 200, "{v}");
    v["points"].as_array().unwrap().clone()
}

#[test]
fn devices_and_workloads_are_sampled_metered_for_energy_and_scraped_by_a_real_prometheus() {
    let prometheus = which("prometheus").expect(
        "Prometheus is needed for this test: run scripts/test-deps.sh (the README's test command)",
    );
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    // One replica keeps its (simulated) GPU busy, the other holds half a GPU and idles.
    let busy = pool.submit("default", 1.0, 1, 50, "while :; do :; done");
    let idle = pool.submit("default", 0.5, 1, 50, "sleep 600");
    pool.wait_state(busy, "running");
    pool.wait_state(idle, "running");
    let util = |p: &Value| p["util_pct"].as_f64().unwrap();
    pool.wait_for("the busy workload to read busy", || {
        series(&pool, &format!("job/{busy}/0"))
            .iter()
            .any(|p| util(p) > 50.0)
    });
    let quiet = series(&pool, &format!("job/{idle}/0"));
    assert!(
        !quiet.is_empty() && quiet.iter().all(|p| util(p) < 20.0),
        "{quiet:?}"
    );
    assert!(quiet.iter().all(|p| p["simulated"] == true));
    let busy_gpu = pool.job(busy)["assignments"][0]["devices"][0]
        .as_u64()
        .unwrap();
    let device = series(&pool, &format!("gpu/n1/{busy_gpu}"));
    assert!(device.iter().any(|p| util(p) > 50.0), "{device:?}");
    assert!(
        device
            .iter()
            .all(|p| p["memory_total_bytes"].as_u64() == Some(80 << 30))
    );
    let pool_series = series(&pool, "pool");
    assert!(!pool_series.is_empty());
    assert!(
        pool_series
            .iter()
            .all(|p| p["memory_total_bytes"].as_u64() == Some(160 << 30))
    );
    let (s, v) = pool.get("/v1/telemetry?name=disk/n1", &pool.admin);
    assert_eq!(s, 400, "{v}");

    // The controller's /metrics under dcgm-exporter's names, scraped by a real Prometheus.
    let (_, metrics) = pool.get("/metrics", "");
    let text = metrics.as_str().unwrap().to_string();
    for name in [
        "DCGM_FI_DEV_GPU_UTIL{gpu=\"0\"",
        "DCGM_FI_DEV_FB_FREE{",
        "DCGM_FI_DEV_FB_TOTAL{gpu=\"1\",UUID=\"TESSERA-n1-1\",device=\"nvidia1\",modelName=\"H100-80GB\",Hostname=\"n1\",simulated=\"true\"} 81920",
        "DCGM_FI_DEV_POWER_USAGE{",
        &format!("tessera_workload_energy_joules{{job=\"{busy}\""),
        "tessera_project_power_watts{project=\"default\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    let prom_port = port();
    let config = pool.path("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: tessera\n    \
             static_configs: [{{targets: ['{}']}}]\n",
            pool.listen
        ),
    )
    .unwrap();
    let _prom = Proc(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                pool.path("prom").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let query = |q: &str| -> Value {
        pool.http
            .get(format!("http://127.0.0.1:{prom_port}/api/v1/query"))
            .query(&[("query", q)])
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .unwrap_or(Value::Null)
    };
    let q = format!("DCGM_FI_DEV_GPU_UTIL{{Hostname=\"n1\",gpu=\"{busy_gpu}\"}}");
    pool.wait_for("Prometheus to scrape the controller", || {
        query(&q)["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    let got = query(&q);
    let value: f64 = got["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(value > 50.0, "{got}");
    let up = query("up{job=\"tessera\"}");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    // The Grafana dashboard in docs/ charts only what the controller exports, in valid PromQL.
    let dashboard: Value =
        serde_json::from_str(include_str!("../../../docs/grafana/tessera.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$node", ".*")
                .replace("$project", ".*");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("DCGM_") || word.starts_with("tessera_") {
                    let family = word.trim_end_matches("_bucket");
                    assert!(text.contains(family), "{word} (in {expr}) is not exported");
                }
            }
            let answer = query(&expr);
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
        }
    }

    // Energy: metered per job when the runs end; the busy job drew more than the idle half.
    for id in [busy, idle] {
        let (s, v) = pool.post(&format!("/v1/jobs/{id}/cancel"), json!({}), &pool.admin);
        assert_eq!(s, 200, "{v}: {} {:?}", pool.job(id), events(&pool, id));
        pool.wait_state(id, "cancelled");
    }
    let report = pool.get("/v1/usage?since=1h&by=job", &pool.admin).1;
    let energy = |id: u64| {
        usage_row(&report, &id.to_string())["energy_mj"]
            .as_u64()
            .unwrap()
    };
    assert!(energy(idle) > 0, "{report}");
    assert!(energy(busy) > 2 * energy(idle), "{report}");
    assert_eq!(report["total"]["simulated"], true);
}

/// A program on the PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The audit entries of a query, oldest first.
fn audit(pool: &Pool, query: &str) -> Vec<Value> {
    let (s, v) = pool.get(&format!("/v1/audit?since=1h&{query}"), &pool.admin);
    assert_eq!(s, 200, "{v}");
    let mut entries = v.as_array().unwrap().clone();
    entries.reverse();
    entries
}

fn actions(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_projects_residency_holds_refusals_name_the_rule_and_every_decision_is_audited() {
    let mut pool = Pool::start();
    pool.add_agent_with("eu1", "127.0.0.2", "1xH100-80GB", &["--label", "region=eu"]);
    pool.add_agent_with("us1", "127.0.0.3", "2xH100-80GB", &["--label", "region=us"]);
    let (ok, out, err) = cli(
        &pool,
        &[
            "projects",
            "create",
            "gdpr",
            "--residency",
            "region=eu",
            "--max-gpu-per-job",
            "1",
        ],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, _) = cli(&pool, &["projects"]);
    assert!(ok && out.contains("region=eu; <=1 GPU/job"), "{out}");

    // The EU job runs in the EU, though the US node has more room; a second one waits for it.
    let a = pool.submit("gdpr", 1.0, 1, 50, "sleep 60");
    let on = pool.wait_state(a, "running")["assignments"][0]["node"].clone();
    assert_eq!(on, "eu1");
    let b = pool.submit("gdpr", 1.0, 1, 50, "sleep 60");
    pool.wait_for("b's reason", || {
        pool.job(b)["reason"]
            .as_str()
            .unwrap()
            .contains("project gdpr's policy: only nodes labelled region=eu")
    });
    // Requests the policy can never allow are refused, naming the field and the rule.
    let refuse = |resources: Value, field: &str| {
        let (s, v) = pool.post(
            "/v1/jobs",
            json!({"metadata": {"name": "x", "project": "gdpr"},
                   "spec": {"resources": resources, "command": ["true"]}}),
            &pool.admin,
        );
        assert_eq!(s, 422, "{v}");
        assert_eq!(v["error"]["field"], field, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("change project gdpr's policy"),
            "{v}"
        );
        v["error"]["message"].as_str().unwrap().to_string()
    };
    let m = refuse(json!({"gpu": 2}), "spec.resources.gpu");
    assert!(m.contains("at most 1 per job"), "{m}");
    let m = refuse(
        json!({"gpu": 1, "nodeSelector": {"region": "us"}}),
        "spec.resources.nodeSelector",
    );
    assert!(m.contains("only region=eu"), "{m}");
    let (s, v) = pool.post(
        &format!("/v1/jobs/{a}/migrate"),
        json!({"to": "us1"}),
        &pool.admin,
    );
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "to");
    assert_eq!(
        pool.job(a)["state"],
        "running",
        "a refused move changes nothing"
    );

    // Priority preemption in another project, and admin actions.
    let low = pool.submit("default", 2.0, 1, 25, "sleep 60");
    pool.wait_state(low, "running");
    let high = pool.submit("default", 1.0, 1, 75, "sleep 0.2");
    pool.wait_state(high, "succeeded");
    for verb in ["cordon", "uncordon"] {
        let (s, v) = pool.post(&format!("/v1/nodes/us1/{verb}"), json!({}), &pool.admin);
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = pool.post(&format!("/v1/jobs/{a}/cancel"), json!({}), &pool.admin);
    assert_eq!(s, 200, "{v}");
    let on = pool.wait_state(b, "running")["assignments"][0]["node"].clone();
    assert_eq!(on, "eu1");

    // The audit log has every decision, with who made it.
    let of_a = audit(&pool, &format!("job={a}"));
    assert_eq!(actions(&of_a)[..3], ["submit", "place", "deny"], "{of_a:?}");
    assert!(
        of_a.iter()
            .any(|e| e["action"] == "cancel" && e["actor"] == "admin")
    );
    let place = &of_a[1];
    assert_eq!(place["actor"], "scheduler");
    assert!(place["detail"].as_str().unwrap().contains("eu1"), "{place}");
    let denies = audit(&pool, "action=deny&project=gdpr");
    assert_eq!(denies.len(), 3, "{denies:?}");
    assert!(denies.iter().all(|e| e["actor"] == "admin"));
    let of_low = audit(&pool, &format!("job={low}"));
    let preempt = of_low
        .iter()
        .find(|e| e["action"] == "preempt")
        .unwrap_or_else(|| panic!("no preemption of {low}: {of_low:?}"));
    assert_eq!(preempt["actor"], "scheduler");
    assert!(
        preempt["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("for job {high}"))
    );
    let admin = actions(&audit(&pool, ""));
    for action in ["project-create", "cordon", "uncordon"] {
        assert!(
            admin.iter().any(|a| a == action),
            "{action} missing: {admin:?}"
        );
    }
    let of_b = audit(&pool, &format!("job={b}"));
    assert_eq!(actions(&of_b), ["submit", "place"], "{of_b:?}");
    let (ok, out, err) = cli(&pool, &["audit", "--project", "gdpr", "--action", "deny"]);
    assert!(ok && out.lines().count() == 4, "{out}{err}");
    let (s, _) = pool.get("/v1/audit?since=yesterday", &pool.admin);
    assert_eq!(s, 400);
}

#[test]
fn idle_interactive_jobs_are_warned_then_stopped_in_time_and_idle_gpu_hours_are_reported() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let (ok, out, err) = cli(
        &pool,
        &[
            "projects",
            "create",
            "notebooks",
            "--idle-after",
            "3s",
            "--idle-warning",
            "1s",
            "--idle-threshold",
            "5",
        ],
    );
    assert!(ok, "{out}{err}");
    let submit = |interactive: bool, command: &str| {
        let mut args = vec!["--project", "notebooks", "--gpu", "0.5", "--cpu", "0.5"];
        if interactive {
            args.push("--interactive");
        }
        args.extend(["--", "sh", "-c", command]);
        cli_submit(&pool, &args)
    };
    let idle = submit(true, "sleep 600");
    let busy = submit(true, "while :; do :; done");
    let batch = submit(false, "sleep 600");
    for id in [idle, busy, batch] {
        pool.wait_state(id, "running");
    }
    let done = pool.wait_state(idle, "cancelled");
    assert!(
        done["reason"].as_str().unwrap().contains("idle policy"),
        "{done}"
    );
    let ev = events(&pool, idle);
    let at = |kind: &str| -> u64 {
        ev.iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {ev:?}"))["ts_ms"]
            .as_u64()
            .unwrap()
    };
    let started = ev
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .starts_with("replica 0 started")
        })
        .unwrap()["ts_ms"]
        .as_u64()
        .unwrap();
    // Warned first, stopped not before the idle time (3 s from its first idle reading, which
    // comes after it started).
    assert!(at("IdleWarning") < at("IdleStop"));
    assert!(at("IdleStop") >= started + 3_000, "stopped early: {ev:?}");
    assert!(at("IdleStop") - at("IdleWarning") >= 900, "{ev:?}");
    // The busy one and the batch job keep running.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pool.job(busy)["state"], "running");
    assert_eq!(pool.job(batch)["state"], "running");
    let stops = audit(&pool, "action=idle-stop");
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(
        (stops[0]["job"].as_u64(), stops[0]["actor"].as_str()),
        (Some(idle), Some("controller"))
    );

    // Idle GPU-hours: the idle and batch jobs' shares count, the busy one's does not.
    for id in [busy, batch] {
        let (s, v) = pool.post(&format!("/v1/jobs/{id}/cancel"), json!({}), &pool.admin);
        assert_eq!(s, 200, "{v}");
        pool.wait_state(id, "cancelled");
    }
    let report = pool.get("/v1/usage?since=1h&by=job", &pool.admin).1;
    let row = |id: u64| -> (u64, u64) {
        let r = usage_row(&report, &id.to_string());
        (
            r["idle_gpu_milli_ms"].as_u64().unwrap(),
            r["gpu_milli_ms"].as_u64().unwrap(),
        )
    };
    let (idle_ms, held) = row(idle);
    assert!(idle_ms > 0 && idle_ms <= held, "{report}");
    let (busy_idle, busy_held) = row(busy);
    assert!(
        busy_idle * 4 < busy_held,
        "the busy job counted idle: {report}"
    );
    let (ok, out, _) = cli(&pool, &["usage", "--since", "1h"]);
    assert!(
        ok && out.contains("IDLE GPU-H") && out.contains("notebooks"),
        "{out}"
    );
}

/// Waits until `f` (a check in the browser) says yes.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "timed out in the browser waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The newest few KiB of replica `replica`'s output of job `id`'s current attempt.
fn output_tail(pool: &Pool, id: u64, replica: u32) -> String {
    let at = |offset: u64| {
        let (status, v) = pool.get(
            &format!("/v1/jobs/{id}/logs?replica={replica}&offset={offset}"),
            &pool.admin,
        );
        (status == 200).then_some(v)
    };
    let Some(end) = at(u64::MAX >> 11).and_then(|v| v["offset"].as_u64()) else {
        return String::new();
    };
    at(end.saturating_sub(4096))
        .and_then(|v| v["data"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn the_dashboard_tells_the_truth_about_jobs_logs_services_and_the_audit_in_headless_chromium() {
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        panic!(
            "Chromium and ChromeDriver are needed: run scripts/test-deps.sh (the README's test command)"
        );
    };
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");

    // A member of another project, with a job of their own there.
    let (s, v) = pool.post(
        "/v1/users",
        json!({"name": "ana", "role": "member"}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = pool.post(
        "/v1/projects",
        json!({"name": "vision", "members": ["ana"]}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    let ana = pool
        .post("/v1/tokens", json!({"user": "ana"}), &pool.admin)
        .1["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "ana-done", "project": "vision"},
               "spec": {"resources": {"cpu": 0.1, "memory": "64MiB"}, "command": ["true"]}}),
        &ana,
    );
    assert_eq!(s, 201, "{v}");
    let ana_job = v["id"].as_u64().unwrap();
    // A job with two replicas whose first attempt fails after writing ~190 KB each (more than the
    // 64 KiB the log view reads back when it opens), and whose second keeps running. Both have
    // written all their lines before the first attempt fails (the gang stops the other replica
    // when one fails). Its command carries markup, which must stay text.
    let chatty_script = "i=0; while [ $i -lt 6000 ]; do \
         printf 'replica %s attempt %s line %05d\\n' $TESSERA_REPLICA $TESSERA_ATTEMPT $i; \
         i=$((i+1)); done; [ $TESSERA_ATTEMPT -ge 2 ] || { sleep 2; exit 1; }; exec sleep 120 \
         # <img id=pwned src=x>";
    let (s, v) = pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "chatty", "project": "default"},
               "spec": {"replicas": 2, "resources": {"cpu": 0.1, "memory": "64MiB"},
                        "restart": {"policy": "on-failure", "maxRestarts": 1},
                        "command": ["sh", "-c", chatty_script]}}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    let chatty = v["id"].as_u64().unwrap();
    // A service, for the services pane.
    let server = write_service(&pool, 0.0);
    let (s, v) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "web"},
               "spec": {"resources": {"cpu": 0.1, "memory": "128MiB"},
                        "command": ["python3", server],
                        "service": {"readiness": {"path": "/healthz", "period": "200ms"}}}}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    pool.wait_state(ana_job, "succeeded");
    pool.wait_for(
        "chatty's second attempt to have written all its lines",
        || {
            let j = pool.job(chatty);
            j["attempt"] == 2
                && j["state"] == "running"
                && (0..2).all(|r| {
                    output_tail(&pool, chatty, r)
                        .ends_with(&format!("replica {r} attempt 2 line 05999\n"))
                })
        },
    );

    let driver_port = port();
    let _driver = Proc(
        Command::new(chromedriver)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Screenshots for the docs when asked (tests run in the crate's directory):
    // TESSERA_SCREENSHOTS=$PWD/docs/img cargo test --test pool the_dashboard
    let shots = std::env::var_os("TESSERA_SCREENSHOTS").map(PathBuf::from);
    let url = format!("{}/ui/", pool.url);
    let admin = pool.admin.clone();
    // The WebDriver client's TLS stack needs its provider named (ChromeDriver is plain HTTP).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job_id: u64 = rt.block_on(async move {
        use fantoccini::{ClientBuilder, Locator};
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                   "--disable-dev-shm-usage", "--window-size=1280,1500"]}),
        );
        let mut browser = None;
        for _ in 0..50 {
            match ClientBuilder::rustls()
                .expect("TLS roots")
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{driver_port}"))
                .await
            {
                Ok(c) => {
                    browser = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let b = browser.expect("ChromeDriver did not start");
        let shot = |b: fantoccini::Client, name: &'static str| {
            let shots = shots.clone();
            async move {
                if let Some(dir) = shots {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(dir.join(name), b.screenshot().await.unwrap()).unwrap();
                }
            }
        };
        b.goto(&url).await.unwrap();
        let text = |id: &'static str| {
            let b = b.clone();
            async move {
                match b.find(Locator::Id(id)).await {
                    Ok(e) => e.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                }
            }
        };
        // What a script in the page answers (the whole text of a scrolled element, say).
        let js = |script: String| {
            let b = b.clone();
            async move { b.execute(&script, vec![]).await.unwrap() }
        };
        let click = |id: &'static str| {
            let b = b.clone();
            async move {
                b.find(Locator::Id(id))
                    .await
                    .unwrap()
                    .click()
                    .await
                    .unwrap()
            }
        };
        let type_in = |id: &'static str, text: String| {
            let b = b.clone();
            async move {
                let field = b.find(Locator::Id(id)).await.unwrap();
                field.clear().await.unwrap();
                field.send_keys(&text).await.unwrap();
            }
        };
        let choose = |id: &'static str, value: String| {
            let b = b.clone();
            async move {
                b.find(Locator::Id(id))
                    .await
                    .unwrap()
                    .select_by_value(&value)
                    .await
                    .unwrap()
            }
        };
        // Every field the page has is labelled, the login's too.
        let unlabelled = "return [...document.querySelectorAll('input, select')]\
                          .filter(e => e.labels.length === 0).map(e => e.id)";
        assert_eq!(js(unlabelled.into()).await, json!([]));
        // And no id names two elements (the script finds each by its id).
        let twice = "return [...document.querySelectorAll('[id]')].map(e => e.id)\
                     .filter((id, i, all) => all.indexOf(id) !== i)";
        assert_eq!(js(twice.into()).await, json!([]));
        // The icon: named by the page, and where browsers look unasked.
        assert_eq!(
            js("return document.querySelector('link[rel=icon]').getAttribute('href')".into())
                .await,
            json!("/ui/favicon.svg")
        );
        let icon = js("return fetch('/favicon.ico').then(r => r.text().then(t => \
                       [r.status, r.headers.get('content-type'), t.startsWith('<svg')]))"
            .into())
        .await;
        assert_eq!(icon, json!([200, "image/svg+xml", true]));

        // A wrong token is refused, and says so.
        type_in("token", "not-a-token".into()).await;
        click("login").await;
        eventually("the login error", || async {
            text("login-error").await.contains("Not logged in")
        })
        .await;
        type_in("token", admin.clone()).await;
        click("login").await;
        eventually("the dashboard", || async {
            text("who").await.contains("admin")
        })
        .await;
        eventually("the node drawn with its devices", || async {
            text("nodes").await.contains("gpu1 H100-80GB")
        })
        .await;

        // Submit half a GPU from the form; see it run on its share of a device.
        type_in("job-name", "from-ui".into()).await;
        type_in(
            "job-command",
            "echo hello from the dashboard; sleep 4".into(),
        )
        .await;
        click("submit").await;
        eventually("the submission", || async {
            text("submit-result").await.contains("submitted")
        })
        .await;
        let result = text("submit-result").await;
        let id: u64 = result
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{result}"));
        let row = format!("tr[data-job='{id}']");
        let row_text = |b: fantoccini::Client, row: String| async move {
            match b.find(Locator::Css(&row)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        };
        eventually("the job to run", || {
            let f = row_text(b.clone(), row.clone());
            async move { f.await.contains("running") }
        })
        .await;
        eventually("its slice on a device", || async {
            text("nodes").await.contains(&format!("job {id} 0.5"))
        })
        .await;
        // The slice is drawn half as wide as its device, under the page's security policy.
        let widths = js(format!(
            "const s = [...document.querySelectorAll('a.share')]\
               .find(e => e.textContent === 'job {id} 0.5');\
             return [s.getBoundingClientRect().width, s.parentElement.getBoundingClientRect().width]"
        ))
        .await;
        let (w, whole) = (widths[0].as_f64().unwrap(), widths[1].as_f64().unwrap());
        assert!((w / whole - 0.5).abs() < 0.05, "{widths}");
        // A project without a guarantee or a limit has no quota to be over.
        eventually("the default project without a quota", || async {
            text("projects").await.contains("no quota")
        })
        .await;
        eventually("the service in its pane", || async {
            text("services").await.contains("web")
        })
        .await;
        eventually("the placement in the audit log", || async {
            let audit = text("audit").await;
            audit.contains("place") && audit.contains(&format!("{id}"))
        })
        .await;
        shot(b.clone(), "dashboard.png").await;

        // Its page: the events, the logs, the use as it ends.
        b.find(Locator::Css(&row))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        eventually("its live logs", || async {
            text("log").await.contains("hello from the dashboard")
        })
        .await;
        eventually("the job to succeed", || async {
            text("job-state").await == "succeeded"
        })
        .await;
        eventually("its events", || async {
            let events = text("job-events").await;
            ["Submitted", "Scheduled", "Running", "Succeeded"]
                .iter()
                .all(|k| events.contains(k))
        })
        .await;
        eventually("its usage", || async {
            let usage = text("job-usage").await;
            let gpu_hours: f64 = usage
                .lines()
                .last()
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
            gpu_hours > 0.0
        })
        .await;
        assert!(text("job-summary").await.contains("0.5 GPU"));
        shot(b.clone(), "dashboard-job.png").await;

        // The jobs table filtered by state, project and owner.
        click("job-back").await;
        let rows = |b: fantoccini::Client| async move {
            let v = b
                .execute(
                    "return [...document.querySelectorAll('#jobs tbody tr')]\
                     .map(r => [Number(r.dataset.job), r.dataset.state, r.cells[2].textContent, \
                     r.cells[3].textContent])",
                    vec![],
                )
                .await
                .unwrap();
            serde_json::from_value::<Vec<(u64, String, String, String)>>(v).unwrap()
        };
        eventually("every job in the table", || {
            let f = rows(b.clone());
            async move {
                let r = f.await;
                [id, ana_job, chatty].iter().all(|j| r.iter().any(|x| x.0 == *j))
            }
        })
        .await;
        choose("filter-state", "succeeded".into()).await;
        eventually("only succeeded jobs", || {
            let f = rows(b.clone());
            async move {
                let r = f.await;
                r.iter().all(|x| x.1 == "succeeded")
                    && r.iter().any(|x| x.0 == id)
                    && r.iter().any(|x| x.0 == ana_job)
            }
        })
        .await;
        choose("filter-project", "vision".into()).await;
        eventually("only vision's succeeded jobs", || {
            let f = rows(b.clone());
            async move {
                let r = f.await;
                r.iter().all(|x| x.1 == "succeeded" && x.2 == "vision") && r.len() == 1
            }
        })
        .await;
        choose("filter-state", "".into()).await;
        choose("filter-project", "".into()).await;
        choose("filter-owner", "admin".into()).await;
        eventually("only admin's jobs", || {
            let f = rows(b.clone());
            async move {
                let r = f.await;
                r.iter().all(|x| x.3 == "admin")
                    && r.iter().any(|x| x.0 == chatty)
                    && !r.iter().any(|x| x.0 == ana_job)
            }
        })
        .await;

        // A deep link to the chatty job: its logs open at the latest line of its latest
        // attempt, scrolled to it, without reading the whole output.
        b.goto(&format!("{url}#/jobs/{chatty}")).await.unwrap();
        let log_text = || {
            async move {
                js("return document.getElementById('log').textContent".into())
                    .await
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            }
        };
        eventually("the last line of replica 0, attempt 2", || async {
            log_text()
                .await
                .ends_with("replica 0 attempt 2 line 05999\n")
        })
        .await;
        let log = log_text().await;
        assert!(!log.contains("line 00000"), "read from the start");
        assert!(text("log-note").await.contains("earlier output not shown"));
        let below = js("const p = document.getElementById('log'); \
                        return p.scrollHeight - p.scrollTop - p.clientHeight"
            .into())
        .await;
        assert!(below.as_f64().unwrap() < 8.0, "not at the latest line: {below}");
        assert_eq!(
            js("return document.getElementById('pwned')".into()).await,
            Value::Null,
            "markup in a command became an element"
        );
        assert!(text("job-summary").await.contains("<img id=pwned src=x>"));
        js("document.getElementById('log-controls').scrollIntoView()".into()).await;
        shot(b.clone(), "dashboard-logs.png").await;
        // The pickers: the other replica, then the first attempt, then all of it.
        choose("log-replica", "1".into()).await;
        eventually("replica 1's output", || async {
            log_text()
                .await
                .ends_with("replica 1 attempt 2 line 05999\n")
        })
        .await;
        choose("log-attempt", "1".into()).await;
        eventually("replica 1's first attempt", || async {
            log_text()
                .await
                .ends_with("replica 1 attempt 1 line 05999\n")
        })
        .await;
        click("log-all").await;
        eventually("the whole first attempt", || async {
            let log = log_text().await;
            log.starts_with("replica 1 attempt 1 line 00000\n")
                && log.ends_with("replica 1 attempt 1 line 05999\n")
        })
        .await;
        eventually("the restart among its events", || async {
            text("job-events").await.contains("Restarting")
        })
        .await;
        // Cancel from its page.
        click("job-cancel").await;
        eventually("chatty cancelled", || async {
            text("job-state").await == "cancelled"
        })
        .await;
        b.close().await.unwrap();
        id
    });
    let job = pool.wait_state(job_id, "succeeded");
    assert_eq!(job["name"], "from-ui");
    assert_eq!(job["gpu"], 0.5);
    assert_eq!(pool.job(chatty)["state"], "cancelled");
    // The page comes from the controller itself, under a policy that allows only its own files.
    let page = pool.http.get(format!("{}/ui/", pool.url)).send().unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"),
        "{policy}"
    );
    // The job's usage, picked out by the API the page reads.
    let (s, report) = pool.get(
        &format!("/v1/usage?by=job&job={job_id}&since=1h"),
        &pool.admin,
    );
    assert_eq!(s, 200, "{report}");
    let keys: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, [job_id.to_string()]);
    // Another tenant's job reads as no usage at all to a member.
    let (s, report) = pool.get(&format!("/v1/usage?by=job&job={job_id}&since=1h"), &ana);
    assert_eq!(s, 200, "{report}");
    assert!(report["rows"].as_array().unwrap().is_empty(), "{report}");
}

/// The agent's run directory of job `id`'s replica 0 (its first attempt's key, `ID.1.0`).
fn run_dir(pool: &Pool, node: &str, id: u64) -> PathBuf {
    let runs = pool.path(node).join("agent").join("runs");
    std::fs::read_dir(&runs)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{id}.")))
        })
        .unwrap_or_else(|| panic!("no run dir of job {id} in {}", runs.display()))
}

#[test]
fn a_members_workload_cannot_reach_the_store_the_agent_or_another_tenants_files_and_processes() {
    let mut pool = Pool::start_on_sqlite();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    for name in ["alpha", "beta"] {
        let (s, v) = pool.post("/v1/projects", json!({"name": name}), &pool.admin);
        assert_eq!(s, 201, "{v}");
    }
    // One tenant's job holds a secret in its output and its files, and keeps running.
    let victim = pool.submit(
        "alpha",
        0.5,
        1,
        50,
        "echo password=hunter2; echo secret > secret.txt; echo tmpsecret > /tmp/s; exec sleep 60",
    );
    pool.wait_state(victim, "running");
    pool.wait_for("the victim's output", || {
        logs(&pool, victim).contains("hunter2")
    });
    let victim_dir = run_dir(&pool, "n1", victim);
    // The shim writes the pid file after the workload starts (which may print first).
    pool.wait_for("the victim's pid file", || victim_dir.join("pid").exists());
    let victim_pid: i32 = std::fs::read_to_string(victim_dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let credential = pool.path("n1").join("agent").join("credential.json");
    let store = pool.path("controller").join("tessera.db");
    assert!(credential.exists() && store.exists());
    // The other tenant's job tries everything a member's code could, and reports each try.
    let attack = format!(
        r#"try() {{ if sh -c "$2" >/dev/null 2>&1; then echo "$1=done"; else echo "$1=refused"; fi; }}
echo uid=$(id -u)
echo nnp=$(grep NoNewPrivs /proc/self/status | tr -dc 0-9)
echo capeff=$(grep CapEff /proc/self/status | cut -f2)
echo pid1=$(cat /proc/1/comm)
try read_credential 'cat {cred}'
try read_store 'head -c 16 {store}'
try write_store 'echo x >> {store}'
try read_victim_log 'grep hunter2 {vdir}/output.log'
try read_victim_work 'cat {vwork}/secret.txt'
try list_victim_run 'ls -a {runs} | grep -qx {vkey}'
try see_victim_process 'test -e /proc/{vpid}'
try signal_victim 'kill -9 {vpid}'
try see_victim_sleep 'grep -l sleep /proc/[0-9]*/comm'
try victim_tmp 'cat /tmp/s'
try write_own_work 'echo mine > own.txt && cat own.txt'
try write_own_tmp 'echo mine > /tmp/own && cat /tmp/own'
try chown_to_root 'touch f && chown 0 f'
try mount_proc 'mkdir -p m && mount -t tmpfs none m'
"#,
        cred = credential.display(),
        store = store.display(),
        vdir = victim_dir.display(),
        runs = pool.path("n1").join("agent").join("runs").display(),
        vkey = victim_dir.file_name().unwrap().to_str().unwrap(),
        vwork = victim_dir.join("work").display(),
        vpid = victim_pid,
    );
    let attacker = pool.submit("beta", 0.5, 1, 50, &attack);
    pool.wait_state(attacker, "succeeded");
    let out = logs(&pool, attacker);
    let said = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {out}"))
            .to_string()
    };
    assert_ne!(said("uid"), "0", "{out}");
    assert_eq!(said("nnp"), "1", "{out}");
    assert_eq!(said("capeff"), "0000000000000000", "{out}");
    assert_eq!(said("pid1"), "tessera", "its pid 1 is its own init: {out}");
    for refused in [
        "read_credential",
        "read_store",
        "write_store",
        "read_victim_log",
        "read_victim_work",
        "list_victim_run",
        "see_victim_process",
        "signal_victim",
        "see_victim_sleep",
        "victim_tmp",
        "chown_to_root",
        "mount_proc",
    ] {
        assert_eq!(said(refused), "refused", "{refused}: {out}");
    }
    for done in ["write_own_work", "write_own_tmp"] {
        assert_eq!(said(done), "done", "{done}: {out}");
    }
    // The victim ran on, untouched, as another uid than the attacker.
    assert_eq!(pool.job(victim)["state"], "running");
    let victim_uid = std::fs::metadata(victim_dir.join("work")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_ne!(victim_uid.uid().to_string(), said("uid"));
    assert_ne!(victim_uid.uid(), 0);
}

fn register_as(pool: &Pool, name: &str, token: &str) -> (u16, Value) {
    pool.post(
        "/v1/agent/register",
        json!({"name": name, "cpu_milli": 8000, "memory_bytes": 17179869184u64,
               "devices": [{"model": "H100-80GB", "memory_bytes": 85899345920u64}],
               "simulated": true, "address": "http://127.0.0.9:9", "callback_secret": "x"}),
        token,
    )
}

#[test]
fn join_tokens_join_once_cannot_take_over_a_live_node_and_agents_speak_only_for_their_node() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let id = pool.submit("default", 1.0, 1, 50, "exec sleep 60");
    pool.wait_state(id, "running");
    let key = run_dir(&pool, "n1", id)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();

    // A join token joins one node; a second join with it is refused.
    let once = pool.join_token();
    let (s, v) = register_as(&pool, "evil", &once);
    assert_eq!(s, 200, "{v}");
    let evil = v["token"].as_str().unwrap().to_string();
    let (s, v) = register_as(&pool, "evil2", &once);
    assert_eq!(s, 401, "a used join token: {v}");

    // A join under the name of a node with a live credential is refused; n1 keeps its work.
    let (s, v) = register_as(&pool, "n1", &pool.join_token());
    assert_eq!(s, 409, "{v}");
    assert!(v.to_string().contains("tessera nodes replace n1"), "{v}");

    // An agent reports n1's replica as exited 0: ignored and audited, the job runs on.
    let (s, v) = pool.post(
        "/v1/agent/sync",
        json!({"seq": 1, "revision": 0, "wait_ms": 0,
               "statuses": [{"key": key, "phase": "exited", "exit_code": 0, "message": "done"}]}),
        &evil,
    );
    assert_eq!(s, 200, "{v}");
    assert!(v["desired"].as_array().unwrap().is_empty(), "{v}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pool.job(id)["state"], "running");
    let forged = audit(&pool, "action=forged-report");
    assert_eq!(forged.len(), 1, "{forged:?}");
    assert!(forged[0]["detail"].as_str().unwrap().contains(&key));
    assert!(run_dir(&pool, "n1", id).join("pid").exists());
    assert!(
        !run_dir(&pool, "n1", id).join("exit").exists(),
        "n1's replica still runs"
    );

    // Join tokens expire, and their limits are checked.
    let (s, v) = pool.post(
        "/v1/tokens",
        json!({"kind": "join", "expires_in": "1s"}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    std::thread::sleep(Duration::from_millis(1500));
    let (s, v) = register_as(&pool, "late", v["token"].as_str().unwrap());
    assert_eq!(s, 401, "an expired join token: {v}");
    for (body, field) in [
        (json!({"kind": "join", "uses": 0}), "uses"),
        (json!({"kind": "join", "expires_in": "0s"}), "expires_in"),
        (json!({"kind": "user", "uses": 3}), "uses"),
    ] {
        let (s, v) = pool.post("/v1/tokens", body.clone(), &pool.admin);
        assert_eq!(s, 400, "{body}: {v}");
        assert!(v.to_string().contains(field), "{body}: {v}");
    }
    let (s, v) = pool.post(
        "/v1/tokens",
        json!({"kind": "join", "uses": 2, "expires_in": "2h"}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["uses_left"], 2, "{v}");

    // The admin replaces n1: its credential is revoked, and a new machine may take the name.
    let (ok, _, err) = cli(&pool, &["nodes", "replace", "n1"]);
    assert!(ok, "{err}");
    let (s, v) = register_as(&pool, "n1", &pool.join_token());
    assert_eq!(s, 200, "after a replace: {v}");
    assert!(!audit(&pool, "action=node-replace").is_empty());
}

/// What the controller holds of every resource a write can change, for comparing memory with
/// the store after a restart.
fn resources(pool: &Pool) -> Value {
    let names = |path: &str, key: &str, extra: &str| -> Vec<(String, String)> {
        let (status, v) = pool.get(path, &pool.admin);
        assert_eq!(status, 200, "{path}: {v}");
        let mut out: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[key].to_string(), r[extra].to_string()))
            .collect();
        out.sort();
        out
    };
    json!({
        "jobs": names("/v1/jobs?limit=100000", "id", "state"),
        "services": names("/v1/services", "name", "replicas"),
        "projects": names("/v1/projects", "name", "members"),
        "users": names("/v1/users", "name", "role"),
        "tokens": names("/v1/tokens", "id", "revoked"),
        "nodes": names("/v1/nodes", "name", "cordoned"),
    })
}

#[test]
fn concurrent_conflicting_writes_on_every_resource_never_wedge_the_controller() {
    let mut pool = Pool::start();
    let join = pool.join_token();
    assert_eq!(register_as(&pool, "n1", &join).0, 200);
    // Jobs and services ask for more CPU than any node has, so that they stay where the
    // requests leave them (nothing runs, nothing ends on its own); the jobs wait for capacity.
    let job = json!({"metadata": {"name": "t", "project": "default"},
                     "spec": {"resources": {"cpu": 64}, "command": ["true"], "waitForCapacity": true}});
    let svc = |name: &str| {
        json!({"kind": "Service", "metadata": {"name": name},
               "spec": {"resources": {"cpu": 64}, "command": ["true"],
                        "service": {}, "waitForCapacity": true}})
    };
    let mut statuses: Vec<(String, u16, Value)> = vec![];
    for round in 0..12 {
        let name = format!("s{round}");
        assert_eq!(pool.post("/v1/services", svc(&name), &pool.admin).0, 201);
        let (s, v) = pool.post("/v1/jobs", job.clone(), &pool.admin);
        assert_eq!(s, 201, "{v}");
        let id = v["id"].as_u64().unwrap();
        let (s, v) = pool.post("/v1/tokens", json!({"kind": "user"}), &pool.admin);
        assert_eq!(s, 201, "{v}");
        let token = v["id"].as_str().unwrap().to_string();
        let project = format!("p{round}");
        let user = format!("u{round}");
        use reqwest::Method as M;
        let calls: Vec<(M, String, Option<Value>)> = vec![
            (M::DELETE, format!("/v1/services/{name}"), None),
            (
                M::POST,
                format!("/v1/services/{name}/scale"),
                Some(json!({"replicas": 3})),
            ),
            (
                M::POST,
                format!("/v1/services/{name}/move"),
                Some(json!({})),
            ),
            (
                M::POST,
                format!("/v1/services/{name}/scale"),
                Some(json!({"replicas": 2})),
            ),
            (M::DELETE, format!("/v1/services/{name}"), None),
            (M::POST, "/v1/services".into(), Some(svc(&name))),
            (M::POST, format!("/v1/jobs/{id}/cancel"), None),
            (M::POST, format!("/v1/jobs/{id}/migrate"), Some(json!({}))),
            (M::POST, format!("/v1/jobs/{id}/cancel"), None),
            (
                M::POST,
                "/v1/projects".into(),
                Some(json!({"name": project})),
            ),
            (
                M::PATCH,
                format!("/v1/projects/{project}"),
                Some(json!({"guaranteed_gpu": 1})),
            ),
            (
                M::POST,
                format!("/v1/projects/{project}/members"),
                Some(json!({"members": []})),
            ),
            (
                M::POST,
                "/v1/projects".into(),
                Some(json!({"name": project})),
            ),
            (
                M::POST,
                "/v1/users".into(),
                Some(json!({"name": user, "role": "member"})),
            ),
            (
                M::POST,
                "/v1/users".into(),
                Some(json!({"name": user, "role": "viewer"})),
            ),
            (M::DELETE, format!("/v1/tokens/{token}"), None),
            (M::DELETE, format!("/v1/tokens/{token}"), None),
            (M::POST, "/v1/nodes/n1/cordon".into(), None),
            (M::POST, "/v1/nodes/n1/drain".into(), None),
            (M::POST, "/v1/nodes/n1/uncordon".into(), None),
            (M::POST, "/v1/nodes/n1/replace".into(), None),
        ];
        let gate = std::sync::Barrier::new(calls.len());
        let answers: Vec<(String, u16, Value)> = std::thread::scope(|scope| {
            let handles: Vec<_> = calls
                .iter()
                .map(|(method, path, body)| {
                    let (pool, gate) = (&pool, &gate);
                    scope.spawn(move || {
                        gate.wait();
                        let (s, v) = pool.req(method.clone(), path, body.clone(), &pool.admin);
                        (format!("{method} {path}"), s, v)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Of two creations of one user, exactly one wins; the other is told it exists.
        let user_wins = answers
            .iter()
            .filter(|(call, s, _)| call == "POST /v1/users" && *s == 201)
            .count();
        assert_eq!(user_wins, 1, "{answers:?}");
        statuses.extend(answers);
    }
    let failed: Vec<_> = statuses.iter().filter(|(_, s, _)| *s >= 500).collect();
    assert!(failed.is_empty(), "server errors: {failed:?}");
    assert!(
        statuses.iter().any(|(_, s, _)| *s == 404 || *s == 409),
        "the calls must have conflicted"
    );
    let (status, health) = pool.get("/healthz", "");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["store"]["faults"], 0, "{health}");
    // The writer goes on, and what memory says is what the store holds.
    assert_eq!(pool.post("/v1/jobs", job, &pool.admin).0, 201);
    // Once the services' reconciler has made the replicas the last scaling asked for.
    let mut before = resources(&pool);
    pool.wait_for("the pool to settle", || {
        std::thread::sleep(Duration::from_millis(500));
        let now = resources(&pool);
        std::mem::replace(&mut before, now) == before
    });
    pool.restart_controller();
    assert_eq!(resources(&pool), before);
}

/// A small tmpfs, unmounted when dropped (after the pool that uses it).
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(mib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={mib}m,mode=0755").as_str()),
        )
        .expect("mounting a tmpfs (the tests run as root, as the agent does)");
        SmallDisk(dir)
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.0.path()).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn submit_as_admin(pool: &Pool, command: &str) -> (u16, Value) {
    pool.post(
        "/v1/jobs",
        json!({"metadata": {"name": "t", "project": "default"},
               "spec": {"resources": {"cpu": 0.5, "memory": "128MiB"},
                        "command": ["sh", "-c", command]}}),
        &pool.admin,
    )
}

#[test]
fn a_log_flood_is_capped_a_filling_disk_refuses_new_work_with_507_and_the_pool_recovers() {
    const MIB: u64 = 1 << 20;
    let disk = SmallDisk::mount(64);
    let mut pool = Pool::start_in(
        false,
        Some(disk.0.path().to_path_buf()),
        &["--log-limit", "1MiB", "--disk-reserve", "24MiB"],
    );
    pool.add_agent_with("n1", "127.0.0.2", "1xH100-80GB", &["--keep-runs", "1s"]);
    let mut acknowledged = vec![];

    // 200 MiB to stdout on a 64 MiB disk: only the newest 1 MiB (the pool's cap) is kept.
    let (s, v) = submit_as_admin(
        &pool,
        "yes tessera-flood | head -c 200000000; echo; echo flood-done; exec sleep 600",
    );
    assert_eq!(s, 201, "{v}");
    let flood = v["id"].as_u64().unwrap();
    acknowledged.push(flood);
    pool.wait_state(flood, "running");
    let runs = run_dir(&pool, "n1", flood);
    let kept = || -> u64 {
        ["output.log", "output.log.1"]
            .iter()
            .filter_map(|n| std::fs::metadata(runs.join(n)).ok())
            .map(|m| m.len())
            .sum()
    };
    pool.wait_for("the flood to be written", || {
        let (_, v) = pool.get(&format!("/v1/jobs/{flood}/logs?offset=0"), &pool.admin);
        let cut = v["cut"].as_u64().unwrap_or(0);
        let end = cut + kept();
        let (_, last) = pool.get(
            &format!("/v1/jobs/{flood}/logs?offset={}", end.saturating_sub(64)),
            &pool.admin,
        );
        cut >= 200_000_000
            && last["data"]
                .as_str()
                .is_some_and(|d| d.ends_with("flood-done\n"))
    });
    assert!(kept() <= MIB, "kept {} bytes of output", kept());
    let (s, chunk) = pool.get(&format!("/v1/jobs/{flood}/logs?offset=0"), &pool.admin);
    assert_eq!(s, 200, "{chunk}");
    assert!(
        chunk["cut"].as_u64().unwrap() >= 200_000_000 - MIB,
        "{}",
        chunk["cut"]
    );
    assert_eq!(
        chunk["offset"], chunk["cut"],
        "the data starts where the cut ends"
    );
    assert!(chunk["data"].as_str().unwrap().contains("tessera-flood\n"));
    let (ok, out, err) = cli(&pool, &["logs", &flood.to_string()]);
    assert!(ok, "{err}");
    assert!(err.contains("bytes of earlier output were cut"), "{err}");
    assert!(out.len() as u64 <= MIB && out.contains("tessera-flood"));
    // The last lines only, read back from the end across the rotated files.
    let (ok, out, err) = cli(&pool, &["logs", "--tail", "3", &flood.to_string()]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert_eq!(lines, ["tessera-flood", "tess", "flood-done"], "{out:?}");
    // An offset past the end reads nothing from the end (it was a 502).
    let (s, v) = pool.get(
        &format!("/v1/jobs/{flood}/logs?offset={}", u64::MAX),
        &pool.admin,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"], "");
    assert_eq!(v["next_offset"], v["offset"]);
    assert!(v["offset"].as_u64().unwrap() >= 200_000_000);
    // A reader that goes away (`tessera logs 1 | head -1`) ends the CLI quietly, not in a panic.
    let mut child = Command::new(bin())
        .args([
            "logs",
            "--url",
            &pool.url,
            "--token",
            &pool.admin,
            &flood.to_string(),
        ])
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.signal() == Some(nix::sys::signal::Signal::SIGPIPE as i32)
            || out.status.success(),
        "{:?} {err}",
        out.status
    );

    // A job fills the disk below the reserve with its own files: new work is refused with 507,
    // while running work goes on and reads answer.
    let (s, v) = submit_as_admin(&pool, "head -c 46000000 /dev/zero > big; exec sleep 600");
    assert_eq!(s, 201, "{v}");
    let filler = v["id"].as_u64().unwrap();
    acknowledged.push(filler);
    pool.wait_for("the disk to fill below the reserve", || {
        disk.free() < 24 * MIB
    });
    let (s, v) = submit_as_admin(&pool, "true");
    assert_eq!(s, 507, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("reserve of 24 MiB"), "{message}");
    let (s, v) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "web"},
               "spec": {"resources": {"cpu": 0.2}, "command": ["true"], "service": {}}}),
        &pool.admin,
    );
    assert_eq!(s, 507, "{v}");
    std::thread::sleep(Duration::from_secs(3)); // longer than the lease: syncs must go on
    for id in [flood, filler] {
        assert_eq!(pool.job(id)["state"], "running", "{}", pool.job(id));
    }
    assert_eq!(pool.get("/v1/nodes/n1", &pool.admin).1["health"], "ready");

    // Space returns when the filler ends and its run dir is removed: new work runs again.
    let (s, v) = pool.post(&format!("/v1/jobs/{filler}/cancel"), json!({}), &pool.admin);
    assert_eq!(s, 200, "{v}");
    pool.wait_for("space to return", || disk.free() >= 24 * MIB);
    let (s, v) = submit_as_admin(&pool, "echo back");
    assert_eq!(s, 201, "{v}");
    let back = v["id"].as_u64().unwrap();
    acknowledged.push(back);
    pool.wait_state(back, "succeeded");
    assert_eq!(logs(&pool, back), "back\n");
    // The filler's output is gone with its run dir, and `logs` says so.
    let (s, v) = pool.get(&format!("/v1/jobs/{filler}/logs"), &pool.admin);
    assert_eq!(s, 410, "{v}");

    // Nothing acknowledged was lost, across a restart too.
    pool.restart_controller();
    for id in acknowledged {
        assert_eq!(pool.get(&format!("/v1/jobs/{id}"), &pool.admin).0, 200);
    }
}

/// Waits until the server closes `conn` (a read returns 0 or fails), writing `trickle` every
/// second meanwhile when given; returns how long that took.
fn time_to_close(mut conn: std::net::TcpStream, trickle: Option<&[u8]>) -> Duration {
    use std::io::Read;
    let start = Instant::now();
    conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        assert!(start.elapsed() < Duration::from_secs(40), "never closed");
        if let Some(t) = trickle
            && std::io::Write::write_all(&mut conn, t).is_err()
        {
            return start.elapsed();
        }
        match conn.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return start.elapsed(),
        }
    }
}

/// Sends `head` and reads the status line of the answer.
fn status_after(mut conn: std::net::TcpStream, head: &[u8]) -> (u16, String, Duration) {
    use std::io::{Read, Write};
    let start = Instant::now();
    conn.write_all(head).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        if text.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text, start.elapsed())
}

#[test]
fn idle_slow_and_crowding_clients_are_cut_off_and_the_gateway_holds_a_bounded_body_budget() {
    use std::net::TcpStream;
    let pool = Pool::start_in(
        false,
        None,
        &[
            "--max-connections-per-address",
            "24",
            "--gateway-body-budget",
            "1MiB",
        ],
    );
    // A service that never becomes ready: its route exists and requests to it wait for it.
    let (s, v) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "up"},
               "spec": {"resources": {"cpu": 64}, "command": ["true"], "service": {},
                        "waitForCapacity": true}}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    let api = pool.listen.clone();
    let gateway = pool.gateway.clone();
    // The gateway knows the route once a request to it waits for a replica instead of a 404.
    let probe = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    pool.wait_for("the gateway's route", || {
        probe.get(format!("http://{gateway}/up/")).send().is_err()
    });
    let admin = pool.admin.clone();
    std::thread::scope(|scope| {
        // A connection that sends nothing is closed after the header timeout (10 s).
        let idle = scope.spawn(|| time_to_close(TcpStream::connect(&api).unwrap(), None));
        // Headers trickled a line a second are cut off at the same deadline.
        let trickled = scope.spawn(|| {
            let mut c = TcpStream::connect(&api).unwrap();
            std::io::Write::write_all(&mut c, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
            time_to_close(c, Some(b"X-Slow: yes\r\n"))
        });
        // A body that stops coming is answered with an error after 10 s of silence.
        let stalled = scope.spawn(|| {
            let head = format!(
                "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            );
            status_after(TcpStream::connect(&api).unwrap(), head.as_bytes())
        });
        // An upload stalled half-way holds 900 KiB of the gateway's 1 MiB budget...
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let gw = gateway.clone();
        let holder = scope.spawn(move || {
            use std::io::Write;
            let mut c = TcpStream::connect(&gw).unwrap();
            c.write_all(b"POST /up/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
                .unwrap();
            c.write_all(&vec![b'a'; 900 << 10]).unwrap();
            let _ = rx.recv();
            drop(c);
        });
        std::thread::sleep(Duration::from_secs(1));
        // ...so another upload is refused at once with 503 and Retry-After.
        let started = Instant::now();
        let resp = reqwest::blocking::Client::new()
            .post(format!("http://{gateway}/up/"))
            .body(vec![b'b'; 300 << 10])
            .send()
            .unwrap();
        let (status, retry) = (
            resp.status().as_u16(),
            resp.headers().get("retry-after").cloned(),
        );
        let text = resp.text().unwrap();
        assert_eq!(status, 503, "{text}");
        assert!(
            text.contains("most request bytes in flight (1 MiB)"),
            "{text}"
        );
        assert_eq!(retry.unwrap(), "1");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Once the stalled upload is gone its budget is back: the next one is taken (and waits
        // for a ready replica, which this service never has).
        tx.send(()).unwrap();
        holder.join().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let resp = reqwest::blocking::Client::new()
            .post(format!("http://{gateway}/up/"))
            .body(vec![b'c'; 300 << 10])
            .send()
            .unwrap();
        let text = resp.text().unwrap();
        assert!(text.contains("no ready replica"), "{text}");

        for (what, took) in [
            ("idle", idle.join().unwrap()),
            ("trickled", trickled.join().unwrap()),
        ] {
            assert!(
                took >= Duration::from_secs(8) && took < Duration::from_secs(20),
                "{what} connection closed after {took:?}"
            );
        }
        let (status, text, took) = stalled.join().unwrap();
        assert!(matches!(status, 400 | 408), "{text}");
        assert!(took < Duration::from_secs(20), "{took:?}");
    });

    // One address cannot take every connection: with 24 held from 127.0.0.1, a 25th from it is
    // closed at once, while another address is served; closing them gives the places back.
    let fresh = |from: &str| {
        reqwest::blocking::Client::builder()
            .local_address(from.parse::<std::net::IpAddr>().unwrap())
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
            .get(format!("{}/healthz", pool.url))
            .send()
    };
    let held: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(&api).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(fresh("127.0.0.1").is_err(), "a connection over the limit");
    assert_eq!(fresh("127.0.0.3").unwrap().status(), 200);
    drop(held);
    pool.wait_for("the places to come back", || {
        fresh("127.0.0.1").is_ok_and(|r| r.status() == 200)
    });
}

#[test]
fn impossible_values_from_users_and_agents_are_refused_by_field_and_change_nothing() {
    let pool = Pool::start();
    let field = |v: &Value| v["error"]["field"].as_str().unwrap_or("").to_string();
    let refused = |(s, v): (u16, Value), want: &str| {
        assert!((400..500).contains(&s), "{want}: {s} {v}");
        assert_eq!(field(&v), want, "{v}");
    };
    // Users: a quota that would saturate, NUL bytes, too little memory, endless model lists.
    refused(
        pool.post(
            "/v1/projects",
            json!({"name": "q", "guaranteed_gpu": 1e30}),
            &pool.admin,
        ),
        "guaranteed_gpu",
    );
    refused(
        pool.post(
            "/v1/projects",
            json!({"name": "q", "limit_gpu": 2e6}),
            &pool.admin,
        ),
        "limit_gpu",
    );
    let job = |resources: Value, command: Value, env: Value| {
        pool.post(
            "/v1/jobs",
            json!({"metadata": {"name": "t"},
                   "spec": {"resources": resources, "command": command, "env": env}}),
            &pool.admin,
        )
    };
    let cpu = json!({"cpu": 1});
    refused(
        job(cpu.clone(), json!(["echo", "a\u{0}b"]), json!({})),
        "spec.command[1]",
    );
    refused(
        job(cpu.clone(), json!(["true"]), json!({"A": "x\u{0}"})),
        "spec.env.A",
    );
    for memory in [json!(0), json!(1), json!("1MiB")] {
        refused(
            job(
                json!({"cpu": 1, "memory": memory}),
                json!(["true"]),
                json!({}),
            ),
            "spec.resources.memory",
        );
    }
    let models: Vec<String> = (0..10_000).map(|i| format!("M{i}")).collect();
    refused(
        job(
            json!({"gpu": 1, "deviceModels": models}),
            json!(["true"]),
            json!({}),
        ),
        "spec.resources.device_models",
    );

    // Agents: a node beyond any machine, an address that is not the agent's, endless labels.
    let node = |patch: Value| {
        let mut body = json!({"name": "n9", "cpu_milli": 8000, "memory_bytes": 17179869184u64,
               "devices": [{"model": "H100-80GB", "memory_bytes": 85899345920u64}],
               "simulated": true, "address": "http://127.0.0.9:9", "callback_secret": "x"});
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        pool.post("/v1/agent/register", body, &pool.join_token())
    };
    refused(node(json!({"cpu_milli": u64::MAX})), "node.cpu");
    refused(node(json!({"memory_bytes": u64::MAX})), "node.memory");
    refused(
        node(json!({"devices": [{"model": "H100-80GB", "memory_bytes": u64::MAX}]})),
        "node.devices",
    );
    for address in [
        "file:///etc/passwd",
        "http://",
        "ftp://x:1",
        "http://u:p@h:1",
    ] {
        refused(node(json!({"address": address})), "address");
    }
    let labels: serde_json::Map<String, Value> =
        (0..100).map(|i| (format!("k{i}"), json!("v"))).collect();
    refused(node(json!({"labels": labels})), "node.labels");
    refused(
        node(json!({"labels": {"k".repeat(64): "v"}})),
        "node.labels",
    );

    // An agent's sync: a sequence number that would lock its node out, impossible readings.
    let (s, v) = node(json!({}));
    assert_eq!(s, 200, "{v}");
    let agent = v["token"].as_str().unwrap().to_string();
    let sync = |patch: Value| {
        let mut body = json!({"seq": 1, "revision": 0, "wait_ms": 0, "statuses": []});
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        pool.post("/v1/agent/sync", body, &agent)
    };
    refused(sync(json!({"seq": u64::MAX})), "seq");
    let device = |index: u32, util: f64| {
        json!({"index": index, "util_pct": util, "memory_used_bytes": 0,
               "memory_total_bytes": 85899345920u64, "power_mw": 0})
    };
    let sample = |devices: Vec<Value>| json!({"sample": {"at_ms": 1, "simulated": true, "devices": devices}});
    refused(sync(sample(vec![device(0, -5.0)])), "sample.devices");
    refused(
        sync(sample(vec![device(0, 5.0), device(0, 5.0)])),
        "sample.devices.index",
    );
    refused(sync(sample(vec![device(3, 5.0)])), "sample.devices.index");
    // The node still syncs afterwards: nothing was recorded of the refused ones.
    let (s, v) = sync(json!({"seq": 2}));
    assert_eq!(s, 200, "{v}");

    // Nothing of the refused requests exists.
    assert_eq!(pool.get("/v1/jobs", &pool.admin).1, json!([]));
    let projects = pool.get("/v1/projects", &pool.admin).1;
    assert!(!projects.to_string().contains("\"q\""), "{projects}");
    let nodes = pool.get("/v1/nodes", &pool.admin).1;
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
}

/// The cgroup directories (one per controller) of job `id`'s running replica on `node`, as its
/// shim was given them.
fn cgroups_of(pool: &Pool, node: &str, id: u64) -> Vec<PathBuf> {
    let run = run_dir(pool, node, id);
    let pid = std::fs::read_to_string(run.join("shim.pid")).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.windows(2)
        .filter(|w| w[0] == "--cgroup-procs")
        .map(|w| Path::new(&w[1]).parent().unwrap().to_path_buf())
        .collect()
}

#[test]
fn cgroups_of_fork_heavy_jobs_and_of_a_dead_shims_replicas_do_not_leak() {
    assert!(
        memory_cgroups_usable(),
        "this test needs cgroups (v1 or v2) as root; the README's test command does so"
    );
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    // A job that forks all the time, so that processes appear while it is being killed.
    let forker = pool.submit(
        "default",
        0.0,
        1,
        50,
        "while :; do sh -c 'sleep 600 &'; done",
    );
    pool.wait_state(forker, "running");
    let dirs = cgroups_of(&pool, "n1", forker);
    assert!(dirs.len() >= 2, "{dirs:?}");
    std::thread::sleep(Duration::from_secs(1));
    let (s, v) = pool.post(&format!("/v1/jobs/{forker}/cancel"), json!({}), &pool.admin);
    assert_eq!(s, 200, "{v}");
    pool.wait_state(forker, "cancelled");
    pool.wait_for("the forker's cgroups to be removed", || {
        dirs.iter().all(|d| !d.exists())
    });

    // With its agent gone, a shim killed outright (as an OOM killer might): its workload does
    // not run on without the lease's enforcement, and its cgroups go when the agent is back.
    let sleeper = pool.submit("default", 0.0, 1, 50, "exec sleep 600");
    pool.wait_state(sleeper, "running");
    let dirs = cgroups_of(&pool, "n1", sleeper);
    let run = run_dir(&pool, "n1", sleeper);
    // The shim writes the workload's pid once it has started it, which may be just after the
    // agent reported the replica running.
    pool.wait_for("the workload's pid file", || run.join("pid").exists());
    let shim: i32 = std::fs::read_to_string(run.join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let workload: i32 = std::fs::read_to_string(run.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    assert!(
        alive(workload),
        "the workload runs before its shim is killed"
    );
    pool.kill_agent("n1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    pool.wait_for("the workload to die with its shim", || !alive(workload));
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.wait_for("the dead shim's cgroups to be removed", || {
        dirs.iter().all(|d| !d.exists())
    });
}

#[test]
fn the_store_and_the_agents_files_are_private_and_hold_no_agent_secret() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut pool = Pool::start_on_sqlite();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let id = pool.submit("default", 0.5, 1, 50, "echo private");
    pool.wait_state(id, "succeeded");
    assert_eq!(
        logs(&pool, id),
        "private\n",
        "the controller still reads the agent's logs"
    );

    // Every file and directory the controller and the agent made is closed to other users,
    // except the few that workloads must pass through or share (each named here).
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.file_type().is_symlink() {
                continue;
            }
            out.push((e.path(), meta.permissions().mode() & 0o777));
            // A workload's own work and temp dirs hold what it made, with its own umask.
            let name = e.file_name();
            if meta.is_dir() && name != "work" && name != "tmp" {
                walk(&e.path(), out);
            }
        }
    }
    let mut all = vec![];
    for root in ["controller", "n1"] {
        walk(&pool.path(root), &mut all);
    }
    let shared = |p: &Path| {
        let s = p.to_string_lossy();
        let name = p.file_name().unwrap().to_string_lossy();
        s.ends_with("/n1/gpu")
            || s.ends_with("/gpu/lib")
            || s.ends_with("/gpu/simulated")
            || (s.contains("/gpu/simulated/") && name.starts_with("device"))
            || name.starts_with("schedule-gpu")
    };
    let open: Vec<_> = all
        .iter()
        .filter(|(p, mode)| mode & 0o066 != 0 && !shared(p))
        .collect();
    assert!(open.is_empty(), "readable or writable by others: {open:?}");
    let db = pool.path("controller").join("tessera.db");
    assert_eq!(std::fs::metadata(&db).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(pool.path("controller")).unwrap().mode() & 0o777,
        0o700
    );

    // No callback secret in the store or the agent's credential: the controller derives it.
    let store = std::fs::read(&db).unwrap();
    let wal = std::fs::read(db.with_extension("db-wal")).unwrap_or_default();
    for bytes in [&store, &wal] {
        assert!(
            !bytes.windows(15).any(|w| w == b"callback_secret"),
            "the store mentions a callback secret"
        );
    }
    let credential =
        std::fs::read_to_string(pool.path("n1").join("agent").join("credential.json")).unwrap();
    assert!(!credential.contains("callback"), "{credential}");
    // The agent's log server refuses a caller without the derived secret.
    let node = pool.get("/v1/nodes/n1", &pool.admin).1;
    let address = node["address"].as_str().unwrap().to_string();
    let key = run_dir(&pool, "n1", id)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let resp = pool
        .http
        .get(format!("{address}/v1/logs/{key}"))
        .bearer_auth("guess")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[test]
fn a_restored_store_never_gives_a_job_id_twice_and_a_lost_store_is_not_bootstrapped_over() {
    let mut pool = Pool::start_on_sqlite();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let store = pool.path("controller");
    let files = ["tessera.db", "tessera.db-wal", "tessera.db-shm"];
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in files {
            let _ = std::fs::remove_file(to.join(f));
            if from.join(f).exists() {
                std::fs::copy(from.join(f), to.join(f)).unwrap();
            }
        }
    };
    let a = pool.submit("default", 0.0, 1, 50, "echo a");
    pool.wait_state(a, "succeeded");
    // A backup of the store, then more work that the backup does not know.
    pool.kill_controller();
    let backup = pool.path("backup");
    copy(&store, &backup);
    pool.start_controller_again();
    let b = pool.submit("default", 0.0, 1, 50, "echo b");
    pool.wait_state(b, "succeeded");

    // The store restored from the backup: ids go on above every id given, and jobs run.
    pool.kill_controller();
    copy(&backup, &store);
    pool.start_controller_again();
    let c = pool.submit("default", 0.0, 1, 50, "echo c");
    assert_eq!(c, b + 1, "job id {c}: b was {b}");
    pool.wait_state(c, "succeeded");
    assert_eq!(logs(&pool, c), "c\n");

    // Restored with the id record too: an id is given again, but the node that ran its replica
    // key never runs it twice; the job goes on under a new attempt.
    pool.kill_controller();
    copy(&backup, &store);
    std::fs::remove_file(store.join("job-ids")).unwrap();
    pool.start_controller_again();
    let d = pool.submit("default", 0.0, 1, 50, "echo d");
    assert_eq!(d, b, "the old store's next id");
    let done = pool.wait_state(d, "succeeded");
    assert!(done["attempt"].as_u64().unwrap() >= 2, "{done}");
    assert_eq!(logs(&pool, d), "d\n");
    let requeued = events(&pool, d);
    assert!(
        requeued.iter().any(|e| e["kind"] == "Requeued"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("already ran this replica key")),
        "{requeued:?}"
    );

    // An emptied store beside an earlier pool's state is refused, saying what to do.
    pool.kill_controller();
    std::fs::write(store.join("tessera.db"), b"").unwrap();
    for f in ["tessera.db-wal", "tessera.db-shm"] {
        let _ = std::fs::remove_file(store.join(f));
    }
    let out = Command::new(bin())
        .args(["controller", "--data-dir"])
        .arg(&store)
        .args(["--listen", &pool.listen, "--gateway-listen", "off"])
        .env("TESSERA_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is missing or empty") && err.contains("restore tessera.db"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(store.join("tessera.db")).unwrap().len(),
        0,
        "nothing written"
    );
}

#[test]
fn a_user_the_admin_mapped_to_a_uid_runs_as_it_and_others_as_their_projects_uid() {
    use std::os::unix::fs::MetadataExt;
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let (s, v) = pool.post(
        "/v1/users",
        json!({"name": "bob", "role": "member", "uid": 0}),
        &pool.admin,
    );
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("uid")), "{v}");
    let (s, v) = pool.post(
        "/v1/users",
        json!({"name": "ana", "role": "member", "uid": 4242}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = pool.post(
        "/v1/projects/default/members",
        json!({"members": ["ana"]}),
        &pool.admin,
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = pool.post("/v1/tokens", json!({"user": "ana"}), &pool.admin);
    assert_eq!(s, 201, "{v}");
    let ana = v["token"].as_str().unwrap().to_string();
    let run_as = |token: &str, name: &str| {
        let out = pool.shared(name);
        let (s, v) = pool.post(
            "/v1/jobs",
            json!({"metadata": {"name": "t", "project": "default"},
                   "spec": {"resources": {"cpu": 0.5, "memory": "128MiB"},
                            "command": ["sh", "-c", format!("id -u > {}", out.display())]}}),
            token,
        );
        assert_eq!(s, 201, "{v}");
        pool.wait_state(v["id"].as_u64().unwrap(), "succeeded");
        let uid: u32 = std::fs::read_to_string(&out)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            std::fs::metadata(&out).unwrap().uid(),
            uid,
            "its file is its own"
        );
        uid
    };
    assert_eq!(run_as(&ana, "ana"), 4242);
    let project_uid = run_as(&pool.admin, "admin");
    assert!((200_000..=265_535).contains(&project_uid), "{project_uid}");
}

#[test]
fn a_service_cannot_turn_the_gateway_onto_the_controllers_own_port() {
    let mut pool = Pool::start();
    // A node on the controller's own address, as under `tessera up`.
    pool.add_agent("n1", "127.0.0.1", "1xH100-80GB");
    let api_port: u16 = pool.listen.rsplit(':').next().unwrap().parse().unwrap();
    let (s, v) = pool.post(
        "/v1/services",
        json!({"kind": "Service", "metadata": {"name": "pivot"},
               "spec": {"resources": {"cpu": 0.2, "memory": "64MiB"},
                        "command": ["sleep", "600"], "service": {"port": api_port}}}),
        &pool.admin,
    );
    assert_eq!(s, 201, "{v}");
    pool.wait_for("the replica to be refused its port", || {
        pool.get("/v1/jobs", &pool.admin)
            .1
            .to_string()
            .contains(&format!("port {api_port} is taken"))
    });
    // Through the gateway the service is not ready; the controller's API is never served.
    let resp = reqwest::blocking::Client::new()
        .get(format!("http://{}/pivot/v1/whoami", pool.gateway))
        .bearer_auth(&pool.admin)
        .send()
        .unwrap();
    let (status, text) = (resp.status().as_u16(), resp.text().unwrap());
    assert_eq!(status, 503, "{text}");
    assert!(!text.contains("\"role\""), "{text}");
}

#[test]
fn a_waiting_jobs_reason_names_the_resource_that_binds() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "2xA100-40GB");
    let submit = |resources: Value| {
        let (status, v) = pool.post(
            "/v1/jobs",
            json!({"metadata": {"name": "b"},
                   "spec": {"resources": resources, "command": ["sleep", "60"]}}),
            &pool.admin,
        );
        assert_eq!(status, 201, "{v}");
        v["id"].as_u64().unwrap()
    };
    let reason_of = |id: u64| -> String {
        let mut reason = String::new();
        pool.wait_for("a waiting reason", || {
            let job = pool.job(id);
            reason = job["reason"].as_str().unwrap_or_default().to_owned();
            job["state"] == "pending" && reason.contains("binds")
        });
        reason
    };
    // Six of each node's eight CPUs go to CPU-only work; the GPUs stay free.
    let hogs = [
        submit(json!({"cpu": 6, "memory": "64MiB"})),
        submit(json!({"cpu": 6, "memory": "64MiB"})),
    ];
    for hog in hogs {
        pool.wait_state(hog, "running");
    }
    let gpu_job = submit(json!({"gpu": 1, "cpu": 4, "memory": "64MiB"}));
    let reason = reason_of(gpu_job);
    assert!(
        reason.contains(
            "CPU binds: 2 nodes have everything else but at most 2 CPU free (it needs 4)"
        ),
        "{reason}"
    );
    let (ok, out, err) = cli(&pool, &["describe", "job", &gpu_job.to_string()]);
    assert!(ok && out.contains("CPU binds"), "{out} {err}");
    for id in hogs.into_iter().chain([gpu_job]) {
        let (s, v) = pool.post(&format!("/v1/jobs/{id}/cancel"), json!({}), &pool.admin);
        assert!((200..300).contains(&s), "{v}");
    }
    // Both H100s busy, the A100s free: an H100-only job waits on its model constraint.
    let h100s =
        submit(json!({"gpu": 2, "cpu": 0.5, "memory": "64MiB", "deviceModels": ["H100-80GB"]}));
    pool.wait_state(h100s, "running");
    let pinned =
        submit(json!({"gpu": 1, "cpu": 0.5, "memory": "64MiB", "deviceModels": ["H100-80GB"]}));
    let reason = reason_of(pinned);
    assert!(
        reason.contains(
            "the model constraint binds: 1 node would fit but carry only other models than H100-80GB"
        ),
        "{reason}"
    );
}

/// Copies `from` into `to` without Python's caches (the package is installed from the copy, so
/// that a build leaves nothing in the source tree).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "__pycache__" || name == "build" {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// The Python client, installed with pip from python/, against a live pool over TLS: submit,
/// wait, logs (followed too), failure and cancel, refusals naming the field, lists and usage as
/// typed records, the records against the document the pool serves, the config file; and
/// `import tessera` inside a job (the agent puts the package on its PYTHONPATH).
#[test]
fn the_python_client_drives_a_live_pool() {
    let mut pool = Pool::start_with(true);
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
    let source = pool.path("python-src");
    copy_tree(&python, &source);
    let site = pool.path("site");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-build-isolation",
            "--no-deps",
        ])
        .args(["--no-index", "--disable-pip-version-check", "--target"])
        .arg(&site)
        .arg(&source)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pip install ./python: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(site.join("tessera/py.typed").is_file(), "typed package");
    let out = Command::new("python3")
        .args(["-m", "mypy", "--strict", "--no-incremental", "tessera"])
        .current_dir(&source)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the package's types: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("python3")
        .arg(python.join("tests/live_pool.py"))
        .current_dir(pool.path(""))
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("TESSERA_URL", &pool.url)
        .env("TESSERA_TOKEN", &pool.admin)
        .env("TESSERA_CA_CERT", pool.cert.as_ref().unwrap())
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("\"ok\": true"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Slurm's habits end to end through the CLI: an array with a limit on how many tasks run at
/// once (one line in `tessera jobs`, each task a job), dependencies through success and
/// failure, a time limit that stops a job through its checkpoint signal, a start time, holds and
/// requeues, and the refusals of each flag's bad input.
#[test]
fn slurm_habits_arrays_dependencies_time_limits_begin_and_holds() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.66", "2xH100-80GB");
    let submit = |args: &[&str]| cli_submit(&pool, args);
    let reason = |id: u64| pool.job(id)["reason"].as_str().unwrap_or("").to_string();

    // Bad input never makes a job.
    for (args, says) in [
        (vec!["--array", "5-1"], "spec.array"),
        (vec!["--array", "0-9%0"], "spec.array"),
        (vec!["--after-ok", "99999"], "no job 99999 that you can see"),
        (vec!["--time", "0s"], "spec.timeLimit"),
        (vec!["--begin", "tomorrow"], "spec.begin"),
    ] {
        let mut all = vec!["submit"];
        all.extend(args.iter().copied());
        all.extend(["--", "true"]);
        let (ok, _, err) = cli(&pool, &all);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(pool.get("/v1/jobs", &pool.admin).1, json!([]));

    // An array of 6 tasks, at most 2 at once; each knows its index.
    let trace = pool.shared("array-trace");
    let line = format!(
        "echo start $TESSERA_ARRAY_INDEX $(date +%s%N) >> {t}; echo task $TESSERA_ARRAY_INDEX \
         of $SLURM_ARRAY_JOB_ID; sleep 1; echo end $TESSERA_ARRAY_INDEX $(date +%s%N) >> {t}",
        t = trace.display()
    );
    let (ok, out, err) = cli(
        &pool,
        &[
            "submit", "--name", "sweep", "--array", "0-5%2", "--cpu", "0.1", "--", "sh", "-c",
            &line,
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("6 tasks") && out.contains("at most 2 running at once"),
        "{out}"
    );
    let array: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let tasks: Vec<u64> = (array..array + 6).collect();
    // While it runs the array is one line, its tasks summed up.
    let (ok, out, _) = cli(&pool, &["jobs"]);
    assert!(
        ok && out.contains("sweep[0-5%2]") && out.contains("6 tasks"),
        "{out}"
    );
    for &t in &tasks {
        pool.wait_state(t, "succeeded");
    }
    let logs = replica_logs(&pool, tasks[3], 0);
    assert_eq!(logs.trim(), format!("task 3 of {array}"), "{logs}");
    // Never more than 2 at once, and 2 at once at some point.
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut edges: Vec<(u128, i32)> = text
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[2].parse().unwrap(), if w[0] == "start" { 1 } else { -1 })
        })
        .collect();
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    assert_eq!(most, 2, "{text}");
    let (ok, out, _) = cli(&pool, &["jobs"]);
    assert!(ok && out.contains("6 succeeded"), "{out}");
    let (ok, out, _) = cli(&pool, &["jobs", "--expand"]);
    assert!(ok && out.contains(&format!("{array}_5")), "{out}");

    // Dependencies: after-ok waits for success; a failure cancels its after-ok dependents and
    // lets its after-any ones run.
    let first = submit(&["--cpu", "0.1", "--", "sleep", "2"]);
    let second = submit(&[
        "--cpu",
        "0.1",
        "--after-ok",
        &first.to_string(),
        "--",
        "true",
    ]);
    pool.wait_state(first, "running");
    assert!(
        reason(second).contains(&format!("waiting for job {first} to succeed")),
        "{}",
        reason(second)
    );
    pool.wait_state(second, "succeeded");
    let ended = pool.job(first)["finished_ms"].as_u64().unwrap();
    assert!(pool.job(second)["created_ms"].as_u64().unwrap() <= ended);
    let fails = submit(&["--cpu", "0.1", "--", "sh", "-c", "sleep 1; exit 3"]);
    let doomed = submit(&[
        "--cpu",
        "0.1",
        "--after-ok",
        &fails.to_string(),
        "--",
        "true",
    ]);
    let anyway = submit(&[
        "--cpu",
        "0.1",
        "--after-any",
        &fails.to_string(),
        "--",
        "true",
    ]);
    pool.wait_state(doomed, "cancelled");
    assert!(
        reason(doomed).contains(&format!("dependency failed: job {fails} failed")),
        "{}",
        reason(doomed)
    );
    pool.wait_state(anyway, "succeeded");

    // A time limit stops the job through its checkpoint signal; it fails with the reason.
    let script = "trap 'echo checkpointed; exit 0' USR1; echo up; while true; do sleep 0.1; done";
    let limited = submit(&[
        "--cpu",
        "0.1",
        "--time",
        "2s",
        "--checkpoint-signal",
        "USR1",
        "--checkpoint-grace",
        "10s",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let job = pool.wait_state(limited, "failed");
    assert!(
        job["reason"].as_str().unwrap().contains("time limit"),
        "{job}"
    );
    assert!(replica_logs(&pool, limited, 0).contains("checkpointed"));
    assert!(
        events(&pool, limited)
            .iter()
            .any(|e| e["kind"] == "TimeLimit"),
        "{:?}",
        events(&pool, limited)
    );

    // --begin: not before then, and it says so.
    let later = submit(&["--cpu", "0.1", "--begin", "+3s", "--", "true"]);
    assert!(reason(later).contains("--begin"), "{}", reason(later));
    // describe --watch describes it again as it changes.
    let (watch, lines) = cli_lines(&pool, &["describe", "job", &later.to_string(), "--watch"]);
    let job = pool.wait_state(later, "succeeded");
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    while !seen
        .iter()
        .any(|l: &String| l.contains("State:      succeeded"))
        && Instant::now() < until
    {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    drop(watch);
    let text = seen.join("\n");
    assert!(
        text.contains("State:      pending") && text.contains("State:      succeeded"),
        "{text}"
    );
    assert!(
        text.contains("\n--- "),
        "a line with the time between descriptions: {text}"
    );
    let started = events(&pool, later)
        .iter()
        .find(|e| e["kind"] == "Running")
        .map(|e| e["ts_ms"].as_u64().unwrap())
        .unwrap();
    assert!(
        started >= job["created_ms"].as_u64().unwrap() + 3000,
        "{job}"
    );

    // Holds: submitted held, it waits until released; a running job cannot be held, but it can
    // be requeued (a new attempt, no restart used).
    let held = submit(&["--cpu", "0.1", "--hold", "--", "true"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pool.job(held)["state"], "pending");
    assert!(reason(held).starts_with("held"), "{}", reason(held));
    let (ok, out, err) = cli(&pool, &["release", &held.to_string()]);
    assert!(ok && out.contains("released by admin"), "{out}{err}");
    pool.wait_state(held, "succeeded");
    let long = submit(&["--cpu", "0.1", "--", "sleep", "300"]);
    pool.wait_state(long, "running");
    let (ok, _, err) = cli(&pool, &["hold", &long.to_string()]);
    assert!(
        !ok && err.contains("only a pending job can be held"),
        "{err}"
    );
    let (ok, out, err) = cli(&pool, &["requeue", &long.to_string()]);
    assert!(ok && out.contains("requeueing"), "{out}{err}");
    pool.wait_for("the requeued job to run again", || {
        let j = pool.job(long);
        j["state"] == "running" && j["attempt"] == 2
    });
    assert_eq!(pool.job(long)["restarts"], 0);

    // An array's id names all its tasks: hold one by ARRAY_INDEX, cancel them all.
    let (ok, out, err) = cli(
        &pool,
        &[
            "submit", "--array", "0-3%1", "--cpu", "0.1", "--", "sleep", "300",
        ],
    );
    assert!(ok, "{err}");
    let sleepers: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    pool.wait_state(sleepers, "running");
    let (ok, _, err) = cli(&pool, &["hold", &format!("{sleepers}_2")]);
    assert!(ok, "{err}");
    assert!(pool.job(sleepers + 2)["held"].as_bool().unwrap_or(false));
    assert!(
        reason(sleepers + 1).contains("its limit (%1)"),
        "{}",
        reason(sleepers + 1)
    );
    let (ok, out, err) = cli(&pool, &["cancel", &sleepers.to_string(), &long.to_string()]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("array {sleepers}: cancelled 4 of its 4 tasks")),
        "{out}"
    );
    for id in (sleepers..sleepers + 4).chain([long]) {
        pool.wait_state(id, "cancelled");
    }
}

/// Interactive work: `tessera exec` runs inside a running replica (its uid, cgroup, namespaces
/// and environment; output, input, a terminal and the exit status carried), `port-forward`
/// carries HTTP to a port the replica listens on and to no other, `run -i` holds a job while
/// its command runs; a viewer may not exec, and each session is audited.
/// Runs a command on a terminal of its own (a pty) sized 30x100, waits for "30 100", resizes
/// the terminal to 40x120 and tells the command (SIGWINCH, as a terminal emulator does), then
/// presses Enter until "40 120" comes back and ends the input; prints all it read.
const PTY_DRIVER: &str = r#"
import fcntl, os, pty, select, signal, struct, subprocess, sys, termios, time
master, slave = pty.openpty()
def size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
size(slave, 30, 100)
p = subprocess.Popen(sys.argv[1:], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
os.close(slave)
seen = b""
def read(wait):
    global seen
    r, _, _ = select.select([master], [], [], wait)
    if r:
        try:
            seen += os.read(master, 4096)
        except OSError:
            pass
def until(text, poke=None):
    end = time.time() + 30
    while text not in seen:
        if time.time() > end:
            sys.exit("timed out waiting for %r; read %r" % (text, seen))
        if poke:
            poke()
        read(0.3)
until(b"30 100")
size(master, 40, 120)
os.kill(p.pid, signal.SIGWINCH)
until(b"40 120", lambda: os.write(master, b"\r"))
os.write(master, b"\x04")
code = p.wait(timeout=30)
read(0.2)
print(seen.decode(errors="replace"))
sys.exit(code)
"#;

#[test]
fn exec_port_forward_and_run_reach_inside_a_running_replica() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.67", "1xH100-80GB");
    let web_port = port();
    let page = pool.shared("served");
    std::fs::create_dir_all(&page).unwrap();
    std::fs::write(page.join("hello.txt"), "from inside\n").unwrap();
    let id = cli_submit(
        &pool,
        &[
            "--cpu",
            "0.2",
            "--",
            "python3",
            "-m",
            "http.server",
            &web_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
            page.to_str().unwrap(),
        ],
    );
    pool.wait_state(id, "running");
    let tessera = |args: &[&str], input: &str| {
        let mut child = Command::new(bin())
            .arg(args[0])
            .args(["--url", &pool.url, "--token", &pool.admin])
            .args(&args[1..])
            .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let sid = id.to_string();

    // Output by stream and the exit status.
    let (code, out, err) = tessera(
        &[
            "exec",
            &sid,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
        "",
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (Some(7), "out\n", "err\n")
    );
    // As the replica: its uid, its cgroup, its pid namespace, its environment.
    let (code, out, err) = tessera(
        &[
            "exec",
            &sid,
            "--",
            "sh",
            "-c",
            "id -u; cat /proc/self/cgroup; echo job=$TESSERA_JOB_ID; ls /proc | grep -c '^[0-9]'",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_ne!(lines[0], "0", "not root: {out}");
    assert!(
        out.contains(&format!("_{id}.1.0")),
        "in the replica's cgroup: {out}"
    );
    assert!(out.contains(&format!("job={id}")), "{out}");
    let pids: usize = lines.last().unwrap().parse().unwrap();
    assert!(pids < 10, "only the replica's processes are seen: {out}");
    // Input with -i; a terminal with -t.
    let (code, out, _) = tessera(&["exec", "-i", &sid, "--", "cat"], "typed\n");
    assert_eq!((code, out.as_str()), (Some(0), "typed\n"));
    let (code, out, _) = tessera(
        &[
            "exec",
            "-t",
            &sid,
            "--",
            "sh",
            "-c",
            "test -t 0 && echo on-a-terminal",
        ],
        "",
    );
    assert_eq!(code, Some(0));
    assert!(out.contains("on-a-terminal"), "{out:?}");
    // -it from a real terminal: the replica's terminal takes the local one's size, and follows
    // it when it is resized (SIGWINCH), as ssh does.
    let driver = pool.shared("pty-driver.py");
    std::fs::write(&driver, PTY_DRIVER).unwrap();
    let out = Command::new("python3")
        .arg(&driver)
        .arg(bin())
        .args([
            "exec",
            "--url",
            &pool.url,
            "--token",
            &pool.admin,
            "-it",
            &sid,
        ])
        .args([
            "--",
            "sh",
            "-c",
            "stty size; while read x; do stty size; done",
        ])
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("30 100") && said.contains("40 120"), "{said}");
    // Refusals: a replica it does not have, an empty command, a viewer.
    let (code, _, err) = tessera(&["exec", &sid, "--replica", "3", "--", "true"], "");
    assert!(code != Some(0) && err.contains("replica 3"), "{err}");
    let (code, _, err) = tessera(&["exec", &sid], "");
    assert!(code != Some(0) && err.contains("after `--`"), "{err}");
    assert_eq!(
        pool.post(
            "/v1/users",
            json!({"name": "vic", "role": "viewer"}),
            &pool.admin
        )
        .0,
        201
    );
    let (_, token) = pool.post(
        "/v1/tokens",
        json!({"kind": "user", "user": "vic"}),
        &pool.admin,
    );
    let out = Command::new(bin())
        .args([
            "exec",
            &sid,
            "--url",
            &pool.url,
            "--token",
            token["token"].as_str().unwrap(),
        ])
        .args(["--", "true"])
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("viewer"), "{err}");

    pool.wait_for("the replica's server to listen", || {
        replica_logs(&pool, id, 0).contains("Serving HTTP")
    });
    // port-forward: HTTP through to the replica's port; a port it does not listen on (the
    // controller's own) is refused.
    let (forward, local) = port_forward(&pool, &[&sid, &format!("0:{web_port}")]);
    for _ in 0..2 {
        let body = reqwest::blocking::get(format!("http://127.0.0.1:{local}/hello.txt"))
            .unwrap()
            .text()
            .unwrap();
        assert_eq!(body, "from inside\n");
    }
    drop(forward);
    let api_port = pool.url.rsplit(':').next().unwrap().to_string();
    let (code, _, err) = tessera(&["port-forward", &sid, &format!("0:{api_port}")], "");
    assert!(
        code != Some(0) && err.contains("does not listen there"),
        "{err}"
    );
    // A replica that made a network namespace of its own (`unshare -rn`, no privilege needed):
    // its loopback is reached there, not the node's.
    let own_port = port();
    let own = cli_submit(
        &pool,
        &[
            "--cpu",
            "0.1",
            "--",
            "unshare",
            "-rn",
            "sh",
            "-c",
            &format!(
                "ip link set lo up && exec python3 -m http.server {own_port} --bind 127.0.0.1 \
                 --directory {}",
                page.display()
            ),
        ],
    );
    pool.wait_state(own, "running");
    pool.wait_for("the server in its own namespace to listen", || {
        replica_logs(&pool, own, 0).contains("Serving HTTP")
    });
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", own_port)).is_err(),
        "the server is not on the node's network"
    );
    let (forward, local) = port_forward(&pool, &[&own.to_string(), &format!("0:{own_port}")]);
    let body = reqwest::blocking::get(format!("http://127.0.0.1:{local}/hello.txt"))
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(body, "from inside\n");
    drop(forward);
    let (s, v) = pool.post(&format!("/v1/jobs/{own}/cancel"), json!({}), &pool.admin);
    assert_eq!(s, 200, "{v}");

    // run -i: a job of its own for as long as its command lasts.
    let (code, out, err) = tessera(
        &[
            "run",
            "-i",
            "--cpu",
            "0.1",
            "--",
            "sh",
            "-c",
            "read x; echo got $x in $TESSERA_JOB_ID; exit 3",
        ],
        "this\n",
    );
    assert_eq!(code, Some(3), "{err}");
    let ran: u64 = out
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("{out}{err}"));
    assert!(out.starts_with("got this in"), "{out}");
    pool.wait_state(ran, "cancelled");

    // --output-file: its output also goes to a file of its own in its working directory, as
    // Slurm's slurm-%j.out, owned by the workload.
    let written = cli_submit(
        &pool,
        &[
            "--cpu",
            "0.1",
            "--output-file",
            "slurm-%j.out",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; sleep 300",
        ],
    );
    pool.wait_state(written, "running");
    pool.wait_for("its output", || {
        replica_logs(&pool, written, 0).contains("to-err")
    });
    let (code, out, err) = tessera(
        &[
            "exec",
            &written.to_string(),
            "--",
            "sh",
            "-c",
            &format!("cat slurm-{written}.out; stat -c %u slurm-{written}.out; id -u"),
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], &["to-out", "to-err"], "{out}");
    assert_eq!(
        lines[2], lines[3],
        "the workload owns its output file: {out}"
    );
    let (ok, _, err) = cli(&pool, &["submit", "--output-file", "../../x", "--", "true"]);
    assert!(!ok && err.contains("spec.outputFile"), "{err}");

    // Each session is in the audit log.
    let audit = pool.get(&format!("/v1/audit?job={id}"), &pool.admin).1;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"exec") && actions.contains(&"port-forward"),
        "{actions:?}"
    );
}

/// `tessera notebook`: a real Jupyter in an interactive job, its port forwarded here; the URL it
/// prints opens the server with its token and not without; interrupted, it cancels its job.
#[test]
fn a_notebook_serves_jupyter_through_a_forwarded_port_until_interrupted() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.68", "1xH100-80GB");
    let mut notebook = Command::new(bin())
        .args([
            "notebook",
            "--url",
            &pool.url,
            "--token",
            &pool.admin,
            "--cpu",
            "1",
        ])
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(notebook.stdout.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(out).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let pid = notebook.id() as i32;
    let notebook = Proc(notebook);
    let url = lines
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            panic!(
                "no URL from tessera notebook: {:?}",
                pool.get("/v1/jobs", &pool.admin).1
            )
        });
    let url = url
        .split(": ")
        .nth(1)
        .unwrap_or_else(|| panic!("{url}"))
        .to_string();
    let (base, token) = url.split_once("/?token=").unwrap();
    let status = |with: &str| {
        reqwest::blocking::get(format!("{base}/api/status{with}"))
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status(&format!("?token={token}")), 200);
    assert_eq!(status(""), 403, "no token, no notebook");
    let jobs = pool.get("/v1/jobs?state=running", &pool.admin).1;
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "notebook")
        .unwrap()
        .clone();
    let id = job["id"].as_u64().unwrap();
    // Interrupted, it cancels its job.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    pool.wait_state(id, "cancelled");
    drop(notebook);
}
