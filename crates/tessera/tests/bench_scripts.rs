//! Every script under bench/ runs here in a smoke size (a few jobs, a second or two), against the
//! binaries this build made: a broken benchmark fails the suite instead of rotting until someone
//! needs its numbers. The GPU scripts need a GPU host; here they are only parsed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The scripts share fixed resources (Slurm's ports, CPU for timing): one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where `cargo test` put the binaries (tessera, the simulated driver, the slice library).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tessera"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a bench script from the repository root; its stdout when it succeeded.
fn run(program: &str, args: &[&str]) -> String {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(program)
        .args(args)
        .current_dir(repo())
        .env("TESSERA_BIN_DIR", bin_dir())
        .env_remove("TESSERA_URL")
        .env_remove("TESSERA_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn slurm_vs_tessera_pushes_a_few_jobs_through_both() {
    let out = run("bench/slurm-vs-tessera.sh", &["3", "1"]);
    assert!(out.contains("slurm   run 1: 3 jobs"), "{out}");
    assert!(out.contains("tessera run 1: 3 jobs"), "{out}");
}

#[test]
fn vgpu_overhead_measures_launches_with_and_without_the_slice_library() {
    let out = run("bench/vgpu-overhead.sh", &["1", "1"]);
    assert!(out.contains("launches/s without"), "{out}");
}

#[test]
fn remote_gpu_runs_the_probe_across_two_namespaces_local_and_remote() {
    let out = run("bench/remote-gpu.sh", &["0.2", "8"]);
    assert!(out.contains("kernel 100 us, sync every 10: local"), "{out}");
    assert!(out.contains("remote pageable: host-to-device"), "{out}");
    assert!(out.contains("iperf3:"), "{out}");
}

#[test]
fn image_pull_puts_one_image_through_containerd_and_tessera_and_starts_it_warm() {
    let out = run("bench/image-pull.sh", &["8", "1", "2"]);
    assert!(out.contains("containerd run 1: cold"), "{out}");
    assert!(out.contains("tessera    run 1: cold"), "{out}");
    assert!(out.contains("tessera image job, submit -> exited"), "{out}");
    assert!(
        !out.lines().any(|l| l.trim_end().ends_with(" -1")),
        "every job reported its start and end: {out}"
    );
}

#[test]
fn service_move_measures_a_move_under_load_without_a_failed_request() {
    let out = run(
        "python3",
        &[
            "bench/service-move.py",
            "--callers",
            "2",
            "--steady",
            "1",
            "--moves",
            "1",
        ],
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(lines[1]["phase"], "moving", "{out}");
    assert_eq!(lines[1]["moves"], 1, "{out}");
    assert_eq!(lines[2]["all_failed"], 0, "{out}");
}

#[test]
fn constrained_variants_are_made_and_replayed() {
    let out = run(
        "bench/openb-constrained.sh",
        &[
            "testdata/openb",
            "42",
            "default",
            "0.25",
            "scarce",
            "FGD,Tessera",
        ],
    );
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("openb_pod_list_default_spec25_scarce"))
        .collect();
    assert_eq!(rows.len(), 2, "one row per policy:\n{out}");
    assert!(rows.iter().any(|r| r.contains("FGD")) && rows.iter().any(|r| r.contains("Tessera")));
}

#[test]
fn gpu_scripts_parse_and_every_bench_script_is_covered_here() {
    let gpu_only = [
        "bench/gpu-smoke.sh",
        "bench/gpu/run.sh",
        "bench/gpu/telemetry.sh",
        "bench/gpu/criu-cuda.sh",
        "bench/gpu/containers.sh",
        "bench/gpu/remote.sh",
        "bench/gpu/torch_slices.py",
    ];
    for script in gpu_only {
        let (program, args): (&str, Vec<&str>) = if script.ends_with(".py") {
            ("python3", vec!["-m", "py_compile", script])
        } else {
            ("bash", vec!["-n", script])
        };
        let ok = Command::new(program)
            .args(&args)
            .current_dir(repo())
            .status()
            .unwrap()
            .success();
        assert!(ok, "{script} does not parse");
    }
    // A new script must be added to a test above (run, or parsed when it needs a GPU).
    let covered = [
        "bench/image-pull.sh",
        "bench/openb-constrained.sh",
        "bench/slurm-vs-tessera.sh",
        "bench/vgpu-overhead.sh",
        "bench/remote-gpu.sh",
        "bench/service-move.py",
    ];
    let mut found = vec![];
    for dir in ["bench", "bench/gpu"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".sh") || name.ends_with(".py") {
                found.push(format!("{dir}/{name}"));
            }
        }
    }
    for script in &found {
        assert!(
            covered.contains(&script.as_str()) || gpu_only.contains(&script.as_str()),
            "{script} is not run or checked by this test"
        );
    }
}
