//! A standby's warm copy of the state, kept by following the leader's commits in PostgreSQL, so
//! that taking over reads what changed since the last poll instead of the whole pool.
//!
//! The change log: every write of a record the state keeps gives it the next `rev` of one
//! sequence; a removed record leaves its key in `deletions` under a rev of its own; events and the
//! usage ledger carry their own sequence numbers. Only the leader writes, one batch at a time,
//! and a deposed leader's batch cannot commit once the next leader took the lease (see
//! [`super::lease`]), so numbers become visible in the order they were given: a follower that
//! read, in one snapshot, every change above its last number has missed none.

use std::sync::{Arc, Mutex};

use tokio_postgres::{Client, IsolationLevel, NoTls};

use super::{STATE_TABLES, apply_deletion, apply_doc};
use crate::state::State;

/// One change read from the log, applied in rev order.
enum Change {
    Doc(&'static str, String),
    Deleted(String, String),
}

pub struct Follower {
    url: String,
    /// `None` until connected, and after the connection failed (the next catch-up reconnects).
    client: Option<Client>,
    /// Shared with the standby's readers (see `controller::standby::Reads`), who see each
    /// catch-up whole: it is applied under one lock.
    state: Arc<Mutex<State>>,
    /// The highest rev applied.
    rev: i64,
    /// A takeover took the state ([`Follower::take_state`]).
    taken: bool,
}

impl Follower {
    /// A follower of the database at `url` that has read nothing yet.
    pub fn new(url: &str) -> Follower {
        Follower {
            url: url.to_string(),
            client: None,
            state: Arc::default(),
            rev: 0,
            taken: false,
        }
    }

