//! Transparent checkpoints with CRIU, for programs that cannot save themselves.
//!
//! The agent finds CRIU (4.x: Debian 12's 3.17 fails on current kernels) and checks that it works
//! here; the node then carries `tessera.io/criu=true`, and transparent jobs run only on such
//! nodes. The shim does the dumps and the restore:
//!
//! - A transparent replica lives in a *home* whose path is the same on every node
//!   (`<root>/<job>-<replica>`: its work directory and its output files), because CRIU restores
//!   open files and the working directory by path.
//! - A dump freezes the tree, writes CRIU's images, and, still frozen (CRIU's post-dump action),
//!   copies the home beside them, so files and memory agree. Then `COMPLETE`, as for cooperative
//!   checkpoints, and the agent sends it in chunks like any other.
//! - A restore puts the home back and runs `criu restore` from inside the replica's cgroups; the
//!   shim is the restored tree's subreaper, so it waits for it as for a child.
//!
//! On GPU hosts with NVIDIA's `cuda-checkpoint`, CRIU's CUDA plugin saves device state the same
//! way (the node also carries `tessera.io/cuda-checkpoint=true`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Nodes that can checkpoint transparently carry this label (`true`).
pub const CRIU_LABEL: &str = "tessera.io/criu";
/// The CRIU version on the node, for `tessera nodes`.
pub const CRIU_VERSION_LABEL: &str = "tessera.io/criu-version";
/// Nodes whose OCI runtime can checkpoint image jobs with CRIU (`runc checkpoint`): confined
/// as every image job is, which needs no capability beyond root's usual ones.
pub const IMAGES_LABEL: &str = "tessera.io/criu-images";
/// GPU nodes whose device state CRIU can save too (NVIDIA's `cuda-checkpoint`).
pub const CUDA_LABEL: &str = "tessera.io/cuda-checkpoint";

/// What a node needs for transparent checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transparent {
    pub criu: PathBuf,
    pub version: String,
    /// Where replicas' homes are made (the same path on every node).
    pub root: PathBuf,
    /// CRIU's CUDA plugin directory, on hosts with `cuda-checkpoint` and real GPUs.
    pub cuda_plugins: Option<PathBuf>,
}

/// The version CRIU reports (`Version: 4.1.1`).
fn version_of(criu: &Path) -> Option<String> {
    let out = Command::new(criu).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Finds a working CRIU 4.x: `explicit` (`--criu`), `$TESSERA_CRIU`, `/usr/local/sbin/criu` (where
/// scripts/install-criu.sh puts it), then `criu` on the PATH. `Err` says why this node cannot
/// checkpoint transparently; the agent logs it and runs on without the capability.
pub fn detect(
    explicit: Option<&Path>,
    root: &Path,
    real_gpus: bool,
) -> anyhow::Result<Transparent> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => std::env::var_os("TESSERA_CRIU")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("/usr/local/sbin/criu")])
            .chain(on_path("criu"))
            .collect(),
    };
    let mut why = Vec::new();
    for criu in candidates {
        let Some(version) = version_of(&criu) else {
            why.push(format!("{}: not found or not CRIU", criu.display()));
            continue;
        };
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 4 {
            why.push(format!(
                "{} is CRIU {version}; 4.x is needed (scripts/install-criu.sh builds it)",
                criu.display()
            ));
            continue;
        }
        let check = Command::new(&criu)
            .arg("check")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} check", criu.display()))?;
        if !check.status.success() {
            why.push(format!(
                "`{} check` failed (run the agent as root): {}",
                criu.display(),
                String::from_utf8_lossy(&check.stderr).trim()
            ));
            continue;
        }
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating the transparent root {}", root.display()))?;
        let plugins = criu
            .parent()
            .and_then(Path::parent)
            .map(|prefix| prefix.join("lib/criu"))
            .filter(|d| d.join("cuda_plugin.so").is_file());
        let cuda_plugins = plugins.filter(|_| real_gpus && on_path("cuda-checkpoint").is_some());
        return Ok(Transparent {
            criu,
            version,
            root: root.to_path_buf(),
            cuda_plugins,
        });
    }
    bail!("{}", why.join("; "))
}

impl Transparent {
    /// The labels that say what this node can do.
    pub fn labels(&self) -> [(String, String); 3] {
        [
            (CRIU_LABEL.into(), "true".into()),
            (CRIU_VERSION_LABEL.into(), self.version.clone()),
            (CUDA_LABEL.into(), self.cuda_plugins.is_some().to_string()),
        ]
    }

    /// A replica's home: the same path wherever it runs.
    pub fn home(&self, job: u64, replica: u32) -> PathBuf {
        self.root.join(format!("{job}-{replica}"))
    }
}

/// The list of the home's directories, beside the images.
const DIRS: &str = "dirs";

/// How the shim runs CRIU for one replica.
#[derive(Debug, Clone)]
pub struct Criu {
    pub bin: PathBuf,
    /// CRIU's plugin directory (the CUDA plugin), for GPU replicas.
    pub plugins: Option<PathBuf>,
    /// The home, copied beside the images by every dump.
    pub home: PathBuf,
}

