//! Slices end to end: the probe (an unmodified CUDA program) with the interception library
//! preloaded, against the simulated driver (tessera-fakecuda), real processes throughout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A library the workspace builds (`libcuda.so` of tessera-fakecuda, `libtessera_vgpu.so`): in
/// target/<profile>/ when built as a package of its own, in its deps/ when built for the tessera
/// binary. Tests run from target/<profile>/deps/.
fn built(file: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let profile = deps.parent().unwrap();
    [profile.join(file), deps.join(file)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{file} is not in {}: run the tests of the workspace (cargo test --workspace)",
                profile.display()
            )
        })
}

/// A simulated machine: its own device files, the driver on the library path.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new(device_memory: u64) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        let fake = built("libcuda.so");
        std::os::unix::fs::symlink(&fake, dir.path().join("libcuda.so.1")).unwrap();
        std::os::unix::fs::symlink(&fake, dir.path().join("libnvidia-ml.so.1")).unwrap();
        let m = Machine { dir };
        std::fs::write(m.path("memory"), device_memory.to_string()).unwrap();
        m
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The probe, optionally in slice `slice` with `share` of the device and `memory` bytes.
    fn probe(&self, slice: Option<(&str, f64, u64)>, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tessera-vgpu-probe"));
        c.args(args)
            .env("LD_LIBRARY_PATH", self.dir.path())
            .env("TESSERA_FAKECUDA_DIR", self.path("devices"))
            .env(
                "TESSERA_FAKECUDA_MEMORY",
                std::fs::read_to_string(self.path("memory")).unwrap(),
            )
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("LD_PRELOAD");
        if let Some((name, share, memory)) = slice {
            c.env("LD_PRELOAD", built("libtessera_vgpu.so"))
                .env("TESSERA_GPU_MEMORY_BYTES", memory.to_string())
                .env("TESSERA_COMPUTE_SHARE", format!("{share:.3}"))
                .env("TESSERA_VGPU_SHM", self.path(&format!("slice-{name}")))
                .env("TESSERA_VGPU_DEVICE_SHM", self.path("gpu0"));
        }
        c
    }
}

/// Runs to the end; returns the key=value pairs of its last line.
fn results(mut c: Command) -> HashMap<String, String> {
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(r: &HashMap<String, String>, key: &str) -> f64 {
    r.get(key)
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
        .parse()
        .unwrap()
}

#[test]
fn every_allocation_path_stops_exactly_at_the_cap_with_out_of_memory() {
    let m = Machine::new(8 * GIB);
    // Without a slice the whole simulated device is there.
    let whole = results(m.probe(None, &["oom"]));
    assert_eq!(num(&whole, "allocated_bytes") as u64, 8 * GIB);
    // Each path, found through dlsym, through cuGetProcAddress_v2, and through it with the
    // per-thread default stream flag (the `_ptsz` variants).
    for entry in [&[][..], &["--proc-address"], &["--proc-address", "--ptds"]] {
        for via in ["alloc", "managed", "async", "pool", "pitch", "vmm", "array"] {
            let name = format!("{via}{}", entry.len());
            let mut args = vec!["oom", "--via", via];
            args.extend_from_slice(entry);
            let r = results(m.probe(Some((&name, 0.5, GIB)), &args));
            assert_eq!(num(&r, "allocated_bytes") as u64, GIB, "{args:?}: {r:?}");
            assert_eq!(r["result"], "CUDA_ERROR_OUT_OF_MEMORY", "{args:?}");
        }
    }
    // The allowance for context memory that no hook sees comes off the cap, per process.
    let mut c = m.probe(Some(("allowance", 0.5, GIB)), &["oom"]);
    c.env("TESSERA_VGPU_CONTEXT_BYTES", (256 * MIB).to_string());
    assert_eq!(num(&results(c), "allocated_bytes") as u64, 768 * MIB);
    // A cap that is not a multiple of the step: the last step that fits, and no byte more.
    let r = results(m.probe(Some(("odd", 0.5, GIB + 32 * MIB)), &["oom"]));
    assert_eq!(num(&r, "allocated_bytes") as u64, GIB);
}

#[test]
fn memory_info_reports_the_slice() {
    let m = Machine::new(80 * GIB);
    let r = results(m.probe(Some(("a", 0.3, 12 * GIB)), &["meminfo"]));
    assert_eq!(num(&r, "total_bytes") as u64, 12 * GIB);
    assert_eq!(num(&r, "free_bytes") as u64, 12 * GIB);
    assert_eq!(num(&r, "device_total_bytes") as u64, 12 * GIB);
    // NVML, as nvidia-smi and frameworks read it.
    assert_eq!(num(&r, "nvml_total_bytes") as u64, 12 * GIB);
    assert_eq!(num(&r, "nvml_free_bytes") as u64, 12 * GIB);
    let whole = results(m.probe(None, &["meminfo"]));
    assert_eq!(num(&whole, "total_bytes") as u64, 80 * GIB);
    assert_eq!(num(&whole, "nvml_total_bytes") as u64, 80 * GIB);
}

/// Starts a probe that holds memory; returns once it has reported what it holds.
fn holder(m: &Machine, slice: (&str, f64, u64), args: &[&str]) -> (std::process::Child, u64) {
    let mut c = m.probe(Some(slice), args);
    let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let held = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("allocated_bytes="))
        .unwrap_or_else(|| panic!("holder said: {line}"))
        .parse()
        .unwrap();
    (child, held)
}

