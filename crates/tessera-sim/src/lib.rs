//! Trace replay for Tessera: production traces through the very placement engine the controller
//! uses, under the exact protocol of published results, so that our numbers compare with theirs.
//!
//! - [`openb`]: loaders for the Alibaba openb traces (the FGD paper's).
//! - [`replay`]: the FGD simulator's protocol (shuffle, tune to 130%, one-shot placement).
//! - [`metrics`]: the paper's allocation metric and binning.
//! - [`constrain`]: constrained variants (a share of GPU tasks pin device models).
//! - [`grid`]: many replays on all cores.
//! - [`published`], [`report`], [`plot`]: our numbers beside the paper's, as tables, JSON, CSV, PNG.

pub mod constrain;
pub mod grid;
pub mod metrics;
pub mod openb;
pub mod plot;
pub mod published;
pub mod replay;
pub mod report;
