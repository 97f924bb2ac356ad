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

/// Whether the NVIDIA management library can be loaded on this host.
pub fn nvml_present() -> bool {
    ["libnvidia-ml.so.1", "libnvidia-ml.so"].iter().any(|name| {
        // SAFETY: loading NVIDIA's library runs its initialisers, which are designed for this; the
        // handle is closed at once.
        unsafe { libloading_probe(name) }
    })
}

/// dlopen(name) and dlclose; true when it loads.
unsafe fn libloading_probe(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    unsafe extern "C" {
        fn dlopen(filename: *const std::ffi::c_char, flag: i32) -> *mut std::ffi::c_void;
        fn dlclose(handle: *mut std::ffi::c_void) -> i32;
    }
    const RTLD_LAZY: i32 = 1;
    // SAFETY: c is a valid NUL-terminated string; a non-null handle is closed exactly once.
    unsafe {
        let h = dlopen(c.as_ptr(), RTLD_LAZY);
        if h.is_null() {
            return false;
        }
        dlclose(h);
    }
    true
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
}
