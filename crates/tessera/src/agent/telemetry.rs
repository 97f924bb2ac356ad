//! What the node's devices and workloads use, sampled on an interval and sent with the sync.
//!
//! Real GPUs are read through NVML (utilisation, memory, power; a workload's device memory from
//! the processes of its cgroup). Fractional slices add the interception library's own memory
//! count. Simulated devices have nothing to read, so their readings are made up from what runs,
//! and marked simulated everywhere they appear: a replica's GPU utilisation is how much of its
//! CPU allocation it uses (capped at 100%, so an idle program reads idle and a busy one busy; on
//! nodes without cgroups it reads 0), a device's is the sum of
//! its replicas' in proportion to their shares, and its power runs from the model's idle to its
//! peak draw with that utilisation.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::AgentConfig;
use super::cgroup::Backend;
use crate::protocol::{Assignment, DeviceSample, NodeSample, ReplicaUsage};

/// Idle and peak power of a device model, in watts, for simulated readings.
fn simulated_power(model: &str) -> (f64, f64) {
    let m = model.to_ascii_uppercase();
    if m.starts_with("H100") || m.starts_with("H200") || m.starts_with("H800") {
        (70.0, 700.0)
    } else if m.starts_with("A100") || m.starts_with("A800") {
        (50.0, 400.0)
    } else if m.starts_with("L40") {
        (35.0, 300.0)
    } else if m.starts_with("L4") {
        (16.0, 72.0)
    } else if m.starts_with("T4") {
        (10.0, 70.0)
    } else {
        (30.0, 300.0)
    }
}

/// The file in a replica's run directory that keeps its energy count across agent restarts.
const ENERGY_FILE: &str = "energy_mj";

pub struct Sampler {
    nvml: Option<nvml_wrapper::Nvml>,
    /// CPU ticks of each replica's processes at the last sample, and when.
    cpu: HashMap<String, (u64, u64)>,
    /// Energy of each replica so far (millijoules).
    energy: HashMap<String, f64>,
    last_ms: Option<u64>,
    ticks_per_s: f64,
}

/// One sample: the node's devices, and each running replica's use.
pub struct Sample {
    pub node: NodeSample,
    pub replicas: BTreeMap<String, ReplicaUsage>,
}

impl Sampler {
    pub fn new(config: &AgentConfig) -> Sampler {
        let nvml = (!config.devices.simulated && !config.devices.devices.is_empty())
            .then(nvml_wrapper::Nvml::init)
            .and_then(|r| {
                r.map_err(|e| tracing::warn!("NVML unavailable for telemetry: {e}"))
                    .ok()
            });
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Sampler {
            nvml,
            cpu: HashMap::new(),
            energy: HashMap::new(),
            last_ms: None,
            ticks_per_s: if ticks > 0 { ticks as f64 } else { 100.0 },
        }
    }

