//! Stage 1: which project's job goes next (fair share, then priority and age).

use super::*;

/// The project whose head job goes next: lowest fair-share key, then priority, then age.
pub(super) fn next_project<'a>(
    queues: &BTreeMap<&'a str, VecDeque<&PendingJob>>,
    quotas: &Quotas,
) -> Option<&'a str> {
    queues
        .iter()
        .filter_map(|(name, q)| q.front().map(|head| (*name, head)))
        .min_by_key(|(name, head)| {
            (
                quotas.share_key(name),
                std::cmp::Reverse(head.spec.priority),
                head.id,
            )
        })
        .map(|(name, _)| name)
}
