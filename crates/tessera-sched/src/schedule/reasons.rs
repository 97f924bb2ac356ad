//! Why a job waits, in words a user can act on.

use super::*;
use crate::model::{human_milli, plural};

/// The largest free capacity on one node, for telling a user what is there instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FreeBlock {
    pub node: String,
    pub whole_devices: u32,
    pub largest_share_milli: u32,
}

/// Why a job stays pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WaitReason {
    Invalid(ValidationError),
    NoFit {
        replica: u32,
        replicas: u32,
        /// Why replica `replica` fits nowhere, with the replicas before it in place.
        report: FilterReport,
        /// What the request could use in the pool as it is (before any of its replicas).
        free_for_it: Usable,
        largest_free: Option<FreeBlock>,
        /// The node labels its project's residency allows (`key=value`), when it has any: they
        /// narrow where the job may fit.
        residency: Vec<String>,
    },
    QuotaLimit {
        hit: LimitHit,
        requested_milli: u64,
    },
    /// Jobs were preempted (or are stopping) to make room; the job is placed once they stop.
    Reclaiming {
        victims: Vec<u64>,
    },
    /// Free capacity was enough but scattered: these jobs are being moved to gather it.
    Consolidating {
        moved: Vec<u64>,
    },
    /// The job's project does not allow what it asks for (its placement rules).
    Policy {
        why: String,
    },
    /// Elastic jobs are giving back replicas above their minimum: (job, replicas).
    Shrinking {
        from: Vec<(u64, u32)>,
    },
}

impl WaitReason {
    /// The reason in words a user can act on.
    pub fn describe(&self, job: &JobSpec) -> String {
        match self {
            WaitReason::Invalid(err) => format!("the job is invalid: {err}"),
            WaitReason::NoFit {
                replica,
                replicas,
                report,
                free_for_it,
                largest_free,
                residency,
            } => {
                let mut text = format!("needs {}", describe_needs(job));
                if *replicas > 1 {
                    text.push_str(&format!(
                        "; only {replica} of its {replicas} replicas fit at once, and a gang \
                         starts whole or not at all"
                    ));
                    if job.request.gpu != GpuRequest::None {
                        text.push_str(&format!(
                            "; the pool has {} GPU free for it, on {} with {} CPU free there",
                            human_milli(free_for_it.milli),
                            plural(free_for_it.nodes, "node"),
                            human_milli(free_for_it.cpu_milli)
                        ));
                    }
                }
                if let Some(binding) = report.binding_text(&job.request) {
                    if *replica > 0 {
                        text.push_str(&format!(
                            "; with {} in place, ",
                            plural(*replica, "replica")
                        ));
                    } else {
                        text.push_str("; ");
                    }
                    text.push_str(&binding);
                }
                text.push_str(&format!("; {report}"));
                if job.request.gpu != GpuRequest::None {
                    match largest_free {
                        Some(b) if b.whole_devices > 0 => text.push_str(&format!(
                            "; the largest free block is {} whole GPU{} on {}",
                            b.whole_devices,
                            if b.whole_devices == 1 { "" } else { "s" },
                            b.node
                        )),
                        Some(b) if b.largest_share_milli > 0 => text.push_str(&format!(
                            "; the largest free share is {} GPU on {}",
                            human_milli(u64::from(b.largest_share_milli)),
                            b.node
                        )),
                        _ => text.push_str("; no GPU is free anywhere"),
                    }
                }
                if !residency.is_empty() {
                    text.push_str(&format!(
                        " (project {}'s policy: only nodes labelled {})",
                        job.project,
                        residency.join(",")
                    ));
                }
                text
            }
            WaitReason::QuotaLimit {
                hit,
                requested_milli,
            } => format!(
                "needs {} GPU in all; project {} is at {} of its limit of {} GPU",
                human_milli(*requested_milli),
                hit.project,
                human_milli(hit.used_milli),
                human_milli(hit.limit_milli)
            ),
            WaitReason::Consolidating { moved } => format!(
                "free capacity is scattered; moving job{} {} to gather it for this one",
                if moved.len() == 1 { "" } else { "s" },
                moved
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            WaitReason::Policy { why } => {
                format!("its project's policy does not allow it: it {why}")
            }
            WaitReason::Shrinking { from } => {
                let mut per_job: BTreeMap<u64, u32> = BTreeMap::new();
                for (job, _) in from {
                    *per_job.entry(*job).or_default() += 1;
                }
                format!(
                    "waiting for elastic job{} to give back replicas above their minimum: {}",
                    if per_job.len() == 1 { "" } else { "s" },
                    per_job
                        .iter()
                        .map(|(job, n)| format!("{n} of job {job}",))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            WaitReason::Reclaiming { victims } => format!(
                "waiting for {} job{} ({}) to stop and give back capacity for it",
                victims.len(),
                if victims.len() == 1 { "" } else { "s" },
                victims
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// "2 whole GPUs of model H100 on one node", "4 replicas of 0.5 GPU each", ...
pub(super) fn describe_needs(job: &JobSpec) -> String {
    let r = &job.request;
    let mut each = match r.gpu {
        GpuRequest::None => "no GPU".to_string(),
        GpuRequest::Share { milli } => format!("{} of a GPU", human_milli(u64::from(milli))),
        GpuRequest::Whole { devices: 1 } => "1 whole GPU".to_string(),
        GpuRequest::Whole { devices } => format!("{devices} whole GPUs"),
    };
    if !r.device_models.is_empty() {
        each.push_str(&format!(" of model {}", r.device_models.join(" or ")));
    }
    if matches!(r.gpu, GpuRequest::Whole { devices } if devices > 1) {
        each.push_str(" on one node");
    }
    each.push_str(&format!(
        ", {} CPU and {} memory",
        human_milli(r.cpu_milli),
        crate::model::human_bytes(r.memory_bytes)
    ));
    if !r.node_selector.is_empty() {
        let labels: Vec<String> = r
            .node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        each.push_str(&format!(" on nodes labelled {}", labels.join(",")));
    }
    if job.replicas > 1 {
        format!("{} replicas, each {each}", job.replicas)
    } else {
        each
    }
}

pub(super) fn no_fit(
    placer: &mut Placer,
    spec: &JobSpec,
    rules: Option<&crate::rules::PlacementRules>,
    replica: u32,
    replicas: u32,
) -> WaitReason {
    let alone = placer.explain(&spec.request);
    let free_for_it = alone.usable;
    let report = if replica == 0 {
        alone
    } else {
        placer.explain_gang(&spec.request, replica)
    };
    let largest_free = placer
        .cluster()
        .nodes()
        .iter()
        .filter(|n| !n.devices.is_empty())
        .max_by_key(|n| {
            (
                n.whole_free(),
                n.max_device_free(),
                std::cmp::Reverse(n.id.0),
            )
        })
        .map(|n| FreeBlock {
            node: n.spec.name.clone(),
            whole_devices: n.whole_free(),
            largest_share_milli: n.max_device_free(),
        });
    WaitReason::NoFit {
        replica,
        replicas,
        report,
        free_for_it,
        largest_free,
        residency: rules
            .into_iter()
            .flat_map(|r| &r.node_selector)
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
    }
}
