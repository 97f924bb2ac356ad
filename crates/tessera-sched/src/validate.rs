//! Validation that names the field, what is wrong, and how to fix it.
//!
//! Nothing invalid ever reaches the placement engine: every request and node goes through here
//! first, so the engine can rely on its invariants (a share is below one device, a node has at most
//! [`MAX_DEVICES_PER_NODE`] devices, ...).

use std::fmt;

use serde::Serialize;

use crate::model::{MAX_DEVICES_PER_NODE, MILLI_PER_DEVICE, NodeSpec};
use crate::request::{GpuRequest, JobSpec, ResourceRequest};

/// Most replicas one gang may have.
pub const MAX_REPLICAS: u32 = 4096;
/// Most device models a request may accept, and labels a node or selector may have.
pub const MAX_LIST: usize = 64;
/// Longest device model name.
pub const MAX_MODEL_LEN: usize = 64;
/// Longest label key and value (as Kubernetes: a 63-character name, a 253-character value).
pub const MAX_LABEL_KEY: usize = 63;
pub const MAX_LABEL_VALUE: usize = 253;
/// Largest node a node may claim to be: 65,536 CPUs, 1 PiB of memory, 16 TiB per device. A
/// claim beyond them is a broken or hostile agent, and would saturate the pool's sums.
pub const MAX_NODE_CPU_MILLI: u64 = 65_536_000;
pub const MAX_NODE_MEMORY_BYTES: u64 = 1 << 50;
pub const MAX_DEVICE_MEMORY_BYTES: u64 = 16 << 40;

/// Checks labels (a node's, or a request's selector) against the limits above.
fn check_labels(
    field: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    if labels.len() > MAX_LIST {
        return Err(ValidationError::new(
            field,
            format!("{} labels", labels.len()),
            format!("at most {MAX_LIST} labels"),
            "keep the labels that placement needs",
        ));
    }
    for (key, value) in labels {
        if key.trim().is_empty() || key.len() > MAX_LABEL_KEY || key.contains('\0') {
            return Err(ValidationError::new(
                field,
                format!("{key:?}"),
                format!("a label key must have 1 to {MAX_LABEL_KEY} characters"),
                "write labels as key=value, e.g. region=eu",
            ));
        }
        if value.len() > MAX_LABEL_VALUE || value.contains('\0') {
            return Err(ValidationError::new(
                format!("{field}.{key}"),
                format!("{} characters", value.len()),
                format!("a label value has at most {MAX_LABEL_VALUE} characters"),
                "shorten the value",
            ));
        }
    }
    Ok(())
}

/// A request or node that Tessera refuses, with the field, the offending value and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct ValidationError {
    pub field: String,
    pub value: String,
    pub problem: String,
    pub fix: String,
}

impl ValidationError {
    pub fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        ValidationError {
            field: field.into(),
            value: value.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}; {}",
            self.field, self.value, self.problem, self.fix
        )
    }
}

