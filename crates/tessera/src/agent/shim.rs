//! The per-workload supervisor (`tessera shim`), in the role of containerd's shim.
//!
//! The agent starts one shim per replica in its own session, so the workload outlives an agent
//! restart (the new agent re-adopts it) and the agent never has to be its parent. The shim:
//! puts the workload in its cgroup and its own process group, sends its output to files, records
//! its exit code in `exit`, kills the whole tree on SIGTERM (after a grace period) and, above all,
//! **kills the workload when the agent's lease runs out**: an agent cut off from the controller
//! (or stopped, or killed) cannot renew the lease file, so its replicas stop before the controller
//! reschedules them elsewhere. No replica runs twice.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::now_ms;

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

/// Does nothing: its only purpose is to interrupt the shim's wait when the workload exits.
extern "C" fn on_child(_: i32) {}

/// Waits up to `ms`, returning early when a signal arrives (a stop request, the workload's
/// exit): unlike `std::thread::sleep`, `nanosleep` is not resumed after a handler runs.
fn nap(ms: u64) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: (ms * 1_000_000) as libc::c_long,
    };
    // SAFETY: nanosleep reads the timespec we own; the remainder pointer may be null.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// What the shim leaves behind when the workload has ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    pub code: i32,
    pub message: String,
}

#[derive(Debug, clap::Args)]
pub struct ShimArgs {
    /// The replica's run directory (work/, stdout.log, stderr.log, exit).
    #[arg(long)]
    pub run_dir: PathBuf,
    /// File holding the lease's end (Unix ms); the workload is killed past it.
    #[arg(long)]
    pub lease_file: PathBuf,
    #[arg(long, default_value_t = 5000)]
    pub grace_ms: u64,
    /// The signal that asks the workload to stop: TERM, or a checkpointing job's own signal,
    /// sent to the whole tree; SIGKILL follows after the grace period.
    #[arg(long, default_value_t = 15)]
    pub stop_signal: i32,
    /// `cgroup.procs` files to join before the workload starts.
    #[arg(long)]
    pub cgroup_procs: Vec<PathBuf>,
    /// Checked for an OOM kill after the workload ends.
    #[arg(long)]
    pub oom_file: Option<PathBuf>,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn lease_end(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn kill_group(pgid: i32, sig: Signal, cgroup_procs: &[PathBuf]) {
    let _ = signal::killpg(Pid::from_raw(pgid), sig);
    // Processes that left the group (setsid) are still in the cgroup.
    for procs in cgroup_procs {
        if let Ok(text) = fs::read_to_string(procs) {
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = signal::kill(Pid::from_raw(pid), sig);
            }
        }
    }
}

fn write_exit(run_dir: &Path, rec: &ExitRecord) -> anyhow::Result<()> {
    let tmp = run_dir.join("exit.tmp");
    fs::write(&tmp, serde_json::to_vec(rec)?)?;
    fs::rename(&tmp, run_dir.join("exit"))?;
    Ok(())
}

pub fn run(args: ShimArgs) -> anyhow::Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal::signal(Signal::SIGTERM, SigHandler::Handler(on_term))?;
    }
    // SAFETY: the handler does nothing (it only wakes the wait below).
    unsafe {
        signal::signal(Signal::SIGCHLD, SigHandler::Handler(on_child))?;
    }
    let work = args.run_dir.join("work");
    fs::create_dir_all(&work)?;
    let stdout = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.run_dir.join("stdout.log"))?;
    let stderr = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.run_dir.join("stderr.log"))?;
    if lease_end(&args.lease_file).is_none_or(|end| end <= now_ms()) {
        write_exit(
            &args.run_dir,
            &ExitRecord {
                code: 128 + 9,
                message: "not started: the agent's lease had already run out".into(),
            },
        )?;
        return Ok(());
    }
    let procs = args.cgroup_procs.clone();
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .current_dir(&work)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    // SAFETY: runs in the forked child before exec; it only opens and writes files (no locks
    // held across fork in this single-threaded process).
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                fs::write(p, "0")?;
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            write_exit(
                &args.run_dir,
                &ExitRecord {
                    code: 127,
                    message: format!("could not start {}: {e}", args.command[0]),
                },
            )?;
            return Ok(());
        }
    };
    let pgid = child.id() as i32;
    fs::write(args.run_dir.join("pid"), pgid.to_string())?;
    let mut stop_deadline: Option<Instant> = None;
    let mut why: Option<String> = None;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the workload")? {
            break status;
        }
        if why.is_none() {
            if TERM.load(Ordering::SeqCst) {
                why = Some("stopped by Tessera".into());
                let stop = Signal::try_from(args.stop_signal).unwrap_or(Signal::SIGTERM);
                kill_group(pgid, stop, &args.cgroup_procs);
                stop_deadline = Some(Instant::now() + Duration::from_millis(args.grace_ms));
            } else if lease_end(&args.lease_file).is_none_or(|end| end <= now_ms()) {
                why = Some(
                    "killed: the agent lost contact with the controller and its lease ran out"
                        .into(),
                );
                kill_group(pgid, Signal::SIGKILL, &args.cgroup_procs);
            }
        }
        if stop_deadline.is_some_and(|d| Instant::now() >= d) {
            kill_group(pgid, Signal::SIGKILL, &args.cgroup_procs);
            stop_deadline = None;
        }
        nap(50);
    };
    // Leave nothing of the tree behind.
    kill_group(pgid, Signal::SIGKILL, &args.cgroup_procs);
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let oom = args
        .oom_file
        .as_ref()
        .is_some_and(|f| fs::read_to_string(f).is_ok_and(|t| super::cgroup::oom_kills(&t) > 0));
    let message = match (why, oom) {
        (_, true) => format!("exited with code {code}: killed by its memory limit (OOM)"),
        (Some(w), _) => format!("{w} (code {code})"),
        (None, _) => format!("exited with {}", crate::protocol::exit_words(code)),
    };
    write_exit(&args.run_dir, &ExitRecord { code, message })?;
    Ok(())
}
