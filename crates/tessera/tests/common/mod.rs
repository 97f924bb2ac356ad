//! The harness of the end-to-end tests: a real controller and real agents as separate processes
//! on 127.0.0.x, simulated GPUs, real child processes, real SQLite (or a throwaway PostgreSQL
//! cluster: [`Pool::start_on_postgresql`], or every pool with `TESSERA_TEST_STORE=postgresql`).
//! Nothing of Tessera's own is mocked. Each test binary uses its part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod registry;
#[path = "../../src/store/testdb.rs"]
mod testdb;
pub use testdb::PgCluster;

pub static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A port for a controller or a gateway: below the kernel's ephemeral range (32768 and up, where
/// every client connection takes its own), spread by process id, and free when asked.
pub fn port() -> u16 {
    let base = 20000 + (std::process::id() % 10000) as u16;
    loop {
        let p = base + NEXT_PORT.fetch_add(1, Ordering::SeqCst) % 2700;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// `n` consecutive ports, free when asked and given to no other caller of [`port`] or this in
/// the process.
pub fn port_block(n: u16) -> u16 {
    let base = 20000 + (std::process::id() % 10000) as u16;
    loop {
        let p = base + NEXT_PORT.fetch_add(n, Ordering::SeqCst) % 2700;
        if (p..p + n).all(|q| std::net::TcpListener::bind(("0.0.0.0", q)).is_ok()) {
            return p;
        }
    }
}

/// Transparent checkpoints need CRIU 4.x (CI builds it with scripts/install-criu.sh, as the
/// README's test command does).
pub fn require_criu() {
    let out = Command::new("/usr/local/sbin/criu")
        .arg("--version")
        .output();
    assert!(
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Version: 4.")),
        "CRIU 4.x is missing: run scripts/install-criu.sh (as root) before the tests"
    );
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tessera")
}

/// A network namespace joined to the host by a veth pair, each end with an address of a /30 of
/// its own: a second "machine" whose link the test can cut. Removed on drop.
pub struct NetNs {
    pub name: String,
    host_if: String,
    /// The host's end.
    pub host_ip: String,
    /// The namespace's end.
    pub inner_ip: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        let id = std::process::id() % 100_000;
        let mut seed = [0u8; 2];
        getrandom::fill(&mut seed).unwrap();
        let (third, fourth) = (seed[0], (seed[1] % 64) * 4);
        let ns = NetNs {
            name: format!("tsr{id}"),
            host_if: format!("th{id}"),
            host_ip: format!("10.213.{third}.{}", fourth + 1),
            inner_ip: format!("10.213.{third}.{}", fourth + 2),
        };
        let inner_if = format!("tn{id}");
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &inner_if,
        ]);
        ns.ip(&["link", "set", &inner_if, "netns", &ns.name]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        ns.ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend(args);
            ns.ip(&all);
        };
        inside(&[
            "addr",
            "add",
            &format!("{}/30", ns.inner_ip),
            "dev",
            &inner_if,
        ]);
        inside(&["link", "set", &inner_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Cuts the link: nothing passes between the namespace and the host.
    pub fn cut(&self) {
        self.ip(&["link", "set", &self.host_if, "down"]);
    }

    /// Puts the link back.
    pub fn heal(&self) {
        self.ip(&["link", "set", &self.host_if, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Removing the namespace removes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Pool {
    pub dir: tempfile::TempDir,
    /// Where jobs and the test exchange files, as a cluster's shared file system would: outside
    /// the pool's data dirs (which workloads cannot see) and open to every workload's uid.
    pub shared_dir: tempfile::TempDir,
    /// The controller's self-signed certificate when it serves HTTPS.
    pub cert: Option<PathBuf>,
    pub url: String,
    pub admin: String,
    pub listen: String,
    /// The service gateway's base URL.
    pub gateway: String,
    pub controller: Option<Proc>,
    pub agents: Vec<(String, Proc)>,
    pub http: reqwest::blocking::Client,
    /// Where the controller's and the agents' data dirs are made (the temp dir by default).
    pub data_root: PathBuf,
    /// More arguments for the controller.
    pub controller_args: Vec<String>,
    /// The controller's `--rendezvous-ports` (unless its arguments name others).
    pub rendezvous_ports: (u16, u16),
    /// The URLs of more controllers on the same store (standbys), given to agents with the
    /// leader's.
    pub standby_urls: Vec<String>,
    /// The PostgreSQL cluster of the store, when the pool keeps it there (stopped last).
    pub postgresql: Option<PgCluster>,
    /// Where the first controller runs when not on the host: a network namespace, the store's
    /// URL as seen from there, and the namespace's address.
    pub leader_in: Option<(String, String, String)>,
}

/// Another controller of a pool on PostgreSQL: a standby until the leader goes.
pub struct Standby {
    pub url: String,
    /// Its service gateway (HOST:PORT).
    pub gateway: String,
    pub proc: Proc,
    /// What it prints, line by line.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Standby {
    /// Waits for a printed line containing `text`; returns it.
    pub fn wait_line(&self, text: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(e) => panic!(
                    "no line with {text:?} from the controller at {}: {e}",
                    self.url
                ),
            }
        }
    }
}

impl Pool {
    pub fn start() -> Pool {
        Pool::start_with(false)
    }

    /// With `tls`, the controller serves HTTPS with a fresh self-signed certificate for
    /// 127.0.0.1, which the test's client, the agents and the CLI are given as their CA.
    pub fn start_with(tls: bool) -> Pool {
        Pool::start_in(tls, None, &[])
    }

    /// A pool whose data dirs are made under `data_root` (e.g. a small file system), with more
    /// arguments for its controller.
    pub fn start_in(tls: bool, data_root: Option<PathBuf>, controller_args: &[&str]) -> Pool {
        let postgresql = (std::env::var("TESSERA_TEST_STORE").as_deref() == Ok("postgresql"))
            .then(PgCluster::start);
        Pool::start_full(tls, data_root, controller_args, postgresql)
    }

    /// A pool on SQLite whatever `TESSERA_TEST_STORE` says, for tests of the store's file.
    pub fn start_on_sqlite() -> Pool {
        Pool::start_full(false, None, &[], None)
    }

    /// A pool whose store is a fresh PostgreSQL cluster of its own.
    pub fn start_on_postgresql(controller_args: &[&str]) -> Pool {
        Pool::start_full(false, None, controller_args, Some(PgCluster::start()))
    }

    /// A pool on PostgreSQL whose first controller runs in network namespace `ns` (listening on
    /// its end of the link, reaching the database at the host's end), so that the test can cut
    /// it off from the database, the agents and the clients at once.
    pub fn start_on_postgresql_in(ns: &NetNs, controller_args: &[&str]) -> Pool {
        let pg = PgCluster::start_also_on(Some((&ns.host_ip, &ns.inner_ip)));
        let inside = (ns.name.clone(), pg.url_at(&ns.host_ip), ns.inner_ip.clone());
        Pool::start_placed(false, None, controller_args, Some(pg), Some(inside))
    }

    fn start_full(
        tls: bool,
        data_root: Option<PathBuf>,
        controller_args: &[&str],
        postgresql: Option<PgCluster>,
    ) -> Pool {
        Pool::start_placed(tls, data_root, controller_args, postgresql, None)
    }

    fn start_placed(
        tls: bool,
        data_root: Option<PathBuf>,
        controller_args: &[&str],
        postgresql: Option<PgCluster>,
        leader_in: Option<(String, String, String)>,
    ) -> Pool {
        let mut controller_args: Vec<String> =
            controller_args.iter().map(|a| a.to_string()).collect();
        if let Some(pg) = &postgresql {
            controller_args.extend(["--store".to_string(), pg.url()]);
        }
        let mut dir = tempfile::tempdir().unwrap();
        if std::env::var_os("TESSERA_TEST_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        let host = leader_in
            .as_ref()
            .map_or("127.0.0.1", |(_, _, at)| at.as_str());
        let listen = format!("{host}:{}", port());
        let mut http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
        let cert = tls.then(|| {
            let made = rcgen::generate_simple_self_signed(vec![
                "127.0.0.1".to_string(),
                "localhost".to_string(),
            ])
            .unwrap();
            let cert = dir.path().join("cert.pem");
            std::fs::write(&cert, made.cert.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), made.signing_key.serialize_pem()).unwrap();
            http = std::mem::replace(&mut http, reqwest::blocking::Client::builder())
                .add_root_certificate(
                    reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).unwrap(),
                );
            cert
        });
        let scheme = if tls { "https" } else { "http" };
        let mut pool = Pool {
            url: format!("{scheme}://{listen}"),
            listen,
            gateway: format!("127.0.0.1:{}", port()),
            admin: String::new(),
            controller: None,
            agents: vec![],
            http: http.build().unwrap(),
            cert,
            data_root: data_root.unwrap_or_else(|| dir.path().to_path_buf()),
            controller_args,
            rendezvous_ports: {
                // Each pool its own: the pools of a test run share one host, and a gang's rank 0
                // (torch's store) listens on every address of it.
                let first = port_block(8);
                (first, first + 7)
            },
            dir,
            shared_dir: shared_dir(),
            standby_urls: vec![],
            postgresql,
            leader_in,
        };
        pool.admin = pool
            .start_controller()
            .expect("a first start prints the admin token");
        pool
    }

    /// Starts (or restarts) the controller; returns the admin token on a first start.
    pub fn start_controller(&mut self) -> Option<String> {
        let (mut command, mut args) = (Command::new(bin()), self.controller_args.clone());
        if let Some((ns, store, _)) = &self.leader_in {
            command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(bin());
            if let Some(at) = args.iter().position(|a| a == "--store") {
                args[at + 1] = store.clone();
            }
        }
        let mut child = command
            .args(["controller", "--data-dir"])
            .arg(self.data_root.join("controller"))
            .args(["--listen", &self.listen])
            .args(self.defaults())
            .args(&args)
            .args(["--gateway-listen", &self.gateway])
            .args(self.cert.iter().flat_map(|cert| {
                [
                    "--tls-cert".into(),
                    cert.clone().into_os_string(),
                    "--tls-key".into(),
                    cert.with_file_name("key.pem").into_os_string(),
                ]
            }))
            .env("TESSERA_CONFIG", self.dir.path().join("cli.yaml"))
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.dir.path().join("controller.err")).unwrap())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| {
                let err = std::fs::read_to_string(self.dir.path().join("controller.err"));
                panic!(
                    "the controller did not start ({e}): {}",
                    err.unwrap_or_default()
                )
            });
        assert!(first.starts_with("Tessera API at"), "{first}");
        // A first start prints the admin token on the next line; a restart prints nothing more.
        let token = rx
            .recv_timeout(Duration::from_secs(2))
            .ok()
            .and_then(|line| {
                line.strip_prefix("First admin token (shown once): ")
                    .map(str::to_string)
            });
        self.controller = Some(Proc(child));
        token
    }

    /// Starts another controller on the pool's PostgreSQL store (with the leader's arguments,
    /// its own data dir and ports): a standby until the leader goes. Agents added afterwards
    /// are given its URL too.
    pub fn start_standby(&mut self) -> Standby {
        let args = self.controller_args.clone();
        self.start_standby_at("127.0.0.1", &args)
    }

    /// A standby listening on `ip` (its requests to the leader leave from there too), with
    /// `controller_args` instead of the pool's.
    pub fn start_standby_at<S: AsRef<std::ffi::OsStr>>(
        &mut self,
        ip: &str,
        controller_args: &[S],
    ) -> Standby {
        let n = self.standby_urls.len() + 1;
        let listen = format!("{ip}:{}", port());
        let gateway = format!("{ip}:{}", port());
        let mut child = Command::new(bin())
            .args(["controller", "--data-dir"])
            .arg(self.data_root.join(format!("controller-{n}")))
            .args(["--listen", &listen])
            .args(self.defaults())
            .args(controller_args)
            .args(["--gateway-listen", &gateway])
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(self.dir.path().join(format!("controller-{n}.err"))).unwrap(),
            )
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let url = format!("http://{listen}");
        let standby = Standby {
            url: url.clone(),
            gateway,
            proc: Proc(child),
            lines: rx,
        };
        let first = standby.wait_line("Tessera API at", Duration::from_secs(30));
        assert!(first.contains("standby"), "{first}");
        self.standby_urls.push(url);
        standby
    }

    /// What every controller of the pool is given unless the pool's controller arguments name
    /// it: a 2 s agent lease and the pool's own rendezvous ports.
    fn defaults(&self) -> Vec<String> {
        let given = |flag: &str| self.controller_args.iter().any(|a| a == flag);
        let mut args = vec![];
        if !given("--lease") {
            args.extend(["--lease".to_string(), "2s".to_string()]);
        }
        if !given("--rendezvous-ports") {
            let (first, last) = self.rendezvous_ports;
            args.extend(["--rendezvous-ports".to_string(), format!("{first}-{last}")]);
        }
        args
    }

    pub fn join_token(&self) -> String {
        self.post("/v1/tokens", json!({"kind": "join"}), &self.admin)
            .1["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn add_agent(&mut self, name: &str, ip: &str, gpus: &str) {
        self.add_agent_with(name, ip, gpus, &[]);
    }

    /// An agent that finds no CRIU, as on a host without it.
    pub fn add_agent_without_criu(&mut self, name: &str, ip: &str, gpus: &str) {
        self.add_agent_with(name, ip, gpus, &["--criu", "/nonexistent/criu"]);
    }

    pub fn add_agent_with(&mut self, name: &str, ip: &str, gpus: &str, extra: &[&str]) {
        let join = self.join_token();
        let child = Command::new(bin())
            .args([
                "agent",
                "--join",
                &std::iter::once(self.url.clone())
                    .chain(self.standby_urls.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(","),
                "--token",
                &join,
                "--node-name",
                name,
            ])
            // "": a node without GPUs.
            .args(
                Some(gpus)
                    .filter(|g| !g.is_empty())
                    .into_iter()
                    .flat_map(|g| ["--simulate-gpus", g]),
            )
            .args([
                "--listen",
                &format!("{ip}:0"),
                "--grace",
                "1s",
                "--cpus",
                "8",
                "--memory",
                "16GiB",
                "--telemetry-interval",
                "300ms",
                // Image pulls leave 64 MiB free whatever the host's disk size: the tests
                // must not depend on how full the host's disk is.
                "--image-reserve",
                "64MiB",
            ])
            .arg("--data-dir")
            .arg(self.data_root.join(name))
            // One host: its agents share the root, as nodes share the path.
            .arg("--transparent-root")
            .arg(self.dir.path().join("transparent"))
            .args(extra)
            .args(
                self.cert
                    .iter()
                    .flat_map(|c| ["--ca-cert".into(), c.clone().into_os_string()]),
            )
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.agents.push((name.to_string(), Proc(child)));
        self.wait_for(&format!("node {name} ready"), || {
            self.get("/v1/nodes", &self.admin)
                .1
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == name && n["health"] == "ready")
        });
    }

    /// `kill -9` of the agent of `node` once job `id` has sent two checkpoints.
    pub fn kill_agent_after_two_checkpoints(&mut self, id: u64, node: &str) {
        self.wait_for("two checkpoints", || {
            events(self, id)
                .iter()
                .filter(|e| e["kind"] == "Checkpoint")
                .count()
                >= 2
        });
        self.kill_agent(node);
    }

    pub fn agent_pid(&self, name: &str) -> i32 {
        self.agents
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .0
            .id() as i32
    }

    pub fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: &str,
    ) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if !token.is_empty() {
            r = r.bearer_auth(token);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.req(reqwest::Method::GET, path, None, token)
    }

    pub fn post(&self, path: &str, body: Value, token: &str) -> (u16, Value) {
        self.req(reqwest::Method::POST, path, Some(body), token)
    }

    pub fn submit(
        &self,
        project: &str,
        gpu: f64,
        replicas: u32,
        priority: i64,
        command: &str,
    ) -> u64 {
        let (status, v) = self.post(
            "/v1/jobs",
            json!({"metadata": {"name": "t", "project": project},
                   "spec": {"replicas": replicas, "priority": priority,
                            "resources": {"gpu": gpu, "cpu": 0.5, "memory": "128MiB"},
                            "command": ["sh", "-c", command]}}),
            &self.admin,
        );
        assert_eq!(status, 201, "{v}");
        v["id"].as_u64().unwrap()
    }

    pub fn job(&self, id: u64) -> Value {
        self.get(&format!("/v1/jobs/{id}"), &self.admin).1
    }

    pub fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}: {}",
                self.get("/v1/jobs", &self.admin).1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_state(&self, id: u64, state: &str) -> Value {
        let mut last = Value::Null;
        self.wait_for(&format!("job {id} to be {state}"), || {
            last = self.job(id);
            last["state"] == state
        });
        last
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.data_root.join(name)
    }

    /// A file jobs can read and write (see `shared_dir`).
    pub fn shared(&self, name: &str) -> PathBuf {
        self.shared_dir.path().join(name)
    }
}