/// Runs `cmd`, killing it past `limit`; its log is `log`.
pub(super) fn run_bounded(
    mut cmd: Command,
    limit: Duration,
    log: &Path,
    what: &str,
) -> anyhow::Result<()> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let text = std::fs::read_to_string(log).unwrap_or_default();
            // CRIU logs a harmless RLIMIT error where it may not raise its own file limit.
            let errors: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
                .take(2)
                .collect();
            bail!(
                "{what} failed ({status}): {}",
                if errors.is_empty() {
                    "see the CRIU log".to_string()
                } else {
                    errors.join("; ")
                }
            );
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} took longer than {} ms", limit.as_millis());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Criu {
    fn command(&self, action: &str, images: &Path) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(action)
            .arg("--images-dir")
            .arg(images)
            .arg("--log-file")
            .arg(format!("{action}.log"))
            .args(["-v2", "--manage-cgroups=ignore"]);
        if let Some(p) = &self.plugins {
            cmd.arg("--libdir").arg(p);
        }
        cmd
    }

    /// Dumps the tree rooted at `pid` into `dir` (CRIU's images in `images/`, the home in
    /// `home/`, then `COMPLETE`). With `leave_running` the tree goes on; otherwise CRIU ends it.
    pub fn dump(
        &self,
        pid: i32,
        dir: &Path,
        leave_running: bool,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let marker = dir.join(super::checkpoint::MARKER);
        let _ = std::fs::remove_file(&marker);
        let images = dir.join("images");
        let copy = dir.join("home");
        for d in [&images, &copy] {
            if d.exists() {
                std::fs::remove_dir_all(d)?;
            }
            std::fs::create_dir_all(d)?;
        }
        // Runs while the tree is still frozen: the copied files match the dumped memory. A
        // failed copy fails the dump, and CRIU then lets the tree run on. Chunks carry files
        // only, so the directories (the working one may be empty) are listed beside them.
        let script = dir.join("post-dump.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\n\
                 cp -a {home}/. {copy}/ && cd {home} && find . -type d > {dirs}\n",
                home = shell_quote(&self.home),
                copy = shell_quote(&copy),
                dirs = shell_quote(&dir.join(DIRS)),
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        let mut cmd = self.command("dump", &images);
        cmd.arg("--tree")
            .arg(pid.to_string())
            .arg("--action-script")
            .arg(&script);
        if leave_running {
            cmd.arg("--leave-running");
        }
        run_bounded(cmd, limit, &images.join("dump.log"), "criu dump")?;
        std::fs::write(&marker, b"")?;
        Ok(())
    }

    /// Puts the home of the checkpoint in `dir` back and restores its tree, detached; the
    /// caller must be a subreaper to inherit it. `procs` are the cgroups the tree must be in
    /// (CRIU joins them, so its children start there). Returns the tree's root pid.
    pub fn restore(&self, dir: &Path, procs: &[PathBuf], limit: Duration) -> anyhow::Result<i32> {
        if self.home.exists() {
            std::fs::remove_dir_all(&self.home)?;
        }
        std::fs::create_dir_all(&self.home)?;
        for d in std::fs::read_to_string(dir.join(DIRS))?.lines() {
            let rel = d.trim_start_matches("./");
            if rel.split('/').any(|p| p == "..") {
                bail!("the checkpoint names a directory outside its home: {d}");
            }
            std::fs::create_dir_all(self.home.join(rel))?;
        }
        if dir.join("home").is_dir() {
            copy_tree(&dir.join("home"), &self.home)?;
        }
        // A checkpoint carries contents, not modes; the shim keeps output files 0600, and CRIU
        // checks that the files it reopens have the mode it dumped.
        for name in ["stdout.log", "stderr.log"] {
            use std::os::unix::fs::PermissionsExt;
            let f = self.home.join(name);
            if f.exists() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        let images = dir.join("images");
        let pidfile = dir.join("restored.pid");
        let mut cmd = self.command("restore", &images);
        cmd.arg("--restore-detached").arg("--pidfile").arg(&pidfile);
        let procs = procs.to_vec();
        use std::os::unix::process::CommandExt;
        // SAFETY: runs in the forked child before exec; it only writes files.
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    std::fs::write(p, "0")?;
                }
                Ok(())
            });
        }
        run_bounded(cmd, limit, &images.join("restore.log"), "criu restore")?;
        let pid = std::fs::read_to_string(&pidfile)?
            .trim()
            .parse()
            .context("criu restore wrote no pid")?;
        Ok(pid)
    }
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// Copies `from` into `to`, keeping modes and times (the files CRIU checks).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()?;
    if !status.success() {
        bail!("copying {} to {} failed", from.display(), to.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_old_criu_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("criu");
        std::fs::write(&old, "#!/bin/sh\necho 'Version: 3.17.1'\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = detect(Some(&old), dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CRIU 3.17.1; 4.x is needed"), "{e}");
        let e = detect(Some(&dir.path().join("nope")), dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
    }

    #[test]
    fn homes_do_not_depend_on_the_node_or_attempt() {
        let t = Transparent {
            criu: "/usr/local/sbin/criu".into(),
            version: "4.1.1".into(),
            root: "/var/lib/tessera/transparent".into(),
            cuda_plugins: None,
        };
        assert_eq!(
            t.home(12, 0),
            PathBuf::from("/var/lib/tessera/transparent/12-0")
        );
        assert_eq!(t.labels()[2], (CUDA_LABEL.into(), "false".into()));
    }

    #[test]
    fn paths_are_quoted_for_the_post_dump_script() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
