//! The distribution of task shapes a pool sees, learned from its own history.
//!
//! FGD (Weng et al., USENIX ATC'23) calls the most common shapes "typical pods": distinct
//! (CPU, GPU share, device count, device models) tuples ranked by how many tasks have them, kept
//! until they cover a given fraction of all tasks, then renormalised. Memory is not part of a shape.

use std::collections::HashMap;

use serde::Serialize;

use crate::request::{GpuRequest, ResourceRequest};

/// One task shape; memory is deliberately left out (it decides feasibility, not fragmentation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TaskShape {
    pub cpu_milli: u64,
    pub gpu: GpuRequest,
    /// Allowed models joined by `|`, empty for any (the trace's own spelling, kept for ordering).
    pub device_models: String,
}

impl TaskShape {
    pub fn of(request: &ResourceRequest) -> Self {
        TaskShape {
            cpu_milli: request.cpu_milli,
            gpu: request.gpu,
            device_models: request.device_models.join("|"),
        }
    }

    pub fn model_list(&self) -> Vec<String> {
        if self.device_models.is_empty() {
            Vec::new()
        } else {
            self.device_models.split('|').map(str::to_owned).collect()
        }
    }
}

/// A set of task shapes with their share of all tasks (weights sum to 1).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShapeDistribution {
    pub shapes: Vec<(TaskShape, f64)>,
    /// Pinned GPU demand over the whole history: pins spread over many small shapes, those of
    /// small models most of all, and the typical-shape cut would drop them and understate the
    /// models' demand.
    pub pinned_demand: Vec<PinnedDemand>,
}

/// The GPU demand of tasks that name one allowed-model set and one device count per replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PinnedDemand {
    /// Allowed models joined by `|`.
    pub models: String,
    /// Devices per replica (1 for a share): a model only takes this demand if one of its nodes
    /// has that many.
    pub devices: u32,
    /// Share of all GPU demand (milli-GPU) in the history.
    pub share: f64,
}

impl ShapeDistribution {
    /// FGD's typical-pods rule: the most common shapes until they cover `coverage` (0..=1) of
    /// all tasks, CPU-only tasks included, renormalised to sum to 1.
    ///
    /// Ties in count are ordered as the reference simulator orders them (larger CPU, then larger
    /// GPU share, more devices, later model name first), so the cut is deterministic.
    pub fn typical<'a>(
        requests: impl IntoIterator<Item = &'a ResourceRequest>,
        coverage: f64,
    ) -> Self {
        let mut counts: HashMap<TaskShape, u64> = HashMap::new();
        let mut total = 0u64;
        let mut pinned: HashMap<(String, u32), u64> = HashMap::new();
        let mut gpu_demand = 0u64;
        for r in requests {
            let shape = TaskShape::of(r);
            gpu_demand += r.gpu.total_milli();
            if !shape.device_models.is_empty() && r.gpu.total_milli() > 0 {
                let key = (shape.device_models.clone(), r.gpu.device_count());
                *pinned.entry(key).or_default() += r.gpu.total_milli();
            }
            *counts.entry(shape).or_default() += 1;
            total += 1;
        }
        let mut pinned_demand: Vec<PinnedDemand> = pinned
            .into_iter()
            .map(|((models, devices), milli)| PinnedDemand {
                models,
                devices,
                share: milli as f64 / gpu_demand as f64,
            })
            .collect();
        pinned_demand.sort_by(|a, b| (&a.models, a.devices).cmp(&(&b.models, b.devices)));
        if total == 0 {
            return ShapeDistribution::default();
        }
        let mut ranked: Vec<(TaskShape, u64)> = counts.into_iter().collect();
        ranked.sort_by(|(a, ca), (b, cb)| {
            cb.cmp(ca).then_with(|| {
                let key = |s: &TaskShape| {
                    (
                        s.cpu_milli,
                        s.gpu.per_device_milli(),
                        s.gpu.device_count(),
                        s.device_models.clone(),
                    )
                };
                key(b).cmp(&key(a))
            })
        });
        let wanted = coverage.clamp(0.0, 1.0) * total as f64;
        let mut kept = Vec::new();
        let mut cumulative = 0u64;
        for (shape, count) in ranked {
            if (cumulative as f64) >= wanted && !kept.is_empty() {
                break;
            }
            cumulative += count;
            kept.push((shape, count));
        }
        let sum = cumulative as f64;
        ShapeDistribution {
            shapes: kept.into_iter().map(|(s, c)| (s, c as f64 / sum)).collect(),
            pinned_demand,
        }
    }

    pub fn len(&self) -> usize {
        self.shapes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu: u64, gpu: GpuRequest) -> ResourceRequest {
        ResourceRequest {
            cpu_milli: cpu,
            memory_bytes: 1,
            gpu,
            ..Default::default()
        }
    }

    #[test]
    fn typical_shapes_cover_the_threshold_and_sum_to_one() {
        let mut reqs = Vec::new();
        reqs.extend((0..60).map(|_| req(4000, GpuRequest::Share { milli: 500 })));
        reqs.extend((0..30).map(|_| req(8000, GpuRequest::Whole { devices: 1 })));
        reqs.extend((0..6).map(|_| req(2000, GpuRequest::None)));
        reqs.extend((0..4).map(|_| req(64000, GpuRequest::Whole { devices: 8 })));
        let d = ShapeDistribution::typical(&reqs, 0.95);
        assert_eq!(d.len(), 3, "60+30 < 95, +6 reaches 96");
        let total: f64 = d.shapes.iter().map(|(_, w)| w).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(d.shapes[0].0.gpu, GpuRequest::Share { milli: 500 });
        assert!((d.shapes[0].1 - 60.0 / 96.0).abs() < 1e-12);
        let all = ShapeDistribution::typical(&reqs, 1.0);
        assert_eq!(all.len(), 4);
        assert!(all.pinned_demand.is_empty(), "nothing names a model");
    }

    #[test]
    fn pinned_demand_counts_every_pinned_task_even_those_the_cut_drops() {
        let mut reqs: Vec<ResourceRequest> = (0..97)
            .map(|_| req(4000, GpuRequest::Whole { devices: 1 }))
            .collect();
        let mut rare = req(8000, GpuRequest::Whole { devices: 2 });
        rare.device_models = vec!["T4".into()];
        reqs.push(rare.clone());
        rare.gpu = GpuRequest::Share { milli: 500 };
        rare.device_models = vec!["V100M16".into(), "V100M32".into()];
        reqs.push(rare);
        reqs.push(req(2000, GpuRequest::None));
        let d = ShapeDistribution::typical(&reqs, 0.95);
        assert_eq!(d.len(), 1, "the cut keeps only the common shape");
        // GPU demand: 97,000 + 2,000 + 500 milli.
        let total = 99_500.0;
        assert_eq!(
            d.pinned_demand,
            vec![
                PinnedDemand {
                    models: "T4".to_owned(),
                    devices: 2,
                    share: 2000.0 / total
                },
                PinnedDemand {
                    models: "V100M16|V100M32".to_owned(),
                    devices: 1,
                    share: 500.0 / total
                }
            ]
        );
    }

    #[test]
    fn equal_counts_rank_larger_shapes_first() {
        let reqs = [
            req(1000, GpuRequest::Share { milli: 200 }),
            req(3000, GpuRequest::Share { milli: 200 }),
        ];
        let d = ShapeDistribution::typical(&reqs, 0.5);
        assert_eq!(d.len(), 1);
        assert_eq!(d.shapes[0].0.cpu_milli, 3000);
    }
}
