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
    /// The workload did not start for a reason of the node (e.g. its disk was full).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

/// Whether an error is the node's lack of space (ENOSPC, EDQUOT) rather than the workload's.
pub fn out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
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
    /// Written by a remotely attached workload's client when it lost its GPU server: an end
    /// after that is the device's, so the job is queued again rather than failed.
    #[arg(long)]
    pub device_lost_file: Option<PathBuf>,
    /// Transparent checkpoints: the CRIU binary (and the rest of the `--home` options).
    #[arg(long, requires_all = ["home", "checkpoint_dir"])]
    pub criu: Option<PathBuf>,
    /// CRIU's plugin directory (CUDA), for GPU replicas.
    #[arg(long, requires = "criu")]
    pub criu_plugins: Option<PathBuf>,
    /// The replica's home, the same path on every node (work/ and the output files).
    #[arg(long, requires = "criu")]
    pub home: Option<PathBuf>,
    /// Where dumps are written for the agent to send (with `--criu` or `--container-id`).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Periodic dumps while the workload runs.
    #[arg(long, requires = "checkpoint_dir")]
    pub checkpoint_interval_ms: Option<u64>,
    /// Transparent checkpoints of an image's container through the runtime (`runc checkpoint`):
    /// its id; the command after `--` runs or restores it.
    #[arg(long, requires_all = ["runc", "runc_root", "container_criu", "checkpoint_dir"], conflicts_with = "criu")]
    pub container_id: Option<String>,
    /// The OCI runtime (with `--container-id`).
    #[arg(long)]
    pub runc: Option<PathBuf>,
    /// The runtime's state directory (with `--container-id`).
    #[arg(long)]
    pub runc_root: Option<PathBuf>,
    /// The CRIU the runtime runs (with `--container-id`).
    #[arg(long)]
    pub container_criu: Option<PathBuf>,
    /// The checkpoint images a container is restored from: removed once it runs again.
    #[arg(long, requires = "container_id")]
    pub restore_images: Option<PathBuf>,
    /// A verified checkpoint to restore instead of starting the command.
    #[arg(long, requires = "criu")]
    pub restore_from: Option<PathBuf>,
    /// Where the program starts (default: `work/` in its run dir or home).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Most bytes of output kept (stdout and stderr together; older output rotates away).
    #[arg(long, default_value_t = super::logs::DEFAULT_LIMIT)]
    pub log_limit: u64,
    /// A file, relative to the working directory, that also gets the output as it comes
    /// (Slurm's `--output`); opened with the workload's own permissions.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
    /// How the workload is confined (none without `--uid`: the admin allowed it).
    #[command(flatten)]
    pub confine: super::confine::Confine,
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

/// Starts the command in its own session (a session leader, as CRIU needs to restore it), in
/// the replica's cgroups. Returns its pid, which is also its process group.
fn spawn(
    args: &ShimArgs,
    work: &Path,
    stdout: impl Into<Stdio>,
    stderr: impl Into<Stdio>,
) -> std::io::Result<i32> {
    let procs = args.cgroup_procs.clone();
    let confine = args.confine.clone();
    let dir = work.to_path_buf();
    confine
        .before_spawn()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: runs in the forked child before exec; it calls setsid, writes files, mounts and
    // drops privileges (no locks held across fork in this single-threaded process).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // The agent's private umask (which the shim keeps for its own files) is not the
            // workload's: its files get the usual 0644 and 0755.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            for p in &procs {
                fs::write(p, "0")?;
            }
            confine.enter(&dir)
        });
    }
    Ok(cmd.spawn()?.id() as i32)
}

/// Reaps every child that has ended (as a subreaper the shim inherits orphans of the tree);
/// returns the workload's exit code (128 + signal when killed) once `pid` has ended.
fn reap(pid: i32) -> anyhow::Result<Option<i32>> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => return Ok(Some(code)),
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => {
                return Ok(Some(128 + sig as i32));
            }
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(_) => continue,
            Err(nix::errno::Errno::ECHILD) => {
                anyhow::bail!("the workload (pid {pid}) is not the shim's to wait for")
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the workload"),
        }
    }
}

