//! A project's placement rules (residency and what its jobs may ask for), applied by the
//! scheduler to every job of the project before it is placed, moved or grown.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::request::{JobSpec, ResourceRequest};

/// Where a project's jobs may run and what they may request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRules {
    /// Node labels every replica's node must carry (e.g. `region=eu`).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Device models allowed; empty means any.
    #[serde(default)]
    pub device_models: Vec<String>,
    /// Most milli-GPU one job may ask for (all replicas together).
    #[serde(default)]
    pub max_job_gpu_milli: Option<u64>,
}

/// Which rule a request breaks, and how, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub rule: Rule,
    pub why: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Residency,
    DeviceModels,
    MaxJobGpu,
}

impl PlacementRules {
    pub fn is_empty(&self) -> bool {
        self.node_selector.is_empty()
            && self.device_models.is_empty()
            && self.max_job_gpu_milli.is_none()
    }

    /// The request narrowed to what the rules allow, or why no request of this job can comply.
    pub fn narrow(&self, request: &ResourceRequest) -> Result<ResourceRequest, Breach> {
        let mut r = request.clone();
        for (key, value) in &self.node_selector {
            match r.node_selector.get(key) {
                Some(v) if v != value => {
                    return Err(Breach {
                        rule: Rule::Residency,
                        why: format!(
                            "asks for nodes labelled {key}={v}, and its project allows only \
                             {key}={value}"
                        ),
                    });
                }
                _ => {
                    r.node_selector.insert(key.clone(), value.clone());
                }
            }
        }
        if !self.device_models.is_empty() {
            if r.device_models.is_empty() {
                r.device_models = self.device_models.clone();
            } else {
                r.device_models.retain(|m| self.device_models.contains(m));
                if r.device_models.is_empty() {
                    return Err(Breach {
                        rule: Rule::DeviceModels,
                        why: format!(
                            "asks for device models {}, and its project allows only {}",
                            request.device_models.join(", "),
                            self.device_models.join(", ")
                        ),
                    });
                }
            }
        }
        Ok(r)
    }

    /// The job narrowed to the rules, or why it cannot comply.
    pub fn narrow_job(&self, job: &JobSpec) -> Result<JobSpec, Breach> {
        let total = job.request.gpu.total_milli() * u64::from(job.replicas);
        if let Some(max) = self.max_job_gpu_milli
            && total > max
        {
            return Err(Breach {
                rule: Rule::MaxJobGpu,
                why: format!(
                    "asks for {} GPU in all, and its project allows at most {} per job",
                    total as f64 / 1000.0,
                    max as f64 / 1000.0
                ),
            });
        }
        Ok(JobSpec {
            request: self.narrow(&job.request)?,
            ..job.clone()
        })
    }

    /// Whether a node with `labels` and a device of `model` (if any) is allowed.
    pub fn allows(&self, labels: &BTreeMap<String, String>, model: Option<&str>) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && (self.device_models.is_empty()
                || model.is_none_or(|m| self.device_models.iter().any(|x| x == m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::GpuRequest;

    fn rules() -> PlacementRules {
        PlacementRules {
            node_selector: [("region".to_string(), "eu".to_string())].into(),
            device_models: vec!["H100".into(), "A100".into()],
            max_job_gpu_milli: Some(4000),
        }
    }

    #[test]
    fn requests_are_narrowed_to_the_rules_or_refused_with_the_reason() {
        let r = ResourceRequest {
            gpu: GpuRequest::Whole { devices: 2 },
            ..Default::default()
        };
        let n = rules().narrow(&r).unwrap();
        assert_eq!(n.node_selector["region"], "eu");
        assert_eq!(n.device_models, vec!["H100", "A100"]);
        let mut us = r.clone();
        us.node_selector.insert("region".into(), "us".into());
        let breach = rules().narrow(&us).unwrap_err();
        assert_eq!(breach.rule, Rule::Residency);
        assert!(breach.why.contains("only region=eu"));
        let mut t4 = r.clone();
        t4.device_models = vec!["T4".into(), "A100".into()];
        assert_eq!(rules().narrow(&t4).unwrap().device_models, vec!["A100"]);
        t4.device_models = vec!["T4".into()];
        assert_eq!(rules().narrow(&t4).unwrap_err().rule, Rule::DeviceModels);
        let job = JobSpec {
            replicas: 3,
            ..JobSpec::single("j", r)
        };
        let breach = rules().narrow_job(&job).unwrap_err();
        assert_eq!(breach.rule, Rule::MaxJobGpu);
        assert!(breach.why.contains("at most 4 per job"));
        assert!(PlacementRules::default().is_empty());
    }
}
