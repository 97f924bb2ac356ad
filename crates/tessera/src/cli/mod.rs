//! The user verbs, in the habits of kubectl and Slurm: human tables by default, `-o json|yaml`.
//! Server URL and token come from flags, `TESSERA_URL` / `TESSERA_TOKEN`, or the config file
//! (`~/.config/tessera/config.yaml`, or `TESSERA_CONFIG`), in that order.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::controller::views::{JobView, LogChunk, NodeView, ProjectView};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
    Yaml,
    /// One line per row with a header (lists, and `usage` rows with their total last).
    Csv,
}

#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// Controller URL, or several of one pool's controllers as URL1,URL2 (default: TESSERA_URL,
    /// then the config file).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// API token (default: TESSERA_TOKEN, then the config file).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for an HTTPS controller (default: TESSERA_CA_CERT, then the
    /// config file).
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct ConfigFile {
    pub url: String,
    pub token: String,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
}

pub mod batch;
pub mod describe;
pub mod interactive;
pub mod session;

pub fn config_path() -> PathBuf {
    if let Ok(p) = std::env::var("TESSERA_CONFIG") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".config/tessera/config.yaml")
}

pub struct Client {
    controllers: crate::endpoints::Endpoints,
    /// Where the URL came from (--url, TESSERA_URL, the config file), for errors.
    url_from: &'static str,
    token: String,
    http: reqwest::blocking::Client,
    /// The CA the controller's certificate must chain to (WebSockets build their own TLS).
    ca_cert: Option<PathBuf>,
    pub output: Output,
}

impl Client {
    pub fn new(conn: &Conn) -> anyhow::Result<Client> {
        let file: Option<ConfigFile> = std::fs::read_to_string(config_path())
            .ok()
            .and_then(|t| serde_yaml::from_str(&t).ok());
        let (from, url) = conn
            .url
            .clone()
            .map(|u| ("--url", u))
            .or_else(|| std::env::var("TESSERA_URL").ok().map(|u| ("TESSERA_URL", u)))
            .or_else(|| file.as_ref().map(|f| ("the config file", f.url.clone())))
            .context("no controller URL: pass --url, set TESSERA_URL, or run `tessera up` (it writes the config file)")?;
        let controllers = crate::endpoints::Endpoints::parse(from, &url)?;
        let token = conn
            .token
            .clone()
            .or_else(|| std::env::var("TESSERA_TOKEN").ok())
            .or_else(|| file.as_ref().map(|f| f.token.clone()))
            .context("no API token: pass --token, set TESSERA_TOKEN, or use the config file")?;
        let mut b = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60));
        let ca_cert = conn
            .ca_cert
            .clone()
            .or_else(|| std::env::var_os("TESSERA_CA_CERT").map(PathBuf::from))
            .or_else(|| file.as_ref().and_then(|f| f.ca_cert.clone()));
        if let Some(ca) = &ca_cert {
            let pem = std::fs::read(ca)
                .with_context(|| format!("--ca-cert {}: cannot read it", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("--ca-cert {}: not a PEM certificate", ca.display()))?;
            b = b.add_root_certificate(cert);
        }
        Ok(Client {
            controllers,
            url_from: from,
            token,
            http: b.build()?,
            ca_cert,
            output: conn.output,
        })
    }

    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<Value> {
        let (status, text) = self.send(method, path, body)?;
        if !status.is_success() {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            bail!("{msg} ({status})");
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Sends a request to the pool's controllers: when one cannot be reached, or answers that
    /// it is between leaders (503: nothing was done), the next one given is tried, for up to
    /// 15 s (a failover takes a few seconds).
    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(reqwest::StatusCode, String)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let base = self.controllers.current().to_string();
            let mut req = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .bearer_auth(&self.token);
            if let Some(b) = &body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.clone());
            }
            let more = self.controllers.all().len() > 1;
            let failed = match req.send() {
                Ok(resp) if resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE || !more => {
                    let status = resp.status();
                    return Ok((status, resp.text()?));
                }
                Ok(resp) => anyhow::anyhow!("{} answered 503: {}", base, resp.text()?),
                // Not sent at all: safe to send elsewhere, whatever the method.
                Err(e) if e.is_connect() && more => anyhow::Error::new(e),
                Err(e) => {
                    let hint = if e.is_connect() {
                        format!(
                            "; nothing answers there: start one with `tessera up`, or use \
                             another with --url URL, TESSERA_URL or `tessera config use URL` \
                             (this URL came from {})",
                            self.url_from
                        )
                    } else {
                        String::new()
                    };
                    return Err(anyhow::Error::new(e)
                        .context(format!("calling the controller at {base}{hint}")));
                }
            };
            self.controllers.failed(&base);
            if std::time::Instant::now() >= deadline {
                return Err(failed.context(format!(
                    "no controller of the pool answered (tried {}); check that one runs, or \
                     change the URLs with --url, TESSERA_URL or the config file",
                    self.controllers
                )));
            }
            if self.controllers.current() == self.controllers.all()[0] {
                // Every one was tried: wait a little before the next round.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None)
    }

    pub fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body.to_string()))
    }

    /// Prints `value` as JSON or YAML, or calls `table` for people.
    pub fn print(
        &self,
        value: &Value,
        table: impl FnOnce(&Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
            Output::Csv => print!("{}", csv(value)),
            Output::Table => table(value)?,
        }
        Ok(())
    }
}

