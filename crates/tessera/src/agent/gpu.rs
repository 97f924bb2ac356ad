//! What a replica on GPUs needs besides its variables: on simulated nodes the simulated driver in
//! front of it, and on fractional slices the interception library with the slice's accounting
//! region, which the agent creates (and removes when the replica is done).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::AgentConfig;
use crate::protocol::{Assignment, RemoteDevice};

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

/// Where a program built with Tessera is: `TESSERA_<VAR>`, else beside the binary (a test's
/// binary is in the build's `deps/`, the programs one level up), else the system location.
fn find_program(var: &str, file: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(var) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let mut candidates = vec![dir.join(file)];
    if dir.file_name().is_some_and(|n| n == "deps")
        && let Some(up) = dir.parent()
    {
        candidates.push(up.join(file));
    }
    candidates.push(Path::new("/usr/lib/tessera").join(file));
    candidates.into_iter().find(|p| p.is_file())
}

/// The directory of this agent's GPU state: simulated devices, slice regions, device schedules.
fn gpu_dir(config: &AgentConfig) -> PathBuf {
    config.data_dir.join("gpu")
}

/// A replica's slice accounting region.
pub fn slice_region(config: &AgentConfig, key: &str) -> PathBuf {
    gpu_dir(config).join(format!("slice-{key}"))
}

/// How a replica's devices reach its program: one implementation per kind of device access.
/// The agent picks one per replica ([`backend_for`]). What differs between the node's own
/// NVIDIA driver, the simulated driver and a device attached from another node lives here; another
/// accelerator would be one more implementation.
pub trait DeviceBackend {
    /// Shown in logs.
    fn name(&self) -> &'static str;
    /// The variables that select the replica's devices among the node's (none at all for a
    /// replica without devices: it must see none).
    fn select(&self, a: &Assignment) -> BTreeMap<String, String> {
        let devices: Vec<String> = a.devices.iter().map(|d| d.device.to_string()).collect();
        BTreeMap::from([("CUDA_VISIBLE_DEVICES".to_string(), devices.join(","))])
    }
    /// The driver the program loads instead of the node's own, and its variables; nothing for
    /// the node's own driver. `dir` is the agent's GPU state directory.
    fn driver(
        &self,
        config: &AgentConfig,
        dir: &Path,
        a: &Assignment,
    ) -> anyhow::Result<BTreeMap<String, String>>;
    /// Whether a fractional slice is enforced in the replica's own processes (the slice library
    /// preloaded); false where the device's own node enforces it.
    fn slices_here(&self) -> bool {
        true
    }
}

/// The node's own NVIDIA driver (devices from NVML).
struct NodeDriver;

impl DeviceBackend for NodeDriver {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn driver(
        &self,
        _: &AgentConfig,
        _: &Path,
        _: &Assignment,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(BTreeMap::new())
    }
}

/// The simulated driver (`--simulate-gpus`), shared by every replica of the node.
struct SimulatedDriver;

impl DeviceBackend for SimulatedDriver {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn driver(
        &self,
        config: &AgentConfig,
        dir: &Path,
        _: &Assignment,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut env = BTreeMap::new();
        let Some(lib) = find_library("TESSERA_FAKECUDA_LIBRARY", "libcuda.so") else {
            tracing::warn!(
                "the simulated CUDA driver (libcuda.so of tessera-fakecuda) was not found beside \
                 tessera; workloads on simulated GPUs get no driver"
            );
            return Ok(env);
        };
        // The simulated driver also answers NVML's memory calls.
        env.insert(
            "LD_LIBRARY_PATH".into(),
            link_driver(&dir.join("lib"), &lib)?,
        );
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
        Ok(env)
    }
}

/// A device attached from another node: the remote client (`libtessera_remote_cuda.so`) is the
/// program's `libcuda.so.1` and `libnvidia-ml.so.1`; the slice is enforced on the device's node,
/// by the server running there under the slice library.
struct RemoteClient<'a>(&'a RemoteDevice);

