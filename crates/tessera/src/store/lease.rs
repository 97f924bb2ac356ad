//! Leadership among several controllers on one PostgreSQL database: a lease row with a fencing
//! token. One controller holds the lease and renews it; the others campaign. A candidate takes the
//! lease when it expired (a leader paused or cut off) or at once when the leader's database session
//! is gone (a leader killed: PostgreSQL closes its session when the socket closes, so failover does
//! not wait out the lease). Every write batch of the leader begins with `tessera_fence(token)`,
//! which aborts the transaction unless this token still holds an unexpired lease, so a leader that
//! was paused past its lease can never commit after another took over.
//!
//! The lease's clock is PostgreSQL's (`clock_timestamp()`), so controllers' clocks need not
//! agree; the holder's own view of how long it may act is kept on its monotonic clock from before
//! each renewal was sent, so it errs towards stepping down early.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

/// What the leader's writes and answers check: the fencing token and until when (on this
/// controller's monotonic clock) the lease surely holds.
#[derive(Debug, Default)]
pub struct Leadership {
    /// The fencing token; 0 until elected.
    token: AtomicI64,
    /// Set for good once the lease was lost (renewal refused, or past its end unrenewed).
    lost: AtomicBool,
    /// Until when the lease surely holds.
    until: std::sync::Mutex<Option<Instant>>,
    /// Wakes whoever waits for the loss.
    lost_notify: tokio::sync::Notify,
}

impl Leadership {
    /// A leadership that never ends (one controller on SQLite).
    pub fn sole() -> Arc<Leadership> {
        Arc::new(Leadership::default())
    }

    /// The fencing token, if this controller was elected through a lease.
    pub fn token(&self) -> Option<i64> {
        match self.token.load(Ordering::SeqCst) {
            0 => None,
            t => Some(t),
        }
    }

    /// Whether this controller may act as the leader now: elected (or sole) and its lease not
    /// past its end. (A lease that ran out unrenewed, the database away, may be taken back if
    /// nobody else took it meanwhile: see [`Campaign::keep`].)
    pub fn holds(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        if self.token().is_none() {
            return true;
        }
        let until = *self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }

    /// Marks the lease lost, for good.
    pub fn lose(&self) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            self.lost_notify.notify_waiters();
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Resolves once the lease is lost.
    pub async fn lost(&self) {
        loop {
            let wait = self.lost_notify.notified();
            if self.is_lost() {
                return;
            }
            wait.await;
        }
    }

    fn renewed(&self, sent: Instant, ttl: Duration) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = Some(sent + ttl);
    }
}

/// The marker in the error a write gets once another controller took the lease.
pub const FENCED: &str = "no longer holds the leader's lease";
/// The marker in the error a write gets while the lease ran out unrenewed (nobody took it yet).
pub const LAPSED: &str = "the leader's lease ran out";

/// Who holds the lease now, as the database says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub id: String,
    /// Where the leader's API answers.
    pub url: String,
    /// Where the leader's service gateway answers (empty: it runs none).
    pub gateway: String,
    pub token: i64,
}

/// One controller's side of the election: its own connection, its id and URL.
pub struct Campaign {
    url: String,
    id: String,
    advertise: String,
    gateway: String,
    ttl: Duration,
    client: Option<Client>,
    pub leadership: Arc<Leadership>,
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", super::postgres::redact(url)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("the lease connection ended: {e}");
        }
    });
    Ok(client)
}

impl Campaign {
    /// A campaign for the controller `id` whose API answers at `advertise` (and its service
    /// gateway at `gateway`, or nowhere when empty), with leases of `ttl`. The schema must
    /// already be migrated (see [`super::postgres::Postgres::open`]).
    pub fn new(
        url: &str,
        id: String,
        advertise: String,
        gateway: String,
        ttl: Duration,
    ) -> Campaign {
        Campaign {
            url: url.to_string(),
            id,
            advertise,
            gateway,
            ttl,
            client: None,
            leadership: Arc::new(Leadership::default()),
        }
    }