#[test]
fn processes_of_one_slice_share_its_cap_and_a_killed_one_gives_its_memory_back() {
    let m = Machine::new(80 * GIB);
    let slice = ("shared", 0.5, GIB);
    let (mut first, held) = holder(&m, slice, &["oom", "--max", "671088640", "--hold", "60"]);
    assert_eq!(held, 640 * MIB);
    // The second process of the slice gets only what the first left.
    let second = results(m.probe(Some(slice), &["oom"]));
    assert_eq!(num(&second, "allocated_bytes") as u64, GIB - 640 * MIB);
    let info = results(m.probe(Some(slice), &["meminfo"]));
    assert_eq!(num(&info, "free_bytes") as u64, GIB - 640 * MIB);
    // Killed while holding its memory: the slice has all of it again.
    first.kill().unwrap();
    first.wait().unwrap();
    let info = results(m.probe(Some(slice), &["meminfo"]));
    assert_eq!(num(&info, "free_bytes") as u64, GIB);
    let after = results(m.probe(Some(slice), &["oom"]));
    assert_eq!(num(&after, "allocated_bytes") as u64, GIB);
    // Another slice on the same device never saw any of this.
    let other = results(m.probe(Some(("other", 0.5, 2 * GIB)), &["oom"]));
    assert_eq!(num(&other, "allocated_bytes") as u64, 2 * GIB);
}

/// Runs two probes side by side; returns their kernels per second.
fn side_by_side(
    m: &Machine,
    a: (&str, f64, &[&str]),
    b: (&str, f64, &[&str]),
    secs: &str,
) -> (f64, f64) {
    let start = |(name, share, mode): (&str, f64, &[&str])| {
        let mut args = mode.to_vec();
        args.extend(["--seconds", secs]);
        m.probe(Some((name, share, GIB)), &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (start(a), start(b));
    let parse = |c: std::process::Child| {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: HashMap<String, String> = text
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        num(&r, "kernels_per_s")
    };
    (parse(ca), parse(cb))
}

#[test]
fn two_slices_at_30_70_get_30_70_of_device_time_also_through_graphs() {
    let m = Machine::new(80 * GIB);
    let launch: &[&str] = &["launch"];
    for (mode_a, mode_b) in [
        (launch, launch),
        (&["graph"][..], launch),
        (&["launch", "--proc-address", "--ptds"][..], launch),
    ] {
        let (a, b) = side_by_side(&m, ("a", 0.3, mode_a), ("b", 0.7, mode_b), "3");
        let share_a = 100.0 * a / (a + b);
        assert!(
            (25.0..=35.0).contains(&share_a),
            "{mode_a:?} at 30% vs {mode_b:?} at 70%: {share_a:.1}% ({a:.0} vs {b:.0} kernels/s)"
        );
    }
}

#[test]
fn a_lone_slice_that_may_burst_uses_the_idle_device_and_one_that_may_not_keeps_to_its_share() {
    let m = Machine::new(80 * GIB);
    // The probe's kernel is 132 x 256 threads at the simulated driver's default 3 ns each:
    // kernels/s times that is the fraction of the device's time the slice held.
    let kernel_s = 132.0 * 256.0 * 3e-9;
    let whole = num(
        &results(m.probe(None, &["launch", "--seconds", "1"])),
        "kernels_per_s",
    ) * kernel_s;
    // What an unsliced loop holds depends on how busy the host's CPUs are (the simulated
    // device runs on them): the slices are measured against it, not against 1.
    assert!(
        whole > 0.5,
        "an unsliced loop keeps the device only {whole:.2} busy"
    );
    let burst = num(
        &results(m.probe(Some(("burst", 0.3, GIB)), &["launch", "--seconds", "2"])),
        "kernels_per_s",
    ) * kernel_s;
    assert!(
        burst > 0.9 * whole,
        "bursting: the slice held {burst:.2} of the device, unsliced {whole:.2}"
    );
    let mut capped = m.probe(Some(("capped", 0.3, GIB)), &["launch", "--seconds", "3"]);
    capped.env("TESSERA_COMPUTE_BURST", "0");
    let share = 100.0 * num(&results(capped), "kernels_per_s") * kernel_s;
    assert!(
        (25.0..=35.0).contains(&share),
        "not bursting: {share:.1}% of the device"
    );
}

#[test]
fn a_bad_setting_refuses_cuda_with_the_variable_named() {
    let m = Machine::new(8 * GIB);
    for (var, value) in [
        ("TESSERA_COMPUTE_SHARE", "half"),
        ("TESSERA_GPU_MEMORY_BYTES", "20GiB"),
        ("TESSERA_COMPUTE_BURST", "maybe"),
    ] {
        let mut c = m.probe(Some(("bad", 0.5, GIB)), &["oom"]);
        c.env(var, value);
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{var}={value} ran");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{var}={value}")), "{err}");
        assert!(err.contains("fail closed"), "{err}");
        assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    }
    // Preloaded without any slice variables: refused too, never uncapped.
    let mut c = m.probe(Some(("none", 0.5, GIB)), &["oom"]);
    c.env_remove("TESSERA_GPU_MEMORY_BYTES");
    let out = c.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TESSERA_GPU_MEMORY_BYTES is not set"));
}

#[test]
fn a_process_that_never_uses_cuda_runs_as_usual_with_the_library_preloaded() {
    let m = Machine::new(GIB);
    let out = Command::new("sh")
        .args(["-c", "echo plain"])
        .env("LD_PRELOAD", built("libtessera_vgpu.so"))
        .env("LD_LIBRARY_PATH", m.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "plain\n");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
