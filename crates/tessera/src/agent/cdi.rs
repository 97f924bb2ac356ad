//! The node's NVIDIA driver as a CDI spec (the Container Device Interface that containerd, CRI-O,
//! Podman and the NVIDIA container toolkit read), and its edits applied to an image job's
//! container: what the toolkit does, without its hooks.
//!
//! At start an agent on real GPUs finds, under the driver's root (`/`), each device's node
//! (`/dev/nvidiaN`), the nodes every device needs (`nvidiactl`, `nvidia-uvm`, …), the driver's
//! user-space libraries (`libcuda.so.1`, `libnvidia-ml.so.1`, …, by their sonames) and
//! `nvidia-smi`, and writes the spec to `<data dir>/cdi/tessera.io-gpu.json` (an admin may link it
//! into `/etc/cdi` for other runtimes). A replica's container then gets only its own devices'
//! nodes (and the device cgroup rules that let it open them), the common nodes, and the libraries
//! bound read-only at `/usr/local/nvidia/lib64` with `nvidia-smi` in `/usr/local/nvidia/bin`,
//! where CUDA images (`nvidia/cuda`, `pytorch/pytorch`) already look (their `LD_LIBRARY_PATH`
//! names it; the agent prepends it in case an image does not). Libraries are bound under their
//! sonames, so no symlink hook is needed. Nothing of the host is bound for devices the replica
//! was not given.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The CDI kind of Tessera's spec (`vendor/class`).
pub const KIND: &str = "tessera.io/gpu";
/// The CDI version the spec is written in.
pub const CDI_VERSION: &str = "0.6.0";
/// Where the container finds the driver's libraries and tools.
pub const LIB_DIR: &str = "/usr/local/nvidia/lib64";
pub const BIN_DIR: &str = "/usr/local/nvidia/bin";

/// Nodes every GPU container needs (those the host has).
const COMMON_NODES: &[&str] = &[
    "nvidiactl",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-modeset",
];

/// The driver's user-space libraries a CUDA or NVML program loads, by soname (the toolkit's
/// "compute" and "utility" capabilities).
const LIBRARIES: &[&str] = &[
    "libcuda.so.1",
    "libnvidia-ml.so.1",
    "libnvidia-ptxjitcompiler.so.1",
    "libnvidia-nvvm.so.4",
    "libcudadebugger.so.1",
    "libnvidia-opencl.so.1",
    "libnvidia-cfg.so.1",
    "libnvidia-allocator.so.1",
];

const BINARIES: &[&str] = &["nvidia-smi", "nvidia-debugdump"];

/// Where distributions put the driver's libraries, under the driver's root.
const LIBRARY_DIRS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "lib/x86_64-linux-gnu",
    "lib64",
];

const BINARY_DIRS: &[&str] = &["usr/bin", "usr/sbin", "bin"];

/// A CDI spec (the fields Tessera writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<Device>,
    pub container_edits: Edits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// The device's index on the node, as assignments name it.
    pub name: String,
    pub container_edits: Edits,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    /// In the container.
    pub path: String,
    /// On the host (when it differs: a driver root other than `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub major: i64,
    pub minor: i64,
    pub permissions: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    pub options: Vec<String>,
}

/// A character device's node, or why `path` is not one.
fn node(root: &Path, name: &str) -> anyhow::Result<DeviceNode> {
    use std::os::unix::fs::MetadataExt;
    let host = root.join("dev").join(name);
    let meta = std::fs::metadata(&host).with_context(|| format!("{}", host.display()))?;
    if !meta.file_type().is_char_device() {
        bail!("{} is not a character device", host.display());
    }
    let rdev = meta.rdev();
    let container = format!("/dev/{name}");
    Ok(DeviceNode {
        host_path: (host != Path::new(&container)).then(|| host.display().to_string()),
        path: container,
        kind: "c".into(),
        major: nix::sys::stat::major(rdev) as i64,
        minor: nix::sys::stat::minor(rdev) as i64,
        permissions: "rw".into(),
    })
}

fn find_in(root: &Path, dirs: &[&str], name: &str) -> Option<PathBuf> {
    dirs.iter()
        .map(|d| root.join(d).join(name))
        .find(|p| p.exists())
        // The file itself, not the soname's link: a bind mount of a link would follow it anyway,
        // and the spec should say what is bound.
        .and_then(|p| std::fs::canonicalize(p).ok())
}

fn read_only(host: &Path, container: String) -> Mount {
    Mount {
        host_path: host.display().to_string(),
        container_path: container,
        options: ["ro", "nosuid", "nodev", "bind"].map(String::from).to_vec(),
    }
}

