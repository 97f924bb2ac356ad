//! Slurm's habits on the command line: an array is one line in `tessera jobs` (`--expand` for
//! its tasks), `cancel`, `hold`, `release` and `requeue` take an array's id for all its tasks
//! and `ID_INDEX` for one (as `scancel 5` and `scancel 5_3` do); `get job` writes a job as the
//! manifest that makes it again.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Client, JobView, Output, printable};
use crate::state::JobState;

/// What `tessera cancel|hold|release|requeue` does to each job.
#[derive(Debug, Clone, Copy)]
pub enum Verb {
    Cancel,
    Hold,
    Release,
    Requeue,
}

impl Verb {
    fn path(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Hold => "hold",
            Verb::Release => "release",
            Verb::Requeue => "requeue",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Verb::Cancel => "cancelled",
            Verb::Hold => "held",
            Verb::Release => "released",
            Verb::Requeue => "requeued",
        }
    }

    /// Whether it applies to a task in this state (the others of an array are left, and
    /// counted).
    fn applies(self, j: &JobView) -> bool {
        match self {
            Verb::Cancel => !j.state.is_final(),
            Verb::Hold => j.state == JobState::Pending && !j.held,
            Verb::Release => j.held,
            Verb::Requeue => j.state != JobState::Pending,
        }
    }
}

/// What an argument names: one job, or an array's tasks.
enum Target {
    Job(u64),
    Array(u64, Vec<JobView>),
}

/// The tasks of array `id`, in index order.
fn tasks(c: &Client, id: u64) -> anyhow::Result<Vec<JobView>> {
    let mut all: Vec<JobView> = serde_json::from_value(c.get(&format!("/v1/jobs?array={id}"))?)?;
    all.sort_by_key(|j| j.array.as_ref().map(|t| t.index));
    Ok(all)
}

/// `5` (a job, or a whole array when 5 is an array's id) or `5_3` (task 3 of array 5).
fn target(c: &Client, arg: &str) -> anyhow::Result<Target> {
    let bad = || anyhow::anyhow!("{arg}: write a job's id (5), or ARRAY_INDEX for one task (5_3)");
    if let Some((array, index)) = arg.split_once('_') {
        let (array, index): (u64, u32) = (
            array.parse().map_err(|_| bad())?,
            index.parse().map_err(|_| bad())?,
        );
        let task = tasks(c, array)?
            .into_iter()
            .find(|j| j.array.as_ref().is_some_and(|t| t.index == index))
            .with_context(|| format!("{arg}: array {array} has no task {index}"))?;
        return Ok(Target::Job(task.id));
    }
    let id: u64 = arg.parse().map_err(|_| bad())?;
    let job: JobView = serde_json::from_value(c.get(&format!("/v1/jobs/{id}"))?)?;
    match &job.array {
        Some(t) if t.id == id => Ok(Target::Array(id, tasks(c, id)?)),
        _ => Ok(Target::Job(id)),
    }
}

/// Does `verb` to each job or array named; says what it did to each.
pub fn act(c: &Client, verb: Verb, args: &[String]) -> anyhow::Result<()> {
    if args.is_empty() {
        bail!(
            "name the jobs: {} ID [ID ...] (an array's id for all its tasks, ID_INDEX for one)",
            verb.path()
        );
    }
    let mut said = Vec::new();
    for arg in args {
        match target(c, arg)? {
            Target::Job(id) => {
                let j = c.post(&format!("/v1/jobs/{id}/{}", verb.path()), json!({}))?;
                said.push(j);
            }
            Target::Array(id, tasks) => {
                let (mine, left): (Vec<&JobView>, Vec<&JobView>) =
                    tasks.iter().partition(|j| verb.applies(j));
                for j in &mine {
                    c.post(&format!("/v1/jobs/{}/{}", j.id, verb.path()), json!({}))?;
                }
                let mut why = String::new();
                if !left.is_empty() {
                    why = format!(" ({} left as they were: {})", left.len(), summary(&left));
                }
                said.push(json!({
                    "array": id,
                    "tasks": tasks.len(),
                    verb.done(): mine.iter().map(|j| j.id).collect::<Vec<_>>(),
                    "reason": format!("{} {} of its {} tasks{why}", verb.done(), mine.len(), tasks.len()),
                }));
            }
        }
    }
    c.print(&Value::Array(said.clone()), |_| {
        for j in &said {
            match j.get("array") {
                Some(a) => println!(
                    "array {a}: {}",
                    printable(j["reason"].as_str().unwrap_or(""))
                ),
                None => println!(
                    "job {}: {}",
                    j["id"],
                    printable(j["reason"].as_str().unwrap_or(""))
                ),
            }
        }
        Ok(())
    })
}

