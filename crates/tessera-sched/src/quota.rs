//! Projects and their GPU quotas, in the model of KAI/Run:ai.
//!
//! A project is a queue in a tree. Each has a *guaranteed* quota (always given back to it, by
//! preempting others if need be), an optional hard *limit* (never exceeded, counting its
//! sub-projects), and an *over-quota weight* that shares what is left once guarantees are met.
//! Quotas count milli-GPU, the pool's scarce resource.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One project's quota settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectQuota {
    pub name: String,
    /// The parent project; `None` for a root.
    pub parent: Option<String>,
    pub guaranteed_milli: u64,
    /// Hard cap on the project and everything under it; `None` means no cap.
    pub limit_milli: Option<u64>,
    /// Share of over-quota capacity relative to other projects; at least 1.
    pub over_quota_weight: u32,
}

impl ProjectQuota {
    /// A project with no guarantee, no limit and weight 1.
    pub fn unlimited(name: impl Into<String>) -> Self {
        ProjectQuota {
            name: name.into(),
            parent: None,
            guaranteed_milli: 0,
            limit_milli: None,
            over_quota_weight: 1,
        }
    }
}

/// A limit that a request would break.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitHit {
    pub project: String,
    pub limit_milli: u64,
    pub used_milli: u64,
}

/// Usage of every project, rolled up the tree.
#[derive(Debug, Clone)]
pub struct Quotas {
    projects: Vec<ProjectQuota>,
    index: HashMap<String, usize>,
    parent: Vec<Option<usize>>,
    /// Milli-GPU used by the project itself.
    own: Vec<u64>,
    /// Milli-GPU used by the project and all its descendants.
    subtree: Vec<u64>,
    /// Past use, decayed (see [`Quotas::with_history`]).
    history: Vec<u64>,
}

impl Quotas {
    /// Builds the tree; a parent that names no project makes its child a root, and a cycle is cut
    /// where it closes, so that a bad tree can never hang the scheduler.
    pub fn new(projects: &[ProjectQuota]) -> Self {
        let projects: Vec<ProjectQuota> = projects.to_vec();
        let index: HashMap<String, usize> = projects
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let mut parent: Vec<Option<usize>> = projects
            .iter()
            .map(|p| p.parent.as_ref().and_then(|name| index.get(name).copied()))
            .collect();
        for start in 0..parent.len() {
            let mut seen = vec![start];
            let mut at = start;
            while let Some(up) = parent[at] {
                if seen.contains(&up) {
                    parent[at] = None;
                    break;
                }
                seen.push(up);
                at = up;
            }
        }
        let n = projects.len();
        Quotas {
            projects,
            index,
            parent,
            own: vec![0; n],
            subtree: vec![0; n],
            history: vec![0; n],
        }
    }

    /// Adds a project the snapshot did not list (no guarantee, no limit, weight 1).
    fn ensure(&mut self, project: &str) -> usize {
        if let Some(&i) = self.index.get(project) {
            return i;
        }
        let i = self.projects.len();
        self.projects.push(ProjectQuota::unlimited(project));
        self.index.insert(project.to_string(), i);
        self.parent.push(None);
        self.own.push(0);
        self.subtree.push(0);
        self.history.push(0);
        i
    }

