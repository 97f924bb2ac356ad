//! Running a replica from an image with an OCI runtime (runc, Debian's): its root is an overlay
//! of the image's shared layers with a private upper directory, and its `config.json` (written
//! with oci-spec's runtime types) gives it the confinement of the process mode: a user namespace
//! in which its root is the project's unprivileged uid on the host, its own mount, pid, ipc and
//! uts namespaces, no capabilities and no new privileges, the replica's cgroup (its limits, and
//! the shim's kill of everything in it). Host networking, as NCCL and the gateway need. What it
//! needs of the node is bound in at the same path: its run dir (checkpoints, hostfile, replica
//! set), its volumes (read-only where marked), its slice's accounting region and the simulated
//! driver on simulated nodes.
//!
//! The image's layers belong to the host's root, which is not mapped in the user namespace: to
//! the job they are owned by `nobody` and read-only, as with Docker's `--read-only`; it writes
//! in its work directory, `/tmp`, its volumes and what it creates at the top of its root.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags};
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilities, LinuxIdMappingBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use super::image::Pulled;

/// A path bound into the container at the same path.
#[derive(Debug, Clone)]
pub struct Bind {
    pub path: PathBuf,
    pub read_only: bool,
}

/// What a container of one replica is made of.
pub struct Plan<'a> {
    /// The runtime's name for it (unique per agent).
    pub id: String,
    /// Where its bundle goes (see [`bundle_dir`]).
    pub bundle: PathBuf,
    pub run_dir: &'a Path,
    /// The image's layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    pub image: &'a Pulled,
    /// The job's command: it replaces the image's `CMD` (Docker's `run IMAGE CMD`).
    pub command: &'a [String],
    /// Tessera's variables and the job's, over the image's own.
    pub env: &'a BTreeMap<String, String>,
    /// Where it starts: the job's workdir, else the image's, else `/`.
    pub workdir: Option<&'a str>,
    /// The host uid its root is (a user namespace maps 0 to it); `None` where the admin allowed
    /// unconfined work (its root is the host's).
    pub uid: Option<u32>,
    pub binds: Vec<Bind>,
    /// Bound on `/tmp`.
    pub tmp: PathBuf,
    /// The replica's cgroup, relative to the hierarchy's root (the runtime joins it).
    pub cgroups_path: Option<String>,
}

/// The bundle directory of a replica's container: under the data dir, which the container's
/// user may pass through, not in the run dir (under the agent's private directory).
pub fn bundle_dir(data_dir: &Path, key: &str) -> PathBuf {
    data_dir.join("bundles").join(key)
}

/// The program the container runs: entrypoint, then the job's command or the image's `CMD`.
fn args(image: &Pulled, command: &[String]) -> anyhow::Result<Vec<String>> {
    let mut args = image.entrypoint.clone();
    if command.is_empty() {
        args.extend(image.cmd.iter().cloned());
    } else {
        args.extend(command.iter().cloned());
    }
    if args.is_empty() {
        bail!(
            "image {} has no entrypoint or command of its own: give the job a command",
            image.resolved
        );
    }
    Ok(args)
}

/// Makes the bundle: mounts the overlay root and writes `config.json`. Returns the bundle's dir.
pub fn prepare(plan: &Plan) -> anyhow::Result<PathBuf> {
    let bundle = plan.bundle.clone();
    if plan.uid.is_some() {
        passable(&bundle)?;
    }
    if let Some(parent) = bundle.parent() {
        std::fs::create_dir_all(parent)?;
        crate::controller::restrict(parent, 0o711)?;
    }
    let (rootfs, upper, work) = (
        bundle.join("rootfs"),
        bundle.join("upper"),
        bundle.join("work"),
    );
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d)?;
    }
    crate::controller::restrict(&bundle, 0o711)?;
    if let Some(uid) = plan.uid {
        // Its root directory is its own: it may create what it likes at the top.
        std::os::unix::fs::chown(&upper, Some(uid), Some(uid))?;
    }
    let empty = bundle.join("empty");
    let mut lower: Vec<String> = plan
        .layers
        .iter()
        .rev()
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    if lower.is_empty() {
        std::fs::create_dir_all(&empty)?;
        lower.push(empty.to_string_lossy().into_owned());
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    if options.len() > 4000 {
        bail!(
            "the image has {} layers, more than one overlay mount can name here; flatten it \
             (e.g. squash its layers) or shorten the agent's --data-dir",
            plan.layers.len()
        );
    }
    if !is_mounted(&rootfs) {
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            Some(options.as_str()),
        )
        .with_context(|| format!("mounting the image's layers at {}", rootfs.display()))?;
    }
    // Mount points for what is bound in, made as the host's root before the runtime (in the
    // user namespace) would need to.
    let mut targets: Vec<(&Path, bool)> = plan
        .binds
        .iter()
        .map(|b| (b.path.as_path(), b.path.is_dir()))
        .collect();
    targets.push((plan.run_dir, true));
    for host in ["/etc/hosts", "/etc/resolv.conf"] {
        targets.push((Path::new(host), false));
    }
    targets.push((Path::new("/tmp"), true));
    for (path, dir) in targets {
        let inside = rootfs.join(path.strip_prefix("/").unwrap_or(path));
        if dir {
            make_dirs(&rootfs, &inside)?;
        } else {
            make_file(&rootfs, &inside)?;
        }
    }
    spec(plan)?.save(bundle.join("config.json"))?;
    Ok(bundle)
}

