//! Confinement: what keeps a workload from the node, the agent and other tenants.
//!
//! Every replica runs as an unprivileged uid (one per project, from a range the agent owns), with
//! no capabilities and `PR_SET_NO_NEW_PRIVS`, in its own mount, pid, ipc and uts namespaces. In
//! its mount namespace the agent's data dir (credential, store, other replicas' run dirs, GPU
//! state) is covered by an empty read-only tmpfs into which only what the replica needs is bound
//! back at the same path (its own run dir, its slice region, the simulated driver); `/tmp` and
//! `/dev/shm` are its own; `/proc` shows only its own processes. Its pid 1 is a tiny init that
//! reaps orphans and exits with the program's status, so the program keeps ordinary signal
//! semantics (a pid 1 ignores signals it has no handler for).
//!
//! Directories above a hidden one that others cannot traverse (a `/root` at mode 0700, a
//! private temp dir) are covered instead: the workload could not see into them anyway.
//!
//! Transparent (CRIU) replicas keep the uid, capability and no-new-privileges confinement but
//! not the namespaces, which CRIU would have to dump and restore with their bind mounts.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid};

/// The uids (and gids, the same numbers) the agent gives projects' workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// Parses `FIRST-LAST` (both included), refusing uids that are root or system accounts.
    pub fn parse(flag: &str, text: &str) -> anyhow::Result<UidRange> {
        let (a, b) = text
            .split_once('-')
            .with_context(|| format!("{flag} {text}: write FIRST-LAST, e.g. 200000-299999"))?;
        let (first, last): (u32, u32) = (
            a.trim()
                .parse()
                .with_context(|| format!("{flag} {text}: {a} is not a uid"))?,
            b.trim()
                .parse()
                .with_context(|| format!("{flag} {text}: {b} is not a uid"))?,
        );
        if first < 1000 || last < first || last >= u32::MAX - 1 {
            bail!(
                "{flag} {text}: give a range of uids no account of this host uses, at or above \
                 1000 and in order (e.g. 200000-299999)"
            );
        }
        Ok(UidRange { first, last })
    }
}

/// Whether this node confines its workloads, and if not, why and whether the admin allowed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Namespaces and per-project uids from this range.
    Confined(UidRange),
    /// The admin allowed unconfined work (`--allow-unconfined`); `why` says what is missing.
    Unconfined { why: String },
    /// Confinement is not possible and the admin did not allow unconfined work: replicas are
    /// refused.
    Refused { why: String },
}

impl Mode {
    /// What `tessera nodes` shows.
    pub fn describe(&self) -> String {
        match self {
            Mode::Confined(r) => format!("confined (uids {}-{})", r.first, r.last),
            Mode::Unconfined { why } => format!("UNCONFINED, allowed by the admin ({why})"),
            Mode::Refused { why } => format!("cannot confine, refuses work ({why})"),
        }
    }

    /// Decides a node's mode at start: confine when possible, else what the admin said.
    pub fn detect(range: UidRange, allow_unconfined: bool) -> Mode {
        match probe() {
            Ok(()) => Mode::Confined(range),
            Err(why) if allow_unconfined => Mode::Unconfined { why },
            Err(why) => Mode::Refused { why },
        }
    }
}

/// Can this process confine a workload? It must be root and able to create the namespaces.
pub fn probe() -> Result<(), String> {
    if !Uid::effective().is_root() {
        return Err(
            "the agent does not run as root, so it cannot switch workloads to other \
                    uids or create their namespaces"
                .into(),
        );
    }
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe system calls,
    // so forking from a multi-threaded process is sound.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let ok = unshare(namespaces()).is_ok();
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
                _ => Err(
                    "this host does not let the agent create mount, pid, ipc and uts \
                          namespaces"
                        .into(),
                ),
            }
        }
        Err(e) => Err(format!("could not fork to test namespaces: {e}")),
    }
}

/// Whether this process holds CAP_SYS_RESOURCE, without which CRIU cannot read the limits of a
/// process of another uid, so it cannot dump a confined workload.
pub fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

fn namespaces() -> CloneFlags {
    CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
}

/// Each project's uid on this node, kept in the agent's data dir so that a project keeps its
/// uid across agent restarts (its files in checkpoints and homes stay its own).
pub struct Uids {
    path: PathBuf,
    range: UidRange,
    by_project: BTreeMap<String, u32>,
}

