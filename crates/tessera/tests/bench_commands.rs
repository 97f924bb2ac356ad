//! Every `tessera bench` command runs here in a smoke size (a few jobs, nodes or kills), so that
//! the commands behind the numbers in docs/benchmarks.md and the README stay runnable: the scale
//! benchmark once broke unnoticed when join tokens became single-use. The numbers themselves are
//! not judged here (these machines are shared and noisy); that each command completes and
//! reports what it measures, is.

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

#[path = "../src/store/testdb.rs"]
mod testdb;

/// The benchmarks start pools of their own and time them: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `tessera bench ARGS -o json` on a free port; its report.
fn bench(args: &[&str]) -> Value {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Two free ports in a row: failover runs its second controller on the next one.
    let port = loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if first < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", first + 1)).is_ok() {
            break first.to_string();
        }
    };
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("bench")
        .args(args)
        .args(["--port", &port, "-o", "json"])
        .env("TESSERA_LOG", "error")
        .env_remove("TESSERA_URL")
        .env_remove("TESSERA_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tessera bench {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The commands the tests below run, by name.
const COVERED: [&str; 7] = [
    "api",
    "latency",
    "checkpoint",
    "preempt",
    "usage",
    "failover",
    "scale",
];

#[test]
fn every_bench_command_is_covered_here() {
    // The commands as `tessera bench --help` lists them (clap writes that list from the
    // command line's own definition).
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["bench", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    for name in &names {
        assert!(
            COVERED.contains(name),
            "tessera bench {name} has no smoke test in tests/bench_commands.rs"
        );
    }
    assert_eq!(names.len(), COVERED.len(), "{names:?}\n{help}");
}

#[test]
fn api_commits_every_submission_it_counts() {
    let r = bench(&["api", "--jobs", "50", "--concurrency", "8"]);
    assert_eq!(r["jobs_listed_after"], 50, "{r}");
    assert!(r["submissions_per_s"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn latency_times_jobs_from_submission_to_running() {
    let r = bench(&["latency", "--jobs", "3"]);
    assert_eq!(r["jobs"], 3, "{r}");
    assert!(r["submit_to_running_max_ms"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn checkpoint_restores_what_it_checkpointed() {
    let r = bench(&["checkpoint", "--size", "1MiB"]);
    assert_eq!(r["restored_identical"], true, "{r}");
}

#[test]
fn preempt_times_both_kinds_of_stop() {
    let r = bench(&["preempt", "--rounds", "1"]);
    assert_eq!(r["rounds"], 1, "{r}");
    assert!(r["plain stop: p50_ms"].as_f64().is_some(), "{r}");
    assert!(r["with checkpoint: p50_ms"].as_f64().is_some(), "{r}");
}

#[test]
fn usage_writes_a_ledger_and_reports_over_it() {
    let r = bench(&["usage", "--runs", "2000"]);
    assert_eq!(r["runs"], 2000, "{r}");
    assert!(r["runs_in_30d"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn scale_joins_its_nodes_and_runs_what_fits() {
    let r = bench(&[
        "scale",
        "--nodes",
        "20",
        "--jobs",
        "200",
        "--concurrency",
        "8",
    ]);
    assert_eq!(r["nodes"], 20, "{r}");
    assert_eq!(r["agent_sync_errors"], 0, "{r}");
    let states = r["jobs_by_state"].as_object().unwrap();
    let total: u64 = states.values().filter_map(Value::as_u64).sum();
    assert_eq!(total, 200, "{r}");
    assert!(r["replicas_reported_running"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn scale_in_process_fills_the_pool_and_times_rounds_after_a_submission() {
    let r = bench(&[
        "scale",
        "--in-process",
        "--nodes",
        "20",
        "--jobs",
        "400",
        "--rounds",
        "5",
    ]);
    // 160 GPUs for 400 jobs asking 350 GPUs among them: some are placed, the rest wait (counted
    // before the timed rounds).
    let (placed, waiting) = (
        r["jobs_placed"].as_u64().unwrap(),
        r["jobs_waiting"].as_u64().unwrap(),
    );
    assert!(placed > 0 && waiting > 0, "{r}");
    assert_eq!(placed + waiting, 400, "{r}");
    assert_eq!(r["rounds_timed"], 5, "{r}");
    // Each timed round follows one submission into a pool the rounds before left settled: it
    // is a quick one (the job decided alone), and the CPU-only job among them (the fourth) is
    // placed. The full rounds after them read the whole pool.
    let after = &r["after_one_submission"];
    assert_eq!(after["rounds"], 5, "{r}");
    assert_eq!(after["quick"], 5, "{r}");
    assert_eq!(after["placing"], 1, "{r}");
    let p50 = after["round_p50_ms"].as_f64().unwrap();
    assert!(
        p50 > 0.0 && p50 <= after["round_p99_ms"].as_f64().unwrap(),
        "{r}"
    );
    assert_eq!(r["full_rounds"]["rounds"], 3, "{r}");
    assert_eq!(r["full_rounds"]["quick"], 0, "{r}");
    assert!(r["peak_rss_mib"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn failover_kills_the_leader_and_loses_nothing() {
    let pg = testdb::PgCluster::start();
    let r = bench(&[
        "failover",
        "--kills",
        "2",
        "--nodes",
        "5",
        "--waiting",
        "10",
        "--store",
        &pg.url(),
    ]);
    assert_eq!(r["kills"], 2, "{r}");
    assert_eq!(r["acknowledged_lost"], 0, "{r}");
    assert_eq!(r["listed_twice"], 0, "{r}");
    assert_eq!(r["long_replica_starts"], 1, "{r}");
    assert!(r["acknowledged"].as_u64().unwrap() > 0, "{r}");
}