/// "12 running, 80 pending, 8 succeeded": tasks by state, busiest first.
pub fn summary(jobs: &[&JobView]) -> String {
    let mut by: BTreeMap<JobState, usize> = BTreeMap::new();
    for j in jobs {
        *by.entry(j.state).or_default() += 1;
    }
    let held = jobs.iter().filter(|j| j.held).count();
    let mut parts: Vec<String> = by
        .iter()
        .map(|(s, n)| format!("{n} {}", s.name()))
        .collect();
    if held > 0 {
        parts.push(format!("{held} held"));
    }
    parts.join(", ")
}

/// The state an array shows as one line: running while any task runs, then pending, then how
/// its tasks ended (failed over cancelled over succeeded).
fn array_state(jobs: &[&JobView]) -> JobState {
    let any = |s: JobState| jobs.iter().any(|j| j.state == s);
    [
        JobState::Running,
        JobState::Scheduled,
        JobState::Pending,
        JobState::Failed,
        JobState::Cancelled,
    ]
    .into_iter()
    .find(|s| any(*s))
    .unwrap_or(JobState::Succeeded)
}

/// The lines of `tessera jobs`, newest first: a job's own line, or one line for all the tasks
/// of an array (each task its own with `expand`). Keys are what a watch compares by.
pub fn rows(jobs: &[JobView], expand: bool) -> Vec<(String, Vec<String>)> {
    let mut arrays: BTreeMap<u64, Vec<&JobView>> = BTreeMap::new();
    for j in jobs {
        if let (Some(t), false) = (&j.array, expand) {
            arrays.entry(t.id).or_default().push(j);
        }
    }
    let mut out = Vec::new();
    for j in jobs {
        match (&j.array, expand) {
            (Some(t), false) => {
                // The array's line stands where its newest task is listed.
                let Some(tasks) = arrays.remove(&t.id) else {
                    continue;
                };
                let mut row = super::job_row(j);
                row[0] = t.id.to_string();
                row[1] = format!("{}[{}]", j.name, t.text);
                row[4] = array_state(&tasks).name().to_string();
                row[5] = format!("{} tasks", t.count);
                row[8] = summary(&tasks);
                out.push((format!("array {}", t.id), row));
            }
            (Some(t), true) => {
                let mut row = super::job_row(j);
                row[0] = format!("{}_{} ({})", t.id, t.index, j.id);
                out.push((j.id.to_string(), row));
            }
            (None, _) => out.push((j.id.to_string(), super::job_row(j))),
        }
    }
    out
}

/// How `tessera submit` reports an array.
pub fn submitted(c: &Client, first: &Value) -> anyhow::Result<()> {
    let t = &first["array"];
    let (id, count) = (
        t["id"].as_u64().unwrap_or(0),
        t["count"].as_u64().unwrap_or(0),
    );
    if c.output != Output::Table {
        return c.print(first, |_| Ok(()));
    }
    let limit = match t["limit"].as_u64() {
        Some(l) => format!(", at most {l} running at once"),
        None => String::new(),
    };
    println!(
        "array {id} submitted ({}, project {}): {count} tasks, jobs {id} to {}{limit}; \
         TESSERA_ARRAY_INDEX is each task's index",
        first["name"].as_str().unwrap_or(""),
        first["project"].as_str().unwrap_or(""),
        id + count.saturating_sub(1),
    );
    Ok(())
}

/// `tessera get job ID`: the manifest that makes it again, YAML unless `-o json`.
pub fn get_job(c: &Client, id: u64, export: bool) -> anyhow::Result<()> {
    let mut m = c.get(&format!("/v1/jobs/{id}/manifest"))?;
    if export && let Some(o) = m.as_object_mut() {
        o.remove("status");
    }
    match c.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&m)?),
        _ => print!("{}", serde_yaml::to_string(&m)?),
    }
    Ok(())
}