    async fn client(&mut self) -> anyhow::Result<&Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect(&self.url).await?);
        }
        Ok(self.client.as_ref().expect("connected just above"))
    }

    /// The current holder, if any holds an unexpired lease.
    pub async fn holder(&mut self) -> anyhow::Result<Option<Holder>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT holder, url, gateway, token FROM leader WHERE id = 1 AND holder <> '' \
                 AND expires > clock_timestamp()",
                &[],
            )
            .await?;
        Ok(row.map(|r| Holder {
            id: r.get(0),
            url: r.get(1),
            gateway: r.get(2),
            token: r.get(3),
        }))
    }

    /// One try to take the lease: when it expired, was never held, or its holder's session is
    /// gone. Returns the new fencing token.
    pub async fn try_take(&mut self) -> anyhow::Result<Option<i64>> {
        let ttl = self.ttl.as_secs_f64();
        let (id, advertise, gateway) = (
            self.id.clone(),
            self.advertise.clone(),
            self.gateway.clone(),
        );
        let sent = Instant::now();
        let row = self
            .client()
            .await?
            .query_opt(
                "UPDATE leader SET holder = $1, url = $2, gateway = $4, token = token + 1, \
                 pid = pg_backend_pid(), expires = clock_timestamp() + make_interval(secs => $3) \
                 WHERE id = 1 AND (holder = '' OR expires < clock_timestamp() \
                   OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = leader.pid)) \
                 RETURNING token",
                &[&id, &advertise, &ttl, &gateway],
            )
            .await?;
        Ok(row.map(|r| {
            let token: i64 = r.get(0);
            self.leadership.renewed(sent, self.ttl);
            self.leadership.token.store(token, Ordering::SeqCst);
            token
        }))
    }

    /// Renews the lease this controller holds; false when another holds it now. Also moves the
    /// lease to this connection's session (after a reconnect).
    pub async fn renew(&mut self) -> anyhow::Result<bool> {
        let token = self.leadership.token().context("not elected")?;
        let ttl = self.ttl.as_secs_f64();
        let id = self.id.clone();
        let sent = Instant::now();
        let row = self
            .client()
            .await?
            .query_opt(
                "UPDATE leader SET expires = clock_timestamp() + make_interval(secs => $3), \
                 pid = pg_backend_pid() \
                 WHERE id = 1 AND token = $1 AND holder = $2 AND expires > clock_timestamp() \
                 RETURNING token",
                &[&token, &id, &ttl],
            )
            .await?;
        if row.is_some() {
            self.leadership.renewed(sent, self.ttl);
        }
        Ok(row.is_some())
    }

    /// Campaigns until elected, trying every `every`; calls `waiting` with the current holder
    /// (or none) after each failed try.
    pub async fn elect(
        &mut self,
        every: Duration,
        mut waiting: impl FnMut(Option<&Holder>, Option<&anyhow::Error>),
    ) -> i64 {
        loop {
            // As in `keep`: a database that answers nothing is given up on after a lease, and
            // the next try connects afresh (a try whose answer was lost took a lease on a session
            // that then ends, so the next take succeeds all the same).
            let taken = tokio::time::timeout(self.ttl, self.try_take())
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the database did not answer")));
            match taken {
                Ok(Some(token)) => return token,
                Ok(None) => {
                    let holder = tokio::time::timeout(self.ttl, self.holder()).await;
                    let holder = holder.ok().and_then(|h| h.ok()).flatten();
                    waiting(holder.as_ref(), None);
                }
                Err(e) => {
                    self.client = None;
                    waiting(None, Some(&e));
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Renews the lease every third of its length until another controller holds it; then
    /// marks the leadership lost and returns. While the database is away nothing can take the
    /// lease, so renewing is retried; a lease that ran out meanwhile is taken back when the
    /// next token is this one's successor (nobody led in between, so this controller's memory
    /// is still the pool's), and lost otherwise.
    pub async fn keep(mut self) {
        let every = self.ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            if self.leadership.is_lost() {
                return;
            }
            // A database cut off by the network answers nothing, not even an error: each try
            // gives up after a lease, and the next one connects afresh (a hung connection would
            // otherwise keep this leader from learning, once the network is back, that another
            // took over).
            let renewed = match tokio::time::timeout(self.ttl, self.renew()).await {
                Ok(Ok(renewed)) => renewed,
                Err(_) => {
                    tracing::warn!("renewing the leader's lease got no answer (retrying)");
                    self.client = None;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!("renewing the leader's lease failed (retrying): {e:#}");
                    self.client = None;
                    continue;
                }
            };
            if renewed {
                continue;
            }
            let before = self.leadership.token().unwrap_or(0);
            let taken = tokio::time::timeout(self.ttl, self.try_take())
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the database did not answer")));
            match taken {
                Ok(Some(token)) if token == before + 1 => {
                    tracing::warn!(
                        "the leader's lease ran out unrenewed and nobody took it: taken back \
                         (token {token})"
                    );
                }
                Ok(_) => {
                    tracing::error!("another controller took the leader's lease");
                    break;
                }
                Err(e) => {
                    tracing::warn!("taking the lease back failed (retrying): {e:#}");
                    self.client = None;
                }
            }
        }
        self.leadership.lose();
    }
}

/// The schema's part for leadership (one migration; see [`super::schema`]).
pub const POSTGRES_SCHEMA: &str = "
CREATE TABLE leader (id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL,
                     url TEXT NOT NULL, gateway TEXT NOT NULL, token BIGINT NOT NULL,
                     pid INTEGER NOT NULL, expires TIMESTAMPTZ NOT NULL);
INSERT INTO leader VALUES (1, '', '', '', 0, 0, 'epoch');
CREATE FUNCTION tessera_fence(t BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE current BIGINT;
BEGIN
  SELECT token INTO current FROM leader WHERE id = 1 AND expires > clock_timestamp() FOR SHARE;
  IF current IS NULL THEN
    RAISE EXCEPTION 'the leader''s lease ran out (token %); retry once it is renewed', t;
  ELSIF current <> t THEN
    RAISE EXCEPTION 'this controller no longer holds the leader''s lease (token %)', t;
  END IF;
  RETURN t;
END $$;";

#[cfg(test)]
mod tests {
    use super::super::testdb::PgCluster;
    use super::super::{Backend, postgres::Postgres};
    use super::*;

    fn two_campaigns(pg: &PgCluster, lease: Duration) -> (Campaign, Campaign) {
        let campaign = |id: &str| {
            Campaign::new(
                &pg.url(),
                id.into(),
                format!("http://{id}"),
                String::new(),
                lease,
            )
        };
        (campaign("a"), campaign("b"))
    }

    /// Tries to take the lease until it is taken (the token), failing after 30 s.
    fn take_within_30s(rt: &tokio::runtime::Runtime, c: &mut Campaign) -> i64 {
        let began = Instant::now();
        loop {
            if let Some(t) = rt.block_on(c.try_take()).unwrap() {
                return t;
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "the lease was never free"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn meta(backend: &Postgres, key: &str) -> Option<String> {
        backend.tx().get_meta(key).unwrap()
    }

    /// One batch that sets `key`; the commit's outcome.
    fn write(backend: &mut Postgres, key: &str, value: &str) -> Result<(), String> {
        backend.begin().map_err(|e| e.message.clone())?;
        backend.savepoint().unwrap();
        backend.tx().put_meta(key, value).unwrap();
        backend.release().unwrap();
        let done = backend.commit().map_err(|e| e.message.clone());
        if done.is_err() {
            backend.rollback();
        }
        done
    }

    #[test]
    fn a_leader_paused_past_its_lease_cannot_commit_once_another_took_over() {
        let pg = PgCluster::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut old = Postgres::open(&pg.url()).unwrap();
        let mut new = Postgres::open(&pg.url()).unwrap();
        let lease = Duration::from_millis(1500);
        let (mut a, mut b) = two_campaigns(&pg, lease);
        let first = rt
            .block_on(a.try_take())
            .unwrap()
            .expect("a free lease is taken");
        assert_eq!(
            rt.block_on(b.try_take()).unwrap(),
            None,
            "a live lease holds"
        );
        let holder = rt.block_on(b.holder()).unwrap().unwrap();
        assert_eq!((holder.url.as_str(), holder.token), ("http://a", first));
        old.fence_with(a.leadership.clone(), lease).unwrap();
        write(&mut old, "k", "from a").unwrap();
        assert!(rt.block_on(a.renew()).unwrap());

        // a is paused (renews nothing) past its lease; b takes over.
        std::thread::sleep(lease + Duration::from_millis(200));
        assert!(!a.leadership.holds(), "a knows its lease ran out");
        let second = rt
            .block_on(b.try_take())
            .unwrap()
            .expect("an expired lease is taken");
        assert_eq!(second, first + 1);
        new.fence_with(b.leadership.clone(), lease).unwrap();
        write(&mut new, "k", "from b").unwrap();

        // a wakes up and tries to write with its old token: refused, nothing of it stored.
        let e = write(&mut old, "k", "late from a").unwrap_err();
        assert!(e.contains(FENCED), "{e}");
        assert!(a.leadership.is_lost());
        assert_eq!(meta(&new, "k").as_deref(), Some("from b"));
        assert!(!rt.block_on(a.renew()).unwrap(), "nor can it renew");
        write(&mut new, "k2", "b goes on").unwrap();
        assert!(b.leadership.holds());
    }

    #[test]
    fn a_leader_paused_inside_a_batch_does_not_hold_off_the_next_one() {
        let pg = PgCluster::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut old = Postgres::open(&pg.url()).unwrap();
        let lease = Duration::from_millis(1500);
        let (mut a, mut b) = two_campaigns(&pg, lease);
        rt.block_on(a.try_take()).unwrap().unwrap();
        old.fence_with(a.leadership.clone(), lease).unwrap();
        // A write that reads sends its BEGIN and fence (which locks the lease row) at once;
        // then its controller stops before the commit.
        old.begin().unwrap();
        old.savepoint().unwrap();
        old.tx().put_meta("k", "half").unwrap();
        assert_eq!(meta(&old, "k").as_deref(), Some("half"));
        let taken = take_within_30s(&rt, &mut b);
        assert_eq!(taken, 2);
        // The server ended the paused transaction: nothing of it is stored.
        assert!(old.commit().is_err());
        old.rollback();
        let mut new = Postgres::open(&pg.url()).unwrap();
        new.fence_with(b.leadership.clone(), lease).unwrap();
        assert_eq!(meta(&new, "k"), None);
        write(&mut new, "k", "from b").unwrap();
    }

    #[test]
    fn a_killed_leaders_lease_is_taken_at_once_without_waiting_for_its_end() {
        let pg = PgCluster::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _migrated = Postgres::open(&pg.url()).unwrap();
        // A lease far longer than the test: only the session's end can free it.
        let lease = Duration::from_secs(600);
        let (mut a, mut b) = two_campaigns(&pg, lease);
        rt.block_on(a.try_take()).unwrap().unwrap();
        assert_eq!(rt.block_on(b.try_take()).unwrap(), None);
        // The leader's process dies: its connection closes.
        drop(a);
        // The lease of a leader whose session ended is free, long before its end.
        assert_eq!(take_within_30s(&rt, &mut b), 2);
        assert!(b.leadership.holds());
    }
}