/// Describes the driver under `root` for `devices` GPUs. An error names what is missing: a node
/// whose driver cannot be described runs no GPU image job (it would fail inside, with a CUDA error
/// far from the cause).
pub fn discover(root: &Path, devices: usize) -> anyhow::Result<Spec> {
    let mut spec = Spec {
        cdi_version: CDI_VERSION.into(),
        kind: KIND.into(),
        devices: Vec::with_capacity(devices),
        container_edits: Edits::default(),
    };
    for i in 0..devices {
        let n =
            node(root, &format!("nvidia{i}")).with_context(|| format!("GPU {i}'s device node"))?;
        spec.devices.push(Device {
            name: i.to_string(),
            container_edits: Edits {
                device_nodes: vec![n],
                ..Edits::default()
            },
        });
    }
    let common = &mut spec.container_edits;
    common
        .device_nodes
        .push(node(root, "nvidiactl").context("the driver's control node")?);
    common
        .device_nodes
        .extend(COMMON_NODES[1..].iter().filter_map(|n| node(root, n).ok()));
    for lib in LIBRARIES {
        if let Some(host) = find_in(root, LIBRARY_DIRS, lib) {
            common
                .mounts
                .push(read_only(&host, format!("{LIB_DIR}/{lib}")));
        }
    }
    if !common
        .mounts
        .iter()
        .any(|m| m.container_path.ends_with("/libcuda.so.1"))
    {
        bail!(
            "the driver's libcuda.so.1 is in none of {} under {}",
            LIBRARY_DIRS.join(", "),
            root.display()
        );
    }
    for bin in BINARIES {
        if let Some(host) = find_in(root, BINARY_DIRS, bin) {
            common
                .mounts
                .push(read_only(&host, format!("{BIN_DIR}/{bin}")));
        }
    }
    Ok(spec)
}

/// Writes the spec where the agent keeps it (and other runtimes may read it).
pub fn write(spec: &Spec, data_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("cdi");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tessera.io-gpu.json");
    crate::controller::write_file(&path, &serde_json::to_string_pretty(spec)?, false)?;
    Ok(path)
}

/// The edits for a replica given `devices` (indices on the node): the common ones and each
/// device's own. An unknown index is an error (the assignment names a device the node lacks).
pub fn edits_for(spec: &Spec, devices: &[u32]) -> anyhow::Result<Edits> {
    let mut out = spec.container_edits.clone();
    for d in devices {
        let device = spec
            .devices
            .iter()
            .find(|x| x.name == d.to_string())
            .with_context(|| {
                format!(
                    "the assignment names GPU {d}, which this node's driver spec lacks ({} devices)",
                    spec.devices.len()
                )
            })?;
        out.device_nodes
            .extend(device.container_edits.device_nodes.iter().cloned());
        out.mounts
            .extend(device.container_edits.mounts.iter().cloned());
        out.env.extend(device.container_edits.env.iter().cloned());
    }
    Ok(out)
}

