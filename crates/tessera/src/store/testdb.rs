//! A throwaway PostgreSQL cluster for tests: `initdb` into a temp dir, the server on a free port
//! of 127.0.0.1, stopped and removed on drop. As PostgreSQL's docs ask, the server runs as the
//! `postgres` user when the tests run as root. Tests that need it fail when PostgreSQL is not
//! installed (`scripts/test-deps.sh` installs it): a store test is never skipped.

use std::path::PathBuf;
use std::process::Command;

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The addresses the server listens on (127.0.0.1 and any given to
    /// [`PgCluster::start_also_on`]).
    listen: String,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        PgCluster::start_also_on(None)
    }

    /// A cluster that also listens on `also.0` and lets clients of `also.1` (an address or
    /// CIDR) in, e.g. for a controller in a network namespace of its own.
    pub fn start_also_on(also: Option<(&str, &str)>) -> PgCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(|v| v.ok().map(|v| v.path().join("bin")))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            })
            .expect("PostgreSQL is not installed: run scripts/test-deps.sh");
        let dir = tempfile::Builder::new()
            .prefix("tessera-pg-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = match also {
            Some((addr, _)) => format!("127.0.0.1,{addr}"),
            None => "127.0.0.1".into(),
        };
        let cluster = PgCluster {
            dir,
            bin,
            port,
            listen,
        };
        cluster.chown_to_server();
        cluster.run(
            "initdb",
            &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "tessera"],
        );
        if let Some((_, clients)) = also {
            use std::io::Write;
            let clients = if clients.contains('/') {
                clients.to_string()
            } else {
                format!("{clients}/32")
            };
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .unwrap();
            writeln!(hba, "host all all {clients} trust").unwrap();
        }
        cluster.start_again();
        cluster
    }

    /// Starts the server (again, after [`PgCluster::stop`]).
    pub fn start_again(&self) {
        let data = self.dir.path().join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses={} -c fsync=on",
            self.port,
            self.dir.path().display(),
            self.listen
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                self.dir.path().join("log").to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server at once (as a crash would: `-m immediate`).
    #[allow(dead_code)] // Not every test target that includes this file uses it.
    pub fn stop(&self) {
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// Runs one SQL statement with psql (as an operator or an attacker with the database would).
    #[allow(dead_code)] // Not every test target that includes this file uses it.
    pub fn sql(&self, statement: &str) {
        let url = self.url();
        self.run(
            "psql",
            &[&url, "-q", "-v", "ON_ERROR_STOP=1", "-c", statement],
        );
    }

    /// The database's URL.
    pub fn url(&self) -> String {
        self.url_at("127.0.0.1")
    }

    /// The database's URL at another address it listens on.
    pub fn url_at(&self, addr: &str) -> String {
        format!("postgresql://tessera@{addr}:{}/postgres", self.port)
    }

    fn as_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn chown_to_server(&self) {
        if Self::as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(self.dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown to the postgres user");
        }
    }

    /// A PostgreSQL tool, run as the `postgres` user when the tests run as root.
    fn tool(&self, tool: &str, args: &[&str]) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if Self::as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args);
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.tool(tool, args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let data = data.to_str().unwrap_or("");
        let _ = self
            .tool("pg_ctl", &["-D", data, "-m", "immediate", "stop"])
            .output();
    }
}
