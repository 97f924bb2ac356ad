//! What a user asks for: jobs made of replicas (a gang), each replica with its own resources.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::MILLI_PER_DEVICE;
use crate::validate::ValidationError;

/// The accelerator part of one replica's request.
///
/// A replica either shares one device (`Share`, strictly less than one device) or holds whole
/// devices (`Whole`); "1.5 GPUs" is not a request Tessera accepts, because no device can be split
/// across a replica boundary and still be isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GpuRequest {
    /// No accelerator at all.
    #[default]
    None,
    /// A share of one device, `1..=999` milli-GPU.
    Share { milli: u32 },
    /// `devices` whole devices on the same node.
    Whole { devices: u32 },
}

impl GpuRequest {
    /// Reads a request written in GPUs, the way people write it (`0.5`, `1`, `8`).
    pub fn from_gpus(gpus: f64) -> Result<Self, ValidationError> {
        let shown = format!("{gpus}");
        if !gpus.is_finite() || gpus < 0.0 {
            return Err(ValidationError::new(
                "gpu",
                shown,
                "a GPU request must be a number of devices, zero or more",
                "write e.g. gpu=0.5 for half a device or gpu=2 for two whole devices",
            ));
        }
        if gpus == 0.0 {
            return Ok(GpuRequest::None);
        }
        if gpus < 1.0 {
            let milli = gpus * f64::from(MILLI_PER_DEVICE);
            let rounded = milli.round();
            if (milli - rounded).abs() > 1e-6 || rounded < 1.0 {
                return Err(ValidationError::new(
                    "gpu",
                    shown,
                    "a share of a device is counted in thousandths",
                    "round it to three decimals, e.g. gpu=0.333",
                ));
            }
            return Ok(GpuRequest::Share {
                milli: rounded as u32,
            });
        }
        if gpus.fract() != 0.0 {
            return Err(ValidationError::new(
                "gpu",
                shown,
                "a request above one device must be a whole number of devices",
                format!(
                    "ask for {} or {} devices, or split the work into replicas",
                    gpus.floor(),
                    gpus.ceil()
                ),
            ));
        }
        Ok(GpuRequest::Whole {
            devices: gpus as u32,
        })
    }

    /// Milli-GPU this request takes from one device it lands on (0, the share, or 1000).
    pub fn per_device_milli(&self) -> u32 {
        match *self {
            GpuRequest::None => 0,
            GpuRequest::Share { milli } => milli,
            GpuRequest::Whole { .. } => MILLI_PER_DEVICE,
        }
    }

    /// Number of devices this request occupies.
    pub fn device_count(&self) -> u32 {
        match *self {
            GpuRequest::None => 0,
            GpuRequest::Share { .. } => 1,
            GpuRequest::Whole { devices } => devices,
        }
    }

    /// Total milli-GPU of this request.
    pub fn total_milli(&self) -> u64 {
        u64::from(self.per_device_milli()) * u64::from(self.device_count())
    }

    pub fn is_share(&self) -> bool {
        matches!(self, GpuRequest::Share { .. })
    }
}

/// Where a replica's device may be: on its own node, or attached over the network from another
/// node (a remote GPU: the replica's CPU part runs on one node, its device slice on another of
/// the same network locality, see [`LOCALITY_LABEL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GpuAttach {
    /// On the replica's own node (the default).
    #[default]
    Local,
    /// Always attached from another node: the CPU part and the device are placed as a pair.
    Remote,
    /// On its own node when that fits, else attached from another node.
    Any,
}

impl GpuAttach {
    pub fn is_local(&self) -> bool {
        *self == GpuAttach::Local
    }
}

/// The node label an admin sets to say which nodes are near enough on the network to attach
/// each other's devices (a rack, a switch): a device on a node with the label is attached only
/// from nodes with the same value; a device on a node without it, from any node.
pub const LOCALITY_LABEL: &str = "tessera.io/network";

/// Resources of one replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct ResourceRequest {
    #[serde(default)]
    pub gpu: GpuRequest,
    /// Device memory per device, in bytes. 0 on a share means "in proportion to the share" (half a
    /// device gets half its memory); 0 on whole devices means the whole device memory.
    #[serde(default)]
    pub gpu_memory_bytes: u64,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// Device models the replica may run on; empty means any.
    #[serde(default)]
    pub device_models: Vec<String>,
    /// Node labels that must all match (`key=value`).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Whether the device may be attached from another node.
    #[serde(default, skip_serializing_if = "GpuAttach::is_local")]
    pub gpu_attach: GpuAttach,
}

/// Named priority classes; a job may also give a plain number.
pub const PRIORITY_CLASSES: [(&str, i32); 4] =
    [("low", 25), ("normal", 50), ("high", 75), ("critical", 100)];

/// Reads a priority class name or a number.
pub fn parse_priority(text: &str) -> Result<i32, ValidationError> {
    if let Some((_, value)) = PRIORITY_CLASSES.iter().find(|(name, _)| *name == text) {
        return Ok(*value);
    }
    text.parse::<i32>().map_err(|_| {
        ValidationError::new(
            "priority",
            text,
            "not a priority class or a number",
            "use low, normal, high, critical, or an integer such as 60",
        )
    })
}

/// What a user submits: `replicas` identical replicas that run as one gang.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub project: String,
    #[serde(default = "default_priority")]
    pub priority: i32,
    #[serde(default = "one")]
    pub replicas: u32,
    pub request: ResourceRequest,
}

fn default_priority() -> i32 {
    50
}

fn one() -> u32 {
    1
}

impl JobSpec {
    /// A one-replica job in project `default` at normal priority.
    pub fn single(name: impl Into<String>, request: ResourceRequest) -> Self {
        JobSpec {
            name: name.into(),
            project: "default".into(),
            priority: default_priority(),
            replicas: 1,
            request,
        }
    }
}