    async fn client(&mut self) -> anyhow::Result<&mut Client> {
        let open = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("the standby's change-log connection ended: {e}");
                    }
                });
                client
            }
        };
        Ok(self.client.insert(open))
    }

    /// Reads everything committed since the last call, in one snapshot, and applies it; returns
    /// how many changes it applied. Nodes it reads count as seen at `now_ms`. On an error nothing
    /// of this call is applied and the next call reads the same changes again.
    pub async fn catch_up(&mut self, now_ms: u64) -> anyhow::Result<usize> {
        let rev = self.rev;
        let client = self.client().await?;
        let read = async {
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let mut changes: Vec<(i64, Change)> = Vec::new();
            for table in STATE_TABLES {
                let sql = format!("SELECT rev, doc FROM {table} WHERE rev > $1");
                for row in tx.query(&sql, &[&rev]).await? {
                    changes.push((row.get(0), Change::Doc(table, row.get(1))));
                }
            }
            let sql = "SELECT rev, tbl, key FROM deletions WHERE rev > $1";
            for row in tx.query(sql, &[&rev]).await? {
                changes.push((row.get(0), Change::Deleted(row.get(1), row.get(2))));
            }
            let usage = tx
                .query_one("SELECT COALESCE(MAX(seq), 0) FROM usage", &[])
                .await?
                .get::<_, i64>(0);
            tx.commit().await?;
            anyhow::Ok((changes, usage))
        };
        let (mut changes, usage) = match read.await {
            Ok(read) => read,
            Err(e) => {
                self.client = None;
                return Err(e);
            }
        };
        changes.sort_by_key(|(rev, _)| *rev);
        let applied = changes.len();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // A record this controller cannot read stops the takeover, as it stops a full read.
        for (rev, change) in changes {
            match change {
                Change::Doc(table, doc) => apply_doc(&mut state, table, &doc, now_ms)?,
                Change::Deleted(table, key) => apply_deletion(&mut state, &table, &key)?,
            }
            self.rev = rev;
        }
        state.usage_seq = state.usage_seq.max(usage as u64);
        Ok(applied)
    }

    /// A reader of jobs' events on a connection of its own (see [`EventReader`]).
    pub fn event_reader(&self) -> EventReader {
        EventReader {
            url: self.url.clone(),
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// Drops the connection (one that stopped answering); the next catch-up connects afresh.
    pub fn disconnect(&mut self) {
        self.client = None;
    }

    /// What has been followed so far, as readers share it.
    pub fn shared(&self) -> &Arc<Mutex<State>> {
        &self.state
    }

    /// Whether a catch-up has read the store.
    pub fn warm(&self) -> bool {
        self.rev > 0
    }

    /// Whether a takeover took the state.
    pub fn taken(&self) -> bool {
        self.taken
    }

    /// The followed state, for a controller taking over (readers of [`Follower::shared`] see an
    /// empty one from now on): its nodes count as seen at `now_ms` (as a full read counts them),
    /// so that none is judged lost before its agent finds the new leader.
    pub fn take_state(&mut self, now_ms: u64) -> State {
        self.taken = true;
        let mut state = std::mem::take(&mut *self.state.lock().unwrap_or_else(|e| e.into_inner()));
        for node in state.nodes.values_mut() {
            node.last_seen_ms = now_ms;
        }
        state
    }
}

/// A standby's reads of a job's events, which no controller keeps in memory: on a connection
/// of its own, not the follower's, so that many readers neither wait on a catch-up nor hold it
/// back (the connection answers several queries at once).
pub struct EventReader {
    url: String,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl EventReader {
    /// The newest `limit` events of `job`, oldest first.
    pub async fn events(&self, job: u64, limit: u64) -> anyhow::Result<Vec<crate::state::Event>> {
        let client = {
            let mut held = self.client.lock().await;
            match held.as_ref() {
                Some(c) if !c.is_closed() => c.clone(),
                _ => {
                    let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!("the standby's events connection ended: {e}");
                        }
                    });
                    held.insert(Arc::new(client)).clone()
                }
            }
        };
        let rows = client
            .query(
                super::postgres::JOB_EVENTS,
                &[&(job as i64), &(limit as i64)],
            )
            .await?;
        Ok(super::postgres::job_events(job, &rows)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::registries::RegistryLogin;
    use crate::service::ServiceDef;
    use crate::state::{
        CheckpointManifest, Event, EventKind, JobState, NodeHealth, Replica, Service, User,
    };
    use crate::store::postgres::Postgres;
    use crate::store::testdb::PgCluster;
    use crate::store::{Backend, StoreResult, Tx};
    use crate::testkit::{job, node};
    use tessera_sched::ResourceRequest;

    /// Commits one batch of `f`'s changes, as the writer does.
    fn batch(b: &mut Postgres, f: impl FnOnce(&dyn Tx) -> StoreResult<()>) {
        b.begin().unwrap();
        b.savepoint().unwrap();
        f(b.tx()).unwrap();
        b.release().unwrap();
        b.commit().unwrap();
    }

    fn json<T: serde::Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    /// The parts of two states that come from the store are the same.
    fn assert_same(followed: &State, read: &State) {
        assert_eq!(json(&followed.users), json(&read.users));
        assert_eq!(json(&followed.projects), json(&read.projects));
        assert_eq!(json(&followed.nodes), json(&read.nodes));
        assert_eq!(json(&followed.jobs), json(&read.jobs));
        assert_eq!(json(&followed.services), json(&read.services));
        assert_eq!(json(&followed.tokens), json(&read.tokens));
        let logins = |s: &State| json(&s.registry_logins.values().collect::<Vec<_>>());
        assert_eq!(logins(followed), logins(read));
        let checkpoints = |s: &State| {
            let mut all: Vec<_> = s.checkpoints.values().map(json).collect();
            all.sort();
            all
        };
        assert_eq!(checkpoints(followed), checkpoints(read));
        for name in read.nodes.keys() {
            let ids = |s: &State| s.jobs_on(name).map(|j| j.id).collect::<Vec<_>>();
            assert_eq!(ids(followed), ids(read), "active jobs on node {name}");
        }
        assert_eq!(followed.next_job_id, read.next_job_id);
        assert_eq!(followed.next_start_seq, read.next_start_seq);
        assert_eq!(followed.usage_seq, read.usage_seq);
        assert_eq!(
            followed.recent_requests.len(),
            read.recent_requests.len(),
            "every job's request is remembered once"
        );
    }

    fn login(project: &str) -> RegistryLogin {
        RegistryLogin {
            project: project.into(),
            registry: "registry.example:5000".into(),
            username: "u".into(),
            password: "p".into(),
            updated_ms: 1,
        }
    }

    fn checkpoint(job: u64) -> CheckpointManifest {
        CheckpointManifest {
            id: format!("c{job}"),
            job,
            attempt: 1,
            replica: 0,
            files: vec![],
            created_ms: 1,
        }
    }

    fn service(name: &str) -> Service {
        Service {
            name: name.into(),
            owner: "ana".into(),
            template: job(0, ResourceRequest::default()).def,
            def: ServiceDef {
                replicas: 1,
                port: None,
                readiness_path: "/".into(),
                readiness_period_ms: 1000,
                drain_ms: 0,
                autoscale: None,
            },
            created_ms: 1,
        }
    }

    fn event(job: u64, message: &str) -> Event {
        Event {
            job,
            ts_ms: job,
            kind: EventKind::Submitted,
            message: message.into(),
        }
    }

    #[test]
    fn a_follower_holds_what_a_full_read_gives_and_reads_only_what_changed_since() {
        let pg = PgCluster::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut b = Postgres::open(&pg.url()).unwrap();
        batch(&mut b, |tx| {
            tx.put_user(&User {
                name: "ana".into(),
                role: crate::state::Role::Member,
                created_ms: 1,
                uid: None,
            })?;
            for name in ["a", "b"] {
                tx.put_node(&node(name, NodeHealth::Ready, false))?;
            }
            for id in 1..=40 {
                tx.put_job(&job(id, ResourceRequest::default()))?;
                tx.add_event(&event(id, "submitted"))?;
            }
            tx.put_registry_login(&login("vision"))?;
            tx.put_registry_login(&login("nlp"))?;
            tx.put_checkpoint(&checkpoint(1))?;
            tx.put_checkpoint(&checkpoint(2))?;
            tx.put_service(&service("web"))?;
            tx.put_service(&service("api"))?;
            Ok(())
        });
        let mut f = Follower::new(&pg.url());
        let first = rt.block_on(f.catch_up(7)).unwrap();
        assert_eq!(first, 1 + 2 + 40 + 2 + 2 + 2, "every record");
        assert_same(&f.shared().lock().unwrap(), &b.load(7).unwrap());

        // The leader's next batches: a job starts on node a, another arrives, a node is
        // cordoned, and one of each removable record goes (a service comes back under its name).
        batch(&mut b, |tx| {
            let mut running = job(3, ResourceRequest::default());
            running.state = JobState::Running;
            let mut replica = Replica::assigned(0, "a", &crate::testkit::alloc(0));
            replica.phase = crate::state::ReplicaPhase::Running;
            running.replicas = vec![replica];
            tx.put_job(&running)?;
            tx.add_event(&event(3, "running on a"))?;
            tx.put_job(&job(41, ResourceRequest::default()))?;
            tx.put_node(&node("b", NodeHealth::Ready, true))?;
            tx.delete_checkpoint(1, 0)?;
            tx.delete_registry_login("nlp", "registry.example:5000")?;
            tx.delete_service("web")?;
            Ok(())
        });
        batch(&mut b, |tx| {
            tx.delete_service("api")?;
            tx.put_service(&service("web"))?;
            Ok(())
        });
        let next = rt.block_on(f.catch_up(7)).unwrap();
        assert_eq!(
            next,
            2 + 1 + 4 + 1,
            "two jobs, a node, four deletions and a service: nothing read twice"
        );
        // Events are not followed into memory; they are read from the store when asked.
        let reader = f.event_reader();
        let events = rt.block_on(reader.events(3, 200)).unwrap();
        let said: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(said, ["submitted", "running on a"]);
        assert_eq!(
            rt.block_on(reader.events(3, 1)).unwrap()[0].message,
            "running on a"
        );
        let read = b.load(7).unwrap();
        assert_same(&f.shared().lock().unwrap(), &read);
        assert!(read.services.contains_key("web") && !read.services.contains_key("api"));
        let on_a: Vec<u64> = f
            .shared()
            .lock()
            .unwrap()
            .jobs_on("a")
            .map(|j| j.id)
            .collect();
        assert_eq!(on_a, [3]);
        assert_eq!(rt.block_on(f.catch_up(7)).unwrap(), 0, "nothing new");

        // A follower that starts now reads the same state from scratch.
        let mut late = Follower::new(&pg.url());
        rt.block_on(late.catch_up(7)).unwrap();
        assert_same(&late.shared().lock().unwrap(), &read);
        // Taking over: every node counts as seen at the takeover.
        let state = f.take_state(99);
        assert!(state.nodes.values().all(|n| n.last_seen_ms == 99));
    }
}
