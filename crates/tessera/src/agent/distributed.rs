//! What distributed programs need to find each other, in the variables `torchrun`, DeepSpeed,
//! Horovod and MPI read, so that a gang starts without glue.
//!
//! Two ways to run are served at once. A replica can be one rank (`python train.py` calling
//! `init_process_group("env://")`): `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `RANK`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE` and `NODE_RANK` say where it stands. Or a replica can be one
//! node of `torchrun` (`torchrun train.py`, one process per GPU): torchrun reads its options from
//! `PET_*` variables, so `PET_NNODES`, `PET_NODE_RANK`, `PET_NPROC_PER_NODE`, `PET_MASTER_ADDR`
//! and `PET_MASTER_PORT` make a bare `torchrun train.py` join the gang. The job's own environment
//! wins over all of these.
//!
//! An elastic job's replicas change while they run, so its torchrun forms its group from the
//! replica-set file instead (`PET_RDZV_BACKEND=tessera`, python/tessera_torchrun.py, put on the
//! replica's `PYTHONPATH`): `PET_NNODES=MIN:MAX`, and every change of the set makes torchrun form
//! the group again at the new size. (The agent puts the helpers on every process-mode replica's
//! `PYTHONPATH`, and an elastic container's: see [`add_python_path`].)

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::protocol::{Assignment, Peer, Rendezvous};

/// The hostfile's name in a replica's run dir (`$TESSERA_HOSTFILE`).
pub const HOSTFILE: &str = "hostfile";

/// Where one replica stands in its gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub node_rank: usize,
    pub nodes: usize,
}

/// The place of replica `index` among `r`'s members; `None` when it is not one of them.
pub fn place(r: &Rendezvous, index: u32) -> Option<Place> {
    let rank = r.members.iter().position(|m| m.index == index)?;
    let node = &r.members[rank].node;
    // Nodes are numbered in the order their first replica appears in rank order.
    let mut nodes: Vec<&str> = Vec::new();
    for m in &r.members {
        if !nodes.contains(&m.node.as_str()) {
            nodes.push(&m.node);
        }
    }
    let same_node = |m: &&crate::protocol::Peer| &m.node == node;
    Some(Place {
        rank,
        world: r.members.len(),
        local_rank: r.members[..rank].iter().filter(same_node).count(),
        local_world: r.members.iter().filter(same_node).count(),
        node_rank: nodes.iter().position(|n| n == node).unwrap_or(0),
        nodes: nodes.len(),
    })
}

/// Where `a` meets its peers: its gang's rendezvous, or for a lone replica a world of one on
/// this host with a port free now; `None` when no port is free.
pub fn rendezvous_of(a: &Assignment, node: &str) -> Option<Rendezvous> {
    if let Some(r) = &a.rendezvous {
        return Some(r.clone());
    }
    Some(Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: free_port()?,
        members: vec![Peer {
            index: a.replica,
            node: node.to_string(),
            host: "127.0.0.1".into(),
            gpus: a.devices.len() as u32,
        }],
    })
}

