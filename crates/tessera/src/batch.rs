//! What Slurm users reach for in a batch queue: job arrays with a limit on how many tasks run at
//! once, dependencies between jobs, a time limit, a start time, and holds. Pure: the submit
//! path parses with these functions and the scheduling round asks [`gate`] what keeps a pending
//! job from the scheduler.

use serde::{Deserialize, Serialize};
use tessera_sched::ValidationError;

use crate::state::{Job, JobState};

/// Most tasks one array may have (Slurm's MaxArraySize is 1001 by default).
pub const MAX_ARRAY_TASKS: usize = 10_000;
/// Most jobs one job may depend on.
pub const MAX_DEPENDENCIES: usize = 100;

/// Most jobs one job's dependencies may stand for, an array counting as its tasks: every
/// scheduling round and every view of a waiting job looks at each of them, so a member must not
/// make one job stand on a million (a hundred arrays of 10,000 tasks).
pub const MAX_DEPENDENCY_TASKS: usize = MAX_ARRAY_TASKS;

/// How many jobs `after` stands for: an array's id counts as its tasks.
pub fn dependency_weight<'a>(after: &[After], job_of: impl Fn(u64) -> Option<&'a Job>) -> usize {
    after
        .iter()
        .map(|a| match job_of(a.job).and_then(|d| d.def.array.as_ref()) {
            Some(t) if t.id == a.job => t.count as usize,
            _ => 1,
        })
        .sum()
}

/// `--array 0-99%8`: the task indexes, and how many may run at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArraySpec {
    pub indexes: Vec<u32>,
    pub limit: Option<u32>,
    /// As it was written.
    pub text: String,
}

/// One task of an array: each is a job of its own; `id` is the array's (its first task's) id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayTask {
    pub id: u64,
    pub index: u32,
    /// Tasks in the array: their ids are `id .. id + count`.
    pub count: u32,
    /// At most this many of its tasks are scheduled or running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The array as it was written (`0-99%8`), for lists.
    pub text: String,
}

/// Parses Slurm's array syntax: indexes `0-99`, `1,3,8-15`, a step `0-99:10`, then `%N` for at
/// most N tasks at once.
pub fn parse_array(field: &str, text: &str) -> Result<ArraySpec, ValidationError> {
    let bad = |why: &str| {
        ValidationError::new(
            field,
            text,
            why,
            "write indexes as 0-99, 1,3,8-15 or 0-99:10, and %N for at most N at once, e.g. 0-99%8",
        )
    };
    let (list, limit) = match text.trim().split_once('%') {
        Some((l, n)) => {
            let n: u32 = n
                .trim()
                .parse()
                .map_err(|_| bad("the limit after % is not a number"))?;
            if n == 0 {
                return Err(bad("a limit of 0 would never run a task"));
            }
            (l, Some(n))
        }
        None => (text.trim(), None),
    };
    let mut indexes = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        let (range, step) = match part.split_once(':') {
            Some((r, s)) => (
                r,
                s.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad("the step after : is not a positive number"))?,
            ),
            None => (part, 1),
        };
        let num = |s: &str| s.trim().parse::<u32>().map_err(|_| bad("not an index"));
        let (from, to) = match range.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(range)?, num(range)?),
        };
        if from > to {
            return Err(bad("a range goes from low to high"));
        }
        let mut i = from;
        while i <= to {
            indexes.push(i);
            if indexes.len() > MAX_ARRAY_TASKS {
                return Err(bad("an array has at most 10000 tasks"));
            }
            match i.checked_add(step) {
                Some(next) => i = next,
                None => break,
            }
        }
    }
    indexes.sort_unstable();
    indexes.dedup();
    Ok(ArraySpec {
        indexes,
        limit,
        text: text.trim().to_string(),
    })
}

/// What a dependency waits for (`--after`, `--after-ok`, `--after-any`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterKind {
    /// The other job has started (Slurm's `after`).
    Start,
    /// The other job succeeded (`afterok`); if it fails or is cancelled, this job is cancelled.
    Ok,
    /// The other job ended, however (`afterany`).
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct After {
    pub job: u64,
    pub on: AfterKind,
}