impl DeviceBackend for RemoteClient<'_> {
    fn name(&self) -> &'static str {
        "remote"
    }

    /// The device's indices are the other node's: the client has exactly one device.
    fn select(&self, _: &Assignment) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn driver(
        &self,
        _: &AgentConfig,
        dir: &Path,
        a: &Assignment,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let Some(lib) = find_library("TESSERA_REMOTE_CUDA_LIBRARY", "libtessera_remote_cuda.so")
        else {
            bail!(
                "the remote GPU client libtessera_remote_cuda.so is not beside tessera nor in \
                 /usr/lib/tessera (set TESSERA_REMOTE_CUDA_LIBRARY); a replica with a remote GPU \
                 cannot start without it"
            );
        };
        let secret = remote_secret(dir, &a.key);
        write_private(&secret, self.0.secret.as_bytes())?;
        let lost = remote_lost(dir, &a.key);
        write_private(&lost, b"")?;
        Ok(BTreeMap::from([
            (
                "LD_LIBRARY_PATH".to_string(),
                link_driver(&dir.join("lib-remote"), &lib)?,
            ),
            ("TESSERA_REMOTE_GPU".to_string(), self.0.address.clone()),
            (
                "TESSERA_REMOTE_SECRET_FILE".to_string(),
                secret.display().to_string(),
            ),
            (
                "TESSERA_REMOTE_LOST_FILE".to_string(),
                lost.display().to_string(),
            ),
        ]))
    }

    fn slices_here(&self) -> bool {
        false
    }
}

/// The backend for `a` on this node.
pub fn backend_for<'a>(config: &AgentConfig, a: &'a Assignment) -> Box<dyn DeviceBackend + 'a> {
    match &a.remote_device {
        Some(remote) => Box::new(RemoteClient(remote)),
        None if config.devices.simulated => Box::new(SimulatedDriver),
        None => Box::new(NodeDriver),
    }
}

/// Where a replica's remote attachment secret is kept on this node (0600, the replica's uid).
pub fn remote_secret(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("remote-{key}.secret"))
}

/// Where the remote client of a replica on this node writes that it lost its GPU server (empty
/// until then; the replica's own, 0600).
pub fn remote_lost(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("remote-{key}.lost"))
}

/// The file that says a replica's remote device was lost, when it runs attached to one.
pub fn lost_device_file(config: &AgentConfig, a: &Assignment) -> Option<PathBuf> {
    a.remote_device
        .as_ref()
        .map(|_| remote_lost(&gpu_dir(config), &a.key))
}

/// What the agent keeps for a replica's devices, removed when the replica is done.
pub fn forget(config: &AgentConfig, key: &str) {
    let _ = std::fs::remove_file(slice_region(config, key));
    let _ = std::fs::remove_file(remote_secret(&gpu_dir(config), key));
    let _ = std::fs::remove_file(remote_lost(&gpu_dir(config), key));
}

/// Writes `data` to a new file only its owner may read.
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}

