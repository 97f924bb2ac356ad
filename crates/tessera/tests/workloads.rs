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
    assert!((29500..=30499).contains(&port), "{port}");

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