/// The runtime sets up the root inside the user namespace, as the container's root, which is an
/// unprivileged uid on the host: every directory above the bundle must let others pass.
fn passable(bundle: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for dir in bundle.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            bail!(
                "image jobs run as an unprivileged uid that must pass through {} (mode {:o}) \
                 to reach the image's root; let others pass (chmod o+x), or give the agent a \
                 --data-dir under directories they may pass (e.g. /var/lib/tessera)",
                dir.display(),
                meta.permissions().mode() & 0o7777
            );
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Creates the directories from `root` down to `dir` that are missing, 0755 (the agent's umask
/// would make them its own, and the container's root could not pass). The image is untrusted and
/// this runs as the host's root: a link on the way (`/var -> /etc`) would lead outside the
/// container's root, so none is followed.
fn make_dirs(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut at = root.to_path_buf();
    for c in dir.strip_prefix(root).unwrap_or(dir).components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => bail!(no_links(root, &at)),
            Ok(_) => {}
            Err(_) => {
                std::fs::create_dir(&at)?;
                set_mode(&at, 0o755)?;
            }
        }
    }
    Ok(())
}

/// Creates an empty file at `path` (its directories made by [`make_dirs`]) unless one is there;
/// a link there is refused, and the file is never created through one.
fn make_file(root: &Path, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    make_dirs(root, path.parent().unwrap_or(root))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => bail!(no_links(root, path)),
        Ok(_) => Ok(()),
        Err(_) => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)?;
            Ok(set_mode(path, 0o644)?)
        }
    }
}

fn no_links(root: &Path, at: &Path) -> String {
    format!(
        "the image has a link at /{} where Tessera binds a path of the node; an image may not \
         put links there",
        at.strip_prefix(root).unwrap_or(at).display()
    )
}

/// Whether a mount sits at `path` (its device differs from its parent's).
fn is_mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(Ok(parent))) = (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) else {
        return false;
    };
    me.dev() != parent.dev()
}

fn bind(path: &Path, read_only: bool) -> anyhow::Result<oci_spec::runtime::Mount> {
    let mut options = vec!["rbind".to_string(), "nosuid".into(), "nodev".into()];
    if read_only {
        options.push("ro".into());
    }
    Ok(MountBuilder::default()
        .destination(path)
        .typ("bind")
        .source(path)
        .options(options)
        .build()?)
}

/// The runtime's configuration of one replica's container.
fn spec(plan: &Plan) -> anyhow::Result<Spec> {
    let mut env: BTreeMap<String, String> = plan
        .image
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.extend(plan.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let cwd = plan
        .workdir
        .map(str::to_string)
        .or_else(|| plan.image.working_dir.clone())
        .unwrap_or_else(|| "/".into());
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(args(plan.image, plan.command)?)
        .env(
            env.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .cwd(cwd)
        .no_new_privileges(true)
        // No capabilities, as in the process mode (they would hold only in its namespace).
        .capabilities(LinuxCapabilities::default())
        .build()?;
    let mut process = process;
    let none = std::collections::HashSet::new();
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(none.clone()))
        .set_effective(Some(none.clone()))
        .set_inheritable(Some(none.clone()))
        .set_permitted(Some(none.clone()))
        .set_ambient(Some(none));
    process.set_capabilities(Some(caps));
    // Open files and the like as the shim has them, not runc's default of 1024.
    process.set_rlimits(None);

    let mut namespaces = vec![];
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?);
    }
    let mut linux = LinuxBuilder::default();
    if let Some(uid) = plan.uid {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()?,
        );
        let map = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(uid)
            .size(1u32)
            .build()?;
        linux = linux.uid_mappings(vec![map]).gid_mappings(vec![map]);
    }
    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = linux
        .namespaces(namespaces)
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .build()?;
    linux.set_resources(None);
    linux.set_cgroups_path(plan.cgroups_path.as_ref().map(PathBuf::from));

    // The usual /proc, /dev, /dev/pts, /dev/shm and /dev/mqueue; /sys bound read-only from the
    // host (a sysfs mount needs a network namespace of its own).
    let mut mounts: Vec<oci_spec::runtime::Mount> = oci_spec::runtime::get_default_mounts()
        .into_iter()
        .filter(|m| !m.destination().starts_with("/sys"))
        .collect();
    if plan.uid.is_some() {
        // In a user namespace devpts takes no gid=5 (no such group is mapped).
        for m in &mut mounts {
            if m.destination() == Path::new("/dev/pts") {
                let options: Vec<String> = m
                    .options()
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|o| !o.starts_with("gid="))
                    .collect();
                m.set_options(Some(options));
            }
        }
    }
    mounts.push(bind(Path::new("/sys"), true)?);
    mounts.push(bind(Path::new("/etc/hosts"), true)?);
    mounts.push(bind(Path::new("/etc/resolv.conf"), true)?);
    let mut tmp = bind(&plan.tmp, false)?;
    tmp.set_destination(PathBuf::from("/tmp"));
    mounts.push(tmp);
    mounts.push(bind(plan.run_dir, false)?);
    for b in &plan.binds {
        mounts.push(bind(&b.path, b.read_only)?);
    }

    let mut spec = Spec::default();
    spec.set_process(Some(process))
        .set_root(Some(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()?,
        ))
        .set_hostname(Some(plan.id.clone()))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux));
    Ok(spec)
}