/// Prints rows as an aligned table.
/// A list (or a report's `rows` and `total`) as CSV: the first row's fields are the columns;
/// nested values are written as JSON.
pub fn csv(value: &Value) -> String {
    let mut rows: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        v => v["rows"]
            .as_array()
            .map(|r| r.iter().collect())
            .unwrap_or_else(|| vec![v]),
    };
    if let Some(total) = value.get("total").filter(|t| t.is_object()) {
        rows.push(total);
    }
    let Some(mut columns) = rows
        .first()
        .and_then(|r| r.as_object())
        .map(|o| o.keys().cloned().collect::<Vec<String>>())
    else {
        return String::new();
    };
    // What a row is about comes first.
    for first in ["key", "name", "id"].into_iter().rev() {
        if let Some(at) = columns.iter().position(|c| c == first) {
            let c = columns.remove(at);
            columns.insert(0, c);
        }
    }
    let cell = |v: &Value| -> String {
        let text = match v {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if text.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text
        }
    };
    let mut out = columns.join(",") + "\n";
    for r in rows {
        let line: Vec<String> = columns.iter().map(|c| cell(&r[c])).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn gpu_text(g: f64) -> String {
    if g == 0.0 { "-".into() } else { format!("{g}") }
}

fn age(ms: u64) -> String {
    let now = crate::controller::now_ms();
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// A manifest file (YAML or JSON); `-` reads standard input.
    #[arg(short, long)]
    pub file: Option<PathBuf>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub project: Option<String>,
    /// GPUs per replica: 0.5 for half a device, 2 for two whole devices.
    #[arg(long)]
    pub gpu: Option<String>,
    /// Device memory per device, e.g. 20GiB.
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// CPUs per replica: 2, 0.5 or 500m.
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory per replica, e.g. 8GiB.
    #[arg(long)]
    pub memory: Option<String>,
    /// Replicas that run as one gang (4), or an elastic range MIN-MAX (1-8): the job starts
    /// with MIN, grows into idle capacity and gives replicas back when others need the room.
    #[arg(long)]
    pub replicas: Option<String>,
    /// low, normal, high, critical, or a number.
    #[arg(long)]
    pub priority: Option<String>,
    /// Restart failed jobs (on-failure) up to --max-restarts times.
    #[arg(long)]
    pub restart: Option<String>,
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// The signal that asks the job to checkpoint (USR1 by default when any checkpoint flag is
    /// given); see `spec.checkpoint`.
    #[arg(long)]
    pub checkpoint_signal: Option<String>,
    /// Time the job gets to write its checkpoint and exit, e.g. 30s.
    #[arg(long)]
    pub checkpoint_grace: Option<String>,
    /// How often the job checkpoints as it runs, e.g. 10m.
    #[arg(long)]
    pub checkpoint_interval: Option<String>,
    /// cooperative (the program saves itself on --checkpoint-signal) or transparent (CRIU
    /// saves the whole process; for programs that cannot cooperate).
    #[arg(long)]
    pub checkpoint_mode: Option<String>,
    /// A person works in it (a notebook, a shell): its project's idle policy may stop it.
    #[arg(long)]
    pub interactive: bool,
    /// Keep it waiting even if no node of the pool could hold it today (for nodes that may join);
    /// without it such a job is refused, naming what no node has enough of.
    #[arg(long)]
    pub queue_anyway: bool,
    /// Device models allowed (repeatable).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// A job array, as Slurm's: 0-99%8 runs a task per index (each a job of its own, its index
    /// in TESSERA_ARRAY_INDEX), at most 8 at once.
    #[arg(long)]
    pub array: Option<String>,
    /// Start after these jobs have started (comma-separated ids; an array's id: all its tasks).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub after: Vec<u64>,
    /// Start after these jobs have succeeded; cancelled if one fails.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub after_ok: Vec<u64>,
    /// Start after these jobs have ended, however they ended.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub after_any: Vec<u64>,
    /// How long it may run (30m, 4h, 2d): then it is stopped through its checkpoint signal and
    /// fails with the reason "time limit" (Slurm's --time).
    #[arg(long = "time", value_name = "LIMIT")]
    pub time_limit: Option<String>,
    /// Start no earlier than this: 2026-12-08T09:00:00Z, or +2h from now.
    #[arg(long)]
    pub begin: Option<String>,
    /// Submit it held: it starts once released (`tessera release ID`).
    #[arg(long)]
    pub hold: bool,
    /// Also write its output (stdout and stderr as they come) to this file in its working
    /// directory, as Slurm's --output: slurm-%j.out (%j job, %A array, %a index, %x name,
    /// %N node).
    #[arg(long, value_name = "PATTERN")]
    pub output_file: Option<String>,
    /// Run only on nodes with this label, KEY=VALUE (repeatable; all must match).
    #[arg(long = "node-selector", value_name = "KEY=VALUE")]
    pub node_selector: Vec<String>,
    /// Where its GPU may be: local (its own node; the default), remote (another node's, over
    /// the network) or any (its own when that fits, else another's).
    #[arg(long)]
    pub gpu_attach: Option<String>,
    /// KEY=VALUE environment variables (repeatable).
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// A container image to run in, e.g. registry.example.com/team/train:1.0; the command after
    /// `--` replaces its CMD (none: the image's own).
    #[arg(long)]
    pub image: Option<String>,
    /// Pass this shell's environment: all of it but names that look secret (TOKEN, SECRET,
    /// PASSWORD, KEY, CREDENTIAL ...) and the shell's own (PWD, SHLVL ...), or exactly the
    /// comma-separated NAMES given. --env wins over it.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "NAMES")]
    pub export_env: Option<String>,
    /// Where the program starts, on one of the job's volumes (default: this directory when it
    /// is on one of the project's volumes, else the job's run dir).
    #[arg(long)]
    pub workdir: Option<String>,
    /// A volume of the project to mount, PATH or PATH:ro (repeatable; default: all of them).
    #[arg(long = "volume")]
    pub volumes: Vec<String>,
    /// The program and its arguments, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Builds the manifest from a file and/or flags (flags win).
fn manifest_from(args: &SubmitArgs) -> anyhow::Result<Value> {
    let mut m: Value = match &args.file {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
            };
            // Read as the manifest it must be, so that a wrong field or type is reported at its
            // line and column in this file (not in the JSON it is sent as); a missing field
            // may still come from the flags, and the controller judges the whole.
            if let Err(e) = serde_yaml::from_str::<crate::manifest::Manifest>(&text)
                && !e.to_string().contains("missing field")
            {
                bail!("{}: {e}", path.display());
            }
            serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => {
            json!({"apiVersion": "tessera/v1", "kind": "Job", "metadata": {}, "spec": {"resources": {}}})
        }
    };
    let num_or_text = |t: &str| -> Value {
        t.parse::<f64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(t))
    };
    if let Some(n) = &args.name {
        m["metadata"]["name"] = json!(n);
    }
    if m["metadata"]["name"].is_null() {
        let base = args
            .command
            .first()
            .map(|c| c.rsplit('/').next().unwrap_or(c).to_string())
            .unwrap_or_else(|| "job".into());
        let clean: String = base
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        m["metadata"]["name"] = json!(if clean.is_empty() {
            "job".into()
        } else {
            clean
        });
    }
    if let Some(p) = &args.project {
        m["metadata"]["project"] = json!(p);
    }
    if m["spec"]["resources"].is_null() {
        m["spec"]["resources"] = json!({});
    }
    for (flag, key) in [
        (&args.gpu, "gpu"),
        (&args.gpu_memory, "gpuMemory"),
        (&args.cpu, "cpu"),
        (&args.memory, "memory"),
    ] {
        if let Some(v) = flag {
            m["spec"]["resources"][key] = num_or_text(v);
        }
    }
    if let Some(a) = &args.gpu_attach {
        m["spec"]["resources"]["gpuAttach"] = json!(a);
    }
    if !args.models.is_empty() {
        m["spec"]["resources"]["deviceModels"] = json!(args.models);
    }
    for kv in &args.node_selector {
        let Some((k, v)) = kv.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            bail!("--node-selector {kv}: write KEY=VALUE, e.g. --node-selector zone=a");
        };
        m["spec"]["resources"]["nodeSelector"][k] = json!(v);
    }
    if let Some(a) = &args.array {
        m["spec"]["array"] = json!(a);
    }
    for (ids, key) in [
        (&args.after, "after"),
        (&args.after_ok, "afterOk"),
        (&args.after_any, "afterAny"),
    ] {
        if !ids.is_empty() {
            m["spec"][key] = json!(ids);
        }
    }
    if let Some(t) = &args.time_limit {
        m["spec"]["timeLimit"] = json!(t);
    }
    if let Some(b) = &args.begin {
        m["spec"]["begin"] = json!(b);
    }
    if args.hold {
        m["spec"]["hold"] = json!(true);
    }
    if let Some(o) = &args.output_file {
        m["spec"]["outputFile"] = json!(o);
    }
    if let Some(r) = &args.replicas {
        m["spec"]["replicas"] = replicas_flag(r)?;
    }
    if args.queue_anyway {
        m["spec"]["waitForCapacity"] = json!(true);
    }
    if args.interactive {
        m["spec"]["interactive"] = json!(true);
    }
    if let Some(p) = &args.priority {
        m["spec"]["priority"] = p
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| json!(p));
    }
    if let Some(r) = &args.restart {
        m["spec"]["restart"]["policy"] = json!(r);
    }
    if let Some(r) = args.max_restarts {
        m["spec"]["restart"]["maxRestarts"] = json!(r);
    }
    for (flag, key) in [
        (&args.checkpoint_signal, "signal"),
        (&args.checkpoint_grace, "grace"),
        (&args.checkpoint_interval, "interval"),
        (&args.checkpoint_mode, "mode"),
    ] {
        if let Some(v) = flag {
            m["spec"]["checkpoint"][key] = json!(v);
        }
    }
    if let Some(names) = &args.export_env {
        for (k, v) in exported_env(names, std::env::vars_os())? {
            m["spec"]["env"][k] = json!(v);
        }
    }
    for kv in &args.env {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv}: write KEY=VALUE");
        };
        m["spec"]["env"][k] = json!(v);
    }
    if let Some(w) = &args.workdir {
        let dir = std::path::absolute(w).with_context(|| format!("--workdir {w}"))?;
        m["spec"]["workdir"] = json!(dir.to_string_lossy());
    }
    if !args.volumes.is_empty() {
        m["spec"]["volumes"] = json!(args.volumes);
    }
    if m["spec"]["submitDir"].is_null()
        && let Ok(here) = std::env::current_dir()
        && let Some(here) = here.to_str()
    {
        m["spec"]["submitDir"] = json!(here);
    }
    if let Some(image) = &args.image {
        m["spec"]["image"] = json!(image);
    }
    if !args.command.is_empty() {
        m["spec"]["command"] = json!(args.command);
    }
    if m["spec"]["command"].is_null() && m["spec"]["image"].is_null() {
        bail!(
            "no command: give it after `--` (tessera submit --gpu 1 -- python train.py), in the manifest's spec.command, or run an image's own (--image REF)"
        );
    }
    Ok(m)
}