    /// Samples the devices and the `running` replicas (with their run directories under
    /// `runs_dir`) at `now_ms`.
    pub fn sample(
        &mut self,
        config: &AgentConfig,
        backend: &Backend,
        runs_dir: &Path,
        running: &[Assignment],
        now_ms: u64,
    ) -> Sample {
        let dt_ms = self.last_ms.map_or(0, |t| now_ms.saturating_sub(t));
        self.last_ms = Some(now_ms);
        let simulated = config.devices.simulated || self.nvml.is_none();
        let mut replicas = BTreeMap::new();
        let mut pids_of: HashMap<&str, Vec<i32>> = HashMap::new();
        for a in running {
            let cg = super::cgroup_name(config, &a.key);
            let pids = backend.pids(&cg);
            let ticks: u64 = pids.iter().filter_map(|p| process_ticks(*p)).sum();
            let cpu_pct = match self.cpu.insert(a.key.clone(), (ticks, now_ms)) {
                Some((before, at)) if now_ms > at && ticks >= before => {
                    (ticks - before) as f64 / self.ticks_per_s * 100_000.0 / (now_ms - at) as f64
                }
                _ => 0.0,
            };
            let slice_memory = a
                .devices
                .first()
                .filter(|d| d.milli < 1000)
                .and_then(|_| {
                    tessera_shm::Region::open(&super::gpu::slice_region(config, &a.key)).ok()
                })
                .map(|r| r.used());
            replicas.insert(
                a.key.clone(),
                ReplicaUsage {
                    // A remote device's use is its GPU server's, on the other node.
                    gpu_util_pct: if a.devices.is_empty() || a.remote_device.is_some() {
                        0.0
                    } else {
                        (cpu_pct * 1000.0 / a.cpu_milli.max(1) as f64).min(100.0)
                    },
                    gpu_memory_bytes: slice_memory.unwrap_or(0),
                    cpu_pct,
                    memory_bytes: backend.memory_used(&cg).unwrap_or(0),
                    energy_mj: 0,
                    simulated,
                },
            );
            pids_of.insert(a.key.as_str(), pids);
        }
        let mut devices: Vec<DeviceSample> = Vec::new();
        for (index, spec) in config.devices.devices.iter().enumerate() {
            let index = index as u32;
            let holders: Vec<(&Assignment, u32)> = running
                .iter()
                // A remote replica's device indices are another node's.
                .filter(|a| a.remote_device.is_none())
                .flat_map(|a| {
                    a.devices
                        .iter()
                        .filter(move |d| d.device == index)
                        .map(move |d| (a, d.milli))
                })
                .collect();
            let real = self.nvml.as_ref().and_then(|n| {
                let d = n.device_by_index(index).ok()?;
                let util = d.utilization_rates().ok()?.gpu as f64;
                let mem = d.memory_info().ok()?;
                let power = d.power_usage().ok().map_or(0, u64::from);
                // A replica's device memory: its processes' on this device.
                if let Ok(procs) = d.running_compute_processes() {
                    for (a, milli) in &holders {
                        let mine = pids_of.get(a.key.as_str());
                        let bytes: u64 = procs
                            .iter()
                            .filter(|p| mine.is_some_and(|m| m.contains(&(p.pid as i32))))
                            .map(|p| match p.used_gpu_memory {
                                nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => b,
                                _ => 0,
                            })
                            .sum();
                        if let Some(u) = replicas.get_mut(&a.key) {
                            u.gpu_memory_bytes = u.gpu_memory_bytes.max(bytes);
                            u.gpu_util_pct = util * f64::from(*milli) / 1000.0;
                        }
                    }
                }
                Some(DeviceSample {
                    index,
                    util_pct: util,
                    memory_used_bytes: mem.used,
                    memory_total_bytes: mem.total,
                    power_mw: power,
                })
            });
            let sample = real.unwrap_or_else(|| {
                let util: f64 = holders
                    .iter()
                    .map(|(a, milli)| {
                        replicas.get(&a.key).map_or(0.0, |u| u.gpu_util_pct) * f64::from(*milli)
                            / 1000.0
                    })
                    .sum::<f64>()
                    .min(100.0);
                let (idle, peak) = simulated_power(&spec.model);
                DeviceSample {
                    index,
                    util_pct: util,
                    memory_used_bytes: holders
                        .iter()
                        .filter_map(|(a, _)| replicas.get(&a.key))
                        .map(|u| u.gpu_memory_bytes)
                        .sum::<u64>()
                        .min(spec.memory_bytes),
                    memory_total_bytes: spec.memory_bytes,
                    power_mw: ((idle + (peak - idle) * util / 100.0) * 1000.0) as u64,
                }
            });
            // Energy: each holder gets its share of the device's power over the interval.
            for (a, milli) in &holders {
                let mj =
                    sample.power_mw as f64 * f64::from(*milli) / 1000.0 * dt_ms as f64 / 1000.0;
                let total = self
                    .energy
                    .entry(a.key.clone())
                    .or_insert_with(|| read_energy(&runs_dir.join(&a.key)));
                *total += mj;
            }
            devices.push(sample);
        }
        for a in running {
            let e = self
                .energy
                .entry(a.key.clone())
                .or_insert_with(|| read_energy(&runs_dir.join(&a.key)));
            if let Some(u) = replicas.get_mut(&a.key) {
                u.energy_mj = *e as u64;
            }
            let _ = std::fs::write(
                runs_dir.join(&a.key).join(ENERGY_FILE),
                format!("{}", *e as u64),
            );
        }
        // Forget replicas no longer running (their last count stays in their run directory).
        self.cpu.retain(|k, _| replicas.contains_key(k));
        self.energy.retain(|k, _| replicas.contains_key(k));
        Sample {
            node: NodeSample {
                at_ms: now_ms,
                simulated,
                devices,
            },
            replicas,
        }
    }
}

/// The energy count a replica's run directory keeps (0 when none).
pub fn read_energy(dir: &Path) -> f64 {
    std::fs::read_to_string(dir.join(ENERGY_FILE))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0.0)
}

/// CPU ticks a process and its reaped children used (`/proc/PID/stat` utime, stime, cutime,
/// cstime).
fn process_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 (index 0 here), utime is field 14 (index 11).
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(n(11)? + n(12)? + n(13)? + n(14)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_process_shows_ticks_and_models_have_a_power_range() {
        let me = std::process::id() as i32;
        let before = process_ticks(me).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(150) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(process_ticks(me).unwrap() > before);
        assert!(process_ticks(i32::MAX).is_none());
        let (idle, peak) = simulated_power("H100-80GB");
        assert!(idle < peak && peak == 700.0);
        assert_eq!(simulated_power("X9"), (30.0, 300.0));
    }
}
