//! Job state transitions: pending → scheduled → running → succeeded / failed / cancelled, with a
//! reason on every transition. Pure functions over a job record and the time.

use crate::manifest::RestartPolicy;
use crate::protocol::{ReplicaStatus, RunPhase, exit_words};
use crate::state::{EventKind, Job, JobState, Replica, ReplicaPhase, StopCause};

/// How long a job whose replica was interrupted by its node waits before it is placed again.
const INTERRUPTED_WAIT_MS: u64 = 5_000;

/// Longest restart backoff.
const MAX_BACKOFF_MS: u64 = 60_000;

/// An event to record: (kind, message).
pub type Note = (EventKind, String);

/// Backoff before restart number `restarts` (1, 2, 4, ... seconds, at most a minute).
pub fn backoff_ms(restarts: u32) -> u64 {
    (1000u64 << restarts.saturating_sub(1).min(16)).min(MAX_BACKOFF_MS)
}

/// Applies one agent report about a replica of the job's current attempt.
pub fn apply_status(job: &mut Job, index: u32, status: &ReplicaStatus, now: u64) -> bool {
    let Some(r) = job.replicas.iter_mut().find(|r| r.index == index) else {
        return false;
    };
    match status.phase {
        RunPhase::Running if r.phase == ReplicaPhase::Assigned => {
            r.phase = ReplicaPhase::Running;
            r.started_ms = Some(now);
            r.port = status.port;
            true
        }
        RunPhase::Exited if !r.phase.is_done() => {
            r.phase = ReplicaPhase::Exited;
            r.exit_code = status.exit_code;
            r.exit_message = Some(status.message.clone()).filter(|m| !m.is_empty());
            r.finished_ms = Some(now);
            if status.interrupted && !r.leaving && job.stop.is_none() {
                job.stop = Some(Box::new(StopCause::Interrupted {
                    replica: index,
                    why: status.message.clone(),
                }));
            }
            true
        }
        _ => false,
    }
}

/// How a replica ended, in words: the agent's own words when it gave some (an OOM kill, a lost
/// lease), which say more than the exit code.
fn ended_how(r: &Replica) -> String {
    match &r.exit_message {
        Some(m) => m.clone(),
        None => format!("exited with {}", exit_words(r.exit_code.unwrap_or(-1))),
    }
}

