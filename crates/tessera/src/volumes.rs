//! Data volumes: host paths the admin allows a project's jobs (`tessera projects set P --volume
//! /datasets:ro --volume /home`), mounted at the same path, read-only where marked. A job picks
//! among its project's volumes (all of them when it names none); other projects' volumes are
//! hidden from it, and its working directory must lie on one of its volumes.

use serde::{Deserialize, Serialize};
use tessera_sched::ValidationError;

/// Most volumes a project may have, and a job may name.
pub const MAX_VOLUMES: usize = 64;
/// Longest volume path.
const MAX_PATH: usize = 1024;

/// One host path a job sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

impl Volume {
    /// `PATH`, `PATH:ro` or `PATH:rw`, with `field` naming it in errors.
    pub fn parse(field: &str, text: &str) -> Result<Volume, ValidationError> {
        let (path, read_only) = match text.rsplit_once(':') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            Some((_, other)) if !other.contains('/') => {
                return Err(ValidationError::new(
                    field,
                    text,
                    format!("{other:?} is not a volume mode"),
                    "write PATH, PATH:ro (read-only) or PATH:rw, e.g. /datasets:ro",
                ));
            }
            _ => (text, false),
        };
        check_path(field, path)?;
        Ok(Volume {
            path: path.to_string(),
            read_only,
        })
    }

    /// `PATH` or `PATH:ro`, as users write it.
    pub fn text(&self) -> String {
        if self.read_only {
            format!("{}:ro", self.path)
        } else {
            self.path.clone()
        }
    }
}

/// An absolute, plain path (no `.`, `..`, `//` or trailing `/`), not `/` and not in the
/// directories every workload gets its own of or that belong to the system.
pub fn check_path(field: &str, path: &str) -> Result<(), ValidationError> {
    let bad = |why: &str| {
        Err(ValidationError::new(
            field,
            path,
            why,
            "give an absolute host path such as /datasets or /home/alice",
        ))
    };
    if !path.starts_with('/') || path.len() < 2 {
        return bad("not an absolute path below /");
    }
    if path.len() > MAX_PATH || path.contains('\0') || path.contains(':') {
        return bad("too long, or holds a NUL or a colon");
    }
    if path.ends_with('/')
        || path[1..]
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("not a plain path (no //, . or .., no trailing /)");
    }
    for system in ["/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/boot"] {
        if under(path, system) {
            return bad(&format!(
                "{system} is the system's (or each workload's own), not a data volume"
            ));
        }
    }
    Ok(())
}

/// Whether `path` is `dir` or lies below it.
pub fn under(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// What a job sees: the volumes it mounts and the directory it starts in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub volumes: Vec<Volume>,
    pub workdir: Option<String>,
}

/// Resolves a job's request against its project's volumes: named volumes must be the project's
/// (`:ro` may tighten, never loosen); none named means all of them. The working directory, given
/// or the directory it was submitted from, must lie on one of them; a submit directory that does
/// not is dropped (the job starts in its run dir).
pub fn resolve(
    project: &str,
    allowed: &[Volume],
    wanted: &[String],
    workdir: Option<&str>,
    submit_dir: Option<&str>,
) -> Result<Resolved, ValidationError> {
    if wanted.len() > MAX_VOLUMES {
        return Err(ValidationError::new(
            "spec.volumes",
            wanted.len().to_string(),
            "too many volumes",
            format!("name at most {MAX_VOLUMES}"),
        ));
    }
    let offered = || {
        if allowed.is_empty() {
            format!(
                "project {project} has no volumes; an admin adds them with `tessera projects set \
                 {project} --volume /datasets:ro`"
            )
        } else {
            let list: Vec<String> = allowed.iter().map(Volume::text).collect();
            format!("project {project} offers {}", list.join(", "))
        }
    };
    let volumes = if wanted.is_empty() {
        allowed.to_vec()
    } else {
        let mut out: Vec<Volume> = Vec::new();
        for (i, text) in wanted.iter().enumerate() {
            let field = format!("spec.volumes[{i}]");
            let v = Volume::parse(&field, text)?;
            let Some(a) = allowed.iter().find(|a| a.path == v.path) else {
                return Err(ValidationError::new(
                    field,
                    text,
                    "not a volume of the job's project",
                    offered(),
                ));
            };
            if !out.iter().any(|o| o.path == v.path) {
                out.push(Volume {
                    path: v.path,
                    read_only: a.read_only || v.read_only,
                });
            }
        }
        out
    };
    let on_a_volume = |dir: &str| volumes.iter().any(|v| under(dir, &v.path));
    let workdir = match (workdir, submit_dir) {
        (Some(dir), _) => {
            check_path("spec.workdir", dir)?;
            if !on_a_volume(dir) {
                return Err(ValidationError::new(
                    "spec.workdir",
                    dir,
                    "not on a volume the job mounts",
                    offered(),
                ));
            }
            Some(dir.to_string())
        }
        (None, Some(dir)) if check_path("spec.submitDir", dir).is_ok() && on_a_volume(dir) => {
            Some(dir.to_string())
        }
        (None, _) => None,
    };
    Ok(Resolved { volumes, workdir })
}