/// The shim's command: the runtime runs the container in the foreground, its stdio the pipes the
/// shim gave it, and exits with the program's status.
pub fn command(runc: &Path, state: &Path, bundle: &Path, id: &str) -> Vec<OsString> {
    vec![
        runc.into(),
        "--root".into(),
        state.into(),
        "run".into(),
        "--bundle".into(),
        bundle.into(),
        id.into(),
    ]
}

/// After the container ended: the runtime forgets it, the root is unmounted and what the job
/// wrote at the top of it goes (its output and checkpoints live in the run dir).
pub fn remove(runc: &Path, state: &Path, bundle: &Path, id: &str) {
    let _ = std::process::Command::new(runc)
        .arg("--root")
        .arg(state)
        .args(["delete", "--force", id])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let rootfs = bundle.join("rootfs");
    if is_mounted(&rootfs) {
        let _ = nix::mount::umount2(&rootfs, MntFlags::MNT_DETACH);
    }
    if !is_mounted(&rootfs) {
        let _ = std::fs::remove_dir_all(bundle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], cmd: &[&str]) -> Pulled {
        Pulled {
            reference: "r/x:1".into(),
            resolved: "r/x@sha256:0".into(),
            layers: vec![],
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/opt/bin".into(), "MODEL=tiny".into()],
            working_dir: Some("/srv".into()),
            note: String::new(),
        }
    }

    #[test]
    fn mount_points_are_never_made_through_a_link_of_the_image() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // The image's /var leads to a directory of the host.
        std::os::unix::fs::symlink(outside.path(), root.path().join("var")).unwrap();
        let e = make_dirs(root.path(), &root.path().join("var/lib/tessera")).unwrap_err();
        assert!(e.to_string().contains("a link at /var"), "{e}");
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("hosts"), root.path().join("etc/hosts"))
            .unwrap();
        let e = make_file(root.path(), &root.path().join("etc/hosts")).unwrap_err();
        assert!(e.to_string().contains("a link at /etc/hosts"), "{e}");
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing made outside"
        );
        // Plain paths are made, 0755 and 0644.
        make_file(root.path(), &root.path().join("srv/a/b")).unwrap();
        assert!(root.path().join("srv/a/b").is_file());
    }

    #[test]
    fn the_jobs_command_replaces_the_images_cmd_after_its_entrypoint() {
        let img = image(&["/entry.sh"], &["serve"]);
        assert_eq!(args(&img, &[]).unwrap(), ["/entry.sh", "serve"]);
        assert_eq!(
            args(&img, &["python".into(), "train.py".into()]).unwrap(),
            ["/entry.sh", "python", "train.py"]
        );
        let bare = image(&[], &[]);
        assert!(
            args(&bare, &[])
                .unwrap_err()
                .to_string()
                .contains("give the job a command")
        );
    }

    #[test]
    fn the_config_maps_root_to_the_projects_uid_with_no_capabilities_and_host_networking() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&[], &["sh"]);
        let env = BTreeMap::from([("MODEL".to_string(), "big".to_string())]);
        let plan = Plan {
            id: "t-1".into(),
            bundle: dir.path().join("bundle"),
            run_dir: dir.path(),
            layers: vec![],
            image: &img,
            command: &[],
            env: &env,
            workdir: None,
            uid: Some(200_001),
            binds: vec![Bind {
                path: "/datasets".into(),
                read_only: true,
            }],
            tmp: dir.path().join("tmp"),
            cgroups_path: Some("/tessera/x".into()),
        };
        let v = serde_json::to_value(spec(&plan).unwrap()).unwrap();
        let linux = &v["linux"];
        assert_eq!(linux["uidMappings"][0]["hostID"], 200_001);
        assert_eq!(linux["uidMappings"][0]["containerID"], 0);
        let ns: Vec<&str> = linux["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(
            ns.contains(&"user") && ns.contains(&"pid") && !ns.contains(&"network"),
            "{ns:?}"
        );
        assert_eq!(linux["cgroupsPath"], "/tessera/x");
        let p = &v["process"];
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["capabilities"]["bounding"], serde_json::json!([]));
        assert_eq!(p["cwd"], "/srv");
        let env: Vec<&str> = p["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(
            env.contains(&"MODEL=big") && env.contains(&"PATH=/opt/bin"),
            "{env:?}"
        );
        let datasets = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/datasets")
            .unwrap();
        assert!(
            datasets["options"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("ro"))
        );
    }
}
