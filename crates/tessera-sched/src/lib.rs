//! Tessera's placement core.
//!
//! Pure: no I/O, no clock, randomness only from a seed the caller passes. The controller turns its
//! store into a [`schedule::Snapshot`] and applies the [`schedule::Plan`]; the simulator replays
//! production traces through the very same [`place::Placer`]. Because nothing here waits on the
//! world, placement can be tested on a 6,212-GPU production trace in seconds.
//!
//! The pipeline, stage by stage (see README.md beside this crate):
//! [`validate`] → [`place`] (feasibility) → [`policy`] (scoring) → [`place`] (choice, gangs) →
//! [`schedule`] (ordering and the plan).

pub mod cluster;
pub mod fit;
pub mod frag;
pub mod model;
pub mod place;
pub mod policy;
pub mod quota;
pub mod request;
pub mod rules;
pub mod schedule;
mod score_cache;
pub mod shapes;
#[cfg(test)]
mod testkit;
pub mod validate;

pub use cluster::{Allocation, Cluster, DeviceShare, NodeId};
pub use model::{DeviceSpec, NodeSpec};
pub use place::{PlacementError, Placer};
pub use policy::{PlacementPolicy, PolicyKind};
pub use request::{GpuAttach, GpuRequest, JobSpec, ResourceRequest};
pub use rules::PlacementRules;
pub use shapes::ShapeDistribution;
pub use validate::ValidationError;