    fn chain(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(i), |&at| self.parent[at])
    }

    /// Counts `milli` against `project` and its ancestors.
    pub fn charge(&mut self, project: &str, milli: u64) {
        let i = self.ensure(project);
        self.own[i] += milli;
        let chain: Vec<usize> = self.chain(i).collect();
        for at in chain {
            self.subtree[at] += milli;
        }
    }

    /// Gives `milli` back.
    pub fn uncharge(&mut self, project: &str, milli: u64) {
        let i = self.ensure(project);
        self.own[i] = self.own[i].saturating_sub(milli);
        let chain: Vec<usize> = self.chain(i).collect();
        for at in chain {
            self.subtree[at] = self.subtree[at].saturating_sub(milli);
        }
    }

    /// The first limit on the way to the root that `milli` more would break.
    pub fn limit_hit(&mut self, project: &str, milli: u64) -> Option<LimitHit> {
        let i = self.ensure(project);
        self.chain(i).find_map(|at| {
            let limit = self.projects[at].limit_milli?;
            (self.subtree[at] + milli > limit).then(|| LimitHit {
                project: self.projects[at].name.clone(),
                limit_milli: limit,
                used_milli: self.subtree[at],
            })
        })
    }

    /// Milli-GPU the project (with its sub-projects) uses now.
    pub fn used(&mut self, project: &str) -> u64 {
        let i = self.ensure(project);
        self.subtree[i]
    }

    /// Would `milli` more keep the project within its guarantee?
    pub fn within_guarantee(&mut self, project: &str, milli: u64) -> bool {
        let i = self.ensure(project);
        self.subtree[i] + milli <= self.projects[i].guaranteed_milli
    }

    /// How far the project is above its guarantee.
    pub fn over_guarantee(&mut self, project: &str) -> u64 {
        let i = self.ensure(project);
        self.subtree[i].saturating_sub(self.projects[i].guaranteed_milli)
    }

    /// Adds each project's past use: its average milli-GPU over the recent past, weighted by a
    /// half-life (Slurm's and KAI's time-decayed fair share). Past use counts only for access
    /// above the guarantee: a project that used much over its quota lately waits behind one
    /// that did not.
    /// Replaces any history given before.
    pub fn with_history(mut self, history: &std::collections::BTreeMap<String, u64>) -> Self {
        self.history.iter_mut().for_each(|h| *h = 0);
        for (name, milli) in history {
            if let Some(&i) = self.index.get(name) {
                self.history[i] = *milli;
            }
        }
        self
    }

    /// Fair-share order key, lower goes first: the fraction of its guarantee a project uses while
    /// under it, and after that its excess divided by its over-quota weight (offset so that every
    /// project under its guarantee comes before every project above it).
    pub fn share_key(&self, project: &str) -> (u8, u64) {
        let Some(&i) = self.index.get(project) else {
            return (1, 0);
        };
        let used = self.subtree[i];
        let guaranteed = self.projects[i].guaranteed_milli;
        if used < guaranteed {
            (0, used * 1_000_000 / guaranteed.max(1))
        } else {
            let weight = u64::from(self.projects[i].over_quota_weight.max(1));
            let past = self.history[i].saturating_sub(guaranteed);
            (1, (used - guaranteed + past) * 1_000 / weight)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(name: &str, parent: Option<&str>, g: u64, limit: Option<u64>) -> ProjectQuota {
        ProjectQuota {
            name: name.into(),
            parent: parent.map(str::to_string),
            guaranteed_milli: g,
            limit_milli: limit,
            over_quota_weight: 1,
        }
    }

    #[test]
    fn past_use_above_the_guarantee_orders_over_quota_access_but_not_the_guarantee() {
        let history = [("b".to_string(), 3000)].into();
        let mut q = Quotas::new(&[
            project("a", None, 1000, None),
            project("b", None, 1000, None),
        ])
        .with_history(&history);
        q.charge("a", 2000);
        q.charge("b", 2000);
        // Both are 1 GPU over their guarantee now; b used 3 on average lately, so a goes first.
        assert!(q.share_key("a") < q.share_key("b"));
        // Under its guarantee, b is ahead of a (which is over) whatever its past.
        q.uncharge("b", 1500);
        assert!(q.share_key("b") < q.share_key("a"));
    }

    #[test]
    fn usage_rolls_up_and_the_nearest_broken_limit_is_named() {
        let mut q = Quotas::new(&[
            project("org", None, 0, Some(4000)),
            project("vision", Some("org"), 2000, None),
            project("nlp", Some("org"), 1000, Some(1500)),
        ]);
        q.charge("vision", 3000);
        assert_eq!(q.used("org"), 3000);
        assert_eq!(q.over_guarantee("vision"), 1000);
        assert!(q.limit_hit("nlp", 1000).is_none());
        let hit = q.limit_hit("nlp", 2000).unwrap();
        assert_eq!(hit.project, "nlp");
        q.charge("nlp", 800);
        let hit = q.limit_hit("nlp", 500).unwrap();
        assert_eq!((hit.project.as_str(), hit.used_milli), ("org", 3800));
        q.uncharge("vision", 3000);
        assert!(q.limit_hit("nlp", 500).is_none());
    }

    #[test]
    fn a_cycle_in_the_tree_is_cut_rather_than_followed() {
        let mut q = Quotas::new(&[
            project("a", Some("b"), 0, None),
            project("b", Some("a"), 0, Some(10)),
        ]);
        q.charge("a", 5);
        assert!(q.used("a") >= 5);
        assert!(q.limit_hit("a", 100).is_some() || q.limit_hit("b", 100).is_some());
    }

    #[test]
    fn projects_under_their_guarantee_come_first() {
        let mut q = Quotas::new(&[project("a", None, 1000, None), project("b", None, 0, None)]);
        q.charge("a", 900);
        assert!(q.share_key("a") < q.share_key("b"));
        q.charge("a", 200); // 100 over its guarantee
        q.charge("b", 50); // 50 over its guarantee
        assert!(q.share_key("b") < q.share_key("a"));
    }
}