/// When a job may start (`--begin`): a time, or a delay from its submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Begin {
    AtMs(u64),
    AfterMs(u64),
}

impl Begin {
    pub fn at(self, submitted_ms: u64) -> u64 {
        match self {
            Begin::AtMs(t) => t,
            Begin::AfterMs(d) => submitted_ms.saturating_add(d),
        }
    }
}

/// `2026-12-08T09:00:00Z` (RFC 3339), or `+2h` / `now+2h` (from submission).
pub fn parse_begin(field: &str, text: &str) -> Result<Begin, ValidationError> {
    let t = text.trim();
    if let Some(d) = t.strip_prefix("now+").or_else(|| t.strip_prefix('+')) {
        let d = crate::units::parse_duration(field, d)?;
        return Ok(Begin::AfterMs(d.as_millis() as u64));
    }
    if t == "now" {
        return Ok(Begin::AfterMs(0));
    }
    match humantime::parse_rfc3339_weak(t) {
        Ok(at) => Ok(Begin::AtMs(
            at.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        )),
        Err(_) => Err(ValidationError::new(
            field,
            text,
            "not a time",
            "write a UTC time as 2026-12-08T09:00:00Z (or 2026-12-08 09:00:00), or a delay as +2h",
        )),
    }
}

/// What keeps a pending job from the scheduler, besides capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// It waits; the words say for what.
    Wait(String),
    /// It can never run: a dependency it needed failed or is gone. It is cancelled with this
    /// reason.
    Never(String),
}

/// The gate of pending `job`: its hold, its dependencies (found with `job_of`), then its array's
/// limit (`running_in_array`: its tasks scheduled or running, or admitted this round).
pub fn gate<'a>(job: &Job, job_of: impl Fn(u64) -> Option<&'a Job>, running_in_array: u32) -> Gate {
    if job.held {
        return Gate::Wait(
            "held: it does not start until released (`tessera release ID`)".to_string(),
        );
    }
    let mut waiting = Vec::new();
    for a in &job.def.after {
        let Some(dep) = job_of(a.job) else {
            match a.on {
                AfterKind::Any => continue,
                _ => {
                    return Gate::Never(format!(
                        "its dependency job {} is no longer known, so its outcome cannot be",
                        a.job
                    ));
                }
            }
        };
        let verb = match a.on {
            AfterKind::Start => "start",
            AfterKind::Ok => "succeed",
            AfterKind::Any => "end",
        };
        // An array's id stands for all its tasks, as in Slurm.
        match dep.def.array.as_ref().filter(|t| t.id == a.job) {
            None => match judge(a.on, dep) {
                Verdict::Met => {}
                Verdict::Wait => waiting.push(format!("job {} to {verb}", a.job)),
                Verdict::Never(why) => return Gate::Never(why),
            },
            Some(t) => {
                let mut left = 0;
                for id in t.id..t.id + u64::from(t.count) {
                    match job_of(id).map(|task| judge(a.on, task)) {
                        None | Some(Verdict::Met) => {}
                        Some(Verdict::Wait) => left += 1,
                        Some(Verdict::Never(why)) => return Gate::Never(why),
                    }
                }
                if left > 0 {
                    waiting.push(format!(
                        "array {} to {verb} ({left} of its {} tasks left)",
                        t.id, t.count
                    ));
                }
            }
        }
    }
    if !waiting.is_empty() {
        return Gate::Wait(format!("waiting for {}", waiting.join(", ")));
    }
    if let Some(t) = &job.def.array
        && let Some(limit) = t.limit
        && running_in_array >= limit
    {
        return Gate::Wait(format!(
            "array {}: {running_in_array} of its tasks are running, its limit (%{limit})",
            t.id
        ));
    }
    Gate::Open
}

enum Verdict {
    Met,
    Wait,
    Never(String),
}

