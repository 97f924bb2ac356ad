//! Per-workload cgroups limiting CPU, memory and pids, on cgroup v2 or v1.
//!
//! Workload cgroups are made under the agent's own cgroup (read from /proc/self/cgroup), never at
//! the root, so that an agent in a container or a systemd slice stays inside what it was given.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Limits of one workload.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Unified hierarchy with the memory, cpu and pids controllers, rooted at the agent's cgroup.
    V2 { base: PathBuf },
    /// Separate hierarchies per controller (legacy or "hybrid" hosts).
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
    /// Neither is usable: workloads run without limits (with a warning).
    None { why: String },
}

/// Reads the agent's own cgroup path for `controller` ("" means the v2 entry).
fn own_path(self_cgroup: &str, controller: &str) -> Option<String> {
    self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let ctrls = parts.next()?;
        let path = parts.next()?;
        let matches = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        matches.then(|| path.to_string())
    })
}

impl Backend {
    /// Detects the host's cgroups under `root` (normally /sys/fs/cgroup), given the text of
    /// /proc/self/cgroup.
    pub fn detect(root: &Path, self_cgroup: &str) -> Backend {
        let rel = |p: &str| p.trim_start_matches('/').to_string();
        let v2_controllers =
            fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if ["memory", "cpu", "pids"]
            .iter()
            .all(|c| v2_controllers.split_whitespace().any(|x| x == *c))
            && let Some(path) = own_path(self_cgroup, "")
        {
            return Backend::V2 {
                base: root.join(rel(&path)).join("tessera"),
            };
        }
        let v1 = |ctrl: &str, dir: &str| -> Option<PathBuf> {
            let mount = root.join(dir);
            mount.is_dir().then_some(())?;
            let path = own_path(self_cgroup, ctrl)?;
            Some(mount.join(rel(&path)).join("tessera"))
        };
        match (v1("memory", "memory"), v1("cpu", "cpu"), v1("pids", "pids")) {
            (Some(memory), Some(cpu), Some(pids)) => Backend::V1 { memory, cpu, pids },
            _ => Backend::None {
                why: format!(
                    "no usable cgroup v2 controllers (memory, cpu, pids) and no v1 hierarchies \
                     under {}",
                    root.display()
                ),
            },
        }
    }