/// Parts of a name that mark a variable as a secret: not passed by a bare `--export-env`.
const SECRET_MARKS: [&str; 9] = [
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "KEY",
    "CREDENTIAL",
    "AUTH",
    "COOKIE",
    "PRIVATE",
];

/// The shell's own variables, which mean nothing on another machine.
const SHELL_OWN: [&str; 6] = ["PWD", "OLDPWD", "SHLVL", "_", "PS1", "PROMPT_COMMAND"];

/// The environment `--export-env[=NAMES]` passes: exactly NAMES when given (each must be set
/// here), else every variable but secret-looking names, the shell's own and Tessera's
/// connection settings; values that are not UTF-8 are left out.
fn exported_env(
    names: &str,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> anyhow::Result<Vec<(String, String)>> {
    let vars: Vec<(String, String)> = vars
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    if !names.trim().is_empty() {
        let mut out = Vec::new();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some((k, v)) = vars.iter().find(|(k, _)| k == name) else {
                bail!("--export-env {names}: {name} is not set in this shell");
            };
            out.push((k.clone(), v.clone()));
        }
        return Ok(out);
    }
    Ok(vars
        .into_iter()
        .filter(|(k, _)| {
            let upper = k.to_ascii_uppercase();
            !SECRET_MARKS.iter().any(|m| upper.contains(m))
                && !SHELL_OWN.contains(&k.as_str())
                && !k.starts_with("TESSERA_")
                && !k.starts_with("BASH_FUNC_")
        })
        .collect())
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Start of the window: a duration back from now (7d, 12h) or epoch milliseconds.
    #[arg(long, default_value = "7d")]
    pub since: String,
    /// End of the window (default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// project, user, model, job or node.
    #[arg(long, default_value = "project")]
    pub by: String,
    /// Only this project.
    #[arg(long)]
    pub project: Option<String>,
    /// Only this job's runs.
    #[arg(long)]
    pub job: Option<u64>,
}

/// `tessera usage`: GPU-hours, memory, CPU, energy and cost per project (user, model, ...).
pub fn usage(c: &Client, a: &UsageArgs) -> anyhow::Result<()> {
    let mut q = vec![format!("since={}", a.since), format!("by={}", a.by)];
    if let Some(u) = &a.until {
        q.push(format!("until={u}"));
    }
    if let Some(p) = &a.project {
        q.push(format!("project={p}"));
    }
    if let Some(j) = a.job {
        q.push(format!("job={j}"));
    }
    let v = c.get(&format!("/v1/usage?{}", q.join("&")))?;
    c.print(&v, |v| {
        let report: crate::metering::Report = serde_json::from_value(v.clone())?;
        let co2 = report.total.co2_kg.is_some();
        let mut header = vec![
            a.by.to_uppercase(),
            "GPU-HOURS".into(),
            "IDLE GPU-H".into(),
            "GPU-MEM GiB-h".into(),
            "CPU-HOURS".into(),
            "MEM GiB-h".into(),
            "ENERGY kWh".into(),
            "COST".into(),
            "JOBS".into(),
        ];
        if co2 {
            header.insert(7, "CO2 kg".into());
        }
        let named = report.by == crate::metering::GroupBy::Job;
        if named {
            header.insert(1, "NAME".into());
        }
        let line = |r: &crate::metering::UsageRow| {
            let mut cells = vec![
                r.key.clone(),
                format!("{:.3}", r.gpu_hours),
                format!("{:.3}", r.idle_gpu_hours),
                format!("{:.2}", r.gpu_memory_gib_hours),
                format!("{:.3}", r.cpu_hours),
                format!("{:.2}", r.memory_gib_hours),
                format!("{:.4}{}", r.energy_kwh, if r.simulated { "*" } else { "" }),
                format!("{:.2}", r.cost),
                r.jobs.to_string(),
            ];
            if let Some(kg) = r.co2_kg {
                cells.insert(7, format!("{kg:.4}"));
            }
            if named {
                cells.insert(1, r.name.clone().unwrap_or_default());
            }
            cells
        };
        let mut rows: Vec<Vec<String>> = report.rows.iter().map(line).collect();
        rows.push(line(&report.total));
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        table(&header, rows);
        if report.total.simulated {
            println!("* includes simulated devices: their energy is simulated, not measured");
        }
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Start of the window: a duration back from now (1d, 2h) or epoch milliseconds.
    #[arg(long, default_value = "1d")]
    pub since: String,
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long)]
    pub project: Option<String>,
    #[arg(long)]
    pub job: Option<u64>,
    /// place, preempt, consolidate, migrate, grow, shrink, cancel, deny, requeue, idle-stop,
    /// cordon, drain, project-update, ...
    #[arg(long)]
    pub action: Option<String>,
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
}