/// Whether `dep` is where a dependency `on` it waits for.
fn judge(on: AfterKind, dep: &Job) -> Verdict {
    let started = dep.attempt > 0;
    match (on, dep.state) {
        (AfterKind::Any, s) if s.is_final() => Verdict::Met,
        (AfterKind::Ok, JobState::Succeeded) => Verdict::Met,
        (AfterKind::Ok, s) if s.is_final() => Verdict::Never(format!(
            "dependency failed: job {} {} and this job was to run only after it succeeded \
             (--after-ok)",
            dep.id,
            s.name()
        )),
        (AfterKind::Start, _) if started => Verdict::Met,
        (AfterKind::Start, s) if s.is_final() => Verdict::Never(format!(
            "dependency failed: job {} {} without ever starting (--after)",
            dep.id,
            s.name()
        )),
        _ => Verdict::Wait,
    }
}

/// `--output-file slurm-%j.out`: a path relative to the job's working directory (no `..`), with
/// Slurm's placeholders %j (job id), %A (array id), %a (array index), %x (job name), %N (node),
/// %% (a percent sign).
pub fn check_output(field: &str, text: &str) -> Result<String, ValidationError> {
    let bad = |why: &str| {
        ValidationError::new(
            field,
            text,
            why,
            "write a path relative to the job's working directory, e.g. slurm-%j.out or \
             logs/%x-%A_%a.out (%j job, %A array, %a index, %x name, %N node; the directory \
             must exist, as with Slurm)",
        )
    };
    let t = text.trim();
    if t.is_empty() || t.len() > 255 || t.contains('\0') {
        return Err(bad("not a file name"));
    }
    if t.starts_with('/')
        || t.split('/')
            .any(|c| c == ".." || c.is_empty() && t.len() > 1)
    {
        return Err(bad(
            "the output file stays inside the job's working directory",
        ));
    }
    let mut chars = t.chars();
    while let Some(c) = chars.next() {
        if c == '%' && !matches!(chars.next(), Some('j' | 'A' | 'a' | 'x' | 'N' | '%')) {
            return Err(bad("an unknown placeholder"));
        }
    }
    Ok(t.to_string())
}

