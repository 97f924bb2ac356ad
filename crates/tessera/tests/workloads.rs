//! Real workloads end to end (issue: a data scientist's first real job): distributed training's
//! rendezvous, the user's environment, logs users can read. Real controller, agents and child
//! processes, as in `pool.rs`.

use serde_json::Value;

mod common;
use common::*;

/// A rendezvous in the standard library only: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every
/// other rank connects and says its rank; each prints what it met, its variables and hostfile.
const RENDEZVOUS: &str = r#"
import json, os, socket, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
if rank == 0:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen()
    s.settimeout(30)
    met = []
    for _ in range(world - 1):
        c, _ = s.accept()
        met.append(int(c.recv(16).decode()))
        c.sendall(b"0")
else:
    for _ in range(300):
        try:
            c = socket.create_connection((addr, port), timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    c.sendall(str(rank).encode())
    met = [int(c.recv(16).decode())]
names = ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
         "NODE_RANK", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE"]
print(json.dumps({"met": sorted(met), "env": {k: os.environ[k] for k in names},
                  "hostfile": open(os.environ["TESSERA_HOSTFILE"]).read()}))
"#;

/// What replica `replica` of job `id` printed (its one JSON line).
fn report(pool: &Pool, id: u64, replica: u32) -> Value {
    let out = replica_logs(pool, id, replica);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"))
}

#[test]
fn a_gangs_ranks_find_each_other_at_the_rendezvous_the_controller_reserved() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "2xH100-80GB");
    let script = pool.shared("rendezvous.py");
    std::fs::write(&script, RENDEZVOUS).unwrap();
    let run = format!("python3 {}", script.display());

    // Three one-GPU ranks need both nodes: one on n1 and two on n2, or the other way round.
    let gang = pool.submit("default", 1.0, 3, 50, &run);
    pool.wait_state(gang, "succeeded");
    let reports: Vec<Value> = (0..3).map(|r| report(&pool, gang, r)).collect();
    assert_eq!(reports[0]["met"], serde_json::json!([1, 2]), "{reports:?}");
    assert_eq!(reports[1]["met"], serde_json::json!([0]));
    assert_eq!(reports[2]["met"], serde_json::json!([0]));
    let job = pool.job(gang);
    let hosts: Vec<&str> = job["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            if a["node"] == "n1" {
                "127.0.0.2"
            } else {
                "127.0.0.3"
            }
        })
        .collect();
    let env = |r: usize, k: &str| reports[r]["env"][k].as_str().unwrap().to_string();
    for (r, report) in reports.iter().enumerate() {
        assert_eq!(env(r, "MASTER_ADDR"), hosts[0], "{report}");
        assert_eq!(env(r, "MASTER_PORT"), env(0, "MASTER_PORT"));
        assert_eq!(env(r, "WORLD_SIZE"), "3");
        assert_eq!(env(r, "RANK"), r.to_string());
        assert_eq!(env(r, "PET_NNODES"), "3");
        assert_eq!(env(r, "PET_NODE_RANK"), r.to_string());
        assert_eq!(env(r, "PET_NPROC_PER_NODE"), "1");
        let hostfile: String = hosts.iter().map(|h| format!("{h} slots=1\n")).collect();
        assert_eq!(report["hostfile"], hostfile.as_str());
        // Local ranks count this node's replicas before this one; nodes count in rank order.
        let local = hosts[..r].iter().filter(|h| **h == hosts[r]).count();
        assert_eq!(env(r, "LOCAL_RANK"), local.to_string());
        let here = hosts.iter().filter(|h| **h == hosts[r]).count();
        assert_eq!(env(r, "LOCAL_WORLD_SIZE"), here.to_string());
        let node_rank = usize::from(hosts[r] != hosts[0]);
        assert_eq!(env(r, "NODE_RANK"), node_rank.to_string());
    }
    let port: u16 = env(0, "MASTER_PORT").parse().unwrap();
    let (first, last) = pool.rendezvous_ports;
    assert!((first..=last).contains(&port), "{port} of {first}-{last}");

    // Two gangs at once, each of two CPU-only ranks: both meet, and where their rank 0 share a
    // host their ports differ.
    let a = pool.submit("default", 0.0, 2, 50, &run);
    let b = pool.submit("default", 0.0, 2, 50, &run);
    pool.wait_state(a, "succeeded");
    pool.wait_state(b, "succeeded");
    let (ra, rb) = (report(&pool, a, 0), report(&pool, b, 0));
    assert_eq!(ra["met"], serde_json::json!([1]));
    assert_eq!(rb["met"], serde_json::json!([1]));
    if ra["env"]["MASTER_ADDR"] == rb["env"]["MASTER_ADDR"] {
        assert_ne!(ra["env"]["MASTER_PORT"], rb["env"]["MASTER_PORT"]);
    }

    // A lone replica is a world of one with a port of its own; its job's own values win.
    let (status, v) = pool.post(
        "/v1/jobs",
        serde_json::json!({"metadata": {"name": "lone", "project": "default"},
               "spec": {"resources": {"cpu": 0.5, "memory": "128MiB"},
                        "env": {"MASTER_PORT": "4242"},
                        "command": ["sh", "-c", "echo $WORLD_SIZE $RANK $MASTER_ADDR $MASTER_PORT"]}}),
        &pool.admin,
    );
    assert_eq!(status, 201, "{v}");
    let lone = v["id"].as_u64().unwrap();
    pool.wait_state(lone, "succeeded");
    assert_eq!(replica_logs(&pool, lone, 0), "1 0 127.0.0.1 4242\n");
}