/// `tessera audit`: decisions and admin actions, newest first.
pub fn audit(c: &Client, a: &AuditArgs) -> anyhow::Result<()> {
    let mut q = vec![format!("since={}", a.since), format!("limit={}", a.limit)];
    for (k, v) in [
        ("until", a.until.clone()),
        ("project", a.project.clone()),
        ("job", a.job.map(|j| j.to_string())),
        ("action", a.action.clone()),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={v}"));
        }
    }
    let v = c.get(&format!("/v1/audit?{}", q.join("&")))?;
    c.print(&v, |v| {
        let entries: Vec<crate::controller::audit::Entry> = serde_json::from_value(v.clone())?;
        table(
            &["AGE", "ACTOR", "ACTION", "PROJECT", "JOB", "DETAIL"],
            entries
                .iter()
                .map(|e| {
                    let mut detail = e.detail.clone();
                    if detail.chars().count() > 80 {
                        detail = detail.chars().take(77).collect::<String>() + "...";
                    }
                    vec![
                        age(e.ts_ms),
                        e.actor.clone(),
                        e.action.clone(),
                        e.project.clone().unwrap_or_else(|| "-".into()),
                        e.job.map_or("-".into(), |j| j.to_string()),
                        detail,
                    ]
                })
                .collect(),
        );
        Ok(())
    })
}

/// "4", or "3 (elastic 1-8)".
fn replicas_text(j: &JobView) -> String {
    match j.elastic {
        Some(e) => format!("{} (elastic {}-{})", j.replicas, e.min, e.max),
        None => j.replicas.to_string(),
    }
}

/// `--replicas 4` or `--replicas 1-8` (elastic), as the manifest writes them.
fn replicas_flag(text: &str) -> anyhow::Result<Value> {
    let number = |t: &str| t.trim().parse::<u32>().ok();
    match text.split_once('-') {
        None => number(text).map(|n| json!(n)),
        Some((min, max)) => number(min)
            .zip(number(max))
            .map(|(min, max)| json!({"min": min, "max": max})),
    }
    .ok_or_else(|| {
        anyhow::anyhow!(
            "--replicas {text}: give a number of replicas (4) or an elastic range MIN-MAX (1-8)"
        )
    })
}

pub fn submit(c: &Client, args: &SubmitArgs) -> anyhow::Result<()> {
    let m = manifest_from(args)?;
    if m["kind"] == "Service" {
        let svc = c.post("/v1/services", m)?;
        return c.print(&svc, |v| {
            println!(
                "service {} created with {} replica(s): jobs {}",
                v["name"].as_str().unwrap_or(""),
                v["replicas"],
                v["jobs"]
            );
            Ok(())
        });
    }
    let job = c.post("/v1/jobs", m)?;
    if job["array"].is_object() {
        return batch::submitted(c, &job);
    }
    c.print(&job, |j| {
        println!(
            "job {} submitted ({}, project {})",
            j["id"],
            j["name"].as_str().unwrap_or(""),
            j["project"].as_str().unwrap_or("")
        );
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[arg(long)]
    pub project: Option<String>,
    /// pending, running, ... (comma-separated)
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub owner: Option<String>,
    #[arg(long)]
    pub limit: Option<usize>,
    /// After the list, a line for each job as it changes (state, replicas, reason), as
    /// `kubectl get -w`, until interrupted; with -o json, one object per line.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Each task of an array on its own line, as ARRAY_INDEX (squeue -r); without it an array
    /// is one line with its tasks' states summed up.
    #[arg(short = 'r', long)]
    pub expand: bool,
}

/// A job's line in `tessera jobs`.
fn job_row(j: &JobView) -> Vec<String> {
    let mut reason = printable(&j.reason);
    if reason.chars().count() > 70 {
        reason = reason.chars().take(67).collect::<String>() + "...";
    }
    vec![
        j.id.to_string(),
        j.name.clone(),
        j.project.clone(),
        j.owner.clone(),
        format!("{:?}", j.state).to_lowercase(),
        replicas_text(j),
        gpu_text(j.gpu),
        age(j.created_ms),
        reason,
    ]
}

/// What a watch reports a change of: everything of a job's line but its age.
fn watched(row: &[String]) -> Vec<String> {
    let mut key = row.to_vec();
    key.remove(7);
    key
}

pub fn jobs(c: &Client, a: &JobsArgs) -> anyhow::Result<()> {
    let mut q = vec![];
    for (k, v) in [
        ("project", a.project.clone()),
        ("state", a.state.clone()),
        ("owner", a.owner.clone()),
        ("limit", a.limit.map(|l| l.to_string())),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={v}"));
        }
    }
    let path = format!("/v1/jobs?{}", q.join("&"));
    let v = c.get(&path)?;
    let mut seen: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut seen_jobs: std::collections::HashMap<u64, Vec<String>> = Default::default();
    let expand = a.expand;
    // The lines that changed since the last look (all of them the first time), and for -o json
    // the jobs that did.
    let mut remember = |v: &Value| -> anyhow::Result<(Vec<Vec<String>>, Vec<JobView>)> {
        let jobs: Vec<JobView> = serde_json::from_value(v.clone())?;
        let mut rows = Vec::new();
        for (key, row) in batch::rows(&jobs, expand) {
            if seen.insert(key, watched(&row)).as_ref() != Some(&watched(&row)) {
                rows.push(row);
            }
        }
        let mut changed = Vec::new();
        for j in jobs {
            let row = watched(&job_row(&j));
            if seen_jobs.insert(j.id, row.clone()).as_ref() != Some(&row) {
                changed.push(j);
            }
        }
        Ok((rows, changed))
    };
    let first = remember(&v)?;
    if a.watch && c.output == Output::Json {
        // One object per line, so that a script reads them as they come.
        for item in v.as_array().into_iter().flatten() {
            println!("{item}");
        }
    } else {
        c.print(&v, |_| {
            table(
                &[
                    "ID", "NAME", "PROJECT", "OWNER", "STATE", "REPLICAS", "GPU", "AGE", "REASON",
                ],
                first.0.clone(),
            );
            Ok(())
        })?;
    }
    if !a.watch {
        return Ok(());
    }
    use std::io::Write;
    loop {
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_secs(1));
        let v = c.get(&path)?;
        let (rows, jobs) = remember(&v)?;
        match c.output {
            Output::Json => {
                for j in jobs {
                    println!("{}", serde_json::to_string(&j)?);
                }
            }
            _ => {
                for row in rows {
                    println!("{}", row.join("  "));
                }
            }
        }
    }
}