/// Applies `edits` to a container's OCI spec: its device nodes (and the device cgroup rules to
/// open them), its bind mounts, the library and tool directories on the search paths.
pub fn apply(edits: &Edits, oci: &mut oci_spec::runtime::Spec) -> anyhow::Result<()> {
    use oci_spec::runtime::{
        LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, MountBuilder,
    };
    let mut linux = oci.linux().clone().unwrap_or_default();
    let mut nodes = linux.devices().clone().unwrap_or_default();
    let mut resources = linux.resources().clone().unwrap_or_default();
    let mut rules = resources.devices().clone().unwrap_or_default();
    for n in &edits.device_nodes {
        nodes.push(
            LinuxDeviceBuilder::default()
                .path(PathBuf::from(&n.path))
                .typ(LinuxDeviceType::C)
                .major(n.major)
                .minor(n.minor)
                .file_mode(0o666u32)
                .build()?,
        );
        rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .major(n.major)
                .minor(n.minor)
                .access("rwm")
                .build()?,
        );
    }
    resources.set_devices(Some(rules));
    linux
        .set_devices(Some(nodes))
        .set_resources(Some(resources));
    oci.set_linux(Some(linux));
    let mut mounts = oci.mounts().clone().unwrap_or_default();
    for m in &edits.mounts {
        mounts.push(
            MountBuilder::default()
                .destination(&m.container_path)
                .typ("bind")
                .source(&m.host_path)
                .options(m.options.clone())
                .build()?,
        );
    }
    oci.set_mounts(Some(mounts));
    if let Some(process) = oci.process_mut() {
        let mut env = process.env().clone().unwrap_or_default();
        let prepend = |env: &mut Vec<String>, key: &str, dir: &str| match env
            .iter_mut()
            .find(|e| e.starts_with(&format!("{key}=")))
        {
            Some(e) => {
                let old = e[key.len() + 1..].to_string();
                if !old.split(':').any(|p| p == dir) {
                    *e = format!("{key}={dir}:{old}");
                }
            }
            None => env.push(format!("{key}={dir}")),
        };
        prepend(&mut env, "LD_LIBRARY_PATH", LIB_DIR);
        prepend(&mut env, "PATH", BIN_DIR);
        env.extend(edits.env.iter().cloned());
        process.set_env(Some(env));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver root like a GPU host's, with real character devices (those of /dev/null,
    /// /dev/zero and /dev/full stand in for the GPUs' and the control node).
    fn fake_driver(gpus: u32) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("dev");
        std::fs::create_dir(&dev).unwrap();
        let mknod = |name: &str, major: u64, minor: u64| {
            nix::sys::stat::mknod(
                &dev.join(name),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(major, minor),
            )
            .expect("mknod (the tests run as root)");
        };
        for i in 0..gpus {
            mknod(&format!("nvidia{i}"), 1, [3, 5][i as usize % 2]);
        }
        mknod("nvidiactl", 1, 7);
        let lib = root.path().join("usr/lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&lib).unwrap();
        for (file, soname) in [
            ("libcuda.so.580.95.05", "libcuda.so.1"),
            ("libnvidia-ml.so.580.95.05", "libnvidia-ml.so.1"),
        ] {
            std::fs::write(lib.join(file), b"\x7fELF").unwrap();
            std::os::unix::fs::symlink(file, lib.join(soname)).unwrap();
        }
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("nvidia-smi"), b"#!/bin/sh\n").unwrap();
        root
    }

    #[test]
    fn the_driver_is_described_with_each_devices_node_and_the_shared_libraries_by_soname() {
        let root = fake_driver(2);
        let spec = discover(root.path(), 2).unwrap();
        assert_eq!(
            (spec.kind.as_str(), spec.cdi_version.as_str()),
            (KIND, CDI_VERSION)
        );
        assert_eq!(spec.devices.len(), 2);
        let gpu1 = &spec.devices[1].container_edits.device_nodes[0];
        assert_eq!(
            (gpu1.path.as_str(), gpu1.major, gpu1.minor),
            ("/dev/nvidia1", 1, 5)
        );
        assert_eq!(
            gpu1.host_path.as_deref(),
            Some(root.path().join("dev/nvidia1").to_str().unwrap())
        );
        let common = &spec.container_edits;
        assert_eq!(common.device_nodes.len(), 1, "only the nodes the host has");
        let cuda = common
            .mounts
            .iter()
            .find(|m| m.container_path == "/usr/local/nvidia/lib64/libcuda.so.1")
            .unwrap();
        assert!(cuda.host_path.ends_with("libcuda.so.580.95.05"), "{cuda:?}");
        assert!(cuda.options.contains(&"ro".to_string()));
        assert!(
            common
                .mounts
                .iter()
                .any(|m| m.container_path == "/usr/local/nvidia/bin/nvidia-smi")
        );
        // It is the JSON other runtimes read.
        let text = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            text["devices"][0]["containerEdits"]["deviceNodes"][0]["type"],
            "c"
        );
        assert!(text["containerEdits"]["mounts"][0]["containerPath"].is_string());

        // A driver that is not all there is refused with what is missing.
        let e = discover(root.path(), 3).unwrap_err();
        assert!(format!("{e:#}").contains("GPU 2's device node"), "{e:#}");
        std::fs::remove_file(root.path().join("usr/lib/x86_64-linux-gnu/libcuda.so.1")).unwrap();
        let e = discover(root.path(), 2).unwrap_err();
        assert!(format!("{e:#}").contains("libcuda.so.1"), "{e:#}");
    }

    #[test]
    fn a_replica_gets_its_own_devices_only_with_the_rules_to_open_them() {
        let root = fake_driver(2);
        let spec = discover(root.path(), 2).unwrap();
        let edits = edits_for(&spec, &[1]).unwrap();
        let paths: Vec<&str> = edits.device_nodes.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(paths, ["/dev/nvidiactl", "/dev/nvidia1"]);
        assert!(format!("{:#}", edits_for(&spec, &[7]).unwrap_err()).contains("GPU 7"));

        let mut oci = oci_spec::runtime::Spec::default();
        let mut process = oci.process().clone().unwrap();
        process.set_env(Some(vec![
            "LD_LIBRARY_PATH=/opt/lib".into(),
            "PATH=/bin".into(),
        ]));
        oci.set_process(Some(process));
        apply(&edits, &mut oci).unwrap();
        let v = serde_json::to_value(&oci).unwrap();
        let devices: Vec<&str> = v["linux"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        assert_eq!(devices, ["/dev/nvidiactl", "/dev/nvidia1"]);
        let rules = v["linux"]["resources"]["devices"].as_array().unwrap();
        assert!(
            rules.iter().any(|r| r["allow"] == true
                && r["major"] == 1
                && r["minor"] == 5
                && r["access"] == "rwm"),
            "{rules:?}"
        );
        assert!(
            !rules.iter().any(|r| r["minor"] == 3),
            "no rule for GPU 0: {rules:?}"
        );
        let env: Vec<&str> = v["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(
            env.contains(&"LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/opt/lib")
                && env.contains(&"PATH=/usr/local/nvidia/bin:/bin"),
            "{env:?}"
        );
        let mounts = v["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(
            |m| m["destination"] == "/usr/local/nvidia/lib64/libcuda.so.1"
                && m["options"].as_array().unwrap().contains(&"ro".into())
        ));
    }
}