/// PyTorch's torchrun, which scripts/test-deps.sh installs.
fn require_torchrun() -> &'static str {
    const TORCHRUN: &str = "/opt/tessera-torch/bin/torchrun";
    assert!(
        std::path::Path::new(TORCHRUN).is_file(),
        "PyTorch is missing: run scripts/test-deps.sh (as root) before the tests"
    );
    TORCHRUN
}

/// A torch.distributed program: a gloo all-reduce of every rank's number, and what it saw.
const ALL_REDUCE: &str = r#"
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} of {dist.get_world_size()} sum {t.item():g} node {os.environ['GROUP_RANK']}", flush=True)
dist.destroy_process_group()
"#;

#[test]
fn a_bare_torchrun_gang_of_two_nodes_all_reduces_with_gloo() {
    let torchrun = require_torchrun();
    let mut pool = Pool::start();
    // Nodes of 8 CPUs, replicas of 5: one replica per node.
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");
    let script = pool.shared("all_reduce.py");
    std::fs::write(&script, ALL_REDUCE).unwrap();
    // No option to torchrun: it reads its nodes, rank and rendezvous from the PET_* variables
    // the agent sets.
    let id = cli_submit(
        &pool,
        &[
            "--replicas",
            "2",
            "--cpu",
            "5",
            "--memory",
            "3GiB",
            "--",
            torchrun,
            script.to_str().unwrap(),
        ],
    );
    let done = pool.wait_state(id, "succeeded");
    let nodes: Vec<&str> = done["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["node"].as_str().unwrap())
        .collect();
    assert_ne!(nodes[0], nodes[1], "{done}");
    for r in 0..2u32 {
        let out = replica_logs(&pool, id, r);
        // 1 + 2 from the two ranks, each torchrun one node of the gang.
        assert!(
            out.contains(&format!("rank {r} of 2 sum 3 node {r}")),
            "replica {r}: {out}"
        );
    }
}

/// A torch.distributed program that all-reduces until any rank sees `argv[1]`, and says what group
/// it is in each time its workers (re)start.
const ELASTIC_LOOP: &str = r#"
import sys, time, torch, torch.distributed as dist
from pathlib import Path
dist.init_process_group("gloo")
w = dist.get_world_size()
print(f"start world {w} rank {dist.get_rank()}", flush=True)
stop = Path(sys.argv[1])
while True:
    t = torch.tensor([1.0, float(stop.exists())])
    dist.all_reduce(t)
    assert t[0].item() == w
    if t[1].item() > 0:
        break
    time.sleep(0.05)
print(f"done world {w}", flush=True)
dist.destroy_process_group()
"#;

#[test]
fn an_elastic_torchrun_job_forms_its_group_again_as_replicas_join_and_are_given_back() {
    let torchrun = require_torchrun();
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");
    let script = pool.shared("elastic_loop.py");
    std::fs::write(&script, ELASTIC_LOOP).unwrap();
    let stop = pool.shared("stop");
    // A bare torchrun: the agent makes it follow the replica set (PET_RDZV_BACKEND=tessera).
    let id = cli_submit(
        &pool,
        &[
            "--gpu",
            "1",
            "--cpu",
            "1",
            "--memory",
            "3GiB",
            "--replicas",
            "1-2",
            "--",
            torchrun,
            script.to_str().unwrap(),
            stop.to_str().unwrap(),
        ],
    );
    // (Read without asserting: a replica's output is gone once its run has ended and been
    // cleaned up, which a busy machine may reach between two polls.)
    let logs = |r: u32| {
        let (status, v) = pool.get(&format!("/v1/jobs/{id}/logs?replica={r}"), &pool.admin);
        if status == 200 {
            v["data"].as_str().unwrap_or_default().to_string()
        } else {
            String::new()
        }
    };
    // It grows into the second node's GPU, and replica 0's torchrun forms a group of two.
    pool.wait_for("a group of two", || {
        logs(0).contains("start world 2 rank 0")
    });
    let second = pool.job(id)["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap() as u32)
        .find(|i| *i != 0)
        .unwrap();
    pool.wait_for("the second replica in the group of two", || {
        logs(second).contains("start world 2 rank 1")
    });
    // A job that needs a GPU takes the second replica's: the group forms again, of one.
    let blocker = pool.submit("default", 1.0, 1, 50, "sleep 2");
    pool.wait_state(blocker, "running");
    pool.wait_for("a group of one again", || {
        let out = logs(0);
        out.find("start world 2")
            .is_some_and(|at| out[at..].contains("start world 1 rank 0"))
    });
    assert_eq!(
        pool.job(id)["state"],
        "running",
        "giving back is not failing"
    );
    // And once the GPU is free, of two again.
    pool.wait_state(blocker, "succeeded");
    pool.wait_for("a group of two again", || {
        logs(0).matches("start world 2 rank 0").count() == 2
    });
    std::fs::write(&stop, "").unwrap();
    pool.wait_for("the job to end", || logs(0).contains("done world 2"));
}

/// `tessera ARGS` run from `dir` with `env` added; returns (success, stdout, stderr).
fn cli_in(pool: &Pool, dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Output3 {
    let out = std::process::Command::new(bin())
        .arg(args[0])
        .args(["--url", &pool.url, "--token", &pool.admin])
        .args(&args[1..])
        .current_dir(dir)
        .envs(env.iter().copied())
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .env_remove("TESSERA_URL")
        .env_remove("TESSERA_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

type Output3 = (bool, String, String);

/// Submits through the CLI from `dir`; the new job's id.
fn submit_in(pool: &Pool, dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> u64 {
    let mut all = vec!["submit", "-o", "json"];
    all.extend_from_slice(args);
    let (ok, out, err) = cli_in(pool, dir, env, &all);
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_u64()
        .unwrap()
}

/// A directory under the shared scratch space, with one file, open to `mode`.
fn volume(pool: &Pool, name: &str, mode: u32, file: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = pool.shared(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("file.txt"), file).unwrap();
    std::fs::set_permissions(dir.join("file.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

#[test]
fn a_job_works_where_it_was_submitted_on_its_projects_volumes_read_only_where_marked() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let data = volume(&pool, "data", 0o755, "the dataset\n");
    let scratch = volume(&pool, "scratch", 0o1777, "scratch\n");
    let other = volume(&pool, "other", 0o755, "nlp's secret\n");
    let (data_s, scratch_s, other_s) = (
        data.to_str().unwrap(),
        scratch.to_str().unwrap(),
        other.to_str().unwrap(),
    );
    for (project, volumes) in [
        (
            "vision",
            vec![format!("{data_s}:ro"), scratch_s.to_string()],
        ),
        ("nlp", vec![other_s.to_string()]),
    ] {
        let mut args = vec!["projects", "create", project];
        for v in &volumes {
            args.extend(["--volume", v]);
        }
        let (ok, _, err) = cli_in(&pool, &scratch, &[], &args);
        assert!(ok, "{err}");
    }
    let (ok, out, _) = cli_in(&pool, &scratch, &[], &["projects"]);
    assert!(
        ok && out.contains(&format!("volumes {data_s}:ro,{scratch_s}")),
        "{out}"
    );

    // Submitted from a directory on a volume: it starts there, reads the read-only dataset,
    // cannot write it, writes where it works, and sees nothing of another project's volume.
    let exp = scratch.join("exp");
    std::fs::create_dir_all(&exp).unwrap();
    std::fs::set_permissions(&exp, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let script = format!(
        "pwd; cat {data_s}/file.txt; (touch {data_s}/new 2>/dev/null && echo wrote-data) || \
         echo data-is-read-only; echo result > out.txt && echo wrote-work; \
         cat {other_s}/file.txt 2>/dev/null || echo other-is-hidden"
    );
    let id = submit_in(
        &pool,
        &exp,
        &[],
        &[
            "--project",
            "vision",
            "--cpu",
            "0.5",
            "--memory",
            "128MiB",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let job = pool.wait_state(id, "succeeded");
    assert_eq!(
        replica_logs(&pool, id, 0),
        format!(
            "{}\nthe dataset\ndata-is-read-only\nwrote-work\nother-is-hidden\n",
            exp.display()
        ),
        "{job}"
    );
    assert_eq!(
        std::fs::read_to_string(exp.join("out.txt")).unwrap(),
        "result\n"
    );
    assert!(!data.join("new").exists());

    // The other project's job sees its own volume and not this one's.
    let id = submit_in(
        &pool,
        &other,
        &[],
        &[
            "--project",
            "nlp",
            "--cpu",
            "0.5",
            "--memory",
            "128MiB",
            "--",
            "sh",
            "-c",
            &format!(
                "pwd; cat {other_s}/file.txt; cat {data_s}/file.txt 2>/dev/null || echo data-is-hidden"
            ),
        ],
    );
    pool.wait_state(id, "succeeded");
    assert_eq!(
        replica_logs(&pool, id, 0),
        format!("{other_s}\nnlp's secret\ndata-is-hidden\n")
    );

    // Submitted from elsewhere, it starts in its own run dir; a workdir or volume the project
    // does not offer is refused by field, and nothing is submitted.
    let elsewhere = pool.shared("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let id = submit_in(
        &pool,
        &elsewhere,
        &[],
        &[
            "--project",
            "vision",
            "--cpu",
            "0.5",
            "--memory",
            "128MiB",
            "--",
            "sh",
            "-c",
            "basename $(pwd)",
        ],
    );
    pool.wait_state(id, "succeeded");
    assert_eq!(replica_logs(&pool, id, 0), "work\n");
    let before = pool
        .get("/v1/jobs", &pool.admin)
        .1
        .as_array()
        .unwrap()
        .len();
    let (ok, _, err) = cli_in(
        &pool,
        &elsewhere,
        &[],
        &[
            "submit",
            "--project",
            "vision",
            "--workdir",
            elsewhere.to_str().unwrap(),
            "--",
            "true",
        ],
    );
    assert!(
        !ok && err.contains("spec.workdir") && err.contains(scratch_s),
        "{err}"
    );
    let (ok, _, err) = cli_in(
        &pool,
        &elsewhere,
        &[],
        &[
            "submit",
            "--project",
            "vision",
            "--volume",
            other_s,
            "--",
            "true",
        ],
    );
    assert!(
        !ok && err.contains("spec.volumes[0]") && err.contains("not a volume of"),
        "{err}"
    );
    let after = pool
        .get("/v1/jobs", &pool.admin)
        .1
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after);

    // Picking one volume hides the other: here only the dataset, made read-only.
    let id = submit_in(
        &pool,
        &elsewhere,
        &[],
        &[
            "--project",
            "vision",
            "--volume",
            &format!("{data_s}:ro"),
            "--cpu",
            "0.5",
            "--memory",
            "128MiB",
            "--",
            "sh",
            "-c",
            &format!(
                "cat {data_s}/file.txt; cat {scratch_s}/file.txt 2>/dev/null || echo scratch-is-hidden"
            ),
        ],
    );
    pool.wait_state(id, "succeeded");
    assert_eq!(
        replica_logs(&pool, id, 0),
        "the dataset\nscratch-is-hidden\n"
    );
}

#[test]
fn the_submitting_shells_environment_goes_along_without_its_secrets_unless_named() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let here = pool.path("");
    let shell = [
        ("EXPERIMENT", "lr-sweep"),
        ("HF_TOKEN", "hf_secret"),
        ("PWD", "/nowhere"),
    ];
    let show = "echo ${EXPERIMENT:-unset} ${HF_TOKEN:-unset} $SEED";
    let run = |extra: &[&str]| {
        let mut args = vec!["--cpu", "0.5", "--memory", "128MiB"];
        args.extend_from_slice(extra);
        args.extend(["--env", "SEED=7", "--", "sh", "-c", show]);
        let id = submit_in(&pool, &here, &shell, &args);
        pool.wait_state(id, "succeeded");
        replica_logs(&pool, id, 0)
    };
    assert_eq!(run(&[]), "unset unset 7\n");
    assert_eq!(run(&["--export-env"]), "lr-sweep unset 7\n");
    assert_eq!(
        run(&["--export-env=HF_TOKEN,EXPERIMENT"]),
        "lr-sweep hf_secret 7\n"
    );
    let (ok, _, err) = cli_in(
        &pool,
        &here,
        &shell,
        &["submit", "--export-env=NOT_SET", "--", "true"],
    );
    assert!(!ok && err.contains("NOT_SET is not set"), "{err}");
}

#[test]
fn logs_interleave_both_streams_in_order_and_pick_one_a_time_or_timestamps() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let here = pool.shared("");
    // Spaced out, as a program's lines are: the order the lines came is the order they show.
    let id = submit_in(
        &pool,
        &here,
        &[],
        &[
            "--cpu",
            "0.5",
            "--memory",
            "128MiB",
            "--",
            "sh",
            "-c",
            "echo out 1; sleep 0.3; echo err 1 >&2; sleep 0.3; echo out 2; sleep 1.2; echo err 2 >&2",
        ],
    );
    pool.wait_state(id, "succeeded");
    let logs = |args: &[&str]| {
        let mut all = vec!["logs", "--replica", "0"];
        all.extend_from_slice(args);
        let id = id.to_string();
        all.push(&id);
        let (ok, out, err) = cli_in(&pool, &here, &[], &all);
        assert!(ok, "{err}");
        out
    };
    assert_eq!(logs(&[]), "out 1\nerr 1\nout 2\nerr 2\n");
    assert_eq!(logs(&["--stdout"]), "out 1\nout 2\n");
    assert_eq!(logs(&["--stderr"]), "err 1\nerr 2\n");
    assert_eq!(logs(&["--tail", "2"]), "out 2\nerr 2\n");
    // Each line tagged with its stream and time for scripts.
    let lines: Vec<Value> = logs(&["-o", "json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tagged: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["stream"].as_str().unwrap(), l["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        tagged,
        [
            ("stdout", "out 1"),
            ("stderr", "err 1"),
            ("stdout", "out 2"),
            ("stderr", "err 2")
        ]
    );
    let ts: Vec<u64> = lines.iter().map(|l| l["ts_ms"].as_u64().unwrap()).collect();
    assert!(
        ts.windows(2).all(|w| w[0] <= w[1]) && ts[3] - ts[2] >= 1000,
        "{ts:?}"
    );
    // From a time on: only what came then.
    assert_eq!(logs(&["--since", &ts[2].to_string()]), "out 2\nerr 2\n");
    assert_eq!(
        logs(&["--since", &ts[3].to_string(), "--stderr"]),
        "err 2\n"
    );
    // With times: RFC 3339 in UTC, the same instants.
    let stamped = logs(&["--timestamps", "--stdout"]);
    let first = stamped.lines().next().unwrap();
    let (time, text) = first.split_once(' ').unwrap();
    assert_eq!(text, "out 1");
    assert_eq!(time, lines[0]["time"].as_str().unwrap(), "{stamped}");
    assert!(
        time.ends_with('Z') && time.len() == "2026-11-29T08:00:00.000Z".len(),
        "{time}"
    );
    // A bad stream or time is refused with what to write.
    let (ok, _, err) = cli_in(
        &pool,
        &here,
        &[],
        &["logs", "--since", "yesterday", &id.to_string()],
    );
    assert!(!ok && err.contains("since yesterday"), "{err}");
    let (status, v) = pool.get(&format!("/v1/jobs/{id}/logs?stream=both"), &pool.admin);
    assert_eq!(status, 400, "{v}");
}

/// A busybox image with one file of its own.
fn hello_image() -> registry::Image {
    registry::Image {
        layers: vec![registry::Layer {
            busybox: true,
            files: vec![("/hello.txt".into(), b"hello from the image\n".to_vec())],
            ..registry::Layer::default()
        }],
        cmd: vec!["sh".into(), "-c".into(), "cat /hello.txt".into()],
        env: vec!["PATH=/bin".into()],
        ..registry::Image::default()
    }
}

#[test]
fn an_image_job_sees_the_images_files_as_an_unprivileged_root_and_says_how_its_pull_went() {
    let reg = registry::Registry::start(None);
    let image = reg.push("demo/hello:1", &hello_image());
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let here = pool.shared("");
    let small = ["--cpu", "0.5", "--memory", "128MiB"];

    // The image's own command.
    let mut args = small.to_vec();
    args.extend(["--image", &image]);
    let id = submit_in(&pool, &here, &[], &args);
    let job = pool.wait_state(id, "succeeded");
    let (ok, out, err) = cli_in(&pool, &here, &[], &["logs", "--stdout", &id.to_string()]);
    assert!(ok && out == "hello from the image\n", "{out} {err} {job}");
    // Its pull is in its log and in its events.
    let (_, all, _) = cli_in(&pool, &here, &[], &["logs", &id.to_string()]);
    assert!(
        all.contains(&format!("[tessera] pulling image {image}")),
        "{all}"
    );
    assert!(
        all.contains("[tessera] pulled ") && all.contains("@sha256:"),
        "{all}"
    );
    let started = events(&pool, id)
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .find(|m| m.contains("started on n1 from"))
        .unwrap_or_default();
    assert!(
        started.contains(&image) && started.contains("@sha256:"),
        "{started}"
    );

    // A command of the job's own: the image's files, not the host's; root inside is an
    // unprivileged uid outside; of the agent's data dir only the way to its run dir is there
    // (not its credential); /tmp is writable.
    let data_dir = pool.path("n1");
    let script = format!(
        "id -u; cat /proc/self/uid_map; test -e /usr/bin/python3 && echo host-python || echo \
         no-host-python; cat {}/agent/credential.json 2>/dev/null && echo sees-credential || \
         echo no-credential; echo x > /tmp/t && echo tmp-ok; cat /hello.txt",
        data_dir.display()
    );
    let mut args = small.to_vec();
    args.extend(["--image", &image, "--", "sh", "-c", &script]);
    let id = submit_in(&pool, &here, &[], &args);
    pool.wait_state(id, "succeeded");
    let (_, out, _) = cli_in(&pool, &here, &[], &["logs", "--stdout", &id.to_string()]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "{out}");
    let map: Vec<u64> = lines[1]
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(map[0], 0, "{out}");
    assert!(
        map[1] >= 200_000 && map[2] == 1,
        "root inside is uid {} outside: {out}",
        map[1]
    );
    assert_eq!(
        lines[2..],
        [
            "no-host-python",
            "no-credential",
            "tmp-ok",
            "hello from the image"
        ],
        "{out}"
    );

    // An image that cannot be pulled fails with the registry's reason.
    let mut args = small.to_vec();
    let missing = format!("{}/demo/hello:nope", reg.addr);
    args.extend(["--image", &missing]);
    let id = submit_in(&pool, &here, &[], &args);
    let failed = pool.wait_state(id, "failed");
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("could not pull image {missing}"))
            && reason.to_lowercase().contains("manifest unknown"),
        "{reason}"
    );
    // A reference that is not one is refused at submit, by field.
    let (ok, _, err) = cli_in(&pool, &here, &[], &["submit", "--image", "Not An Image!"]);
    assert!(!ok && err.contains("spec.image"), "{err}");
}

/// Every file under `dir` (but the store's own) that holds `secret`.
fn files_holding(dir: &std::path::Path, secret: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(files_holding(&path, secret));
        } else if meta.is_file()
            && !e.file_name().to_string_lossy().starts_with("tessera.db")
            && std::fs::read(&path).is_ok_and(|b| b.windows(secret.len()).any(|w| w == secret))
        {
            found.push(path);
        }
    }
    found
}

#[test]
fn a_private_image_is_pulled_with_the_projects_login_which_is_never_shown_back() {
    const PASSWORD: &str = "pw-Zq8-never-shown";
    let reg = registry::Registry::start(Some(&format!("puller:{PASSWORD}")));
    let image = reg.push("private/hello:1", &hello_image());
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let here = pool.shared("");
    let (ok, _, err) = cli_in(&pool, &here, &[], &["projects", "create", "vision"]);
    assert!(ok, "{err}");
    let submit = || {
        submit_in(
            &pool,
            &here,
            &[],
            &[
                "--project",
                "vision",
                "--cpu",
                "0.5",
                "--memory",
                "128MiB",
                "--image",
                &image,
            ],
        )
    };

    // Without a login the registry refuses, and the job says so.
    let id = submit();
    let failed = pool.wait_state(id, "failed");
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("could not pull image") && reason.contains("Not authorized"),
        "{reason}"
    );

    // The admin stores the project's login; the same job now runs.
    let (status, v) = pool.req(
        reqwest::Method::PUT,
        &format!("/v1/projects/vision/registries/{}", reg.addr),
        Some(serde_json::json!({"username": "puller", "password": PASSWORD})),
        &pool.admin,
    );
    assert_eq!(status, 200, "{v}");
    let id = submit();
    pool.wait_state(id, "succeeded");
    let (_, out, _) = cli_in(&pool, &here, &[], &["logs", "--stdout", &id.to_string()]);
    assert_eq!(out, "hello from the image\n");
    let (ok, out, err) = cli_in(&pool, &here, &[], &["projects", "logins", "vision"]);
    assert!(
        ok && out.contains("puller") && out.contains(&reg.addr),
        "{out} {err}"
    );

    // Never shown back: not in any answer, event, log or audit entry, nor in any file of the
    // controller or the node but the store itself.
    let mut answers = String::new();
    for path in [
        "/v1/projects/vision/registries".to_string(),
        "/v1/projects".into(),
        "/v1/jobs".into(),
        format!("/v1/jobs/{id}/events"),
        format!("/v1/jobs/{id}/logs"),
        "/v1/audit?since=1h".into(),
    ] {
        answers.push_str(&pool.get(&path, &pool.admin).1.to_string());
    }
    assert!(
        answers.contains("registry-login"),
        "the login is audited: {answers}"
    );
    assert!(!answers.contains(PASSWORD), "{answers}");
    for root in ["controller", "n1"] {
        let found = files_holding(&pool.path(root), PASSWORD.as_bytes());
        assert!(found.is_empty(), "the password is in {found:?}");
    }
    // A bad registry name is refused; removing the login makes pulls fail again.
    let (status, _) = pool.req(
        reqwest::Method::PUT,
        "/v1/projects/vision/registries/not%20a%20host",
        Some(serde_json::json!({"username": "u", "password": "p"})),
        &pool.admin,
    );
    assert_eq!(status, 400);
    let (ok, _, err) = cli_in(
        &pool,
        &here,
        &[],
        &["projects", "logout", "vision", &reg.addr],
    );
    assert!(ok, "{err}");
    let id = submit();
    pool.wait_state(id, "failed");
}

#[test]
fn a_half_gpu_image_job_on_a_simulated_node_sees_its_slice_through_the_injected_driver() {
    // The probe (an unmodified CUDA program) in an image, with the C library it links to; the
    // node injects the simulated driver and the slice library, as it would a real driver's.
    let probe = std::path::Path::new(bin()).with_file_name("tessera-vgpu-probe");
    assert!(
        probe.exists(),
        "{} is missing: build the workspace",
        probe.display()
    );
    let mut programs = vec![("/usr/bin/probe".to_string(), std::fs::read(&probe).unwrap())];
    for lib in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libgcc_s.so.1",
        "/lib64/ld-linux-x86-64.so.2",
    ] {
        programs.push((lib.to_string(), std::fs::read(lib).unwrap()));
    }
    let image = registry::Image {
        layers: vec![registry::Layer {
            busybox: true,
            programs,
            ..registry::Layer::default()
        }],
        env: vec!["PATH=/bin:/usr/bin".into()],
        ..registry::Image::default()
    };
    let reg = registry::Registry::start(None);
    let image = reg.push("demo/probe:1", &image);
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let here = pool.shared("");
    let id = submit_in(
        &pool,
        &here,
        &[],
        &[
            "--gpu",
            "0.5",
            "--gpu-memory",
            "1GiB",
            "--cpu",
            "0.5",
            "--memory",
            "256MiB",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            "probe meminfo && probe oom",
        ],
    );
    pool.wait_state(id, "succeeded");
    let (_, out, _) = cli_in(&pool, &here, &[], &["logs", "--stdout", &id.to_string()]);
    assert!(
        out.contains("free_bytes=1073741824 total_bytes=1073741824"),
        "{out}"
    );
    assert!(
        out.contains("allocated_bytes=1073741824 result=CUDA_ERROR_OUT_OF_MEMORY"),
        "{out}"
    );
}

/// Once job `id` (counting a line at a time on n1) has printed 8, a second node joins and the job
/// is sent there.
fn move_once_it_counts(pool: &mut Pool, id: u64, here: &std::path::Path) {
    pool.wait_state(id, "running");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");
    pool.wait_for("some progress", || {
        replica_logs(pool, id, 0).contains("\n8\n")
    });
    let (ok, _, err) = cli_in(pool, here, &[], &["migrate", &id.to_string(), "--to", "n2"]);
    assert!(ok, "{err}");
}

#[test]
fn a_checkpointing_image_job_moves_to_another_node_and_resumes_there() {
    let reg = registry::Registry::start(None);
    let image = reg.push("demo/count:1", &hello_image());
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let here = pool.shared("");
    // Counts to 60, saving its count on USR1 into its checkpoint dir (bound into the container).
    let script = r#"n=0
if [ -n "${TESSERA_RESUME_FROM:-}" ]; then n=$(cat "$TESSERA_RESUME_FROM/count"); echo "resumed from $n"; else echo "fresh start"; fi
trap 'echo $n > "$TESSERA_CHECKPOINT_DIR/count"; : > "$TESSERA_CHECKPOINT_DIR/COMPLETE"; exit 0' USR1
while [ $n -lt 60 ]; do n=$((n+1)); echo $n; sleep 0.1; done
echo "done $n""#;
    let id = submit_in(
        &pool,
        &here,
        &[],
        &[
            "--gpu",
            "1",
            "--cpu",
            "0.5",
            "--memory",
            "128MiB",
            "--checkpoint-signal",
            "USR1",
            "--checkpoint-grace",
            "10s",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    move_once_it_counts(&mut pool, id, &here);
    let done = pool.wait_state(id, "succeeded");
    assert_eq!(done["assignments"][0]["node"], "n2", "{done}");
    assert_eq!(done["attempt"], 2, "{done} {:?}", events(&pool, id));
    let (_, out, _) = cli_in(&pool, &here, &[], &["logs", "--stdout", &id.to_string()]);
    let first = out.lines().next().unwrap_or_default();
    let from: u32 = first
        .strip_prefix("resumed from ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(from >= 8, "{out}");
    assert!(out.ends_with("done 60\n"), "{out}");
    let (_, before, _) = cli_in(
        &pool,
        &here,
        &[],
        &["logs", "--stdout", "--previous", &id.to_string()],
    );
    assert!(before.starts_with("fresh start\n"), "{before}");
}

#[test]
fn a_transparent_image_job_moves_with_its_memory_and_files_and_stays_confined() {
    require_criu();
    let reg = registry::Registry::start(None);
    let image = reg.push("demo/transparent:1", &hello_image());
    let mut pool = Pool::start();
    // Confined nodes (no --allow-unconfined): the runtime checkpoints the container as it is.
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let (ok, out, err) = cli(&pool, &["nodes"]);
    assert!(ok && out.contains("criu-images"), "{out}{err}");
    let here = pool.shared("");
    // Knows nothing of Tessera: its count lives in the shell's memory, and it writes files at
    // the top of its root and in its /tmp.
    let script = r#"echo "start as $(tr -s ' ' < /proc/self/uid_map)"
n=0
while [ $n -lt 60 ]; do n=$((n+1)); echo $n; echo $n > /top.txt; echo $n > /tmp/tmp.txt; [ $n = 3 ] && echo early > /early.txt; sleep 0.1; done
echo "done $n top=$(cat /top.txt) tmp=$(cat /tmp/tmp.txt) early=$(cat /early.txt) dir=$TESSERA_HOSTFILE""#;
    let id = submit_in(
        &pool,
        &here,
        &[],
        &[
            "--cpu",
            "0.5",
            "--memory",
            "128MiB",
            "--checkpoint-mode",
            "transparent",
            "--checkpoint-grace",
            "30s",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    move_once_it_counts(&mut pool, id, &here);
    // Its memory's images are readable to the restore only until it runs again.
    let bundles = pool.path("n2").join("bundles");
    pool.wait_for("the restored job to run with its images gone", || {
        let left = std::fs::read_dir(&bundles)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|b| std::fs::read_dir(b.path()).into_iter().flatten().flatten())
            .any(|f| {
                f.file_name()
                    .to_string_lossy()
                    .starts_with("restore-images")
            });
        let (status, v) = pool.get(&format!("/v1/jobs/{id}/logs?replica=0"), &pool.admin);
        let out = v["data"].as_str().unwrap_or_default();
        status == 200 && !left && !out.contains("start as") && out.lines().count() > 1
    });
    let done = pool.wait_state(id, "succeeded");
    assert_eq!(done["assignments"][0]["node"], "n2", "{done}");
    assert_eq!(done["attempt"], 2, "{done} {:?}", events(&pool, id));
    let (_, before, _) = cli_in(
        &pool,
        &here,
        &[],
        &["logs", "--stdout", "--previous", &id.to_string()],
    );
    let first = before.lines().next().unwrap_or_default();
    let map: Vec<&str> = first
        .strip_prefix("start as ")
        .unwrap_or_else(|| panic!("{before}"))
        .split_whitespace()
        .collect();
    assert_eq!(map[0], "0", "{first}");
    assert_ne!(map[1], "0", "its root is not the host's: {first}");
    let last_before: u32 = before
        .lines()
        .last()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("{before}"));
    // Restored, not restarted: no new start, the count goes on where it was saved, and the files
    // it wrote before the move are there.
    let (_, out, _) = cli_in(&pool, &here, &[], &["logs", "--stdout", &id.to_string()]);
    assert!(!out.contains("start as"), "{out}");
    let resumed: u32 = out
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        resumed >= 8 && resumed <= last_before + 1,
        "{before}\n---\n{out}"
    );
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("done 60 top=60 tmp=60 early=early dir="),
        "{out}"
    );
}

#[test]
fn among_equal_nodes_an_image_job_goes_where_its_image_is_already_cached() {
    let reg = registry::Registry::start(None);
    let image = reg.push("demo/warm:1", &hello_image());
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    pool.add_agent("n2", "127.0.0.3", "1xH100-80GB");
    let here = pool.shared("");
    // Pulled ahead into n2's cache, as an admin would before a big run.
    let out = std::process::Command::new(bin())
        .args([
            "images",
            "pull",
            &image,
            "--image-reserve",
            "64MiB",
            "--data-dir",
        ])
        .arg(pool.path("n2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pulled"));
    // Give n2's agent a sync to report what it holds.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let small = ["--cpu", "0.5", "--memory", "128MiB"];
    let mut args = small.to_vec();
    args.extend(["--image", &image]);
    let id = submit_in(&pool, &here, &[], &args);
    let job = pool.wait_state(id, "succeeded");
    assert_eq!(job["assignments"][0]["node"], "n2", "{job}");
    // The same job without an image goes to the first of the equal nodes.
    let mut args = small.to_vec();
    args.extend(["--", "true"]);
    let plain = submit_in(&pool, &here, &[], &args);
    let job = pool.wait_state(plain, "succeeded");
    assert_eq!(job["assignments"][0]["node"], "n1", "{job}");
}

#[test]
fn a_replica_its_lease_killed_is_queued_again_not_failed() {
    let mut pool = Pool::start();
    pool.add_agent("n1", "127.0.0.2", "1xH100-80GB");
    let id = pool.submit("default", 1.0, 1, 50, "sleep 60");
    pool.wait_state(id, "running");
    // The agent stops past its lease (2 s): its shim kills the workload, as it must, and the
    // agent reports that when it comes back. That is the node's loss, not the job's failure.
    let pid = nix::unistd::Pid::from_raw(pool.agent_pid("n1"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2600));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    pool.wait_for("the job to run again", || {
        let j = pool.job(id);
        assert_ne!(j["state"], "failed", "{j}");
        j["state"] == "running" && j["attempt"] == 2
    });
    let j = pool.job(id);
    assert_eq!(j["restarts"], 0, "no restart was used: {j}");
}
