//! What a node offers: CPUs and memory from the host, devices from NVML or a simulated inventory.

use anyhow::bail;
use tessera_sched::DeviceSpec;
use tessera_sched::model::GIB;

/// The node's devices and whether they are simulated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub devices: Vec<DeviceSpec>,
    pub simulated: bool,
}

/// Parses `4xH100-80GB` or `2xA100-40GB,1xT4-16GB` (count, model; memory from a trailing
/// `-<n>GB`).
pub fn parse_simulated(spec: &str) -> anyhow::Result<Inventory> {
    let mut devices = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((count, model)) = part.split_once('x') else {
            bail!("--simulate-gpus {part}: write COUNTxMODEL-MEMORY, e.g. 4xH100-80GB");
        };
        let count: usize = count.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "--simulate-gpus {part}: {count} is not a device count; e.g. 4xH100-80GB"
            )
        })?;
        if count == 0 || count > tessera_sched::model::MAX_DEVICES_PER_NODE {
            bail!("--simulate-gpus {part}: a node has 1 to 64 devices");
        }
        let memory = model
            .rsplit_once('-')
            .and_then(|(_, m)| m.strip_suffix("GB").or_else(|| m.strip_suffix("G")))
            .and_then(|m| m.parse::<u64>().ok())
            .map(|g| g * GIB);
        let Some(memory_bytes) = memory else {
            bail!("--simulate-gpus {part}: the model must end in its memory, e.g. H100-80GB");
        };
        devices.extend((0..count).map(|_| DeviceSpec {
            class: Default::default(),
            model: model.to_string(),
            memory_bytes,
        }));
    }
    if devices.is_empty() {
        bail!("--simulate-gpus is empty; e.g. 4xH100-80GB");
    }
    Ok(Inventory {
        devices,
        simulated: true,
    })
}

/// The node's real GPUs, read through NVML (loaded at run time, so the same binary runs on hosts
/// without NVIDIA's library). `Ok(None)`: no NVIDIA library here. An error: the library is here
/// but unusable (e.g. no driver loaded), which an operator must hear about rather than get a node
/// without GPUs.
pub fn nvml_inventory() -> anyhow::Result<Option<Inventory>> {
    use nvml_wrapper::error::NvmlError;
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound) => return Ok(None),
        Err(e) => bail!(
            "the NVIDIA management library is installed but cannot be used ({e}); check the              driver with nvidia-smi, or pass --simulate-gpus to run without GPUs"
        ),
    };
    let count = nvml.device_count()?;
    let mut devices = Vec::with_capacity(count as usize);
    for index in 0..count {
        let device = nvml.device_by_index(index)?;
        let name = device.name()?;
        let memory_bytes = device.memory_info()?.total;
        devices.push(DeviceSpec {
            class: Default::default(),
            model: model_name(&name, memory_bytes),
            memory_bytes,
        });
    }
    Ok(Some(Inventory {
        devices,
        simulated: false,
    }))
}

/// A short model name from NVML's product name and the device's memory, in the form users
/// request and simulated inventories use: "NVIDIA H100 80GB HBM3" with 79.6 GiB → `H100-80GB`,
/// "NVIDIA A100-SXM4-40GB" → `A100-40GB`, "Tesla T4" → `T4-15GB`.
pub fn model_name(nvml_name: &str, memory_bytes: u64) -> String {
    let family = nvml_name
        .split_whitespace()
        .find(|w| !matches!(*w, "NVIDIA" | "Tesla" | "GeForce" | "Quadro"))
        .unwrap_or("GPU");
    let family = family.split('-').next().unwrap_or(family);
    let gib = (memory_bytes as f64 / GIB as f64).round() as u64;
    format!("{family}-{gib}GB")
}

/// CPUs (milli) and memory (bytes) of this host.
pub fn host_cpu_memory() -> (u64, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(GIB);
    (cpus * 1000, mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_inventories_read_count_model_and_memory() {
        let inv = parse_simulated("2xA100-40GB,1xT4-16GB").unwrap();
        assert!(inv.simulated);
        assert_eq!(inv.devices.len(), 3);
        assert_eq!(inv.devices[0].memory_bytes, 40 * GIB);
        assert_eq!(inv.devices[2].model, "T4-16GB");
        assert!(parse_simulated("H100").is_err());
        assert!(parse_simulated("0xH100-80GB").is_err());
        assert!(
            parse_simulated("4xH100")
                .unwrap_err()
                .to_string()
                .contains("H100-80GB")
        );
    }

    #[test]
    fn nvml_product_names_become_the_model_names_users_request() {
        let mib = 1 << 20;
        assert_eq!(
            model_name("NVIDIA H100 80GB HBM3", 81_559 * mib),
            "H100-80GB"
        );
        assert_eq!(model_name("NVIDIA H200", 143_771 * mib), "H200-140GB");
        assert_eq!(
            model_name("NVIDIA A100-SXM4-40GB", 40_960 * mib),
            "A100-40GB"
        );
        assert_eq!(model_name("Tesla T4", 15_360 * mib), "T4-15GB");
    }
}