/// Checks one replica's resources.
pub fn validate_request(request: &ResourceRequest) -> Result<(), ValidationError> {
    match request.gpu {
        GpuRequest::None => {
            if request.gpu_memory_bytes > 0 {
                return Err(ValidationError::new(
                    "gpu_memory",
                    request.gpu_memory_bytes.to_string(),
                    "device memory was requested without a GPU",
                    "add a GPU request (e.g. gpu=0.5) or drop gpu_memory",
                ));
            }
            if !request.device_models.is_empty() {
                return Err(ValidationError::new(
                    "device_models",
                    request.device_models.join("|"),
                    "device models were given without a GPU request",
                    "add a GPU request or drop device_models",
                ));
            }
        }
        GpuRequest::Share { milli } => {
            if milli == 0 || milli >= MILLI_PER_DEVICE {
                return Err(ValidationError::new(
                    "gpu_milli",
                    milli.to_string(),
                    "a share of one device must be between 1 and 999 milli-GPU",
                    "ask for a whole device instead (gpu=1) or a share below 1000",
                ));
            }
        }
        GpuRequest::Whole { devices } => {
            if devices == 0 || devices as usize > MAX_DEVICES_PER_NODE {
                return Err(ValidationError::new(
                    "gpu",
                    devices.to_string(),
                    format!(
                        "whole devices must come from one node, which has at most {MAX_DEVICES_PER_NODE}"
                    ),
                    "ask for fewer devices per replica and add replicas",
                ));
            }
        }
    }
    if !request.gpu_attach.is_local() {
        let attach = format!("{:?}", request.gpu_attach).to_lowercase();
        if request.gpu == GpuRequest::None {
            return Err(ValidationError::new(
                "gpu_attach",
                attach,
                "a replica without a GPU has no device to attach from another node",
                "ask for a GPU (e.g. gpu=0.5) or drop gpu_attach",
            ));
        }
        if request.gpu.device_count() > 1 {
            return Err(ValidationError::new(
                "gpu_attach",
                attach,
                "a remote attachment carries one device per replica",
                "ask for one device per replica and add replicas, or use gpu_attach=local",
            ));
        }
    }
    if request.cpu_milli == 0 && request.gpu == GpuRequest::None {
        return Err(ValidationError::new(
            "cpu",
            "0",
            "a replica with no GPU must ask for some CPU",
            "give cpu, e.g. cpu=2 (2000 milli-CPU)",
        ));
    }
    if request.device_models.len() > MAX_LIST {
        return Err(ValidationError::new(
            "device_models",
            format!("{} models", request.device_models.len()),
            format!("at most {MAX_LIST} device models"),
            "list the models the job can use, e.g. H100-80GB|A100-80GB",
        ));
    }
    for model in &request.device_models {
        if model.trim().is_empty() || model.len() > MAX_MODEL_LEN {
            return Err(ValidationError::new(
                "device_models",
                format!("{model:?}"),
                format!("a device model name has 1 to {MAX_MODEL_LEN} characters"),
                "list model names such as H100-80GB|A100-80GB",
            ));
        }
    }
    check_labels("node_selector", &request.node_selector)
}

/// Checks a whole job.
pub fn validate_job(job: &JobSpec) -> Result<(), ValidationError> {
    if job.name.trim().is_empty() {
        return Err(ValidationError::new(
            "name",
            "\"\"",
            "a job needs a name",
            "give one, e.g. --name train-resnet",
        ));
    }
    if job.replicas == 0 || job.replicas > MAX_REPLICAS {
        return Err(ValidationError::new(
            "replicas",
            job.replicas.to_string(),
            format!("a job has between 1 and {MAX_REPLICAS} replicas"),
            "set replicas to at least 1",
        ));
    }
    validate_request(&job.request)
}