/// Gives back what a confined workload's processes held of the simulated devices.
fn release_simulated_devices(dir: &Path, ns: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("device")
            && let Ok(region) = tessera_shm::Region::open(&e.path())
        {
            region.release_namespace(ns);
        }
    }
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
    let criu = args.criu.clone().map(|bin| super::criu::Criu {
        bin,
        plugins: args.criu_plugins.clone(),
        home: args.home.clone().unwrap_or_default(),
    });
    let runtime = match (
        &args.container_id,
        &args.runc,
        &args.runc_root,
        &args.container_criu,
    ) {
        (Some(id), Some(runc), Some(state), Some(criu)) => {
            Some(super::container::RuntimeCheckpoint {
                runc: runc.clone(),
                state: state.clone(),
                id: id.clone(),
                criu: criu.clone(),
            })
        }
        _ => None,
    };
    // A transparent replica's files live in its home (the same path on every node, as CRIU
    // restores them by path); the run directory links to its output.
    let home = args.home.clone().unwrap_or_else(|| args.run_dir.clone());
    let own_work = home.join("work");
    fs::create_dir_all(&own_work)?;
    if let Some(uid) = args.confine.uid {
        super::confine::own(&own_work, uid)?;
    }
    let work = args.workdir.clone().unwrap_or(own_work);
    if home != args.run_dir {
        for name in ["stdout.log", "stderr.log"] {
            let link = args.run_dir.join(name);
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(home.join(name), &link)?;
            }
        }
    }
    // A transparent replica writes its output files itself (CRIU restores them by path); the
    // shim keeps them under the cap by copying and truncating. Any other replica writes into
    // pipes the shim drains into capped, rotated files (the files stay the agent's).
    let per_stream = (args.log_limit / 2).max(super::logs::MIN_LIMIT / 2);
    let direct = criu.is_some();
    let log = |name: &str| {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(home.join(name))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        Ok::<_, std::io::Error>(f)
    };
    if lease_end(&args.lease_file).is_none_or(|end| end <= now_ms()) {
        write_exit(
            &args.run_dir,
            &ExitRecord {
                code: 128 + 9,
                message: "not started: the agent's lease had already run out".into(),
                interrupted: true,
            },
        )?;
        return Ok(());
    }
    // A restored tree is not our child: as a subreaper the shim inherits it when CRIU exits.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let grace = Duration::from_millis(args.grace_ms);
    let mut pump = super::logs::Pump::default();
    let started = match (&criu, &args.restore_from) {
        _ if !work.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "its working directory {} is not a directory on this node",
                work.display()
            ),
        )),
        (Some(c), Some(from)) => c
            .restore(from, &args.cgroup_procs, grace.max(Duration::from_secs(60)))
            .map_err(|e| {
                std::io::Error::other(format!("its checkpoint could not be restored: {e:#}"))
            }),
        _ if direct => (|| spawn(&args, &work, log("stdout.log")?, log("stderr.log")?))(),
        _ => (|| {
            use super::logs::{OUTPUT, Rotating, Stream};
            let (out_r, out_w) = super::logs::pipe()?;
            let (err_r, err_w) = super::logs::pipe()?;
            pump = super::logs::Pump::into(Rotating::open(&home, OUTPUT, args.log_limit)?);
            if let Some(name) = &args.output_file {
                pump.also(open_as_workload(&work, name, args.confine.uid)?);
            }
            let pid = spawn(&args, &work, out_w, err_w)?;
            pump.add(out_r, Stream::Stdout)?;
            pump.add(err_r, Stream::Stderr)?;
            Ok::<_, std::io::Error>(pid)
        })(),
    };
    let pgid = match started {
        Ok(pid) => pid,
        Err(e) => {
            let interrupted = out_of_space(&e);
            let message = if interrupted {
                format!("the node could not start it: {e}")
            } else if let Some(dir) = &args.workdir {
                let who = args
                    .confine
                    .uid
                    .map_or(String::new(), |u| format!(" as uid {u}"));
                format!(
                    "could not start {} in {}{who}: {e}",
                    args.command[0],
                    dir.display()
                )
            } else {
                format!("could not start {}: {e}", args.command[0])
            };
            write_exit(
                &args.run_dir,
                &ExitRecord {
                    code: 127,
                    message,
                    interrupted,
                },
            )?;
            return Ok(());
        }
    };
    fs::write(args.run_dir.join("pid"), pgid.to_string())?;
    // The workload's own pid namespace, whose slots in shared device accounting are given back
    // when it ends (nobody outside it can tell its pids from others').
    let pid_ns = args
        .confine
        .namespaces
        .then(|| {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(format!("/proc/{pgid}/ns/pid"))
                .map(|m| m.ino())
                .ok()
        })
        .flatten();
    let interval = args.checkpoint_interval_ms.map(Duration::from_millis);
    let mut next_dump = interval.map(|i| Instant::now() + i);
    let mut stop_deadline: Option<Instant> = None;
    let mut why: Option<String> = None;
    let mut lease_lost = false;
    let mut restore_images = args.restore_images.clone();
    let status = loop {
        if let Some(status) = reap(pgid)? {
            break status;
        }
        if let (Some(images), Some(r)) = (&restore_images, &runtime)
            && r.running()
        {
            let _ = fs::remove_dir_all(images);
            restore_images = None;
        }
        if why.is_none() {
            if TERM.load(Ordering::SeqCst) {
                let dumped = match (&criu, &runtime, &args.checkpoint_dir) {
                    (Some(c), _, Some(dir)) => Some(c.dump(pgid, dir, false, grace)),
                    (_, Some(r), Some(dir)) => Some(r.dump(dir, false, grace)),
                    _ => None,
                };
                match dumped {
                    // CRIU ended the tree after saving it.
                    Some(Ok(())) => {
                        why = Some("checkpointed by CRIU and stopped by Tessera".into())
                    }
                    Some(Err(e)) => {
                        eprintln!("transparent checkpoint failed: {e:#}");
                        why = Some(format!("stopped by Tessera; its checkpoint failed: {e:#}"));
                        kill_group(pgid, Signal::SIGTERM, &args.cgroup_procs);
                        stop_deadline = Some(Instant::now() + grace.min(Duration::from_secs(10)));
                    }
                    None => {
                        why = Some("stopped by Tessera".into());
                        let stop = Signal::try_from(args.stop_signal).unwrap_or(Signal::SIGTERM);
                        kill_group(pgid, stop, &args.cgroup_procs);
                        stop_deadline = Some(Instant::now() + grace);
                    }
                }
                continue;
            } else if let (Some(dir), Some(at)) = (&args.checkpoint_dir, next_dump)
                && Instant::now() >= at
                && (criu.is_some() || runtime.is_some())
            {
                let dumped = match (&criu, &runtime) {
                    (Some(c), _) => c.dump(pgid, dir, true, grace),
                    (_, Some(r)) => r.dump(dir, true, grace),
                    _ => Ok(()),
                };
                if let Err(e) = dumped {
                    eprintln!("periodic transparent checkpoint failed: {e:#}");
                }
                next_dump = interval.map(|i| Instant::now() + i);
            } else if lease_end(&args.lease_file).is_none_or(|end| end <= now_ms()) {
                why = Some(
                    "killed: the agent lost contact with the controller and its lease ran out"
                        .into(),
                );
                // The node's loss, not the workload's failure: it is queued again.
                lease_lost = true;
                kill_group(pgid, Signal::SIGKILL, &args.cgroup_procs);
            }
        }
        if direct {
            for name in ["stdout.log", "stderr.log"] {
                if let Err(e) = super::logs::truncate_over(&home, name, per_stream) {
                    eprintln!("tessera: rotating {name} failed: {e}");
                }
            }
        }
        if stop_deadline.is_some_and(|d| Instant::now() >= d) {
            kill_group(pgid, Signal::SIGKILL, &args.cgroup_procs);
            stop_deadline = None;
        }
        if pump.is_done() {
            nap(50);
        } else {
            pump.wait(50);
        }
    };
    // Leave nothing of the tree behind.
    kill_group(pgid, Signal::SIGKILL, &args.cgroup_procs);
    // The output is complete before the exit is recorded (unless a process that escaped the
    // tree still holds a pipe: then after a few seconds).
    let until = Instant::now() + Duration::from_secs(5);
    while !pump.is_done() && Instant::now() < until {
        pump.wait(50);
    }
    if let (Some(ns), Some(dir)) = (pid_ns, std::env::var_os("TESSERA_FAKECUDA_DIR")) {
        release_simulated_devices(Path::new(&dir), ns);
    }
    let code = status;
    if home != args.run_dir {
        // The run directory keeps this attempt's output; the home goes (a next attempt
        // restores its own from the checkpoint).
        for name in ["stdout.log", "stderr.log"] {
            let link = args.run_dir.join(name);
            let _ = fs::remove_file(&link);
            let _ = fs::copy(home.join(name), &link);
        }
        let _ = fs::remove_dir_all(&home);
    }
    let oom = args
        .oom_file
        .as_ref()
        .is_some_and(|f| fs::read_to_string(f).is_ok_and(|t| super::cgroup::oom_kills(&t) > 0));
    let device_lost = args
        .device_lost_file
        .as_ref()
        // The workload can write this file: read its first 1 KiB only, whatever its size.
        .and_then(|f| {
            let mut head = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(fs::File::open(f).ok()?, 1024),
                &mut head,
            )
            .ok()?;
            Some(String::from_utf8_lossy(&head).into_owned())
        })
        .map(|t| t.trim().chars().take(300).collect::<String>())
        .filter(|t| !t.is_empty() && code != 0);
    let message = match (why, oom, &device_lost) {
        (_, true, _) => format!("exited with code {code}: killed by its memory limit (OOM)"),
        (None, false, Some(lost)) => format!("its remote GPU went away ({lost}; code {code})"),
        (Some(w), _, _) => format!("{w} (code {code})"),
        (None, false, None) => {
            let words = format!("exited with {}", crate::protocol::exit_words(code));
            // A failed program's last word on stderr is usually why (a traceback's last line).
            match super::logs::last_error_line(&home, 300).filter(|_| code != 0) {
                Some(line) => format!("{words}; its last error output: {line}"),
                None => words,
            }
        }
    };
    write_exit(
        &args.run_dir,
        &ExitRecord {
            code,
            message,
            interrupted: lease_lost || (device_lost.is_some() && !oom),
        },
    )?;
    Ok(())
}