/// The output file's name for one replica (placeholders filled in).
pub fn expand_output(pattern: &str, job: &Job, node: &str) -> String {
    let (array, index) = match &job.def.array {
        Some(t) => (t.id.to_string(), t.index.to_string()),
        None => (job.id.to_string(), "0".to_string()),
    };
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('j') => out.push_str(&job.id.to_string()),
            Some('A') => out.push_str(&array),
            Some('a') => out.push_str(&index),
            Some('x') => out.push_str(&job.def.spec.name),
            Some('N') => out.push_str(node),
            Some(other) => out.push(other),
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_are_read_as_slurm_writes_them() {
        let a = parse_array("spec.array", "0-99%8").unwrap();
        assert_eq!(
            (a.indexes.len(), a.indexes[99], a.limit),
            (100, 99, Some(8))
        );
        let a = parse_array("spec.array", "1,3,8-10,3").unwrap();
        assert_eq!(a.indexes, vec![1, 3, 8, 9, 10]);
        assert_eq!(a.limit, None);
        let a = parse_array("spec.array", "0-20:10%1").unwrap();
        assert_eq!((a.indexes, a.limit), (vec![0, 10, 20], Some(1)));
        for bad in ["", "5-1", "0-9%0", "a-b", "0-9:0", "0-10000000", "0-9%x"] {
            let e = parse_array("spec.array", bad).unwrap_err();
            assert_eq!(e.field, "spec.array", "{bad}");
        }
    }

    #[test]
    fn output_files_stay_in_the_working_directory_and_fill_in_slurms_placeholders() {
        assert_eq!(check_output("o", "slurm-%j.out").unwrap(), "slurm-%j.out");
        for bad in ["/etc/x", "../x", "a/../../x", "a%q", "", "a//b"] {
            assert!(check_output("o", bad).is_err(), "{bad}");
        }
        let mut j = job(12, JobState::Running, 1);
        j.def.spec.name = "sweep".into();
        assert_eq!(
            expand_output("o/%x-%j-%N-100%%", &j, "n1"),
            "o/sweep-12-n1-100%"
        );
        j.def.array = Some(Box::new(ArrayTask {
            id: 10,
            index: 2,
            count: 4,
            limit: None,
            text: "0-3".into(),
        }));
        assert_eq!(expand_output("%A_%a.out", &j, "n1"), "10_2.out");
    }

    #[test]
    fn an_arrays_id_weighs_its_tasks_among_dependencies() {
        let mut first = job(5, JobState::Running, 1);
        first.def.array = Some(Box::new(ArrayTask {
            id: 5,
            index: 0,
            count: 400,
            limit: None,
            text: "0-399".into(),
        }));
        let mut second = job(6, JobState::Running, 1);
        second.def.array = Some(Box::new(ArrayTask {
            index: 1,
            ..*first.def.array.clone().unwrap()
        }));
        let plain = job(9, JobState::Running, 1);
        let jobs = [first, second, plain];
        let of = |id: u64| jobs.iter().find(|j| j.id == id);
        let after = |job| After {
            job,
            on: AfterKind::Ok,
        };
        // The array's id stands for its 400 tasks; one of its tasks, or a plain job, for one.
        assert_eq!(
            dependency_weight(&[after(5), after(6), after(9), after(77)], of),
            403
        );
    }

    #[test]
    fn a_begin_is_a_time_or_a_delay() {
        assert_eq!(
            parse_begin("b", "+2h").unwrap(),
            Begin::AfterMs(2 * 3600 * 1000)
        );
        assert_eq!(parse_begin("b", "now+10m").unwrap().at(5), 5 + 600_000);
        assert_eq!(
            parse_begin("b", "2026-12-08T00:00:00Z").unwrap(),
            Begin::AtMs(1_796_688_000_000)
        );
        assert!(
            parse_begin("b", "tomorrow")
                .unwrap_err()
                .to_string()
                .contains("+2h")
        );
    }

    fn job(id: u64, state: JobState, attempt: u32) -> Job {
        let mut j = crate::testkit::job(id, Default::default());
        j.state = state;
        j.attempt = attempt;
        j
    }

    #[test]
    fn dependencies_wait_open_or_doom_a_job() {
        let mut me = job(9, JobState::Pending, 0);
        let others = [
            job(1, JobState::Running, 1),
            job(2, JobState::Succeeded, 1),
            job(3, JobState::Failed, 1),
            job(4, JobState::Cancelled, 0),
        ];
        let of = |id: u64| others.iter().find(|j| j.id == id);
        let after = |job, on| After { job, on };
        me.def.after = vec![after(1, AfterKind::Start), after(2, AfterKind::Ok)];
        assert_eq!(gate(&me, of, 0), Gate::Open);
        me.def.after = vec![after(1, AfterKind::Ok), after(1, AfterKind::Any)];
        assert_eq!(
            gate(&me, of, 0),
            Gate::Wait("waiting for job 1 to succeed, job 1 to end".into())
        );
        me.def.after = vec![after(3, AfterKind::Ok)];
        assert!(matches!(gate(&me, of, 0), Gate::Never(w) if w.contains("job 3 failed")));
        me.def.after = vec![after(3, AfterKind::Any), after(4, AfterKind::Any)];
        assert_eq!(gate(&me, of, 0), Gate::Open);
        me.def.after = vec![after(4, AfterKind::Start)];
        assert!(matches!(gate(&me, of, 0), Gate::Never(w) if w.contains("without ever starting")));
        me.def.after = vec![after(77, AfterKind::Ok)];
        assert!(matches!(gate(&me, of, 0), Gate::Never(_)));
        me.def.after = vec![after(77, AfterKind::Any)];
        assert_eq!(gate(&me, of, 0), Gate::Open);
        // A hold comes first; an array's limit last.
        me.held = true;
        assert!(matches!(gate(&me, of, 0), Gate::Wait(w) if w.starts_with("held")));
        me.held = false;
        me.def.array = Some(Box::new(ArrayTask {
            id: 5,
            index: 3,
            count: 10,
            limit: Some(2),
            text: "0-9%2".into(),
        }));
        assert_eq!(gate(&me, of, 1), Gate::Open);
        assert!(matches!(gate(&me, of, 2), Gate::Wait(w) if w.contains("%2")));
    }
}
