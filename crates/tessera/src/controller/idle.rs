//! Idle reclaim: interactive jobs whose GPUs stay under their project's utilisation threshold
//! for its idle time get a warning event, then are stopped (through their checkpoint signal where
//! they declare one). The decision is pure ([`Tracker::step`]); the loop feeds it what the agents
//! last reported. The idle clock lives in memory: a restarted controller starts it again, so a
//! job is never stopped early, at worst late.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::lifecycle::settle;
use super::{ApiError, Ctl, now_ms, ops::save_job};
use crate::state::{EventKind, ReplicaPhase, State, StopCause};

/// A reading older than this says nothing about now.
const STALE_MS: u64 = 30_000;

/// What one interactive job looks like now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub job: u64,
    /// Every replica under the threshold (`Some(true)`), one above it (`Some(false)`), or no
    /// fresh reading (`None`: the clock neither starts nor stops).
    pub idle: Option<bool>,
    pub after_ms: u64,
    pub warning_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Warn {
        job: u64,
        idle_ms: u64,
        stop_in_ms: u64,
    },
    Stop {
        job: u64,
        idle_ms: u64,
    },
}

/// When each job was first seen idle (in its current idle stretch), and which were warned.
#[derive(Debug, Default)]
pub struct Tracker {
    since: HashMap<u64, u64>,
    warned: HashSet<u64>,
}

impl Tracker {
    /// Advances the clocks to `now` and says what to do; jobs not observed are forgotten.
    pub fn step(&mut self, now: u64, seen: &[Observation]) -> Vec<Action> {
        let present: HashSet<u64> = seen.iter().map(|o| o.job).collect();
        self.since.retain(|j, _| present.contains(j));
        self.warned.retain(|j| present.contains(j));
        let mut out = Vec::new();
        for o in seen {
            match o.idle {
                Some(false) => {
                    self.since.remove(&o.job);
                    self.warned.remove(&o.job);
                }
                None => {}
                Some(true) => {
                    let since = *self.since.entry(o.job).or_insert(now);
                    let idle_ms = now - since;
                    if idle_ms >= o.after_ms {
                        out.push(Action::Stop {
                            job: o.job,
                            idle_ms,
                        });
                        self.since.remove(&o.job);
                        self.warned.remove(&o.job);
                    } else if idle_ms + o.warning_ms >= o.after_ms && self.warned.insert(o.job) {
                        out.push(Action::Warn {
                            job: o.job,
                            idle_ms,
                            stop_in_ms: o.after_ms - idle_ms,
                        });
                    }
                }
            }
        }
        out
    }
}

/// The interactive jobs under an idle policy, as the agents last saw them.
fn observe(s: &State, now: u64) -> Vec<Observation> {
    s.jobs
        .values()
        .filter(|j| j.def.interactive && j.state.is_active() && j.stop.is_none())
        .filter_map(|j| {
            let policy = &s.projects.get(j.project())?.policy;
            if policy.idle_after_ms == 0 {
                return None;
            }
            let threshold = policy.idle_threshold();
            let mut idle = Some(true);
            for r in j
                .replicas
                .iter()
                .filter(|r| !r.leaving && !r.devices.is_empty())
            {
                let reading = s
                    .replica_idle
                    .get(&j.key(r.index))
                    .filter(|c| r.phase == ReplicaPhase::Running && c.last_at + STALE_MS >= now);
                match reading {
                    Some(c) if c.last_util_pct >= threshold => {
                        idle = Some(false);
                        break;
                    }
                    Some(_) => {}
                    None => idle = None,
                }
            }
            Some(Observation {
                job: j.id,
                idle,
                after_ms: policy.idle_after_ms,
                warning_ms: policy.idle_warning_ms,
            })
        })
        .collect()
}

/// Checks idle jobs every `every`.
pub async fn run(ctl: Ctl, every: Duration) {
    let mut tracker = Tracker::default();
    loop {
        tokio::time::sleep(every).await;
        let now = now_ms();
        let seen = ctl.store.read(|s| observe(s, now));
        let actions = tracker.step(now, &seen);
        if actions.is_empty() {
            continue;
        }
        let result = ctl
            .store
            .write(move |c, s| -> Result<(), ApiError> {
                for a in actions {
                    let (id, notes) = match a {
                        Action::Warn {
                            job,
                            idle_ms,
                            stop_in_ms,
                        } => (
                            job,
                            vec![(
                                EventKind::IdleWarning,
                                format!(
                                    "its GPUs have been idle for {} s; it will be stopped in {} s \
                                     unless they are used",
                                    idle_ms / 1000,
                                    stop_in_ms.div_ceil(1000)
                                ),
                            )],
                        ),
                        Action::Stop { job, idle_ms } => (
                            job,
                            vec![(
                                EventKind::IdleStop,
                                format!(
                                    "its GPUs were idle for {} s: stopped by its project's idle \
                                     policy",
                                    idle_ms / 1000
                                ),
                            )],
                        ),
                    };
                    let Some(job) = s.jobs.get(&id).filter(|j| j.state.is_active()) else {
                        continue;
                    };
                    let mut job = job.clone();
                    let mut notes = notes;
                    if let Action::Stop { idle_ms, .. } = a {
                        job.stop = Some(Box::new(StopCause::Idle { idle_ms }));
                        notes.extend(settle(&mut job, now));
                    }
                    save_job(c, s, job, notes, now)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!("idle reclaim: {}", e.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(job: u64, idle: Option<bool>) -> Observation {
        Observation {
            job,
            idle,
            after_ms: 10_000,
            warning_ms: 3_000,
        }
    }

    #[test]
    fn an_idle_job_is_warned_then_stopped_and_not_before_its_time() {
        let mut t = Tracker::default();
        assert!(t.step(1_000, &[obs(1, Some(true))]).is_empty());
        assert!(t.step(7_000, &[obs(1, Some(true))]).is_empty());
        assert_eq!(
            t.step(8_000, &[obs(1, Some(true))]),
            vec![Action::Warn {
                job: 1,
                idle_ms: 7_000,
                stop_in_ms: 3_000
            }]
        );
        assert!(
            t.step(9_000, &[obs(1, Some(true))]).is_empty(),
            "warned once"
        );
        assert_eq!(
            t.step(11_000, &[obs(1, Some(true))]),
            vec![Action::Stop {
                job: 1,
                idle_ms: 10_000
            }]
        );
    }

    #[test]
    fn use_resets_the_clock_and_unknown_readings_neither_start_nor_stop_it() {
        let mut t = Tracker::default();
        t.step(0, &[obs(1, Some(true)), obs(2, None)]);
        assert!(
            t.step(9_000, &[obs(1, Some(false)), obs(2, None)])
                .is_empty()
        );
        // Idle again from 9 s: nothing until 19 s.
        t.step(9_500, &[obs(1, Some(true)), obs(2, None)]);
        assert!(
            t.step(18_000, &[obs(1, Some(true)), obs(2, None)])
                .iter()
                .all(|a| matches!(a, Action::Warn { .. }))
        );
        assert!(matches!(
            t.step(19_500, &[obs(1, Some(true)), obs(2, Some(true))])[..],
            [Action::Stop { job: 1, .. }]
        ));
        // A job that left the set is forgotten.
        t.step(20_000, &[obs(2, None)]);
        assert!(t.step(40_000, &[obs(1, Some(true))]).is_empty());
    }
}
