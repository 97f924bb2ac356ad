//! Quantities as people write them: `8GiB`, `512MiB`, `500m` CPU, `0.5` GPU.

use serde::{Deserialize, Serialize};
use tessera_sched::ValidationError;

/// A number or a string, as YAML and JSON manifests give them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    Number(f64),
    Text(String),
}

impl Quantity {
    fn shown(&self) -> String {
        match self {
            Quantity::Number(n) => n.to_string(),
            Quantity::Text(t) => t.clone(),
        }
    }
}

/// Bytes from `8GiB`, `512MiB`, `1.5GiB`, `1G` (read as GiB: memory is counted in powers of two
/// here) or a plain number of bytes.
pub fn parse_bytes(field: &str, q: &Quantity) -> Result<u64, ValidationError> {
    let bad = || {
        ValidationError::new(
            field,
            q.shown(),
            "not a size",
            "write a number with a unit, e.g. 8GiB, 512MiB or 100KiB, or a plain number of bytes",
        )
    };
    let (number, unit) = match q {
        Quantity::Number(n) => (*n, ""),
        Quantity::Text(t) => {
            let t = t.trim();
            let split = t
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(t.len());
            let (n, u) = t.split_at(split);
            (n.parse::<f64>().map_err(|_| bad())?, u.trim())
        }
    };
    let scale: u64 = match unit {
        "" | "B" => 1,
        "Ki" | "KiB" | "K" | "KB" => 1 << 10,
        "Mi" | "MiB" | "M" | "MB" => 1 << 20,
        "Gi" | "GiB" | "G" | "GB" => 1 << 30,
        "Ti" | "TiB" | "T" | "TB" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(bad());
    }
    if scale == 1 && number.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Milli-CPU from `2`, `0.5` or `500m`.
pub fn parse_cpu(field: &str, q: &Quantity) -> Result<u64, ValidationError> {
    let bad = || {
        ValidationError::new(
            field,
            q.shown(),
            "not a CPU amount",
            "write cores as a number (2, 0.5) or milli-CPU with m (500m)",
        )
    };
    let milli = match q {
        Quantity::Number(n) => n * 1000.0,
        Quantity::Text(t) => match t.trim().strip_suffix('m') {
            Some(m) => m.trim().parse::<f64>().map_err(|_| bad())?,
            None => t.trim().parse::<f64>().map_err(|_| bad())? * 1000.0,
        },
    };
    if !milli.is_finite() || !(0.0..=1e12).contains(&milli) || (milli - milli.round()).abs() > 1e-6
    {
        return Err(bad());
    }
    Ok(milli.round() as u64)
}

/// GPUs from `0.5`, `1`, `"2"`.
pub fn parse_gpu(field: &str, q: &Quantity) -> Result<f64, ValidationError> {
    match q {
        Quantity::Number(n) => Ok(*n),
        Quantity::Text(t) => t.trim().parse::<f64>().map_err(|_| {
            ValidationError::new(
                field,
                t.clone(),
                "not a number of GPUs",
                "write e.g. 0.5 for half a device or 2 for two whole devices",
            )
        }),
    }
}

/// Milli-GPU from a number of GPUs (quotas: `8`, `2.5`).
pub fn parse_gpu_milli(field: &str, q: &Quantity) -> Result<u64, ValidationError> {
    let g = parse_gpu(field, q)?;
    if g > MAX_GPUS {
        return Err(ValidationError::new(
            field,
            q.shown(),
            format!("at most {MAX_GPUS} GPUs"),
            "give a number of GPUs the pool could hold; no limit is written as null",
        ));
    }
    let milli = g * 1000.0;
    if !milli.is_finite() || milli < 0.0 || (milli - milli.round()).abs() > 1e-6 {
        return Err(ValidationError::new(
            field,
            q.shown(),
            "a GPU amount must be zero or more, in thousandths",
            "write e.g. 8 or 2.5",
        ));
    }
    Ok(milli.round() as u64)
}

/// The most GPUs an amount (a quota, a limit) may name: far above any pool, far below where sums
/// of milli-GPU would saturate.
pub const MAX_GPUS: f64 = 1_000_000.0;

/// Durations such as `30s`, `5m`, `2h`, `7d`, `250ms`.
pub fn parse_duration(field: &str, text: &str) -> Result<std::time::Duration, ValidationError> {
    let bad = || {
        ValidationError::new(
            field,
            text,
            "not a duration",
            "write a number with a unit: 250ms, 30s, 5m, 2h or 7d",
        )
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Bytes as people write them back, exactly: `8GiB`, `512MiB`, `100KiB`, or a plain number.
pub fn bytes_text(b: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if b > 0 && b % (1 << shift) == 0 {
            return format!("{}{unit}", b >> shift);
        }
    }
    b.to_string()
}

/// A duration as people write it back, exactly: `4h`, `90m`, `30s`, `1500ms`.
pub fn duration_text(ms: u64) -> String {
    let s = ms / 1000;
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else if s > 0 && s % 86400 == 0 {
        format!("{}d", s / 86400)
    } else if s > 0 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s > 0 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Quantity {
        Quantity::Text(s.into())
    }

    #[test]
    fn sizes_cpu_and_durations_read_as_people_write_them() {
        assert_eq!(parse_bytes("m", &t("8GiB")).unwrap(), 8 << 30);
        assert_eq!(parse_bytes("m", &t("1.5Gi")).unwrap(), 3 << 29);
        assert_eq!(parse_bytes("m", &Quantity::Number(4096.0)).unwrap(), 4096);
        assert_eq!(parse_cpu("c", &t("500m")).unwrap(), 500);
        assert_eq!(parse_cpu("c", &Quantity::Number(2.0)).unwrap(), 2000);
        assert_eq!(parse_gpu_milli("g", &t("2.5")).unwrap(), 2500);
        assert_eq!(parse_duration("d", "7d").unwrap().as_secs(), 7 * 86400);
        for (ms, text) in [
            (4 * 3_600_000, "4h"),
            (90_000, "90s"),
            (1500, "1500ms"),
            (172_800_000, "2d"),
        ] {
            assert_eq!(duration_text(ms), text);
            assert_eq!(parse_duration("d", text).unwrap().as_millis() as u64, ms);
        }
        for (b, text) in [(8 << 30, "8GiB"), (3 << 29, "1536MiB"), (4097, "4097")] {
            assert_eq!(bytes_text(b), text);
            assert_eq!(parse_bytes("m", &t(text)).unwrap(), b);
        }
    }

    #[test]
    fn wrong_units_name_the_field_and_the_fix() {
        let err = parse_bytes("spec.resources.memory", &t("8 gigs")).unwrap_err();
        assert_eq!(err.field, "spec.resources.memory");
        assert!(err.to_string().contains("8GiB"), "{err}");
        assert!(parse_bytes("m", &t("-1GiB")).is_err());
        assert!(parse_bytes("m", &Quantity::Number(0.5)).is_err());
        assert!(parse_cpu("c", &t("2 cores")).is_err());
        assert!(parse_cpu("c", &t("0.0001")).is_err());
        assert!(parse_duration("d", "soon").is_err());
    }
}
