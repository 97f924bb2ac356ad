//! What the pool is made of: nodes and the devices on them, in Tessera's units.
//!
//! Units are those of the public traces: GPU in milli-GPU (1000 = one whole device), CPU in
//! milli-CPU, memory and device memory in bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Milli-GPU in one whole device.
pub const MILLI_PER_DEVICE: u32 = 1000;

/// Most devices a single node may carry (device sets are kept in fixed-size arrays on the hot path).
pub const MAX_DEVICES_PER_NODE: usize = 64;

/// Most distinct device models one pool may hold (model sets are 64-bit masks).
pub const MAX_DEVICE_MODELS: usize = 64;

/// Bytes in one mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// Bytes in one gibibyte.
pub const GIB: u64 = 1024 * MIB;

/// What kind of device it is, after Nomad's vendor/type/model: who makes it and what it is
/// (`nvidia`/`gpu` unless an agent's backend says otherwise), so that other accelerators join
/// the pool as one device backend each and a request can name a class instead of models.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceClass {
    pub vendor: String,
    pub kind: String,
}

impl Default for DeviceClass {
    fn default() -> Self {
        DeviceClass {
            vendor: "nvidia".into(),
            kind: "gpu".into(),
        }
    }
}

impl DeviceClass {
    fn is_default(&self) -> bool {
        *self == DeviceClass::default()
    }
}

/// One physical accelerator as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Model name, e.g. `H100-80GB`, `T4`, `G2`.
    pub model: String,
    /// Device memory in bytes; 0 when the inventory does not know it.
    pub memory_bytes: u64,
    #[serde(default, skip_serializing_if = "DeviceClass::is_default")]
    pub class: DeviceClass,
}

impl DeviceSpec {
    /// Whether a request's device name takes this device: a model (`H100-80GB`), a class
    /// (`nvidia/gpu`), or a model of a class (`nvidia/gpu/H100-80GB`).
    pub fn matches(&self, name: &str) -> bool {
        self.class.takes(&self.model, name)
    }
}

impl DeviceClass {
    /// Whether a request's device name takes a device of this class and `model` (see
    /// [`DeviceSpec::matches`]).
    pub fn takes(&self, model: &str, name: &str) -> bool {
        let mut parts = name.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(m), None, None) => m == model,
            (Some(vendor), Some(kind), m) => {
                vendor == self.vendor && kind == self.kind && m.is_none_or(|m| m == model)
            }
            _ => false,
        }
    }
}

/// One machine of the pool and what it offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
}

impl NodeSpec {
    /// A node with `count` identical devices.
    pub fn with_devices(
        name: impl Into<String>,
        cpu_milli: u64,
        memory_bytes: u64,
        count: usize,
        device: DeviceSpec,
    ) -> Self {
        NodeSpec {
            name: name.into(),
            cpu_milli,
            memory_bytes,
            labels: BTreeMap::new(),
            devices: vec![device; count],
        }
    }
}

/// Formats milli-units (CPU, GPU) for people: `2`, `0.5`.
pub fn human_milli(milli: u64) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{}", milli as f64 / 1000.0)
    }
}

/// `1 node`, `2 nodes`.
pub fn plural(n: u32, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Formats bytes for people: `20.0 GiB`, `512.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}
