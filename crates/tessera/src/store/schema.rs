//! The schema, one migration per version, each written for both backends side by side so that
//! they cannot drift: the same tables, columns and keys; only the dialect differs. SQLite counts
//! the migrations it ran in `PRAGMA user_version`, PostgreSQL in the `schema_version` table.

/// One schema version.
pub struct Migration {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Applied in order; never edit one that has shipped, add another.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        sqlite: "CREATE TABLE users (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE projects (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE jobs (id INTEGER PRIMARY KEY, project TEXT NOT NULL, state TEXT NOT NULL,
                        doc TEXT NOT NULL);
     CREATE INDEX jobs_project ON jobs(project);
     CREATE TABLE nodes (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE tokens (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job INTEGER NOT NULL,
                          ts_ms INTEGER NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL);
     CREATE INDEX events_job ON events(job, seq);
     CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        postgres: "CREATE TABLE users (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE projects (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE jobs (id BIGINT PRIMARY KEY, project TEXT NOT NULL, state TEXT NOT NULL,
                        doc TEXT NOT NULL);
     CREATE INDEX jobs_project ON jobs(project);
     CREATE TABLE nodes (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE tokens (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE events (seq BIGSERIAL PRIMARY KEY, job BIGINT NOT NULL,
                          ts_ms BIGINT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL);
     CREATE INDEX events_job ON events(job, seq);
     CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    },
    // The latest complete checkpoint of each replica of each job: a manifest of files whose
    // contents are content-addressed chunks in the blob area beside the store.
    Migration {
        sqlite: "CREATE TABLE checkpoints (job INTEGER NOT NULL, replica INTEGER NOT NULL,
                               id TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (job, replica));",
        postgres: "CREATE TABLE checkpoints (job BIGINT NOT NULL, replica INTEGER NOT NULL,
                               id TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (job, replica));",
    },
    Migration {
        sqlite: "CREATE TABLE services (name TEXT PRIMARY KEY, doc TEXT NOT NULL);",
        postgres: "CREATE TABLE services (name TEXT PRIMARY KEY, doc TEXT NOT NULL);",
    },
    // The usage ledger: one row per replica run, written when the run ends.
    Migration {
        sqlite: "CREATE TABLE usage (seq INTEGER PRIMARY KEY, job INTEGER NOT NULL,
                         project TEXT NOT NULL, start_ms INTEGER NOT NULL,
                         end_ms INTEGER NOT NULL, doc TEXT NOT NULL);
     CREATE INDEX usage_end ON usage(end_ms);",
        postgres: "CREATE TABLE usage (seq BIGINT PRIMARY KEY, job BIGINT NOT NULL,
                         project TEXT NOT NULL, start_ms BIGINT NOT NULL,
                         end_ms BIGINT NOT NULL, doc TEXT NOT NULL);
     CREATE INDEX usage_end ON usage(end_ms);",
    },
    // Telemetry: one point per series per minute (see `controller::telemetry`).
    Migration {
        sqlite: "CREATE TABLE samples (series TEXT NOT NULL, ts_ms INTEGER NOT NULL,
                           doc TEXT NOT NULL, PRIMARY KEY (series, ts_ms));
     CREATE INDEX samples_ts ON samples(ts_ms);",
        postgres: "CREATE TABLE samples (series TEXT NOT NULL, ts_ms BIGINT NOT NULL,
                           doc TEXT NOT NULL, PRIMARY KEY (series, ts_ms));
     CREATE INDEX samples_ts ON samples(ts_ms);",
    },
    // The audit log (see `controller::audit`).
    Migration {
        sqlite: "CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL,
                         actor TEXT NOT NULL, action TEXT NOT NULL, project TEXT, job INTEGER,
                         detail TEXT NOT NULL);
     CREATE INDEX audit_ts ON audit(ts_ms);
     CREATE INDEX audit_job ON audit(job);",
        postgres: "CREATE TABLE audit (seq BIGSERIAL PRIMARY KEY, ts_ms BIGINT NOT NULL,
                         actor TEXT NOT NULL, action TEXT NOT NULL, project TEXT, job BIGINT,
                         detail TEXT NOT NULL);
     CREATE INDEX audit_ts ON audit(ts_ms);
     CREATE INDEX audit_job ON audit(job);",
    },
    // Agents' callback secrets are derived from the controller's key, no longer stored.
    Migration {
        sqlite: "UPDATE nodes SET doc = json_remove(doc, '$.callback_secret');",
        postgres: "UPDATE nodes SET doc = (doc::jsonb - 'callback_secret')::text;",
    },
    // Projects' registry logins (see `controller::registries`).
    Migration {
        sqlite: "CREATE TABLE registry_logins (project TEXT NOT NULL, registry TEXT NOT NULL,
                                   doc TEXT NOT NULL, PRIMARY KEY (project, registry));",
        postgres: "CREATE TABLE registry_logins (project TEXT NOT NULL, registry TEXT NOT NULL,
                                   doc TEXT NOT NULL, PRIMARY KEY (project, registry));",
    },
    // Leadership among several controllers on one PostgreSQL database (see `store::lease`):
    // the lease row and the fence every write batch of the leader passes. SQLite has one
    // controller; its table stays empty.
    Migration {
        sqlite: "CREATE TABLE leader (id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL,
                     url TEXT NOT NULL, gateway TEXT NOT NULL, token INTEGER NOT NULL,
                     pid INTEGER NOT NULL, expires TEXT NOT NULL);",
        postgres: super::lease::POSTGRES_SCHEMA,
    },
    // Checkpoint chunks (see `store::blobs`): in the database on PostgreSQL, so that every
    // controller reads them; SQLite keeps them as files beside the store and this table empty.
    Migration {
        sqlite: "CREATE TABLE blobs (hash TEXT PRIMARY KEY, data BLOB NOT NULL);",
        postgres: "CREATE TABLE blobs (hash TEXT PRIMARY KEY, data BYTEA NOT NULL);",
    },
    // The change log standbys follow (see `store::follow`): every write of a record the state
    // keeps takes the next value of one sequence as its `rev`, and a removed record leaves its
    // key in `deletions` under its own rev. SQLite has one controller and nobody following it:
    // its revs stay 0 and its deletions empty.
    Migration {
        sqlite: "ALTER TABLE users ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE projects ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE jobs ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE nodes ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE tokens ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE checkpoints ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE services ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE registry_logins ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE deletions (rev INTEGER PRIMARY KEY, tbl TEXT NOT NULL, key TEXT NOT NULL);",
        postgres: "CREATE SEQUENCE changes;
     ALTER TABLE users ADD COLUMN rev BIGINT NOT NULL DEFAULT nextval('changes');
     ALTER TABLE projects ADD COLUMN rev BIGINT NOT NULL DEFAULT nextval('changes');
     ALTER TABLE jobs ADD COLUMN rev BIGINT NOT NULL DEFAULT nextval('changes');
     ALTER TABLE nodes ADD COLUMN rev BIGINT NOT NULL DEFAULT nextval('changes');
     ALTER TABLE tokens ADD COLUMN rev BIGINT NOT NULL DEFAULT nextval('changes');
     ALTER TABLE checkpoints ADD COLUMN rev BIGINT NOT NULL DEFAULT nextval('changes');
     ALTER TABLE services ADD COLUMN rev BIGINT NOT NULL DEFAULT nextval('changes');
     ALTER TABLE registry_logins ADD COLUMN rev BIGINT NOT NULL DEFAULT nextval('changes');
     CREATE INDEX users_rev ON users(rev);
     CREATE INDEX projects_rev ON projects(rev);
     CREATE INDEX jobs_rev ON jobs(rev);
     CREATE INDEX nodes_rev ON nodes(rev);
     CREATE INDEX tokens_rev ON tokens(rev);
     CREATE INDEX checkpoints_rev ON checkpoints(rev);
     CREATE INDEX services_rev ON services(rev);
     CREATE INDEX registry_logins_rev ON registry_logins(rev);
     CREATE TABLE deletions (rev BIGINT PRIMARY KEY DEFAULT nextval('changes'),
                             tbl TEXT NOT NULL, key TEXT NOT NULL);",
    },
];