/// Moves the job on after its replicas changed; returns what happened, in words.
pub fn settle(job: &mut Job, now: u64) -> Vec<Note> {
    let mut notes = Vec::new();
    if !job.state.is_active() {
        return notes;
    }
    // Replicas an elastic job gave back end as they will: they are no longer part of it.
    if job.stop.is_none() {
        if let Some(r) = job
            .replicas
            .iter()
            .find(|r| !r.leaving && r.phase == ReplicaPhase::Exited && r.exit_code != Some(0))
        {
            let code = r.exit_code.unwrap_or(-1);
            let others = job.replicas.iter().filter(|o| !o.phase.is_done()).count();
            let mut text = format!("replica {} {}", r.index, ended_how(r));
            if others > 0 {
                text.push_str(&format!(
                    "; stopping the other {others} replica(s) of the gang"
                ));
            }
            job.stop = Some(Box::new(StopCause::ReplicaFailed {
                replica: r.index,
                exit_code: code,
            }));
            notes.push((EventKind::ReplicaFailed, text));
        } else if job.all_replicas_done()
            && job
                .replicas
                .iter()
                .filter(|r| !r.leaving)
                .all(|r| r.phase == ReplicaPhase::Exited && r.exit_code == Some(0))
        {
            job.state = JobState::Succeeded;
            job.reason = "every replica exited with code 0".into();
            job.finished_ms = Some(now);
            notes.push((EventKind::Succeeded, job.reason.clone()));
            return notes;
        } else if job.state == JobState::Scheduled
            && job
                .replicas
                .iter()
                .any(|r| r.phase == ReplicaPhase::Running)
        {
            job.state = JobState::Running;
            let mut nodes: Vec<&str> = job
                .replicas
                .iter()
                .flat_map(|r| r.nodes().map(String::as_str))
                .collect();
            nodes.sort_unstable();
            nodes.dedup();
            let running = format!("running on {}", nodes.join(", "));
            // A job being stopped keeps saying so (cancelling, moving).
            if job.stop.is_none() {
                job.reason = running.clone();
            }
            notes.push((EventKind::Running, running));
        }
    }
    if job.stop.is_some() && job.all_replicas_done() {
        let cause = job.stop.take().map(|b| *b).unwrap_or(StopCause::Cancel {
            by: "unknown".into(),
        });
        let requeue = |job: &mut Job, reason: String| {
            job.state = JobState::Pending;
            job.reason = reason;
            job.queued_ms = now;
            job.replicas.clear();
        };
        match cause {
            StopCause::Idle { idle_ms } => {
                job.state = JobState::Cancelled;
                job.reason = format!(
                    "stopped by its project's idle policy: its GPUs were idle for {} s",
                    idle_ms / 1000
                );
                job.finished_ms = Some(now);
                notes.push((EventKind::Cancelled, job.reason.clone()));
            }
            StopCause::Cancel { by } => {
                job.state = JobState::Cancelled;
                job.reason = format!("cancelled by {by}");
                job.finished_ms = Some(now);
                notes.push((EventKind::Cancelled, job.reason.clone()));
            }
            StopCause::Preempt { for_job, reason } => {
                requeue(
                    job,
                    format!("preempted for job {for_job} ({reason}); queued again"),
                );
                notes.push((EventKind::Preempted, job.reason.clone()));
            }
            StopCause::NodeLost { node } => {
                requeue(
                    job,
                    format!("node {node} was lost; the job is queued again to run elsewhere"),
                );
                notes.push((EventKind::Requeued, job.reason.clone()));
            }
            StopCause::Migrate { by, to } => {
                let target = to
                    .as_ref()
                    .map_or(String::new(), |n| format!(" to node {n}"));
                requeue(
                    job,
                    format!("moved{target} at the request of {by}; queued again"),
                );
                job.pin_node = to;
                notes.push((EventKind::Migrated, job.reason.clone()));
            }
            StopCause::Interrupted { replica, why } => {
                requeue(
                    job,
                    format!(
                        "replica {replica} could not run for a reason of its node ({why}); \
                         queued again"
                    ),
                );
                // Not at once: the node's trouble (a full disk) may take a while to clear.
                job.not_before_ms = now + INTERRUPTED_WAIT_MS;
                notes.push((EventKind::Requeued, job.reason.clone()));
            }
            StopCause::Drain { node } => {
                requeue(job, format!("node {node} is being drained; queued again"));
                notes.push((EventKind::Requeued, job.reason.clone()));
            }
            StopCause::Requeue { by } => {
                requeue(job, format!("requeued at the request of {by}"));
                notes.push((EventKind::Requeued, job.reason.clone()));
            }
            StopCause::TimeLimit { limit_ms } => {
                job.state = JobState::Failed;
                job.reason = format!(
                    "time limit: stopped after running {}, its limit (--time)",
                    crate::units::duration_text(limit_ms)
                );
                job.finished_ms = Some(now);
                notes.push((EventKind::Failed, job.reason.clone()));
            }
            StopCause::ReplicaFailed { replica, exit_code } => {
                let how = match job.replicas.iter().find(|r| r.index == replica) {
                    Some(r) => ended_how(r),
                    None => format!("exited with {}", exit_words(exit_code)),
                };
                let what = format!("replica {replica} {how}");
                if job.def.restart == RestartPolicy::OnFailure
                    && job.restarts < job.def.max_restarts
                {
                    job.restarts += 1;
                    let wait = backoff_ms(job.restarts);
                    job.not_before_ms = now + wait;
                    requeue(
                        job,
                        format!(
                            "{what}; restart {} of {} after {} s",
                            job.restarts,
                            job.def.max_restarts,
                            wait / 1000
                        ),
                    );
                    notes.push((EventKind::Restarting, job.reason.clone()));
                } else {
                    job.state = JobState::Failed;
                    job.reason = if job.def.restart == RestartPolicy::OnFailure {
                        format!("{what}; no restarts left ({})", job.def.max_restarts)
                    } else {
                        format!("{what}; the restart policy is never")
                    };
                    job.finished_ms = Some(now);
                    notes.push((EventKind::Failed, job.reason.clone()));
                }
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Replica;
    use tessera_sched::ResourceRequest;

    fn job(replicas: u32, restart: RestartPolicy) -> Job {
        let mut job = crate::testkit::job(1, ResourceRequest::default());
        job.def.spec.replicas = replicas;
        job.def.restart = restart;
        job.def.max_restarts = 1;
        let placed = crate::testkit::alloc(0);
        Job {
            state: JobState::Scheduled,
            reason: String::new(),
            attempt: 1,
            started_seq: 1,
            replicas: (0..replicas)
                .map(|i| Replica::assigned(i, &format!("n{i}"), &placed))
                .collect(),
            ..job
        }
    }

    fn status(phase: RunPhase, code: Option<i32>) -> ReplicaStatus {
        ReplicaStatus {
            exit_code: code,
            ..ReplicaStatus::new("", phase)
        }
    }

    #[test]
    fn a_gang_runs_then_succeeds_only_when_every_replica_exits_zero() {
        let mut j = job(2, RestartPolicy::Never);
        apply_status(&mut j, 0, &status(RunPhase::Running, None), 10);
        assert_eq!(settle(&mut j, 10)[0].0, EventKind::Running);
        apply_status(&mut j, 0, &status(RunPhase::Exited, Some(0)), 20);
        assert!(settle(&mut j, 20).is_empty());
        assert_eq!(j.state, JobState::Running);
        apply_status(&mut j, 1, &status(RunPhase::Exited, Some(0)), 30);
        settle(&mut j, 30);
        assert_eq!(j.state, JobState::Succeeded);
    }

    #[test]
    fn a_failed_replica_stops_the_gang_then_restarts_with_backoff_until_none_are_left() {
        let mut j = job(2, RestartPolicy::OnFailure);
        apply_status(&mut j, 1, &status(RunPhase::Exited, Some(3)), 10);
        let notes = settle(&mut j, 10);
        assert_eq!(notes[0].0, EventKind::ReplicaFailed);
        assert!(j.stop.is_some() && j.state.is_active());
        // The other replica is still assigned: nothing moves until it is done.
        assert!(settle(&mut j, 11).is_empty());
        j.replicas[0].phase = ReplicaPhase::NotStarted;
        settle(&mut j, 12);
        assert_eq!(j.state, JobState::Pending);
        assert_eq!((j.restarts, j.not_before_ms), (1, 12 + 1000));
        assert!(j.reason.contains("restart 1 of 1"), "{}", j.reason);
        // Second failure: the one allowed restart is used up.
        j.state = JobState::Running;
        j.replicas = job(1, RestartPolicy::OnFailure).replicas;
        apply_status(&mut j, 0, &status(RunPhase::Exited, Some(137)), 20);
        settle(&mut j, 20);
        assert_eq!(j.state, JobState::Failed);
        assert!(j.reason.contains("137"), "{}", j.reason);
    }

    #[test]
    fn a_replica_an_elastic_job_gave_back_is_neither_its_failure_nor_its_success() {
        let mut j = job(3, RestartPolicy::Never);
        j.replicas[2].leaving = true;
        for i in 0..3 {
            apply_status(&mut j, i, &status(RunPhase::Running, None), 10);
        }
        settle(&mut j, 10);
        // Stopped by its checkpoint signal: a non-zero exit, and nothing fails.
        apply_status(&mut j, 2, &status(RunPhase::Exited, Some(143)), 20);
        assert!(settle(&mut j, 20).is_empty());
        assert_eq!((j.state, j.stop.is_none()), (JobState::Running, true));
        apply_status(&mut j, 0, &status(RunPhase::Exited, Some(0)), 30);
        apply_status(&mut j, 1, &status(RunPhase::Exited, Some(0)), 30);
        settle(&mut j, 30);
        assert_eq!(j.state, JobState::Succeeded);

        // The others done while a given-back replica still stops: success waits for it.
        let mut j = job(2, RestartPolicy::Never);
        j.replicas[1].leaving = true;
        apply_status(&mut j, 0, &status(RunPhase::Exited, Some(0)), 30);
        settle(&mut j, 30);
        assert!(j.state.is_active());
        apply_status(&mut j, 1, &status(RunPhase::Exited, Some(1)), 31);
        settle(&mut j, 31);
        assert_eq!(j.state, JobState::Succeeded);
    }

    #[test]
    fn a_replica_its_node_interrupted_is_queued_again_without_using_a_restart() {
        let mut j = job(2, RestartPolicy::Never);
        apply_status(&mut j, 0, &status(RunPhase::Running, None), 10);
        settle(&mut j, 10);
        let mut full = status(RunPhase::Exited, Some(127));
        full.interrupted = true;
        full.message = "the node could not start it: No space left on device".into();
        apply_status(&mut j, 1, &full, 20);
        // The gang's other replica is stopped first; then the job waits and is placed again.
        assert!(settle(&mut j, 20).is_empty());
        assert!(j.stop.is_some() && j.state.is_active());
        apply_status(&mut j, 0, &status(RunPhase::Exited, Some(143)), 30);
        let notes = settle(&mut j, 30);
        assert_eq!(notes[0].0, EventKind::Requeued, "{notes:?}");
        assert_eq!(
            j.state,
            JobState::Pending,
            "not failed, although its policy is never"
        );
        assert_eq!((j.restarts, j.not_before_ms), (0, 30 + INTERRUPTED_WAIT_MS));
        assert!(j.reason.contains("No space left"), "{}", j.reason);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_ms(1), 1000);
        assert_eq!(backoff_ms(3), 4000);
        assert_eq!(backoff_ms(30), MAX_BACKOFF_MS);
    }
}