/// Checks a node's inventory.
pub fn validate_node(node: &NodeSpec) -> Result<(), ValidationError> {
    if node.name.trim().is_empty() {
        return Err(ValidationError::new(
            "node.name",
            "\"\"",
            "a node needs a name",
            "use the host name",
        ));
    }
    if node.cpu_milli == 0 {
        return Err(ValidationError::new(
            "node.cpu",
            format!("{} (node {})", node.cpu_milli, node.name),
            "a node must offer some CPU",
            "report the node's CPUs in milli-CPU (32 CPUs = 32000)",
        ));
    }
    if node.memory_bytes == 0 {
        return Err(ValidationError::new(
            "node.memory",
            format!("0 (node {})", node.name),
            "a node must offer some memory",
            "report the node's memory in bytes",
        ));
    }
    if node.cpu_milli > MAX_NODE_CPU_MILLI {
        return Err(ValidationError::new(
            "node.cpu",
            format!("{} (node {})", node.cpu_milli, node.name),
            format!("a node offers at most {} CPUs", MAX_NODE_CPU_MILLI / 1000),
            "report the node's real CPUs in milli-CPU (32 CPUs = 32000)",
        ));
    }
    if node.memory_bytes > MAX_NODE_MEMORY_BYTES {
        return Err(ValidationError::new(
            "node.memory",
            format!("{} (node {})", node.memory_bytes, node.name),
            "a node offers at most 1 PiB of memory",
            "report the node's real memory in bytes",
        ));
    }
    check_labels("node.labels", &node.labels)?;
    if let Some(d) = node
        .devices
        .iter()
        .find(|d| d.memory_bytes > MAX_DEVICE_MEMORY_BYTES || d.model.len() > MAX_MODEL_LEN)
    {
        return Err(ValidationError::new(
            "node.devices",
            format!(
                "{} with {} bytes (node {})",
                d.model, d.memory_bytes, node.name
            ),
            format!(
                "a device has at most 16 TiB of memory and a model name of at most \
                 {MAX_MODEL_LEN} characters"
            ),
            "report the device as NVML names it",
        ));
    }
    // A class names a vendor and a kind in request names (`vendor/kind/model`): short words.
    let word = |w: &str| {
        !w.is_empty()
            && w.len() <= 32
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if let Some(d) = node
        .devices
        .iter()
        .find(|d| !word(&d.class.vendor) || !word(&d.class.kind) || d.model.contains('/'))
    {
        return Err(ValidationError::new(
            "node.devices.class",
            format!(
                "{}/{}/{} (node {})",
                d.class.vendor, d.class.kind, d.model, node.name
            ),
            "a device's vendor and kind are words of 1 to 32 lowercase letters, digits or '-', \
             and its model has no '/'",
            "report e.g. nvidia/gpu/H100-80GB",
        ));
    }
    if node.devices.len() > MAX_DEVICES_PER_NODE {
        return Err(ValidationError::new(
            "node.devices",
            format!("{} (node {})", node.devices.len(), node.name),
            format!("a node may carry at most {MAX_DEVICES_PER_NODE} devices"),
            "split the machine into several agents",
        ));
    }
    if let Some(device) = node.devices.iter().find(|d| d.model.trim().is_empty()) {
        return Err(ValidationError::new(
            "node.devices.model",
            format!("{:?} (node {})", device.model, node.name),
            "a device has no model name",
            "name every device's model, e.g. H100-80GB",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_only(cpu_milli: u64) -> ResourceRequest {
        ResourceRequest {
            cpu_milli,
            memory_bytes: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn fractional_request_above_one_device_is_refused_with_the_fix() {
        let err = GpuRequest::from_gpus(1.5).unwrap_err();
        assert_eq!(err.field, "gpu");
        assert_eq!(
            err.to_string(),
            "gpu 1.5: a request above one device must be a whole number of devices; \
             ask for 1 or 2 devices, or split the work into replicas"
        );
    }

    #[test]
    fn gpus_are_read_as_shares_or_whole_devices() {
        assert_eq!(GpuRequest::from_gpus(0.0).unwrap(), GpuRequest::None);
        assert_eq!(
            GpuRequest::from_gpus(0.5).unwrap(),
            GpuRequest::Share { milli: 500 }
        );
        assert_eq!(
            GpuRequest::from_gpus(1.0).unwrap(),
            GpuRequest::Whole { devices: 1 }
        );
        assert_eq!(
            GpuRequest::from_gpus(8.0).unwrap(),
            GpuRequest::Whole { devices: 8 }
        );
        assert_eq!(GpuRequest::from_gpus(0.3333).unwrap_err().field, "gpu");
        assert_eq!(GpuRequest::from_gpus(-1.0).unwrap_err().field, "gpu");
        assert_eq!(GpuRequest::from_gpus(f64::NAN).unwrap_err().field, "gpu");
    }

    #[test]
    fn a_device_class_is_two_short_words() {
        let mut n = crate::testkit::node("n", 8, 64, 1, "H100", 80);
        validate_node(&n).unwrap();
        n.devices[0].class.vendor = "Evil/Vendor".into();
        assert_eq!(validate_node(&n).unwrap_err().field, "node.devices.class");
        n.devices[0].class.vendor = "amd".into();
        n.devices[0].model = "a/b".into();
        assert_eq!(validate_node(&n).unwrap_err().field, "node.devices.class");
    }

    #[test]
    fn remote_attachment_needs_exactly_one_device() {
        use crate::request::GpuAttach;
        let mut r = cpu_only(1000);
        r.gpu_attach = GpuAttach::Any;
        let err = validate_request(&r).unwrap_err();
        assert_eq!(err.field, "gpu_attach");
        assert!(err.to_string().contains("no device to attach"), "{err}");
        r.gpu = GpuRequest::Whole { devices: 2 };
        let err = validate_request(&r).unwrap_err();
        assert!(err.to_string().contains("one device per replica"), "{err}");
        r.gpu = GpuRequest::Whole { devices: 1 };
        validate_request(&r).unwrap();
        r.gpu = GpuRequest::Share { milli: 250 };
        r.gpu_attach = GpuAttach::Remote;
        validate_request(&r).unwrap();
    }

    #[test]
    fn share_must_stay_below_one_device() {
        let mut r = cpu_only(1000);
        r.gpu = GpuRequest::Share { milli: 1000 };
        assert_eq!(validate_request(&r).unwrap_err().field, "gpu_milli");
        r.gpu = GpuRequest::Share { milli: 0 };
        assert_eq!(validate_request(&r).unwrap_err().field, "gpu_milli");
        r.gpu = GpuRequest::Share { milli: 999 };
        assert!(validate_request(&r).is_ok());
    }

    #[test]
    fn device_memory_or_models_without_a_gpu_are_refused() {
        let mut r = cpu_only(1000);
        r.gpu_memory_bytes = 1 << 30;
        assert_eq!(validate_request(&r).unwrap_err().field, "gpu_memory");
        let mut r = cpu_only(1000);
        r.device_models = vec!["T4".into()];
        assert_eq!(validate_request(&r).unwrap_err().field, "device_models");
    }

    #[test]
    fn jobs_need_a_name_and_replicas() {
        let mut job = JobSpec::single("train", cpu_only(1000));
        assert!(validate_job(&job).is_ok());
        job.replicas = 0;
        assert_eq!(validate_job(&job).unwrap_err().field, "replicas");
        job.replicas = 1;
        job.name = " ".into();
        assert_eq!(validate_job(&job).unwrap_err().field, "name");
    }

    #[test]
    fn too_many_whole_devices_for_any_node_is_refused() {
        let mut r = cpu_only(1000);
        r.gpu = GpuRequest::Whole { devices: 65 };
        let err = validate_request(&r).unwrap_err();
        assert_eq!(err.field, "gpu");
        assert!(err.fix.contains("replicas"));
    }

    #[test]
    fn nodes_need_cpu_memory_and_named_devices() {
        use crate::model::DeviceSpec;
        let good = NodeSpec::with_devices(
            "n1",
            32_000,
            1 << 36,
            2,
            DeviceSpec {
                class: Default::default(),
                model: "T4".into(),
                memory_bytes: 16 << 30,
            },
        );
        assert!(validate_node(&good).is_ok());
        let mut bad = good.clone();
        bad.cpu_milli = 0;
        assert_eq!(validate_node(&bad).unwrap_err().field, "node.cpu");
        let mut bad = good.clone();
        bad.devices[1].model = String::new();
        assert_eq!(validate_node(&bad).unwrap_err().field, "node.devices.model");
        let mut bad = good;
        bad.devices = vec![bad.devices[0].clone(); 65];
        assert_eq!(validate_node(&bad).unwrap_err().field, "node.devices");
    }

    #[test]
    fn priorities_are_classes_or_numbers() {
        assert_eq!(crate::request::parse_priority("high").unwrap(), 75);
        assert_eq!(crate::request::parse_priority("60").unwrap(), 60);
        assert_eq!(
            crate::request::parse_priority("urgent").unwrap_err().field,
            "priority"
        );
    }
}