/// The volumes of other projects a job must not see: every volume not on one of the job's. One
/// that holds a volume of the job is hidden too; the job's own is then bound back inside it.
pub fn hidden<'a>(all: impl IntoIterator<Item = &'a Volume>, mine: &[Volume]) -> Vec<String> {
    let mut out: Vec<String> = all
        .into_iter()
        .filter(|v| !mine.iter().any(|m| under(&v.path, &m.path)))
        .map(|v| v.path.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(text: &str) -> Volume {
        Volume::parse("v", text).unwrap()
    }

    #[test]
    fn volumes_parse_with_their_mode_and_bad_paths_are_refused_by_field() {
        assert_eq!(
            vol("/datasets:ro"),
            Volume {
                path: "/datasets".into(),
                read_only: true
            }
        );
        assert!(!vol("/home").read_only);
        assert!(!vol("/home:rw").read_only);
        for bad in [
            "datasets",
            "/",
            "/a/../etc",
            "/a//b",
            "/a/",
            "/proc/1",
            "/tmp/x",
            "/etc",
            "/a:rx",
        ] {
            let e = Volume::parse("spec.volumes[0]", bad).unwrap_err();
            assert_eq!(e.field, "spec.volumes[0]", "{bad}");
        }
    }

    #[test]
    fn a_job_picks_among_its_projects_volumes_and_works_on_one() {
        let allowed = [vol("/datasets:ro"), vol("/home")];
        let all = resolve("p", &allowed, &[], None, Some("/home/alice/exp")).unwrap();
        assert_eq!(all.volumes, allowed);
        assert_eq!(all.workdir.as_deref(), Some("/home/alice/exp"));
        // A submit directory off the volumes is dropped; a given workdir off them is refused.
        let off = resolve("p", &allowed, &[], None, Some("/srv/x")).unwrap();
        assert_eq!(off.workdir, None);
        let e = resolve("p", &allowed, &[], Some("/srv/x"), None).unwrap_err();
        assert_eq!(e.field, "spec.workdir");
        assert!(e.to_string().contains("/datasets:ro, /home"), "{e}");
        // `:ro` tightens; a volume the project lacks is refused with what it offers.
        let picked = resolve("p", &allowed, &["/home:ro".into()], None, None).unwrap();
        assert_eq!(picked.volumes, [vol("/home:ro")]);
        let loosen = resolve("p", &allowed, &["/datasets:rw".into()], None, None).unwrap();
        assert_eq!(loosen.volumes, [vol("/datasets:ro")]);
        let e = resolve("p", &allowed, &["/scratch".into()], None, None).unwrap_err();
        assert_eq!(e.field, "spec.volumes[0]");
        let e = resolve("q", &[], &[], Some("/home"), None).unwrap_err();
        assert!(
            e.to_string().contains("tessera projects set q --volume"),
            "{e}"
        );
    }

    #[test]
    fn other_projects_volumes_are_hidden_unless_they_hold_one_of_the_jobs() {
        let all = [
            vol("/data"),
            vol("/data/vision"),
            vol("/data/nlp"),
            vol("/home"),
        ];
        let mine = [vol("/data/vision")];
        assert_eq!(hidden(&all, &mine), ["/data", "/data/nlp", "/home"]);
        // A job granted the parent sees what lies under it.
        assert_eq!(hidden(&all, &[vol("/data")]), ["/home"]);
        assert_eq!(
            hidden(&all, &[vol("/home")]),
            ["/data", "/data/nlp", "/data/vision"]
        );
    }
}