/// The distributed variables of `a` meeting its peers at `r`. Names the job sets itself are left
/// out: its own values win.
/// `python`: where Tessera's Python helpers are on this node; an elastic replica's torchrun
/// follows its replica set through them (without them it is a group of the set it started in).
pub fn env(a: &Assignment, r: &Rendezvous, python: Option<&Path>) -> BTreeMap<String, String> {
    let Some(place) = place(r, a.replica) else {
        return BTreeMap::new();
    };
    let (addr, port) = (r.master_addr.clone(), r.master_port);
    let gpus = a.devices.len().max(1).to_string();
    let mut vars = vec![
        ("MASTER_ADDR", addr.clone()),
        ("MASTER_PORT", port.to_string()),
        ("WORLD_SIZE", place.world.to_string()),
        ("RANK", place.rank.to_string()),
        ("LOCAL_RANK", place.local_rank.to_string()),
        ("LOCAL_WORLD_SIZE", place.local_world.to_string()),
        ("NODE_RANK", place.node_rank.to_string()),
        ("GROUP_RANK", place.node_rank.to_string()),
        ("PET_NPROC_PER_NODE", gpus),
    ];
    let follows_set = a.elastic.as_ref().zip(python);
    match follows_set {
        Some((set, _)) => vars.extend([
            ("PET_NNODES", format!("{}:{}", set.min, set.max)),
            ("PET_RDZV_BACKEND", "tessera".to_string()),
            // A replica given back may end its peers' step before they see the new set.
            ("PET_MAX_RESTARTS", "3".to_string()),
        ]),
        None => vars.extend([
            ("PET_NNODES", place.world.to_string()),
            ("PET_NODE_RANK", place.rank.to_string()),
            ("PET_MASTER_ADDR", addr),
            ("PET_MASTER_PORT", port.to_string()),
        ]),
    }
    vars.into_iter()
        .filter(|(k, _)| !a.env.contains_key(*k))
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Puts Tessera's Python package (`import tessera`: the checkpoint and elastic helpers, the
/// client, torchrun's rendezvous) after the job's own `PYTHONPATH`, so that the job's own
/// modules win; said once however often it is asked.
pub fn add_python_path(env: &mut BTreeMap<String, String>, python: &Path) {
    let ours = python.display().to_string();
    let path = match env.get("PYTHONPATH").filter(|p| !p.is_empty()) {
        Some(own) if own.split(':').any(|p| p == ours) => return,
        Some(own) => format!("{own}:{ours}"),
        None => ours,
    };
    env.insert("PYTHONPATH".into(), path);
}

/// Where Tessera's Python helpers are on this node: `$TESSERA_PYTHON_DIR`, else the source
/// tree's `python/` above the binary (a cargo build), else `/usr/lib/tessera/python`.
pub fn python_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TESSERA_PYTHON_DIR") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(4)
        .map(|d| d.join("python"))
        .chain([PathBuf::from("/usr/lib/tessera/python")])
        .find(|d| d.join("tessera/__init__.py").is_file())
}

/// A port nothing listens on now, for a lone replica's own rendezvous.
fn free_port() -> Option<u16> {
    let l = TcpListener::bind(("0.0.0.0", 0)).ok()?;
    Some(l.local_addr().ok()?.port())
}

/// Fails when rank 0's reserved port is held by a program outside Tessera on this host: the
/// gang would otherwise hang at its rendezvous or join a stranger's.
pub fn check_port(r: &Rendezvous) -> anyhow::Result<()> {
    match TcpListener::bind(("0.0.0.0", r.master_port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "the gang's rendezvous port {} is in use on this node by a program outside Tessera; \
             keep the controller's --rendezvous-ports free on every node",
            r.master_port
        ),
        Err(e) => bail!("checking rendezvous port {}: {e}", r.master_port),
    }
}

