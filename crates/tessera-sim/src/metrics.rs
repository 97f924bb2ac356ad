//! The FGD paper's allocation metric: GPU allocated (% of capacity) against GPU arrived (% of
//! capacity, placed or not), binned to whole percents the way the paper's analysis scripts do.

use serde::Serialize;

/// Arrived percentages reported, 0..=130.
pub const MAX_ARRIVED_PCT: usize = 130;

/// One observation after a task: cumulative milli-GPU arrived and milli-GPU allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub arrived_milli: u64,
    pub used_milli: u64,
}

/// Allocated GPU % per arrived-GPU % bin (index = arrived %); `None` where no sample is near.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Curve {
    pub alloc_pct: Vec<Option<f64>>,
}

impl Curve {
    /// Unallocated GPU % at `arrived` %: 100 − allocated.
    pub fn unallocated_at(&self, arrived: usize) -> Option<f64> {
        self.alloc_pct
            .get(arrived)
            .copied()
            .flatten()
            .map(|a| 100.0 - a)
    }
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round_ties_even() / scale
}

/// Bins samples as the paper's `merge_alloc_discrete.py`: arrived % rounded to a whole percent,
/// allocated % to two decimals, the mean of each bin rounded to two decimals, and a ±1 window
/// where a bin is empty.
pub fn bin(samples: &[Sample], capacity_milli: u64) -> Curve {
    let cap = capacity_milli as f64;
    let points: Vec<(i64, f64)> = samples
        .iter()
        .map(|s| {
            let arrived = round_to(s.arrived_milli as f64 / cap * 100.0, 0) as i64;
            let alloc = round_to(s.used_milli as f64 / cap * 100.0, 2);
            (arrived, alloc)
        })
        .collect();
    let mut sums = vec![(0.0f64, 0u64); MAX_ARRIVED_PCT + 3];
    for &(a, v) in &points {
        if (0..=(MAX_ARRIVED_PCT as i64 + 1)).contains(&a) {
            let slot = &mut sums[a as usize];
            slot.0 += v;
            slot.1 += 1;
        }
    }
    let alloc_pct = (0..=MAX_ARRIVED_PCT)
        .map(|a| {
            let (s, n) = sums[a];
            if n > 0 {
                return Some(round_to(s / n as f64, 2));
            }
            let lo = a.saturating_sub(1);
            let (s, n) = (lo..=a + 1).fold((0.0, 0u64), |(s, n), b| (s + sums[b].0, n + sums[b].1));
            (n > 0).then(|| round_to(s / n as f64, 2))
        })
        .collect();
    Curve { alloc_pct }
}

/// Mean and sample standard deviation (n − 1), as pandas reports them.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_average_samples_and_fill_gaps_from_neighbours() {
        let cap = 1000;
        let samples = [
            Sample {
                arrived_milli: 0,
                used_milli: 0,
            },
            Sample {
                arrived_milli: 10,
                used_milli: 10,
            },
            Sample {
                arrived_milli: 12,
                used_milli: 10,
            },
            Sample {
                arrived_milli: 30,
                used_milli: 20,
            },
        ];
        let c = bin(&samples, cap);
        assert_eq!(c.alloc_pct[0], Some(0.0));
        assert_eq!(c.alloc_pct[1], Some(1.0));
        // Bin 2 is empty: the mean of bins 1..=3 (the samples at 1, 1 and 3).
        assert_eq!(c.alloc_pct[2], Some(round_to((1.0 + 1.0 + 2.0) / 3.0, 2)));
        assert_eq!(c.alloc_pct[3], Some(2.0));
        assert_eq!(c.alloc_pct[5], None);
        assert_eq!(c.unallocated_at(3), Some(98.0));
    }

    #[test]
    fn mean_and_sample_sd() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((sd - 1.0).abs() < 1e-12);
        assert_eq!(mean_sd(&[4.0]), (4.0, 0.0));
    }
}