impl Uids {
    pub fn load(path: PathBuf, range: UidRange) -> anyhow::Result<Uids> {
        let by_project: BTreeMap<String, u32> = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Uids {
            path,
            range,
            by_project,
        })
    }

    /// The project's uid, allocating the lowest free one of the range (saved before it is used).
    pub fn of(&mut self, project: &str) -> anyhow::Result<u32> {
        if let Some(&uid) = self.by_project.get(project)
            && (self.range.first..=self.range.last).contains(&uid)
        {
            return Ok(uid);
        }
        let taken: std::collections::BTreeSet<u32> = self.by_project.values().copied().collect();
        let uid = (self.range.first..=self.range.last)
            .find(|u| !taken.contains(u))
            .with_context(|| {
                format!(
                    "every uid of the workload range {}-{} is taken by a project; give the agent \
                     a larger --workload-uids range",
                    self.range.first, self.range.last
                )
            })?;
        self.by_project.insert(project.to_string(), uid);
        crate::controller::write_private(&self.path, &serde_json::to_string(&self.by_project)?)?;
        Ok(uid)
    }
}

/// How the shim confines one workload (its `--uid`, `--mask`, `--expose` … options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Confine {
    /// Run the workload as this uid (and gid): confinement is on.
    #[arg(long)]
    pub uid: Option<u32>,
    /// Also give the workload its own mount, pid, ipc and uts namespaces.
    #[arg(long, requires = "uid")]
    pub namespaces: bool,
    /// Paths covered by an empty read-only tmpfs in the workload's mount namespace.
    #[arg(long, requires = "namespaces")]
    pub mask: Vec<PathBuf>,
    /// Paths bound back, read-write at the same path, inside the masks.
    #[arg(long, requires = "namespaces")]
    pub expose: Vec<PathBuf>,
    /// Bound on `/tmp`: the replica's own.
    #[arg(long, requires = "namespaces")]
    pub private_tmp: Option<PathBuf>,
    /// Paths made read-only in the workload's mount namespace (read-only volumes).
    #[arg(long, requires = "namespaces")]
    pub read_only: Vec<PathBuf>,
}

/// Gives `path` to the workload's uid, mode 0700: its work dir, checkpoints, temp files.
pub fn own(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Gives a tree the agent wrote before the workload started (a restored checkpoint) to it.
pub fn own_tree(path: &Path, uid: u32) -> std::io::Result<()> {
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_dir() {
            own_tree(&entry.path(), uid)?;
        } else if t.is_file() {
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(uid))?;
        }
    }
    own(path, uid)
}

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

/// The path of an open file as `mount` can take it.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn open_path(p: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(p)?;
    Ok(f.into())
}

/// The highest directory on the way to `path` that others cannot traverse, or `path` itself:
/// covering it hides nothing the workload could have seen.
fn mask_point(path: &Path) -> PathBuf {
    let mut at = PathBuf::from("/");
    for c in path.components() {
        if let Component::Normal(name) = c {
            at.push(name);
            if std::fs::metadata(&at).is_ok_and(|m| m.is_dir() && m.mode() & 0o001 == 0) {
                return at;
            }
        }
    }
    path.to_path_buf()
}

