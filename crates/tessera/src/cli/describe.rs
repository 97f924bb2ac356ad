//! `tessera describe node NAME` and `describe project NAME` (as `kubectl describe`): the record,
//! then what runs there, in words.

use serde_json::{Value, json};

use super::{Client, printable, table};
use crate::controller::views::{JobView, NodeView, ProjectView};
use tessera_sched::model::human_bytes;

/// Jobs (running or waiting) of a query, as the API lists them.
fn active_jobs(c: &Client, query: &str) -> anyhow::Result<Vec<JobView>> {
    let v = c.get(&format!("/v1/jobs?state=pending,scheduled,running{query}"))?;
    Ok(serde_json::from_value(v)?)
}

/// The jobs' lines of a table: id, name, project, state, and what they hold.
fn job_rows(jobs: &[JobView], holds: impl Fn(&JobView) -> String) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.name.clone(),
                j.project.clone(),
                format!("{:?}", j.state).to_lowercase(),
                holds(j),
            ]
        })
        .collect()
}

pub fn node(c: &Client, name: &str) -> anyhow::Result<()> {
    let node = c.get(&format!("/v1/nodes/{name}"))?;
    let jobs: Vec<JobView> = active_jobs(c, "")?
        .into_iter()
        .filter(|j| {
            j.assignments
                .iter()
                .any(|r| r.node == name || r.gpu_node.as_deref() == Some(name))
        })
        .collect();
    let both = json!({"node": node, "jobs": serde_json::to_value(&jobs)?});
    c.print(&both, |_| {
        let n: NodeView = serde_json::from_value(node.clone())?;
        println!("Node:        {}", n.name);
        println!(
            "State:       {}{}{}",
            format!("{:?}", n.health).to_lowercase(),
            if n.cordoned { ", cordoned" } else { "" },
            if n.simulated {
                " (simulated devices)"
            } else {
                ""
            }
        );
        println!("Address:     {}", n.address);
        println!(
            "CPU:         {} of {} allocated   Memory: {}",
            n.cpu_allocated_milli as f64 / 1000.0,
            n.cpu_milli as f64 / 1000.0,
            human_bytes(n.memory_bytes)
        );
        if !n.labels.is_empty() {
            let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("Labels:      {}", labels.join(", "));
        }
        println!("Checkpoint:  {}", n.checkpoint.join(", "));
        println!("Confinement: {}", printable(&n.confinement));
        println!(
            "Last seen:   {:.1} s ago",
            n.last_seen_ms_ago as f64 / 1000.0
        );
        if !n.devices.is_empty() {
            println!("Devices:");
            for d in &n.devices {
                println!(
                    "  {}  {}  {}  {:.3} allocated",
                    d.index,
                    d.model,
                    human_bytes(d.memory_bytes),
                    f64::from(d.allocated_milli) / 1000.0
                );
            }
        }
        if jobs.is_empty() {
            println!("Jobs:        none");
        } else {
            println!("Jobs:");
            table(
                &["ID", "NAME", "PROJECT", "STATE", "HERE"],
                job_rows(&jobs, |j| {
                    let mut here = Vec::new();
                    for r in &j.assignments {
                        if r.node == name {
                            here.push(format!("replica {}", r.index));
                        }
                        if r.gpu_node.as_deref() == Some(name) {
                            here.push(format!(
                                "replica {}'s GPU (attached from {})",
                                r.index, r.node
                            ));
                        }
                    }
                    here.join(", ")
                }),
            );
        }
        Ok(())
    })
}

pub fn project(c: &Client, name: &str) -> anyhow::Result<()> {
    let project = c.get(&format!("/v1/projects/{name}"))?;
    let jobs = active_jobs(c, &format!("&project={name}"))?;
    let both = json!({"project": project, "jobs": serde_json::to_value(&jobs)?});
    c.print(&both, |_| {
        let p: ProjectView = serde_json::from_value(project.clone())?;
        println!("Project:     {}", p.name);
        if let Some(parent) = &p.parent {
            println!("Parent:      {parent}");
        }
        let quota = match (p.guaranteed_gpu > 0.0, p.limit_gpu) {
            (false, None) => "no quota: it uses what is free".to_string(),
            (_, None) => format!("{} GPU guaranteed, no limit", p.guaranteed_gpu),
            (_, Some(l)) => format!("{} GPU guaranteed, at most {l}", p.guaranteed_gpu),
        };
        println!("Quota:       {quota}");
        println!(
            "In use:      {} GPU ({} recently, on average)   weight over quota: {}",
            p.used_gpu, p.recent_gpu, p.over_quota_weight
        );
        println!(
            "Jobs:        {} running, {} waiting   protected for {} s after start",
            p.jobs_running, p.jobs_pending, p.min_runtime_s
        );
        let members: Vec<&str> = p.members.iter().map(String::as_str).collect();
        println!(
            "Members:     {}",
            if members.is_empty() {
                "-".to_string()
            } else {
                members.join(", ")
            }
        );
        let policy = serde_json::to_value(&p.policy)?;
        if let Value::Object(m) = &policy
            && !m.is_empty()
        {
            println!("Policy:      {}", serde_json::to_string(&policy)?);
        }
        if !jobs.is_empty() {
            println!("Jobs:");
            table(
                &["ID", "NAME", "PROJECT", "STATE", "GPU"],
                job_rows(&jobs, |j| j.gpu.to_string()),
            );
        }
        Ok(())
    })
}

/// `tessera describe KIND ID [--watch]`: with `watch`, described again each time what it
/// describes changes (looked at every second), under a line with the time, as `watch` would
/// but only on a change.
pub fn describe(c: &Client, kind: &str, id: &str, watch: bool) -> anyhow::Result<()> {
    type Render<'a> = Box<dyn Fn() -> anyhow::Result<()> + 'a>;
    type Look<'a> = Box<dyn Fn() -> anyhow::Result<Value> + 'a>;
    let (render, look): (Render, Look) = match kind {
        "job" => {
            let id: u64 = id
                .parse()
                .map_err(|_| anyhow::anyhow!("describe job {id}: a job's id is a number"))?;
            (
                Box::new(move || super::describe_job(c, id)),
                Box::new(move || {
                    Ok(json!([
                        c.get(&format!("/v1/jobs/{id}"))?,
                        c.get(&format!("/v1/jobs/{id}/events"))?
                    ]))
                }),
            )
        }
        "node" => (
            Box::new(move || node(c, id)),
            Box::new(move || {
                let mut v = c.get(&format!("/v1/nodes/{id}"))?;
                // Counts up by itself: not a change of the node.
                if let Some(o) = v.as_object_mut() {
                    o.remove("last_seen_ms_ago");
                }
                Ok(json!([v, c.get("/v1/jobs?state=scheduled,running")?]))
            }),
        ),
        "project" => (
            Box::new(move || project(c, id)),
            Box::new(move || {
                Ok(json!([
                    c.get(&format!("/v1/projects/{id}"))?,
                    c.get(&format!(
                        "/v1/jobs?project={id}&state=pending,scheduled,running"
                    ))?
                ]))
            }),
        ),
        _ => anyhow::bail!("describe {kind}: describe job ID, node NAME or project NAME"),
    };
    render()?;
    if !watch {
        return Ok(());
    }
    let mut seen = look()?;
    loop {
        std::io::Write::flush(&mut std::io::stdout())?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = look()?;
        if now != seen {
            seen = now;
            println!(
                "\n--- {} ---",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
            render()?;
        }
    }
}