    /// The host's backend.
    pub fn host() -> Backend {
        let self_cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Backend::detect(Path::new("/sys/fs/cgroup"), &self_cgroup)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::V2 { .. } => "cgroup v2",
            Backend::V1 { .. } => "cgroup v1",
            Backend::None { .. } => "none",
        }
    }

    /// Creates the workload's cgroup(s) with its limits; returns the `cgroup.procs` files a
    /// process writes itself into.
    pub fn create(&self, name: &str, limits: Limits) -> anyhow::Result<Vec<PathBuf>> {
        let cpu_quota = |period: u64| (limits.cpu_milli.max(10) * period / 1000).max(1000);
        match self {
            Backend::V2 { base } => {
                fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
                // Controllers must be enabled for the children of every level we create.
                let _ = fs::write(base.join("cgroup.subtree_control"), "+memory +cpu +pids");
                let dir = base.join(name);
                fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let _ = fs::write(dir.join("memory.swap.max"), "0");
                write(
                    &dir.join("cpu.max"),
                    &format!("{} 100000", cpu_quota(100_000)),
                )?;
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
                Ok(vec![dir.join("cgroup.procs")])
            }
            Backend::V1 { memory, cpu, pids } => {
                let mut procs = Vec::new();
                for (base, settings) in [
                    (
                        memory,
                        vec![("memory.limit_in_bytes", limits.memory_bytes.to_string())],
                    ),
                    (
                        cpu,
                        vec![
                            ("cpu.cfs_period_us", "100000".to_string()),
                            ("cpu.cfs_quota_us", cpu_quota(100_000).to_string()),
                        ],
                    ),
                    (pids, vec![("pids.max", limits.pids.to_string())]),
                ] {
                    let dir = base.join(name);
                    fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    for (file, value) in settings {
                        write(&dir.join(file), &value)?;
                    }
                    procs.push(dir.join("cgroup.procs"));
                }
                // Without swap accounting a v1 memory limit could spill to swap; where the knob
                // exists, close it.
                let _ = fs::write(
                    memory.join(name).join("memory.memsw.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                );
                Ok(procs)
            }
            Backend::None { .. } => Ok(vec![]),
        }
    }

    /// The workload's cgroup as an OCI runtime names it (`linux.cgroupsPath`): its path below
    /// each hierarchy's root, when that is one path for all (v1 hierarchies of one host under
    /// /sys/fs/cgroup usually agree); `None` otherwise.
    pub fn relative_path(&self, name: &str) -> Option<String> {
        let root = Path::new("/sys/fs/cgroup");
        let rel = |mount: &str, dir: &Path| {
            dir.join(name)
                .strip_prefix(root.join(mount))
                .ok()
                .map(|r| format!("/{}", r.display()))
        };
        match self {
            Backend::V2 { base } => rel("", base),
            Backend::V1 { memory, cpu, pids } => {
                let m = rel("memory", memory)?;
                (rel("cpu", cpu)? == m && rel("pids", pids)? == m).then_some(m)
            }
            Backend::None { .. } => None,
        }
    }

    /// Directories of the workload's cgroup(s).
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Backend::V2 { base } => vec![base.join(name)],
            Backend::V1 { memory, cpu, pids } => {
                vec![memory.join(name), cpu.join(name), pids.join(name)]
            }
            Backend::None { .. } => vec![],
        }
    }

    /// The processes in the workload's cgroup.
    pub fn pids(&self, name: &str) -> Vec<i32> {
        let Some(dir) = self.dirs(name).into_iter().next() else {
            return vec![];
        };
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Memory the workload's cgroup uses now, in bytes.
    pub fn memory_used(&self, name: &str) -> Option<u64> {
        let file = match self {
            Backend::V2 { base } => base.join(name).join("memory.current"),
            Backend::V1 { memory, .. } => memory.join(name).join("memory.usage_in_bytes"),
            Backend::None { .. } => return None,
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Kills whatever still runs in the workload's cgroup(s) and removes them. A process that
    /// forks while it is being killed keeps a cgroup busy, so the kill is repeated (through
    /// `cgroup.kill` where the kernel has it) until the directories go, for up to two seconds.
    pub fn remove(&self, name: &str) -> bool {
        let dirs = self.dirs(name);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let mut left = false;
            for dir in dirs.iter().filter(|d| d.exists()) {
                if fs::write(dir.join("cgroup.kill"), "1").is_err() {
                    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                left |= fs::remove_dir(dir).is_err() && dir.exists();
            }
            if !left {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Names of the cgroups under this backend that start with `prefix` (an agent's own).
    pub fn named(&self, prefix: &str) -> Vec<String> {
        let Some(base) = self.dirs("").into_iter().next() else {
            return vec![];
        };
        fs::read_dir(base)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(prefix))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The `oom_kill` count in a v2 `memory.events` or v1 `memory.oom_control` file.
pub fn oom_kills(text: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    fs::write(path, value).with_context(|| format!("writing {value} to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_is_chosen_where_its_controllers_exist_and_limits_are_written_in_its_format() {
        let root = tempfile::tempdir().unwrap();
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .unwrap();
        let backend = Backend::detect(root.path(), "0::/user.slice/agent.service\n");
        let base = root.path().join("user.slice/agent.service/tessera");
        assert_eq!(backend, Backend::V2 { base: base.clone() });
        let procs = backend
            .create(
                "1.1.0",
                Limits {
                    cpu_milli: 1500,
                    memory_bytes: 64 << 20,
                    pids: 128,
                },
            )
            .unwrap();
        let dir = base.join("1.1.0");
        assert_eq!(procs, vec![dir.join("cgroup.procs")]);
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "67108864"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "128");
        assert_eq!(
            fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        let events = fs::read_to_string(dir.join("memory.events")).unwrap();
        assert_eq!(oom_kills(&events), 1);
        assert_eq!(oom_kills("under_oom 0\noom_kill 0\n"), 0);
    }

    #[test]
    fn a_hybrid_host_uses_v1_under_the_agents_own_cgroups() {
        let root = tempfile::tempdir().unwrap();
        for d in ["memory", "cpu", "pids", "unified"] {
            fs::create_dir_all(root.path().join(d)).unwrap();
        }
        // The v2 mount of a hybrid host has no resource controllers.
        fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let self_cgroup = "12:pids:/a\n5:cpu,cpuacct:/b\n4:memory:/c\n0::/d\n";
        match Backend::detect(root.path(), self_cgroup) {
            Backend::V1 { memory, cpu, pids } => {
                assert_eq!(memory, root.path().join("memory/c/tessera"));
                assert_eq!(cpu, root.path().join("cpu/b/tessera"));
                assert_eq!(pids, root.path().join("pids/a/tessera"));
            }
            other => panic!("expected v1, got {other:?}"),
        }
    }

    #[test]
    fn neither_interface_is_reported_with_the_reason() {
        let root = tempfile::tempdir().unwrap();
        let backend = Backend::detect(root.path(), "");
        assert!(matches!(backend, Backend::None { .. }));
        assert!(
            backend
                .create(
                    "x",
                    Limits {
                        cpu_milli: 1,
                        memory_bytes: 1,
                        pids: 1
                    }
                )
                .unwrap()
                .is_empty()
        );
    }
}
