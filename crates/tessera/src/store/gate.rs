//! The commit gate: readers may see a batch's changes while the batch commits, but nothing they
//! read leaves the controller before that batch is durable.
//!
//! The writer holds the state's lock while it applies a batch to memory, and releases it before
//! the database's round trip (an fsync on SQLite, a network round trip and an fsync on
//! PostgreSQL). Holding it across the commit made every reader, the scheduler and every request
//! being parsed wait for the database, so that each batch found only the few writes that arrived
//! during the previous one. Now a reader can see a change that is still committing; an answer
//! built from such a read ([`CommitGate::settled`]) waits until every batch it may have seen is
//! decided, and is withdrawn (the caller answers 503, retry) if one of them failed, since the
//! state it read was then put back. Writes are unaffected: each write's reply already waits for
//! its own commit, and the writer starts a batch only once the previous one is decided, so no
//! write ever builds on a change that may not commit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// Failed batches remembered, for readers that started before them. Failures are rare (the
/// database away, a fence lost); a reader older than the oldest remembered one is judged tainted.
const FAILED_KEPT: usize = 64;

/// Batches are numbered from 1 in the order the writer applies them.
pub struct CommitGate {
    /// The last batch applied to memory (set while the writer holds the state's lock).
    applied: AtomicU64,
    decided: watch::Sender<Decided>,
}

#[derive(Debug, Clone, Default)]
struct Decided {
    /// Every batch up to this one is committed or failed.
    upto: u64,
    /// The most recent failed batches, oldest first.
    failed: VecDeque<u64>,
    /// A failed batch was forgotten to keep `failed` short: the oldest kept is not the first.
    forgot: bool,
}

/// A read saw a batch that failed to commit; its answer must not be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store did not commit a change this answer was read with; retry")]
pub struct Tainted;

impl Default for CommitGate {
    fn default() -> Self {
        CommitGate {
            applied: AtomicU64::new(0),
            decided: watch::channel(Decided::default()).0,
        }
    }
}

impl CommitGate {
    /// The last batch applied to memory. A reader takes [`CommitGate::first_unsettled`] before it
    /// reads and this after, and passes both to [`CommitGate::settled`].
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// The first batch a read that starts now may see before it is decided: the last one applied
    /// while it commits, the next one otherwise.
    pub fn first_unsettled(&self) -> u64 {
        let applied = self.applied();
        if self.decided.borrow().upto >= applied {
            applied + 1
        } else {
            applied
        }
    }

    /// The writer applied batch `seq` to memory (called under the state's lock).
    pub(super) fn apply(&self, seq: u64) {
        self.applied.store(seq, Ordering::SeqCst);
    }

    /// The writer decided batch `seq`: committed, or failed and put back.
    pub(super) fn decide(&self, seq: u64, committed: bool) {
        self.decided.send_modify(|d| {
            d.upto = d.upto.max(seq);
            if !committed {
                if d.failed.len() == FAILED_KEPT {
                    d.failed.pop_front();
                    d.forgot = true;
                }
                d.failed.push_back(seq);
            }
        });
    }

    /// Waits until every batch from `from` to `upto` is decided; [`Tainted`] when one of them
    /// failed (or the writer stopped before deciding).
    pub async fn settled(&self, from: u64, upto: u64) -> Result<(), Tainted> {
        let mut rx = self.decided.subscribe();
        let d = rx
            .wait_for(|d| d.upto >= upto)
            .await
            .map_err(|_| Tainted)?
            .clone();
        let forgotten = d.forgot && d.failed.front().is_some_and(|&oldest| oldest > from);
        if forgotten || d.failed.iter().any(|&f| (from..=upto).contains(&f)) {
            return Err(Tainted);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_waits_for_what_it_read_and_is_withdrawn_when_that_failed() {
        let gate = CommitGate::default();
        assert_eq!(
            gate.settled(gate.first_unsettled(), gate.applied()).await,
            Ok(())
        );
        assert_eq!(gate.first_unsettled(), 1);
        gate.apply(1);
        let from = gate.first_unsettled();
        assert_eq!(from, 1, "batch 1 is committing");
        let upto = gate.applied();
        // Batch 1 is applied but not decided: the answer waits.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            gate.settled(from, upto),
        )
        .await;
        assert!(waiting.is_err(), "answered before the commit");
        gate.decide(1, true);
        assert_eq!(gate.settled(from, upto).await, Ok(()));
        gate.apply(2);
        gate.decide(2, false);
        gate.apply(3);
        gate.decide(3, true);
        assert_eq!(
            gate.settled(1, 2).await,
            Err(Tainted),
            "read while 2 failed"
        );
        assert_eq!(gate.settled(2, 3).await, Err(Tainted));
        assert_eq!(
            gate.settled(3, 3).await,
            Ok(()),
            "read after 2 was put back"
        );
        assert_eq!(gate.first_unsettled(), 4, "nothing is committing");
        assert_eq!(
            gate.settled(4, 3).await,
            Ok(()),
            "a read with no batch in it"
        );
        // A reader older than every failure remembered is judged tainted.
        // Batch 2 and 63 more failures: 64 remembered.
        for seq in 4..3 + FAILED_KEPT as u64 {
            gate.apply(seq);
            gate.decide(seq, false);
        }
        assert_eq!(gate.settled(3, 3).await, Ok(()), "all failures still known");
        let last = 3 + FAILED_KEPT as u64;
        gate.apply(last);
        gate.decide(last, false);
        gate.apply(last + 1);
        gate.decide(last + 1, true);
        assert_eq!(gate.settled(3, 3).await, Err(Tainted), "forgotten failures");
        assert_eq!(gate.settled(last + 1, last + 1).await, Ok(()));
    }
}
