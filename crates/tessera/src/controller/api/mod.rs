//! User-facing handlers under `/v1/`, one module per resource: thin edges over the store and
//! the job lifecycle (shared operations in [`super::ops`], answers in [`super::views`]).

use crate::state::EventKind;
use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use serde::{Deserialize, Serialize};
use tessera_sched::GpuRequest;

use super::lifecycle::settle;
use super::ops::{
    acting_user, cancel, may_use_project, move_target, parse_body, parse_body_or_default,
    parse_manifest, refuse_never_fitting, resolve_mounts, save_job,
};
use super::views::{
    DeviceView, JobView, LogChunk, NodeView, PoolView, ProjectView, ReplicaView, TokenView, WhoAmI,
};
use super::{ApiError, AxState, Caller, Reader, S, issue_token, now_ms};
use crate::manifest::check_name;
use crate::state::{Event, Job, JobState, Project, Role, State, StopCause, TokenKind, User};
use crate::units::{Quantity, parse_gpu_milli};
use std::sync::Arc;

mod interactive;
mod jobs;
mod logs;
mod nodes;
mod projects;
mod users;

pub use interactive::*;
pub use jobs::*;
pub use logs::*;
pub use nodes::*;
pub use projects::*;
pub use users::*;