/// Writes the gang's hostfile in `dir`: one line per replica in rank order, `HOST slots=GPUS`
/// (at least one slot), the form `mpirun` and DeepSpeed read; private to the workload's `uid`
/// (root's when it runs unconfined). Returns its path.
pub fn write_hostfile(dir: &Path, r: &Rendezvous, uid: Option<u32>) -> std::io::Result<PathBuf> {
    let text: String = r
        .members
        .iter()
        .map(|m| format!("{} slots={}\n", m.host, m.gpus.max(1)))
        .collect();
    let path = dir.join(HOSTFILE);
    let tmp = dir.join(format!("{HOSTFILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(uid))?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gang(nodes: &[&str]) -> Rendezvous {
        Rendezvous {
            master_addr: "10.0.0.1".into(),
            master_port: 29500,
            members: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Peer {
                    index: i as u32 + 3,
                    node: n.to_string(),
                    host: format!("{n}.lan"),
                    gpus: i as u32 % 2,
                })
                .collect(),
        }
    }

    #[test]
    fn ranks_count_replicas_and_nodes_in_rank_order() {
        let g = gang(&["b", "a", "b", "c", "a"]);
        let p: Vec<Place> = (3..8).map(|i| place(&g, i).unwrap()).collect();
        assert_eq!(
            p.iter().map(|p| p.rank).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(
            p.iter().map(|p| p.local_rank).collect::<Vec<_>>(),
            [0, 0, 1, 0, 1]
        );
        assert_eq!(
            p.iter().map(|p| p.local_world).collect::<Vec<_>>(),
            [2, 2, 2, 1, 2]
        );
        assert_eq!(
            p.iter().map(|p| p.node_rank).collect::<Vec<_>>(),
            [0, 1, 0, 2, 1]
        );
        assert!(p.iter().all(|p| p.world == 5 && p.nodes == 3));
        assert_eq!(place(&g, 9), None);
    }

    #[test]
    fn the_hostfile_has_a_line_per_replica_with_at_least_one_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_hostfile(dir.path(), &gang(&["b", "a"]), None).unwrap();
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            "b.lan slots=1\na.lan slots=1\n"
        );
    }

    #[test]
    fn the_jobs_own_values_win_and_a_held_port_is_refused() {
        let g = gang(&["a", "b"]);
        let mut a: Assignment = serde_json::from_value(serde_json::json!({
            "key": "1.1.4", "job_id": 1, "job_name": "t", "project": "p", "replica": 4,
            "replicas": 2, "attempt": 1, "command": ["true"], "env": {"MASTER_PORT": "1234"},
            "cpu_milli": 1000, "memory_bytes": 1, "devices": [], "device_memory": [],
        }))
        .unwrap();
        a.rendezvous = Some(g.clone());
        let vars = env(&a, &rendezvous_of(&a, "b").unwrap(), None);
        assert_eq!(
            vars.get("MASTER_PORT"),
            None,
            "the job's own value is not overridden"
        );
        assert_eq!(vars["MASTER_ADDR"], "10.0.0.1");
        assert_eq!(vars["RANK"], "1");
        assert_eq!(vars["NODE_RANK"], "1");
        assert_eq!(vars["PET_NPROC_PER_NODE"], "1");
        let held = TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let mut busy = g;
        busy.master_port = held.local_addr().unwrap().port();
        let err = check_port(&busy).unwrap_err().to_string();
        assert!(err.contains("in use on this node"), "{err}");

        a.rendezvous = None;
        a.env.clear();
        let lone = rendezvous_of(&a, "b").unwrap();
        let vars = env(&a, &lone, None);
        assert_eq!(vars["WORLD_SIZE"], "1");
        assert_eq!(vars["RANK"], "0");
        assert_eq!(vars["MASTER_ADDR"], "127.0.0.1");
        assert_ne!(vars["MASTER_PORT"], "0");
    }

    #[test]
    fn an_elastic_replicas_torchrun_follows_its_set_where_the_helpers_are() {
        let mut a: Assignment = serde_json::from_value(serde_json::json!({
            "key": "1.1.4", "job_id": 1, "job_name": "t", "project": "p", "replica": 4,
            "replicas": 2, "attempt": 1, "command": ["torchrun", "t.py"],
            "env": {"PYTHONPATH": "/srv/mine"},
            "cpu_milli": 1000, "memory_bytes": 1, "devices": [], "device_memory": [],
        }))
        .unwrap();
        a.rendezvous = Some(gang(&["a", "b"]));
        a.elastic = Some(crate::protocol::ReplicaSet {
            generation: 3,
            min: 1,
            max: 4,
            replicas: vec![],
        });
        let r = rendezvous_of(&a, "b").unwrap();
        let vars = env(&a, &r, Some(Path::new("/usr/lib/tessera/python")));
        assert_eq!(vars["PET_RDZV_BACKEND"], "tessera");
        assert_eq!(vars["PET_NNODES"], "1:4");
        assert!(!vars.contains_key("PET_NODE_RANK") && !vars.contains_key("PET_MASTER_ADDR"));
        // Without the helpers its torchrun is a group of the set it started in.
        let vars = env(&a, &r, None);
        assert_eq!(vars["PET_NNODES"], "2");
        assert!(!vars.contains_key("PET_RDZV_BACKEND"));
    }

    #[test]
    fn the_python_package_comes_after_the_jobs_own_path_once() {
        let ours = Path::new("/usr/lib/tessera/python");
        let mut env = BTreeMap::new();
        add_python_path(&mut env, ours);
        assert_eq!(env["PYTHONPATH"], "/usr/lib/tessera/python");
        add_python_path(&mut env, ours);
        assert_eq!(env["PYTHONPATH"], "/usr/lib/tessera/python");
        let mut env = BTreeMap::from([("PYTHONPATH".to_string(), "/srv/mine:/srv/b".to_string())]);
        add_python_path(&mut env, ours);
        assert_eq!(
            env["PYTHONPATH"],
            "/srv/mine:/srv/b:/usr/lib/tessera/python"
        );
        let mut env = BTreeMap::from([("PYTHONPATH".to_string(), String::new())]);
        add_python_path(&mut env, ours);
        assert_eq!(env["PYTHONPATH"], "/usr/lib/tessera/python");
    }
}