/// Same file (device and inode)?
fn same(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Binds `fd` (opened before anything was covered) at `target`, creating the way to it.
fn bind_back(fd: &OwnedFd, target: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(fd_path(fd))?;
    if std::fs::metadata(target).is_ok_and(|m| same(&m, &meta)) {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(target)?;
    } else if std::fs::symlink_metadata(target).is_err() {
        std::fs::File::create(target)?;
    }
    mount(
        Some(&fd_path(fd)),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io)
}

impl Confine {
    /// In the shim, before the workload is forked: a new pid namespace for the next child.
    pub fn before_spawn(&self) -> anyhow::Result<()> {
        if self.namespaces {
            unshare(CloneFlags::CLONE_NEWPID).context("creating the workload's pid namespace")?;
        }
        Ok(())
    }

    /// In the forked child, as root, just before exec: namespaces and mounts, then the uid, no
    /// capabilities, no new privileges; with namespaces, the child becomes the namespace's init
    /// and the program runs in its own child. Runs in a single-threaded child of the shim.
    pub fn enter(&self, work: &Path) -> std::io::Result<()> {
        let Some(uid) = self.uid else {
            return Ok(());
        };
        if self.namespaces {
            self.mount_view()?;
        }
        drop_privileges(uid)?;
        // As the workload: a directory it may not enter fails here, not in its program.
        std::env::set_current_dir(work)?;
        if self.namespaces {
            become_init()?;
        }
        Ok(())
    }

    /// The workload's view of the file system (see the module's doc).
    fn mount_view(&self) -> std::io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
            .map_err(io)?;
        // Nothing done here propagates back to the host.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(io)?;
        // Opened before anything is covered.
        let exposed = self
            .expose
            .iter()
            .map(|p| Ok((open_path(p)?, p.clone())))
            .collect::<std::io::Result<Vec<_>>>()?;
        if let Some(tmp) = &self.private_tmp {
            let fd = open_path(tmp)?;
            mount(
                Some(&fd_path(&fd)),
                "/tmp",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(io)?;
        }
        let hidden = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(
            Some("tmpfs"),
            "/dev/shm",
            Some("tmpfs"),
            hidden,
            Some("mode=1777"),
        )
        .map_err(io)?;
        let mut points = Vec::new();
        for m in &self.mask {
            // Under the private /tmp a host path is gone already.
            if std::fs::symlink_metadata(m).is_err() {
                continue;
            }
            let at = mask_point(m);
            mount(
                Some("tmpfs"),
                &at,
                Some("tmpfs"),
                hidden | MsFlags::MS_NOEXEC,
                Some("mode=0755,size=1m"),
            )
            .map_err(io)?;
            points.push(at);
        }
        for (fd, path) in &exposed {
            bind_back(fd, path)?;
        }
        for at in &points {
            mount(
                None::<&str>,
                at,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hidden,
                None::<&str>,
            )
            .map_err(io)?;
        }
        // Read-only volumes: a bind of each onto itself, remounted read-only (mounts below one
        // keep their own mode).
        for p in &self.read_only {
            mount(
                Some(p.as_path()),
                p.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(io)?;
            mount(
                None::<&str>,
                p.as_path(),
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hidden,
                None::<&str>,
            )
            .map_err(io)?;
        }
        // This process is the first of the new pid namespace: its /proc shows only the
        // workload's processes.
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            hidden | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(io)?;
        Ok(())
    }
}

/// No capabilities (bounding set emptied), no new privileges, then the workload's uid and gid
/// with no supplementary groups: after `setresuid` from root, the kernel clears the permitted,
/// effective and ambient sets.
fn drop_privileges(uid: u32) -> std::io::Result<()> {
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments touches no memory; capabilities this kernel does
        // not know answer EINVAL, which ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            break;
        }
    }
    // SAFETY: prctl with integer arguments touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    nix::unistd::setgroups(&[]).map_err(io)?;
    let (g, u) = (Gid::from_raw(uid), Uid::from_raw(uid));
    nix::unistd::setresgid(g, g, g).map_err(io)?;
    nix::unistd::setresuid(u, u, u).map_err(io)?;
    Ok(())
}

/// Forks: the child returns and goes on to exec the program; this process stays as the pid
/// namespace's init, reaping orphans, and exits with the program's status (128 + signal when a
/// signal ended it). When the init exits, the kernel kills what is left in the namespace.
fn become_init() -> std::io::Result<()> {
    // SAFETY: the shim is single-threaded, so the forked child may do anything; the parent only
    // makes system calls below.
    let program = match unsafe { nix::unistd::fork() }.map_err(io)? {
        nix::unistd::ForkResult::Child => return Ok(()),
        nix::unistd::ForkResult::Parent { child } => child,
    };
    // The init never execs: close what std's spawn left open (its exec-error pipe among them),
    // so that the shim sees the exec of the program, not the end of the init.
    // SAFETY: close_range takes integers; the init uses no descriptor above 2.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // If the shim dies (killed, or its host's OOM killer), the init dies with it, and with the
    // init everything in the namespace: no workload outlives the supervisor that enforces its
    // lease. Set after the credentials changed (a change clears it); a shim already gone by
    // then shows as a new parent.
    let shim = nix::unistd::getppid();
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if nix::unistd::getppid() != shim {
        // SAFETY: ends the init without unwinding into the parent's stack.
        unsafe { libc::_exit(128 + libc::SIGKILL) }
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into the integer we own.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == program.as_raw() {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            // SAFETY: ends the init without unwinding into the parent's stack.
            unsafe { libc::_exit(code) }
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: as above.
            unsafe { libc::_exit(127) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_are_checked_and_projects_keep_their_uid() {
        assert!(UidRange::parse("--workload-uids", "0-100").is_err());
        assert!(UidRange::parse("--workload-uids", "300000-200000").is_err());
        assert!(UidRange::parse("--workload-uids", "abc").is_err());
        let range = UidRange::parse("--workload-uids", "200000-200001").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uids.json");
        let mut uids = Uids::load(path.clone(), range).unwrap();
        assert_eq!(uids.of("a").unwrap(), 200000);
        assert_eq!(uids.of("b").unwrap(), 200001);
        assert_eq!(uids.of("a").unwrap(), 200000);
        let err = uids.of("c").unwrap_err().to_string();
        assert!(err.contains("--workload-uids"), "{err}");
        // Kept across a restart.
        let mut again = Uids::load(path, range).unwrap();
        assert_eq!(again.of("b").unwrap(), 200001);
    }

    #[test]
    fn the_mask_covers_the_highest_directory_others_cannot_enter() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let inner = closed.join("data");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(mask_point(&inner), closed);
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(mask_point(&inner), inner);
    }
}