/// Links `lib` as `libcuda.so.1` and `libnvidia-ml.so.1` in `libdir`; the library path that puts
/// them first.
fn link_driver(libdir: &Path, lib: &Path) -> anyhow::Result<String> {
    crate::controller::restrict(libdir, 0o755)?;
    for name in ["libcuda.so.1", "libnvidia-ml.so.1"] {
        let link = libdir.join(name);
        if std::fs::read_link(&link).ok().as_deref() != Some(lib) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(lib, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    let mut path = libdir.display().to_string();
    if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
        path = format!("{path}:{old}");
    }
    Ok(path)
}

/// What the replica runs: the job's command, or for the device half of a remote attachment the
/// GPU server, listening where the controller said with the attachment's secret (written 0600
/// for the replica's uid, and named in the environment so that confinement binds it in).
pub fn command(
    config: &AgentConfig,
    a: &Assignment,
    env: &mut BTreeMap<String, String>,
) -> anyhow::Result<Vec<String>> {
    let Some(serve) = &a.serves_device else {
        return Ok(a.command.clone());
    };
    if a.image.is_some() {
        bail!(
            "{}: a device server runs from the node, never in an image",
            a.key
        );
    }
    // The server is tessera itself (`tessera remote-gpu serve`): the agent's own program, or
    // beside a test's binary.
    let Some(server) = find_program("TESSERA_PROGRAM", "tessera") else {
        bail!(
            "the tessera program is not beside this one nor in /usr/lib/tessera (set \
             TESSERA_PROGRAM); this node cannot serve a remote attachment without it"
        );
    };
    let dir = gpu_dir(config);
    crate::controller::restrict(&dir, 0o711)?;
    let secret = remote_secret(&dir, &a.key);
    write_private(&secret, serve.secret.as_bytes())?;
    env.insert(
        "TESSERA_REMOTE_SECRET_FILE".into(),
        secret.display().to_string(),
    );
    Ok(vec![
        server.display().to_string(),
        "remote-gpu".into(),
        "serve".into(),
        "--listen".into(),
        serve.address.clone(),
        "--secret-file".into(),
        secret.display().to_string(),
        // Goes with its shim: a lost agent or a stopped replica never leaves the slice held.
        "--die-with-parent".into(),
    ])
}

/// The environment that selects the replica's devices and puts its driver (the simulated one,
/// the remote client) and the slice library in front of it, creating the slice's accounting
/// region. An error when a fractional slice cannot be enforced: the replica must not run
/// uncapped.
pub fn device_env(
    config: &AgentConfig,
    a: &Assignment,
) -> anyhow::Result<BTreeMap<String, String>> {
    let backend = backend_for(config, a);
    let mut env = backend.select(a);
    let Some(first) = a.devices.first() else {
        return Ok(env);
    };
    let dir = gpu_dir(config);
    // Passable, not listable, by workloads (the agent's umask makes new directories private).
    crate::controller::restrict(&dir, 0o711)?;
    env.extend(backend.driver(config, &dir, a)?);
    if first.milli < 1000 && backend.slices_here() {
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
    tracing::debug!("{}: devices through the {} backend", a.key, backend.name());
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
    for (var, dir) in [
        ("TESSERA_FAKECUDA_DIR", "lib"),
        ("TESSERA_REMOTE_GPU", "lib-remote"),
    ] {
        if env.contains_key(var)
            && let Ok(entries) = std::fs::read_dir(gpu_dir(config).join(dir))
        {
            out.extend(
                entries
                    .flatten()
                    .filter_map(|e| std::fs::canonicalize(e.path()).ok())
                    .filter(|p| p.is_file()),
            );
        }
    }
    for var in ["TESSERA_REMOTE_SECRET_FILE", "TESSERA_REMOTE_LOST_FILE"] {
        if let Some(file) = env.get(var) {
            out.push(PathBuf::from(file));
        }
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
    if env.contains_key("TESSERA_REMOTE_GPU") {
        paths.push(dir.join("lib-remote"));
    }
    for var in ["TESSERA_REMOTE_SECRET_FILE", "TESSERA_REMOTE_LOST_FILE"] {
        if let Some(file) = env.get(var).map(PathBuf::from) {
            // The replica's own, readable (and the second writable) by it alone.
            std::os::unix::fs::chown(&file, Some(uid), Some(uid))?;
            shared(&file, 0o600)?;
            paths.push(file);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;

    /// A program or library the workspace builds, beside this test's directory.
    fn built(file: &str) -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let deps = exe.parent().unwrap();
        [deps.parent().unwrap().join(file), deps.join(file)]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{file} is not built: run the workspace's tests"))
    }

    /// Starts a GPU server; it and the address it listens on.
    fn serving(mut c: std::process::Command) -> (std::process::Child, String) {
        let mut server = c
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_string();
        (server, address)
    }

    fn config(data_dir: &Path) -> AgentConfig {
        AgentConfig {
            controller: "https://127.0.0.1:1".into(),
            join_token: None,
            name: "cpu-node".into(),
            data_dir: data_dir.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            devices: crate::agent::devices::parse_simulated("1xH100-80GB").unwrap(),
            labels: BTreeMap::new(),
            cpu_milli: None,
            memory_bytes: None,
            grace_ms: 1000,
            telemetry_ms: 1000,
            ca_cert: None,
            transparent: None,
            confinement: crate::agent::confine::Mode::Unconfined {
                why: "a test".into(),
            },
            transparent_unconfined: false,
            hide: vec![],
            pids_max: 1000,
            keep_runs: std::time::Duration::from_secs(60),
            image_cache: 1 << 30,
            image_reserve: None,
            insecure_registries: vec![],
            runc: PathBuf::from("runc"),
            image_criu: None,
            gpu_driver: None,
            python_dir: None,
        }
    }

    #[test]
    fn the_device_half_runs_the_server_under_the_slice_library() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let secret = "an-attachment-secret-of-the-controller";
        let mut a = assignment(500, None);
        a.serves_device = Some(RemoteDevice {
            address: "127.0.0.1:0".into(),
            secret: secret.into(),
        });
        // What the agent gives the replica: its allocation's and its devices' environment (the
        // slice library's settings are the allocation's), then its command.
        let mut env = crate::agent::allocation_env(&a, "gpu-node");
        env.extend(device_env(&config, &a).unwrap());
        let command = command(&config, &a, &mut env).unwrap();
        assert!(command[0].ends_with("tessera"), "{command:?}");
        assert_eq!(command[1..3], ["remote-gpu", "serve"], "{command:?}");
        assert!(env["LD_PRELOAD"].ends_with("libtessera_vgpu.so"), "{env:?}");
        let mut server = std::process::Command::new(&command[0]);
        server
            .args(&command[1..])
            .env_remove("CUDA_VISIBLE_DEVICES")
            .envs(&env);
        let (mut server, address) = serving(server);

        // The replica on the other node, as the agent there sets it up.
        let client_config = super::tests::config(&dir.path().join("cpu-node"));
        std::fs::create_dir_all(&client_config.data_dir).unwrap();
        let user = assignment(
            500,
            Some(RemoteDevice {
                address,
                secret: secret.into(),
            }),
        );
        let client_env = device_env(&client_config, &user).unwrap();
        let probe = |mode: &str| {
            std::process::Command::new(built("tessera-vgpu-probe"))
                .arg(mode)
                .env_remove("LD_PRELOAD")
                .env_remove("CUDA_VISIBLE_DEVICES")
                .envs(&client_env)
                .output()
                .unwrap()
        };
        let meminfo = probe("meminfo");
        let check = probe("check");
        let _ = server.kill();
        let _ = server.wait();
        // The slice's memory is what the remote program sees: the server runs in the slice.
        let stdout = String::from_utf8_lossy(&meminfo.stdout);
        assert!(
            stdout.contains(&format!("total_bytes={}", 1u64 << 30)),
            "{stdout}{}",
            String::from_utf8_lossy(&meminfo.stderr)
        );
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(
            stdout.contains("fill_ok=1 memset_ok=1 copy_ok=1"),
            "{stdout}"
        );
        // A device server never runs an image.
        a.image = Some(crate::protocol::ImageRun {
            reference: "busybox".into(),
            credentials: None,
        });
        assert!(command_err(&config, &a).contains("never in an image"));
    }

    fn command_err(config: &AgentConfig, a: &Assignment) -> String {
        command(config, a, &mut BTreeMap::new())
            .unwrap_err()
            .to_string()
    }

    fn assignment(milli: u32, remote: Option<RemoteDevice>) -> Assignment {
        let mut a: Assignment = serde_json::from_value(serde_json::json!({
            "key": "7-0", "job_id": 7, "job_name": "j", "project": "p", "replica": 0,
            "replicas": 1, "attempt": 0, "command": ["true"], "env": {}, "cpu_milli": 1000,
            "memory_bytes": 1 << 30, "device_memory": [80u64 << 30],
            "devices": if milli == 0 { serde_json::json!([]) } else {
                serde_json::json!([{"device": 0, "milli": milli, "memory_bytes": 1u64 << 30}])
            },
        }))
        .unwrap();
        a.remote_device = remote;
        a
    }

    #[test]
    fn local_backends_select_devices_and_preload_the_slice_library() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let env = device_env(&config, &assignment(500, None)).unwrap();
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "0");
        assert!(env["LD_PRELOAD"].ends_with("libtessera_vgpu.so"), "{env:?}");
        assert!(env.contains_key("TESSERA_FAKECUDA_DIR"), "{env:?}");
        // A replica without devices sees none.
        let env = device_env(&config, &assignment(0, None)).unwrap();
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "");
        assert_eq!(
            backend_for(&config, &assignment(0, None)).name(),
            "simulated"
        );
    }

    #[test]
    fn a_remote_device_puts_the_client_in_front_of_an_unmodified_program() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir.path().join("agent"));
        std::fs::create_dir_all(&config.data_dir).unwrap();
        // The GPU node: a server over the simulated driver, on loopback.
        let gpu = dir.path().join("gpu-node");
        std::fs::create_dir_all(&gpu).unwrap();
        std::os::unix::fs::symlink(built("libcuda.so"), gpu.join("libcuda.so.1")).unwrap();
        let secret = "an-attachment-secret-of-the-controller";
        std::fs::write(gpu.join("secret"), secret).unwrap();
        let mut server = std::process::Command::new(built("tessera"));
        server
            .args([
                "remote-gpu",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--secret-file",
            ])
            .arg(gpu.join("secret"))
            .env("LD_LIBRARY_PATH", &gpu)
            .env("TESSERA_FAKECUDA_DIR", gpu.join("devices"))
            .env_remove("LD_PRELOAD");
        let (mut server, address) = serving(server);

        let a = assignment(
            500,
            Some(RemoteDevice {
                address: address.clone(),
                secret: secret.into(),
            }),
        );
        assert_eq!(backend_for(&config, &a).name(), "remote");
        let env = device_env(&config, &a).unwrap();
        // The slice is enforced on the GPU node; here nothing is preloaded and no index of the
        // other node's devices leaks into the program's view.
        assert!(!env.contains_key("LD_PRELOAD"), "{env:?}");
        assert!(!env.contains_key("CUDA_VISIBLE_DEVICES"), "{env:?}");
        assert_eq!(env["TESSERA_REMOTE_GPU"], address);
        let secret_file = PathBuf::from(&env["TESSERA_REMOTE_SECRET_FILE"]);
        assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
        let mode = std::fs::metadata(&secret_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let libdir = env["LD_LIBRARY_PATH"]
            .split(':')
            .next()
            .unwrap()
            .to_string();
        let target = std::fs::read_link(Path::new(&libdir).join("libcuda.so.1")).unwrap();
        assert!(target.ends_with("libtessera_remote_cuda.so"), "{target:?}");
        assert!(
            library_files(&config, &env).contains(&secret_file),
            "a container would not see its secret"
        );

        // An unmodified program with that environment runs on the other node's device.
        let out = std::process::Command::new(built("tessera-vgpu-probe"))
            .arg("check")
            .env_remove("LD_PRELOAD")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .envs(&env)
            .output()
            .unwrap();
        let _ = server.kill();
        let _ = server.wait();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("fill_ok=1 memset_ok=1 copy_ok=1"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );

        forget(&config, &a.key);
        assert!(!secret_file.exists(), "the secret outlived its replica");
    }
}
