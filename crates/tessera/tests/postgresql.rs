//! A pool whose store is PostgreSQL (`--store postgresql://…`): a real throwaway cluster, a real
//! controller and agent. The whole pool suite also runs on PostgreSQL with
//! `TESSERA_TEST_STORE=postgresql cargo test -p tessera --test pool`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Submissions from three clients at once until the controller dies; returns what each client
/// was acknowledged.
fn submit_until_refused(pool: &Pool) -> Vec<std::thread::JoinHandle<Vec<u64>>> {
    (0..3)
        .map(|client| {
            let (url, token) = (pool.url.clone(), pool.admin.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut acked = vec![];
                for i in 0..2000 {
                    let name = format!("c{client}-{i}");
                    let r = http
                        .post(format!("{url}/v1/jobs"))
                        .bearer_auth(&token)
                        .json(&json!({"metadata": {"name": name},
                                      "spec": {"command": ["true"],
                                               "resources": {"cpu": "100m", "memory": "16MiB"}}}))
                        .send();
                    match r {
                        Ok(resp) if resp.status().as_u16() == 201 => {
                            acked.push(resp.json::<Value>().unwrap()["id"].as_u64().unwrap());
                        }
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect()
}

#[test]
fn a_pool_on_postgresql_runs_jobs_keeps_every_acknowledged_one_across_kill_9_and_reads_its_ledgers()
{
    let mut pool = Pool::start_on_postgresql(&[]);
    pool.add_agent("n1", "127.0.0.2", "2xH100-80GB");
    let first = pool.submit("default", 0.0, 1, 50, "echo on-postgresql");
    pool.wait_state(first, "succeeded");
    assert_eq!(logs(&pool, first), "on-postgresql\n");

    // kill -9 in the middle of a burst from three clients.
    let clients = submit_until_refused(&pool);
    std::thread::sleep(Duration::from_millis(1500));
    pool.kill_controller();
    let acked: Vec<u64> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        acked.len() > 30,
        "only {} submissions before the kill",
        acked.len()
    );
    let unique: HashSet<u64> = acked.iter().copied().collect();
    assert_eq!(unique.len(), acked.len(), "an id was given twice");
    pool.start_controller_again();

    let jobs = pool.get("/v1/jobs?limit=100000", &pool.admin).1;
    let stored: Vec<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    let stored_once: HashSet<u64> = stored.iter().copied().collect();
    assert_eq!(stored_once.len(), stored.len(), "a job is listed twice");
    for id in &acked {
        assert!(
            stored_once.contains(id),
            "acknowledged job {id} is gone after the restart"
        );
    }
    let last = *acked.iter().max().unwrap();
    pool.wait_state(last, "succeeded");

    // The store is the database: nothing of it in the controller's data dir.
    let data = pool.data_root.join("controller");
    for f in ["tessera.db", "tessera.db-wal"] {
        assert!(!data.join(f).exists(), "{f} in the controller's data dir");
    }
    // The ledgers are read back from the database: the first job's run and its audit trail.
    let (s, usage) = pool.get("/v1/usage?since=1h&by=job", &pool.admin);
    assert_eq!(s, 200, "{usage}");
    assert!(
        usage["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["key"].as_str() == Some(first.to_string().as_str())),
        "{usage}"
    );
    let (s, audit) = pool.get(&format!("/v1/audit?job={first}"), &pool.admin);
    assert_eq!(s, 200, "{audit}");
    assert!(!audit.as_array().unwrap().is_empty(), "{audit}");

    // A bad store is refused with the form to use, and nothing starts.
    let out = std::process::Command::new(bin())
        .args(["controller", "--store", "mysql://root:hunter2@db/tessera"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--store") && err.contains("postgresql://USER:PASS@HOST:PORT/DB"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password is not echoed: {err}"
    );
}
