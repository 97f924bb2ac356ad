//! What a replica on GPUs needs besides its variables: on simulated nodes the simulated driver in
//! front of it, and on fractional slices the interception library with the slice's accounting
//! region, which the agent creates (and removes when the replica is done).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::AgentConfig;
use crate::protocol::Assignment;

/// Where a library built with Tessera is: `TESSERA_<VAR>`, else the newest of: beside the
/// binary, in the build's `deps/` (a cargo build keeps the copy there current, while the one
/// beside the binary is only refreshed when its package is built by name), and the system
/// location.
fn find_library(var: &str, file: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(var) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join(file),
        dir.join("deps").join(file),
        Path::new("/usr/lib/tessera").join(file),
    ]
    .into_iter()
    .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
    .max_by_key(|(modified, _)| *modified)
    .map(|(_, p)| p)
}

/// The directory of this agent's GPU state: simulated devices, slice regions, device schedules.
fn gpu_dir(config: &AgentConfig) -> PathBuf {
    config.data_dir.join("gpu")
}

/// A replica's slice accounting region.
pub fn slice_region(config: &AgentConfig, key: &str) -> PathBuf {
    gpu_dir(config).join(format!("slice-{key}"))
}

/// The environment that puts the simulated driver and the slice library in front of the
/// replica, creating the slice's accounting region. An error when a fractional slice cannot be
/// enforced: the replica must not run uncapped.
pub fn device_env(
    config: &AgentConfig,
    a: &Assignment,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    let Some(first) = a.devices.first() else {
        return Ok(env);
    };
    let dir = gpu_dir(config);
    // Passable, not listable, by workloads (the agent's umask makes new directories private).
    crate::controller::restrict(&dir, 0o711)?;
    if config.devices.simulated {
        match find_library("TESSERA_FAKECUDA_LIBRARY", "libcuda.so") {
            Some(lib) => {
                let libdir = dir.join("lib");
                crate::controller::restrict(&libdir, 0o755)?;
                // The simulated driver also answers NVML's memory calls.
                for name in ["libcuda.so.1", "libnvidia-ml.so.1"] {
                    let link = libdir.join(name);
                    if std::fs::read_link(&link).ok().as_deref() != Some(lib.as_path()) {
                        let _ = std::fs::remove_file(&link);
                        std::os::unix::fs::symlink(&lib, &link)
                            .with_context(|| format!("linking {}", link.display()))?;
                    }
                }
                let mut path = libdir.display().to_string();
                if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
                    path = format!("{path}:{old}");
                }
                env.insert("LD_LIBRARY_PATH".into(), path);
                env.insert(
                    "TESSERA_FAKECUDA_DIR".into(),
                    dir.join("simulated").display().to_string(),
                );
                env.insert(
                    "TESSERA_FAKECUDA_DEVICES".into(),
                    config.devices.devices.len().to_string(),
                );
                if let Some(d) = config.devices.devices.first() {
                    env.insert("TESSERA_FAKECUDA_MEMORY".into(), d.memory_bytes.to_string());
                    env.insert(
                        "TESSERA_FAKECUDA_NAME".into(),
                        format!("Tessera Simulated {}", d.model),
                    );
                }
            }
            None => tracing::warn!(
                "the simulated CUDA driver (libcuda.so of tessera-fakecuda) was not found beside \
                 tessera; workloads on simulated GPUs get no driver"
            ),
        }
    }
    if first.milli < 1000 {
        let Some(lib) = find_library("TESSERA_VGPU_LIBRARY", "libtessera_vgpu.so") else {
            bail!(
                "the slice library libtessera_vgpu.so is not beside tessera nor in \
                 /usr/lib/tessera (set TESSERA_VGPU_LIBRARY); a fractional slice is not run \
                 unenforced"
            );
        };
        let region = slice_region(config, &a.key);
        tessera_shm::Region::open_or_create(&region, first.memory_bytes)
            .with_context(|| format!("creating the slice region {}", region.display()))?;
        let mut preload = lib.display().to_string();
        if let Some(old) = a.env.get("LD_PRELOAD") {
            preload = format!("{preload}:{old}");
        }
        env.insert("LD_PRELOAD".into(), preload);
        env.insert("TESSERA_VGPU_SHM".into(), region.display().to_string());
        env.insert(
            "TESSERA_VGPU_DEVICE_SHM".into(),
            dir.join(format!("schedule-gpu{}", first.device))
                .display()
                .to_string(),
        );
    }
    Ok(env)
}

/// The library files a replica's GPU environment loads (the slice library it preloads, the
/// simulated driver behind the links of the agent's library dir): an image's container has them
/// bound in at the same path, as the NVIDIA container toolkit binds the driver's libraries.
pub fn library_files(config: &AgentConfig, env: &BTreeMap<String, String>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = env
        .get("LD_PRELOAD")
        .into_iter()
        .flat_map(|p| p.split(':'))
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_file())
        .collect();
    if env.contains_key("TESSERA_FAKECUDA_DIR")
        && let Ok(entries) = std::fs::read_dir(gpu_dir(config).join("lib"))
    {
        out.extend(
            entries
                .flatten()
                .filter_map(|e| std::fs::canonicalize(e.path()).ok())
                .filter(|p| p.is_file()),
        );
    }
    out.sort();
    out.dedup();
    out
}

/// What a confined replica must reach of the agent's GPU state (bound into its view of the data
/// dir), made usable by its uid: the simulated driver's links and devices, its slice region and
/// its device's schedule. The shared files are created here, before the replica runs, since its
/// view of the data dir is read-only.
pub fn confined_paths(
    config: &AgentConfig,
    env: &BTreeMap<String, String>,
    uid: u32,
) -> anyhow::Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let shared = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("opening {} to workloads", p.display()))
    };
    let mut paths = Vec::new();
    let dir = gpu_dir(config);
    if let Some(sim) = env.get("TESSERA_FAKECUDA_DIR").map(PathBuf::from) {
        crate::controller::restrict(&sim, 0o711)?;
        let memory = config.devices.devices.first().map_or(0, |d| d.memory_bytes);
        for i in 0..config.devices.devices.len() {
            let device = sim.join(format!("device{i}"));
            tessera_shm::Region::open_or_create(&device, memory)?;
            shared(&device, 0o666)?;
        }
        paths.push(sim);
        paths.push(dir.join("lib"));
    }
    if let Some(region) = env.get("TESSERA_VGPU_SHM").map(PathBuf::from) {
        std::os::unix::fs::chown(&region, Some(uid), Some(uid))?;
        shared(&region, 0o600)?;
        paths.push(region);
    }
    if let Some(schedule) = env.get("TESSERA_VGPU_DEVICE_SHM").map(PathBuf::from) {
        tessera_shm::Schedule::open_or_create(&schedule)?;
        shared(&schedule, 0o666)?;
        paths.push(schedule);
    }
    Ok(paths)
}