/// A directory every workload may use, outside `/tmp` (each workload has its own) and outside
/// directories others cannot enter, mode 1777 like a shared scratch file system.
pub fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("shared-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

pub fn logs(pool: &Pool, id: u64) -> String {
    let (status, v) = pool.get(&format!("/v1/jobs/{id}/logs?replica=0"), &pool.admin);
    assert_eq!(status, 200, "{v}");
    v["data"].as_str().unwrap().to_string()
}

/// Runs the CLI against the pool; returns (success, stdout, stderr).
pub fn cli(pool: &Pool, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(bin());
    cmd.arg(args[0])
        .args(["--url", &pool.url, "--token", &pool.admin])
        .args(&args[1..]);
    cli_with_config(&mut cmd, &pool.path("no-config.yaml"))
}

/// Runs a CLI command with `config` as its config file and no connection from the environment;
/// returns (success, stdout, stderr).
pub fn cli_with_config(cmd: &mut Command, config: &Path) -> (bool, String, String) {
    let out = cmd
        .env("TESSERA_CONFIG", config)
        .env_remove("TESSERA_URL")
        .env_remove("TESSERA_TOKEN")
        .env_remove("TESSERA_CA_CERT")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn events(pool: &Pool, id: u64) -> Vec<Value> {
    pool.get(&format!("/v1/jobs/{id}/events"), &pool.admin)
        .1
        .as_array()
        .unwrap()
        .clone()
}

/// `tessera submit ARGS -o json` through the CLI; returns the new job's id.
pub fn cli_submit(pool: &Pool, args: &[&str]) -> u64 {
    let mut all = vec!["submit", "-o", "json"];
    all.extend_from_slice(args);
    let (ok, out, err) = cli(pool, &all);
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_u64()
        .unwrap()
}

impl Pool {
    /// Kills the controller (SIGKILL) and starts it again on the same store.
    pub fn restart_controller(&mut self) {
        self.kill_controller();
        self.start_controller_again();
    }

    /// Kills the controller (SIGKILL) and leaves it down.
    pub fn kill_controller(&mut self) {
        let mut c = self.controller.take().unwrap();
        let _ = c.0.kill();
        let _ = c.0.wait();
    }

    pub fn start_controller_again(&mut self) {
        assert!(self.start_controller().is_none());
        self.wait_for("the controller", || {
            self.http
                .get(format!("{}/healthz", self.url))
                .send()
                .is_ok()
        });
    }

    /// `kill -9` of the agent of `node` (its workloads' shims run on).
    pub fn kill_agent(&mut self, node: &str) {
        let idx = self.agents.iter().position(|(n, _)| n == node).unwrap();
        let (_, mut proc) = self.agents.remove(idx);
        proc.0.kill().unwrap();
        let _ = proc.0.wait();
    }
}

/// The output of replica `replica` of job `id`.
pub fn replica_logs(pool: &Pool, id: u64, replica: u32) -> String {
    let (status, v) = pool.get(
        &format!("/v1/jobs/{id}/logs?replica={replica}"),
        &pool.admin,
    );
    assert_eq!(status, 200, "{v}");
    v["data"].as_str().unwrap().to_string()
}

/// Starts a CLI command that keeps running (a watch) and hands its output line by line.
pub fn cli_lines(pool: &Pool, args: &[&str]) -> (Proc, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(bin())
        .args(args)
        .args(["--url", &pool.url, "--token", &pool.admin])
        .env("TESSERA_CONFIG", pool.path("no-config.yaml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(out).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Proc(child), rx)
}
