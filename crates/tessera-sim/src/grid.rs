//! Many replays at once: every (trace, policy, seed) on all cores.

use rayon::prelude::*;
use tessera_sched::model::NodeSpec;
use tessera_sched::policy::PolicyKind;
use tessera_sched::validate::ValidationError;

use crate::openb::Trace;
use crate::replay::{RunResult, replay, typical_shapes};

/// Runs every combination; `on_done` is called after each replay (for progress bars).
pub fn run_grid(
    nodes: &[NodeSpec],
    traces: &[Trace],
    policies: &[PolicyKind],
    seeds: &[u64],
    on_done: &(dyn Fn(&RunResult) + Sync),
) -> Result<Vec<RunResult>, ValidationError> {
    let shapes: Vec<_> = traces.iter().map(typical_shapes).collect();
    let mut jobs = Vec::new();
    for (t, _) in traces.iter().enumerate() {
        for &p in policies {
            for &s in seeds {
                jobs.push((t, p, s));
            }
        }
    }
    let mut results: Vec<RunResult> = jobs
        .par_iter()
        .map(|&(t, p, s)| {
            let r = replay(nodes, &traces[t], &shapes[t], p, s)?;
            on_done(&r);
            Ok(r)
        })
        .collect::<Result<_, ValidationError>>()?;
    results.sort_by(|a, b| (&a.trace, a.policy, a.seed).cmp(&(&b.trace, b.policy, b.seed)));
    Ok(results)
}