/// Opens (creating, appending) the job's output file `name` in its working directory `work`
/// with the workload's permissions, not the shim's: the name is resolved beneath `work` only
/// (no `..`, no link out of it) and judged as the workload's uid (`setfsuid`), so a file it may
/// not write is refused as it would be to the workload itself. Its directory must exist, as
/// with Slurm.
fn open_as_workload(work: &Path, name: &Path, uid: Option<u32>) -> std::io::Result<fs::File> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use nix::sys::stat::Mode;
    use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
    // The working directory is the shim's to open (the workload's own, or a volume's).
    let dir = fs::File::open(work)?;
    let how = OpenHow::new()
        .flags(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(0o644))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let old = uid.map(|u| (setfsuid(Uid::from_raw(u)), setfsgid(Gid::from_raw(u))));
    let opened = openat2(&dir, name, how);
    if let Some((old_uid, old_gid)) = old {
        setfsuid(old_uid);
        setfsgid(old_gid);
    }
    opened.map(fs::File::from).map_err(|e| {
        let e = std::io::Error::from(e);
        std::io::Error::new(
            e.kind(),
            format!(
                "its output file {} could not be opened in {}: {e}",
                name.display(),
                work.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output file is judged as the workload would be: refused where its uid may not
    /// write, never outside its working directory, created as its own where it may.
    #[test]
    fn the_output_file_is_opened_with_the_workloads_permissions() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let nobody = 65534;
        let root_only = dir.path().join("root");
        fs::create_dir(&root_only).unwrap();
        let e = open_as_workload(&root_only, Path::new("x.out"), Some(nobody)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        let theirs = dir.path().join("theirs");
        fs::create_dir_all(theirs.join("logs")).unwrap();
        for d in [&theirs, &theirs.join("logs")] {
            std::os::unix::fs::chown(d, Some(nobody), Some(nobody)).unwrap();
        }
        let mut f = open_as_workload(&theirs, Path::new("logs/x.out"), Some(nobody)).unwrap();
        std::io::Write::write_all(&mut f, b"hi").unwrap();
        assert_eq!(
            fs::metadata(theirs.join("logs/x.out")).unwrap().uid(),
            nobody
        );
        // A link out of the working directory is not followed, even for root.
        std::os::unix::fs::symlink(root_only.join("z.out"), theirs.join("out")).unwrap();
        assert!(open_as_workload(&theirs, Path::new("out"), None).is_err());
        assert!(!root_only.join("z.out").exists());
        // The shim itself is root again afterwards.
        assert!(open_as_workload(&root_only, Path::new("y.out"), None).is_ok());
    }
}
