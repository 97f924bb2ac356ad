//! The slice a process runs in, from the `TESSERA_*` variables the agent sets.
//!
//! Read once, on the process's first CUDA call (a process that never uses CUDA reads nothing).
//! A missing or bad value is an error that names the variable: the library then refuses CUDA
//! (fails closed) instead of letting the workload run uncapped.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Device memory of the slice, shared by all processes of the allocation.
    pub memory_bytes: u64,
    /// Per-process allowance for context and module memory that no hook sees.
    pub context_bytes: u64,
    /// Share of the device's time, in thousandths.
    pub share_milli: u64,
    /// May use device time that other slices leave idle.
    pub burst: bool,
    /// The limiter's period.
    pub period_ns: u64,
    /// The slice's accounting region (shared by its processes).
    pub slice_path: PathBuf,
    /// The device's schedule (shared by the slices on it).
    pub device_path: PathBuf,
    /// The physical device index (first of CUDA_VISIBLE_DEVICES), for NVML.
    pub physical_device: u32,
}

fn parse_u64(name: &str, value: &str, example: &str) -> Result<u64, String> {
    value.trim().parse::<u64>().map_err(|_| {
        format!("{name}={value}: not a whole number; the agent sets it, e.g. {name}={example}")
    })
}

/// Parses the configuration from a variable lookup (the environment in the library).
pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
    let memory = get("TESSERA_GPU_MEMORY_BYTES").ok_or_else(|| {
        "TESSERA_GPU_MEMORY_BYTES is not set: this process was given the slice library without \
         a slice; run it through Tessera (tessera submit --gpu 0.5 --gpu-memory 20GiB ...)"
            .to_string()
    })?;
    let memory_bytes = parse_u64("TESSERA_GPU_MEMORY_BYTES", &memory, "21474836480")?;
    if memory_bytes == 0 {
        return Err("TESSERA_GPU_MEMORY_BYTES=0: a slice needs some memory".into());
    }
    let share = get("TESSERA_COMPUTE_SHARE").ok_or_else(|| {
        "TESSERA_COMPUTE_SHARE is not set; the agent sets it, e.g. TESSERA_COMPUTE_SHARE=0.500"
            .to_string()
    })?;
    let share_f: f64 = share.trim().parse().map_err(|_| {
        format!("TESSERA_COMPUTE_SHARE={share}: not a number; write a fraction, e.g. 0.300")
    })?;
    if !(share_f > 0.0 && share_f <= 1.0) {
        return Err(format!(
            "TESSERA_COMPUTE_SHARE={share}: must be above 0 and at most 1, e.g. 0.300"
        ));
    }
    let burst = match get("TESSERA_COMPUTE_BURST").as_deref().map(str::trim) {
        None | Some("1") | Some("true") => true,
        Some("0") | Some("false") => false,
        Some(other) => {
            return Err(format!(
                "TESSERA_COMPUTE_BURST={other}: write 1 (may use idle time) or 0 (never above \
                 its share)"
            ));
        }
    };
    let context_bytes = match get("TESSERA_VGPU_CONTEXT_BYTES") {
        Some(v) => parse_u64("TESSERA_VGPU_CONTEXT_BYTES", &v, "314572800")?,
        None => 0,
    };
    if context_bytes >= memory_bytes {
        return Err(format!(
            "TESSERA_VGPU_CONTEXT_BYTES={context_bytes}: the allowance leaves nothing of the \
             slice's {memory_bytes} bytes"
        ));
    }
    let period_ms = match get("TESSERA_VGPU_PERIOD_MS") {
        Some(v) => parse_u64("TESSERA_VGPU_PERIOD_MS", &v, "20")?,
        None => 50,
    };
    if !(1..=1000).contains(&period_ms) {
        return Err(format!(
            "TESSERA_VGPU_PERIOD_MS={period_ms}: use 1 to 1000 (default 50)"
        ));
    }
    let physical_device = match get("CUDA_VISIBLE_DEVICES") {
        Some(v) => {
            let first = v.split(',').next().unwrap_or("").trim().to_string();
            first.parse::<u32>().map_err(|_| {
                format!(
                    "CUDA_VISIBLE_DEVICES={v}: a slice runs on one device given by its index, \
                     e.g. CUDA_VISIBLE_DEVICES=3"
                )
            })?
        }
        None => 0,
    };
    let slice_path = get("TESSERA_VGPU_SHM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(format!(
                "/dev/shm/tessera-vgpu-slice-{}",
                std::process::id()
            ))
        });
    let device_path = get("TESSERA_VGPU_DEVICE_SHM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/tessera-vgpu-gpu{physical_device}")));
    Ok(Config {
        memory_bytes,
        context_bytes,
        share_milli: (share_f * 1000.0).round() as u64,
        burst,
        period_ns: period_ms * 1_000_000,
        slice_path,
        device_path,
        physical_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Config, String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(|k| m.get(k).cloned())
    }

    #[test]
    fn the_agents_variables_make_a_slice() {
        let c = with(&[
            ("TESSERA_GPU_MEMORY_BYTES", "1073741824"),
            ("TESSERA_COMPUTE_SHARE", "0.300"),
            ("CUDA_VISIBLE_DEVICES", "2"),
            ("TESSERA_VGPU_SHM", "/dev/shm/s"),
        ])
        .unwrap();
        assert_eq!(c.memory_bytes, 1 << 30);
        assert_eq!(c.share_milli, 300);
        assert!(c.burst);
        assert_eq!(c.physical_device, 2);
        assert_eq!(c.device_path, PathBuf::from("/dev/shm/tessera-vgpu-gpu2"));
    }

    #[test]
    fn bad_or_missing_values_name_the_variable_and_the_fix() {
        let ok = [
            ("TESSERA_GPU_MEMORY_BYTES", "1073741824"),
            ("TESSERA_COMPUTE_SHARE", "0.3"),
        ];
        assert!(
            with(&[])
                .unwrap_err()
                .contains("TESSERA_GPU_MEMORY_BYTES is not set")
        );
        for (vars, needle) in [
            (
                vec![("TESSERA_GPU_MEMORY_BYTES", "20GiB")],
                "not a whole number",
            ),
            (vec![("TESSERA_COMPUTE_SHARE", "1.5")], "at most 1"),
            (vec![("TESSERA_COMPUTE_SHARE", "half")], "not a number"),
            (
                vec![("TESSERA_COMPUTE_BURST", "yes")],
                "TESSERA_COMPUTE_BURST=yes",
            ),
            (vec![("TESSERA_VGPU_PERIOD_MS", "0")], "1 to 1000"),
            (
                vec![("CUDA_VISIBLE_DEVICES", "GPU-abc")],
                "CUDA_VISIBLE_DEVICES=GPU-abc",
            ),
        ] {
            let mut all: Vec<(&str, &str)> = ok.to_vec();
            for (k, v) in vars {
                all.retain(|(a, _)| *a != k);
                all.push((k, v));
            }
            let err = with(&all).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