/// Text from the pool as a terminal may show it: control characters (a job's command may hold
/// escape sequences that move the cursor or retitle the window) are written as escapes.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub fn describe_job(c: &Client, id: u64) -> anyhow::Result<()> {
    let job = c.get(&format!("/v1/jobs/{id}"))?;
    let events = c.get(&format!("/v1/jobs/{id}/events"))?;
    let both = json!({"job": job, "events": events});
    c.print(&both, |_| {
        let j: JobView = serde_json::from_value(job.clone())?;
        println!("Job:        {} ({})", j.id, j.name);
        println!(
            "Project:    {}   Owner: {}   Priority: {}",
            j.project, j.owner, j.priority
        );
        println!("State:      {}", format!("{:?}", j.state).to_lowercase());
        println!("Reason:     {}", printable(&j.reason));
        println!(
            "Resources:  {} replica(s), each gpu {} cpu {} memory {}{}",
            replicas_text(&j),
            gpu_text(j.gpu),
            j.cpu_milli as f64 / 1000.0,
            tessera_sched::model::human_bytes(j.memory_bytes),
            if j.gpu_memory_bytes > 0 {
                format!(
                    " gpu-memory {}",
                    tessera_sched::model::human_bytes(j.gpu_memory_bytes)
                )
            } else {
                String::new()
            }
        );
        println!("Command:    {}", printable(&j.command.join(" ")));
        println!("Attempt:    {}   Restarts: {}", j.attempt, j.restarts);
        if !j.assignments.is_empty() {
            println!("Replicas:");
            for r in &j.assignments {
                // A remote replica's devices are its GPU node's.
                let devices = match &r.gpu_node {
                    Some(g) => format!("devices {:?} on {g} (attached)", r.devices),
                    None => format!("devices {:?}", r.devices),
                };
                println!(
                    "  {}  node {}  {devices}  {}  {}",
                    r.index,
                    r.node,
                    format!("{:?}", r.phase).to_lowercase(),
                    r.exit_code.map(|c| format!("exit {c}")).unwrap_or_default()
                );
            }
        }
        println!("Events:");
        for e in events.as_array().into_iter().flatten() {
            println!(
                "  {:>6}  {:<14} {}",
                age(e["ts_ms"].as_u64().unwrap_or(0)),
                printable(e["kind"].as_str().unwrap_or("")),
                printable(e["message"].as_str().unwrap_or(""))
            );
        }
        Ok(())
    })
}

/// The attempt before job `id`'s current one (`tessera logs --previous`).
pub fn previous_attempt(c: &Client, id: u64) -> anyhow::Result<u32> {
    let job = c.get(&format!("/v1/jobs/{id}"))?;
    match job["attempt"].as_u64().unwrap_or(0) {
        0 | 1 => anyhow::bail!(
            "job {id} has no earlier attempt; `tessera describe job {id}` shows its history"
        ),
        a => Ok(a as u32 - 1),
    }
}

/// What `tessera logs` reads and how it shows it.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// `all` (both streams, interleaved), `stdout` or `stderr`.
    pub stream: &'static str,
    /// Only lines from this time: 10m back, or Unix ms.
    pub since: Option<String>,
    /// Each line starts with its RFC 3339 time.
    pub timestamps: bool,
    pub attempt: Option<u32>,
}

impl LogOptions {
    /// The query of a read of replica `replica` from `offset`.
    fn query(&self, replica: u32, offset: u64, lines: bool) -> String {
        let mut q = format!(
            "replica={replica}&stream={}&offset={offset}",
            if self.stream.is_empty() {
                "all"
            } else {
                self.stream
            }
        );
        if let Some(a) = self.attempt {
            q.push_str(&format!("&attempt={a}"));
        }
        if let Some(since) = &self.since {
            q.push_str(&format!("&since={}", urlencoding(since)));
        }
        if self.timestamps {
            q.push_str("&timestamps=true");
        }
        if lines {
            q.push_str("&lines=true");
        }
        q
    }
}

