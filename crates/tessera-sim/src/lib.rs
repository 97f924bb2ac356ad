//! Trace replay for Tessera: production traces through the very placement engine the controller
//! uses, under the exact protocol of published results, so that our numbers compare with theirs.

pub mod grid;
pub mod metrics;
pub mod openb;
pub mod replay;
