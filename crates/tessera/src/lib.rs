//! Tessera's controller, agent, store and command line as a library: the `tessera` binary is a
//! thin `main` over it, and the unit tests of each module (the controller's snapshot building and
//! plan applying among them) run in this library's test target.

pub mod agent;
pub mod auth;
pub mod batch;
pub mod bench;
pub mod bench_failover;
pub mod bench_inprocess;
pub mod cli;
pub mod controller;
pub mod endpoints;
pub mod interactive;
pub mod manifest;
pub mod metering;
pub mod protocol;
pub mod service;
pub mod sim;
pub mod state;
pub mod store;
#[cfg(test)]
mod testkit;
pub mod units;
pub mod volumes;

/// A real OCI registry and test images, shared with the end-to-end tests.
#[cfg(test)]
#[path = "../tests/common/registry.rs"]
mod test_registry;