/// Percent-encodes what a query value may not hold as is.
fn urlencoding(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Writes a page: its text, or with `-o json` one JSON object per line (with its replica, stream
/// and time) so that a script can follow it as it comes.
fn write_page(
    c: &Client,
    out: &mut impl Write,
    chunk: &LogChunk,
    replica: Option<u32>,
) -> anyhow::Result<()> {
    if c.output == Output::Json {
        for l in chunk.lines.iter().flatten() {
            let mut v = json!({"stream": l.stream, "ts_ms": l.ts_ms, "text": l.text});
            if l.ts_ms > 0 {
                v["time"] = json!(crate::controller::api::rfc3339(l.ts_ms));
            }
            if l.partial {
                v["partial"] = json!(true);
            }
            if let Some(r) = replica {
                v["replica"] = json!(r);
            }
            writeln!(out, "{v}")?;
        }
        return Ok(());
    }
    out.write_all(chunk.data.as_bytes())?;
    Ok(())
}

pub fn logs(
    c: &Client,
    id: u64,
    replica: u32,
    opts: &LogOptions,
    follow: bool,
    tail: Option<usize>,
) -> anyhow::Result<()> {
    let json = c.output == Output::Json;
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    if let Some(lines) = tail {
        match last_lines(c, id, replica, opts, lines) {
            Ok((page, end)) => {
                write_page(c, &mut out, &page, None)?;
                out.flush()?;
                if !follow {
                    return Ok(());
                }
                offset = end;
            }
            // Not started yet: the loop below says so and waits.
            Err(e) if follow && e.to_string().contains("has not started") => {}
            Err(e) => return Err(e),
        }
    }
    let mut said_waiting = false;
    loop {
        let v = c.get(&format!(
            "/v1/jobs/{id}/logs?{}",
            opts.query(replica, offset, json)
        ));
        let chunk: LogChunk = match v {
            Ok(v) => serde_json::from_value(v)?,
            Err(e) if follow && e.to_string().contains("has not started") => {
                if !said_waiting {
                    let job = c.get(&format!("/v1/jobs/{id}"))?;
                    eprintln!(
                        "[tessera: job {id} has not started ({}); waiting for its output]",
                        printable(job["reason"].as_str().unwrap_or("pending"))
                    );
                    said_waiting = true;
                }
                std::thread::sleep(Duration::from_millis(300));
                continue;
            }
            Err(e) => return Err(e),
        };
        if chunk.cut > 0 {
            out.flush()?;
            eprintln!(
                "[tessera: {} bytes of earlier output were cut; the pool keeps only the newest \
                 output of each replica]",
                chunk.cut
            );
        }
        write_page(c, &mut out, &chunk, None)?;
        out.flush()?;
        let moved = chunk.next_offset > offset;
        offset = chunk.next_offset;
        if chunk.done || (!follow && !moved) {
            return Ok(());
        }
        if !moved {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Every replica's output, each line prefixed with `[REPLICA]`; with `follow`, until all ended.
pub fn logs_of_every_replica(
    c: &Client,
    id: u64,
    opts: &LogOptions,
    follow: bool,
) -> anyhow::Result<()> {
    let json = c.output == Output::Json;
    let job = c.get(&format!("/v1/jobs/{id}"))?;
    let replicas = job["replicas"].as_u64().unwrap_or(1) as u32;
    // (offset, a line not yet ended, done) per replica.
    let mut state: Vec<(u64, String, bool)> = vec![(0, String::new(), false); replicas as usize];
    let mut out = std::io::stdout();
    loop {
        let mut quiet = true;
        for (r, (offset, partial, done)) in state.iter_mut().enumerate() {
            if *done {
                continue;
            }
            let v = c.get(&format!(
                "/v1/jobs/{id}/logs?{}",
                opts.query(r as u32, *offset, json)
            ));
            let chunk: LogChunk = match v {
                Ok(v) => serde_json::from_value(v)?,
                Err(e) if follow && e.to_string().contains("has not started") => continue,
                Err(e) => return Err(e),
            };
            let moved = chunk.next_offset > *offset;
            quiet &= !moved;
            if json {
                write_page(c, &mut out, &chunk, Some(r as u32))?;
            } else {
                partial.push_str(&chunk.data);
                while let Some(i) = partial.find('\n') {
                    writeln!(out, "[{r}] {}", &partial[..i])?;
                    partial.drain(..=i);
                }
            }
            *offset = chunk.next_offset;
            if chunk.done || (!follow && !moved) {
                if !partial.is_empty() {
                    writeln!(out, "[{r}] {partial}")?;
                    partial.clear();
                }
                *done = true;
            }
        }
        out.flush()?;
        if state.iter().all(|s| s.2) {
            return Ok(());
        }
        if quiet {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// The last `n` lines of a replica's output (as one page) and the offset its output ends at:
/// reads back from the end in growing windows until it has `n` lines or the whole output.
fn last_lines(
    c: &Client,
    id: u64,
    replica: u32,
    opts: &LogOptions,
    n: usize,
) -> anyhow::Result<(LogChunk, u64)> {
    let chunk = |offset: u64| -> anyhow::Result<LogChunk> {
        let q = opts.query(replica, offset, true);
        Ok(serde_json::from_value(
            c.get(&format!("/v1/jobs/{id}/logs?{q}"))?,
        )?)
    };
    let end = chunk(u64::MAX)?.offset;
    let mut window = 64u64 << 10;
    loop {
        let from = end.saturating_sub(window);
        let (mut lines, mut at, mut oldest) = (Vec::new(), from, None);
        while at < end {
            let part = chunk(at)?;
            if part.next_offset <= at {
                break;
            }
            oldest.get_or_insert(part.offset);
            lines.extend(part.lines.unwrap_or_default());
            at = part.next_offset;
        }
        let whole = from == 0 || oldest.is_some_and(|o| o > from) || window >= 16 << 20;
        // Lines that end (full records, or a partial one at the very end).
        let ends: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(i, l)| !l.partial || *i + 1 == lines.len())
            .map(|(i, _)| i)
            .collect();
        if ends.len() > n || whole {
            // The first record of the last n lines follows the end of the line before them.
            let first = match ends.len().checked_sub(n + 1) {
                Some(k) => ends[k] + 1,
                None => 0,
            };
            let lines = lines.split_off(first);
            let page = LogChunk {
                data: crate::controller::api::log_text(&lines, opts.timestamps, true),
                offset: from,
                cut: 0,
                next_offset: end,
                done: false,
                lines: Some(lines),
            };
            return Ok((page, end));
        }
        window *= 4;
    }
}

/// Moves a running job (checkpointed first when it checkpoints), to `to` or anywhere.
pub fn migrate(c: &Client, id: u64, to: Option<&str>) -> anyhow::Result<()> {
    let body = match to {
        Some(n) => json!({ "to": n }),
        None => json!({}),
    };
    let j = c.post(&format!("/v1/jobs/{id}/migrate"), body)?;
    c.print(&j, |j| {
        println!(
            "job {}: {}",
            j["id"],
            printable(j["reason"].as_str().unwrap_or(""))
        );
        Ok(())
    })
}

#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// List nodes (the default).
    List,
    Cordon {
        name: String,
    },
    Uncordon {
        name: String,
    },
    /// Cordon and requeue the node's jobs.
    Drain {
        name: String,
    },
    /// Revoke the node's agent credential so that a new machine may join under its name.
    Replace {
        name: String,
    },
}

pub fn nodes(c: &Client, cmd: Option<NodesCmd>) -> anyhow::Result<()> {
    let v = match cmd.unwrap_or(NodesCmd::List) {
        NodesCmd::List => c.get("/v1/nodes")?,
        NodesCmd::Cordon { name } => Value::Array(vec![
            c.post(&format!("/v1/nodes/{name}/cordon"), json!({}))?,
        ]),
        NodesCmd::Uncordon { name } => Value::Array(vec![
            c.post(&format!("/v1/nodes/{name}/uncordon"), json!({}))?,
        ]),
        NodesCmd::Drain { name } => {
            Value::Array(vec![c.post(&format!("/v1/nodes/{name}/drain"), json!({}))?])
        }
        NodesCmd::Replace { name } => Value::Array(vec![
            c.post(&format!("/v1/nodes/{name}/replace"), json!({}))?,
        ]),
    };
    // Asked before anything is printed: a reader that stops at the first lines (`| grep -q`)
    // must not find the command still waiting on the network. (A controller older than this CLI
    // has no /v1/pool: then nothing more is said.)
    let policy = c
        .get("/v1/pool")
        .ok()
        .and_then(|p| p["policy"].as_str().map(str::to_string));
    c.print(&v, |v| {
        let nodes: Vec<NodeView> = serde_json::from_value(v.clone())?;
        table(
            &[
                "NAME",
                "STATUS",
                "GPUS",
                "MODEL",
                "GPU ALLOC",
                "CPU ALLOC",
                "MEMORY",
                "REPLICAS",
                "CHECKPOINT",
                "WORKLOADS",
                "SEEN",
            ],
            nodes
                .iter()
                .map(|n| {
                    let status = format!(
                        "{}{}",
                        format!("{:?}", n.health).to_lowercase(),
                        if n.cordoned { ",cordoned" } else { "" }
                    );
                    let model = n
                        .devices
                        .first()
                        .map(|d| {
                            format!(
                                "{}{}",
                                d.model,
                                if n.simulated { " (simulated)" } else { "" }
                            )
                        })
                        .unwrap_or_else(|| "-".into());
                    vec![
                        n.name.clone(),
                        status,
                        n.devices.len().to_string(),
                        model,
                        format!(
                            "{}/{}",
                            n.gpu_allocated_milli as f64 / 1000.0,
                            n.devices.len()
                        ),
                        format!(
                            "{}/{}",
                            n.cpu_allocated_milli as f64 / 1000.0,
                            n.cpu_milli as f64 / 1000.0
                        ),
                        tessera_sched::model::human_bytes(n.memory_bytes),
                        n.replicas.to_string(),
                        n.checkpoint.join(","),
                        n.confinement
                            .split_once(' ')
                            .map_or(n.confinement.as_str(), |(word, _)| word)
                            .to_string(),
                        format!("{}s ago", n.last_seen_ms_ago / 1000),
                    ]
                })
                .collect(),
        );
        if let Some(policy) = &policy {
            println!("placement policy: {policy}");
        }
        Ok(())
    })
}

#[derive(Debug, Subcommand)]
pub enum ServicesCmd {
    List,
    /// One service with its replicas (ready, draining, requests in flight).
    Get {
        name: String,
    },
    /// Set the replica count (within the autoscale range, if any).
    Scale {
        name: String,
        replicas: u32,
    },
    /// Move a replica, make-before-break: the new one starts, becomes ready and takes the
    /// traffic before the old one drains and stops.
    Move {
        name: String,
        /// The replica's job id (default: the oldest replica).
        #[arg(long)]
        job: Option<u64>,
        #[arg(long)]
        to: Option<String>,
    },
    /// Stop every replica and remove the service.
    Delete {
        name: String,
    },
}

pub fn services(c: &Client, cmd: Option<ServicesCmd>) -> anyhow::Result<()> {
    let one = |v: Value| Value::Array(vec![v]);
    // What a changing command did, said before the service's line.
    let mut said = None;
    let v = match cmd.unwrap_or(ServicesCmd::List) {
        ServicesCmd::List => c.get("/v1/services")?,
        ServicesCmd::Get { name } => one(c.get(&format!("/v1/services/{name}"))?),
        ServicesCmd::Scale { name, replicas } => {
            said = Some(format!("service {name}: scaled to {replicas} replica(s)"));
            one(c.post(
                &format!("/v1/services/{name}/scale"),
                json!({ "replicas": replicas }),
            )?)
        }
        ServicesCmd::Move { name, job, to } => {
            let v = c.post(
                &format!("/v1/services/{name}/move"),
                json!({ "job": job, "to": to }),
            )?;
            let what = job.map_or("a replica".to_string(), |j| format!("job {j}"));
            let whither = to.as_deref().map_or(String::new(), |n| format!(" to {n}"));
            said = Some(format!(
                "service {name}: moving {what}{whither}; a new replica starts, and the old one \
                 stops once the new one is ready"
            ));
            one(v)
        }
        ServicesCmd::Delete { name } => {
            said = Some(format!(
                "service {name}: deleted; its replicas are stopping"
            ));
            one(c.call(
                reqwest::Method::DELETE,
                &format!("/v1/services/{name}"),
                None,
            )?)
        }
    };
    c.print(&v, |v| {
        if let Some(line) = &said {
            println!("{line}");
        }
        let rows = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|svc| {
                let eps: Vec<String> = svc["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        format!(
                            "{}@{}{}{}",
                            e["job"],
                            e["node"].as_str().unwrap_or(""),
                            if e["ready"] == true { "" } else { "(starting)" },
                            if e["draining"] == true {
                                "(draining)"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect();
                let auto = match &svc["autoscale"] {
                    Value::Null => "-".to_string(),
                    a => format!(
                        "{}..{} {} {}",
                        a["min"],
                        a["max"],
                        a["metric"].as_str().unwrap_or(""),
                        a["target"]
                    ),
                };
                vec![
                    svc["name"].as_str().unwrap_or("").to_string(),
                    svc["project"].as_str().unwrap_or("").to_string(),
                    format!("{}/{}", svc["ready"], svc["replicas"]),
                    auto,
                    svc["path"].as_str().unwrap_or("").to_string(),
                    if eps.is_empty() {
                        "-".into()
                    } else {
                        eps.join(" ")
                    },
                ]
            })
            .collect();
        table(
            &["NAME", "PROJECT", "READY", "AUTOSCALE", "PATH", "REPLICAS"],
            rows,
        );
        Ok(())
    })
}

#[derive(Debug, Subcommand)]
pub enum ProjectsCmd {
    List,
    /// Create a project: `tessera projects create vision --guaranteed 4 --limit 8`.
    Create(ProjectArgs),
    /// Change a project's quota, parent or members.
    Set(ProjectArgs),
    /// Store the project's login to a registry; its image jobs pull with it. The password (or
    /// token) is read from standard input and never shown back.
    Login {
        name: String,
        /// The registry, as images name it: registry.example.com:5000, docker.io.
        registry: String,
        #[arg(long)]
        username: String,
    },
    /// Remove the project's login to a registry.
    Logout {
        name: String,
        registry: String,
    },
    /// The project's registry logins (without passwords).
    Logins {
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ProjectArgs {
    pub name: String,
    #[arg(long)]
    pub parent: Option<String>,
    /// Guaranteed GPUs.
    #[arg(long)]
    pub guaranteed: Option<f64>,
    /// Hard limit in GPUs; `none` removes it.
    #[arg(long)]
    pub limit: Option<String>,
    #[arg(long)]
    pub weight: Option<u32>,
    /// How long a job runs before it may be preempted, e.g. 10m.
    #[arg(long)]
    pub min_runtime: Option<String>,
    /// Members (comma-separated user names).
    #[arg(long)]
    pub members: Option<String>,
    /// Residency: node labels KEY=VALUE its jobs must run on (repeatable); `none` clears.
    #[arg(long)]
    pub residency: Vec<String>,
    /// Device models its jobs may use (comma-separated); `any` clears.
    #[arg(long)]
    pub models: Option<String>,
    /// Most GPUs one job may ask for; `none` removes the cap.
    #[arg(long)]
    pub max_gpu_per_job: Option<String>,
    /// Stop interactive jobs idle this long, e.g. 30m; `off` disables.
    #[arg(long)]
    pub idle_after: Option<String>,
    /// GPU utilisation (percent) under which a job counts as idle (default 5).
    #[arg(long)]
    pub idle_threshold: Option<f64>,
    /// Warn this long before an idle job is stopped (default 5m).
    #[arg(long)]
    pub idle_warning: Option<String>,
    /// A host path its jobs may mount at the same path, PATH or PATH:ro (repeatable; replaces
    /// the list); `none` removes them all.
    #[arg(long = "volume")]
    pub volumes: Vec<String>,
}

pub fn projects(c: &Client, cmd: Option<ProjectsCmd>) -> anyhow::Result<()> {
    let body = |a: &ProjectArgs, with_name: bool| -> anyhow::Result<Value> {
        let mut b = json!({});
        if with_name {
            b["name"] = json!(a.name);
        }
        if let Some(p) = &a.parent {
            b["parent"] = json!(p);
        }
        if let Some(g) = a.guaranteed {
            b["guaranteed_gpu"] = json!(g);
        }
        if let Some(l) = &a.limit {
            b["limit_gpu"] = if l == "none" {
                Value::Null
            } else {
                json!(
                    l.parse::<f64>()
                        .map_err(|_| anyhow::anyhow!("--limit {l}: a number of GPUs or none"))?
                )
            };
        }
        if let Some(w) = a.weight {
            b["over_quota_weight"] = json!(w);
        }
        if let Some(d) = &a.min_runtime {
            b["min_runtime"] = json!(d);
        }
        if !a.residency.is_empty() {
            let mut labels = serde_json::Map::new();
            for kv in a.residency.iter().filter(|kv| *kv != "none") {
                let (k, v) = kv.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("--residency {kv}: write KEY=VALUE, e.g. region=eu, or none")
                })?;
                labels.insert(k.trim().to_string(), json!(v.trim()));
            }
            b["residency"] = Value::Object(labels);
        }
        if let Some(m) = &a.models {
            b["device_models"] = if m == "any" {
                json!([])
            } else {
                json!(m.split(',').map(str::trim).collect::<Vec<_>>())
            };
        }
        if let Some(g) = &a.max_gpu_per_job {
            b["max_gpu_per_job"] = if g == "none" {
                Value::Null
            } else {
                json!(g.parse::<f64>().map_err(|_| anyhow::anyhow!(
                    "--max-gpu-per-job {g}: a number of GPUs or none"
                ))?)
            };
        }
        if let Some(d) = &a.idle_after {
            b["idle_after"] = json!(d);
        }
        if let Some(t) = a.idle_threshold {
            b["idle_threshold"] = json!(t);
        }
        if let Some(w) = &a.idle_warning {
            b["idle_warning"] = json!(w);
        }
        if !a.volumes.is_empty() {
            let list: Vec<&String> = a.volumes.iter().filter(|v| *v != "none").collect();
            b["volumes"] = json!(list);
        }
        if let Some(m) = &a.members {
            b["members"] = json!(
                m.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
            );
        }
        Ok(b)
    };
    let v = match cmd.unwrap_or(ProjectsCmd::List) {
        ProjectsCmd::Login {
            name,
            registry,
            username,
        } => {
            let mut password = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut password)?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            if password.is_empty() {
                bail!(
                    "no password: give it on standard input, e.g. `echo $TOKEN | tessera projects login {name} {registry} --username {username}`"
                );
            }
            let v = c.call(
                reqwest::Method::PUT,
                &format!("/v1/projects/{name}/registries/{registry}"),
                Some(json!({"username": username, "password": password}).to_string()),
            )?;
            return c.print(&v, |v| {
                println!(
                    "project {name} pulls from {} as {}",
                    v["registry"].as_str().unwrap_or(""),
                    v["username"].as_str().unwrap_or("")
                );
                Ok(())
            });
        }
        ProjectsCmd::Logout { name, registry } => {
            c.call(
                reqwest::Method::DELETE,
                &format!("/v1/projects/{name}/registries/{registry}"),
                None,
            )?;
            println!("project {name} no longer has a login to {registry}");
            return Ok(());
        }
        ProjectsCmd::Logins { name } => {
            let v = c.get(&format!("/v1/projects/{name}/registries"))?;
            return c.print(&v, |v| {
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|l| {
                        vec![
                            l["registry"].as_str().unwrap_or("").to_string(),
                            l["username"].as_str().unwrap_or("").to_string(),
                        ]
                    })
                    .collect();
                table(&["REGISTRY", "USERNAME"], rows);
                Ok(())
            });
        }
        ProjectsCmd::List => c.get("/v1/projects")?,
        ProjectsCmd::Create(a) => Value::Array(vec![c.post("/v1/projects", body(&a, true)?)?]),
        ProjectsCmd::Set(a) => Value::Array(vec![c.call(
            reqwest::Method::PATCH,
            &format!("/v1/projects/{}", a.name),
            Some(body(&a, false)?.to_string()),
        )?]),
    };
    c.print(&v, |v| {
        let ps: Vec<ProjectView> = serde_json::from_value(v.clone())?;
        table(
            &[
                "NAME",
                "PARENT",
                "GUARANTEED",
                "LIMIT",
                "WEIGHT",
                "USED",
                "RUNNING",
                "PENDING",
                "RECENT",
                "MEMBERS",
                "POLICY",
            ],
            ps.iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.parent.clone().unwrap_or_else(|| "-".into()),
                        p.guaranteed_gpu.to_string(),
                        p.limit_gpu
                            .map(|l| l.to_string())
                            .unwrap_or_else(|| "-".into()),
                        p.over_quota_weight.to_string(),
                        p.used_gpu.to_string(),
                        p.jobs_running.to_string(),
                        p.jobs_pending.to_string(),
                        format!("{:.3}", p.recent_gpu),
                        p.members.iter().cloned().collect::<Vec<_>>().join(","),
                        p.policy.summary(),
                    ]
                })
                .collect(),
        );
        Ok(())
    })
}

#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    List,
    /// `tessera users create ana --role member`
    Create {
        name: String,
        #[arg(long, default_value = "member")]
        role: String,
    },
}

pub fn users(c: &Client, cmd: Option<UsersCmd>) -> anyhow::Result<()> {
    let v = match cmd.unwrap_or(UsersCmd::List) {
        UsersCmd::List => c.get("/v1/users")?,
        UsersCmd::Create { name, role } => Value::Array(vec![
            c.post("/v1/users", json!({"name": name, "role": role}))?,
        ]),
    };
    c.print(&v, |v| {
        table(
            &["NAME", "ROLE"],
            v.as_array()
                .into_iter()
                .flatten()
                .map(|u| {
                    vec![
                        u["name"].as_str().unwrap_or("").into(),
                        u["role"].as_str().unwrap_or("").into(),
                    ]
                })
                .collect(),
        );
        Ok(())
    })
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    List,
    /// A token for yourself, for another user (admins), or a join token for agents (--join).
    Create {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        join: bool,
        #[arg(long)]
        description: Option<String>,
        /// Join tokens: how many nodes it may join (default 1).
        #[arg(long, requires = "join")]
        uses: Option<u32>,
        /// Join tokens: how long it works, e.g. 1h (default) or 7d.
        #[arg(long, requires = "join")]
        expires_in: Option<String>,
    },
    Revoke {
        id: String,
    },
}

pub fn token(c: &Client, cmd: TokenCmd) -> anyhow::Result<()> {
    let v = match cmd {
        TokenCmd::List => c.get("/v1/tokens")?,
        TokenCmd::Create {
            user,
            join,
            description,
            uses,
            expires_in,
        } => {
            let mut b = json!({});
            if let Some(n) = uses {
                b["uses"] = json!(n);
            }
            if let Some(e) = expires_in {
                b["expires_in"] = json!(e);
            }
            if join {
                b["kind"] = json!("join");
            }
            if let Some(u) = user {
                b["user"] = json!(u);
            }
            if let Some(d) = description {
                b["description"] = json!(d);
            }
            let t = c.post("/v1/tokens", b)?;
            return c.print(&t, |t| {
                println!("{}", t["token"].as_str().unwrap_or(""));
                eprintln!(
                    "(token {} for {}; shown only now)",
                    t["id"].as_str().unwrap_or(""),
                    t["subject"].as_str().unwrap_or("")
                );
                Ok(())
            });
        }
        TokenCmd::Revoke { id } => {
            c.call(reqwest::Method::DELETE, &format!("/v1/tokens/{id}"), None)?;
            println!("token {id} revoked");
            return Ok(());
        }
    };
    c.print(&v, |v| {
        table(
            &["ID", "KIND", "SUBJECT", "REVOKED", "DESCRIPTION"],
            v.as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    vec![
                        t["id"].as_str().unwrap_or("").into(),
                        t["kind"].as_str().unwrap_or("").into(),
                        t["subject"].as_str().unwrap_or("").into(),
                        t["revoked"].to_string(),
                        t["description"].as_str().unwrap_or("").into(),
                    ]
                })
                .collect(),
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_as_escapes() {
        assert_eq!(
            printable("a\u{1b}]0;pwned\u{7}b"),
            "a\\u{1b}]0;pwned\\u{7}b"
        );
        assert_eq!(printable("line\nnext ünï"), "line\\nnext ünï");
    }

    #[test]
    fn csv_puts_the_key_first_quotes_what_needs_it_and_ends_with_the_total() {
        let report = json!({"rows": [{"gpu": 1, "key": "a,b"}, {"gpu": 2, "key": "say \"x\""}],
                            "total": {"gpu": 3, "key": "total"}});
        assert_eq!(
            csv(&report),
            "key,gpu\n\"a,b\",1\n\"say \"\"x\"\"\",2\ntotal,3\n"
        );
        assert_eq!(csv(&json!([{"z": null, "id": 7}])), "id,z\n7,\n");
        assert_eq!(csv(&json!([])), "");
    }

    #[test]
    fn the_replicas_flag_is_a_number_or_an_elastic_range() {
        assert_eq!(replicas_flag("4").unwrap(), json!(4));
        assert_eq!(replicas_flag("1-8").unwrap(), json!({"min": 1, "max": 8}));
        for bad in ["", "x", "1-", "-3", "1-2-3", "1.5"] {
            let err = replicas_flag(bad).unwrap_err().to_string();
            assert!(err.contains("MIN-MAX"), "{bad}: {err}");
        }
    }
}
