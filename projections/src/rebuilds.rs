//! The rebuild record: what a rebuild is doing, written by the rebuilding process (every second,
//! by `annal-runner rebuild`) so that every operator view (`annal-runner status`, the console)
//! shows it, wherever the rebuild runs.
//!
//! Staleness is judged by the store's clock: the PostgreSQL store stamps every write and
//! measures every record's age with the server's `clock_timestamp()`, so two machines whose
//! clocks disagree still agree on whether a rebuild stopped writing; the SQLite store uses the
//! clock of the machine holding the file (all its writers share it); the memory store, the
//! process's.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// How a projection is being rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebuildMode {
    /// Paused everywhere, emptied, replayed, resumed (`rebuild --in-place`).
    InPlace,
    /// Replayed into shadow tables while the live read model keeps serving, then swapped in.
    Shadow,
}

impl RebuildMode {
    /// The stored spelling: `in_place` or `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            RebuildMode::InPlace => "in_place",
            RebuildMode::Shadow => "shadow",
        }
    }

    /// The mode a stored spelling names; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "in_place" => Some(RebuildMode::InPlace),
            "shadow" => Some(RebuildMode::Shadow),
            _ => None,
        }
    }
}

/// How a rebuild ended, or that it has not.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebuildOutcome {
    /// Still replaying (or its process died: see [`RebuildProgress::stale`]).
    Running,
    /// A shadow rebuild caught up and its read model was swapped in.
    SwappedIn,
    /// An in-place rebuild caught up and the projection was resumed.
    Resumed,
    /// An in-place rebuild caught up, and the projection stays paused, as an operator had
    /// paused it before.
    LeftPaused,
    /// The rebuild failed; an in-place one leaves the projection paused.
    Failed {
        /// Why, as the rebuild reported it.
        reason: String,
    },
    /// The rebuild was stopped by SIGINT or SIGTERM before it caught up.
    Interrupted,
}

impl RebuildOutcome {
    /// The stored spelling: `running`, `swapped_in`, `resumed`, `left_paused`, `failed` or
    /// `interrupted`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RebuildOutcome::Running => "running",
            RebuildOutcome::SwappedIn => "swapped_in",
            RebuildOutcome::Resumed => "resumed",
            RebuildOutcome::LeftPaused => "left_paused",
            RebuildOutcome::Failed { .. } => "failed",
            RebuildOutcome::Interrupted => "interrupted",
        }
    }

    /// The reason of a failure.
    pub fn reason(&self) -> Option<&str> {
        match self {
            RebuildOutcome::Failed { reason } => Some(reason),
            _ => None,
        }
    }

    /// The outcome a stored spelling and reason name; `None` for an unknown spelling.
    pub fn parse(text: &str, reason: Option<String>) -> Option<Self> {
        Some(match text {
            "running" => RebuildOutcome::Running,
            "swapped_in" => RebuildOutcome::SwappedIn,
            "resumed" => RebuildOutcome::Resumed,
            "left_paused" => RebuildOutcome::LeftPaused,
            "failed" => RebuildOutcome::Failed { reason: reason.unwrap_or_default() },
            "interrupted" => RebuildOutcome::Interrupted,
            _ => return None,
        })
    }
}

/// What a rebuilding process reports, each time it writes its record.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildUpdate {
    /// Events to replay in all: those selected up to the head as it was when the replay began.
    pub total: u64,
    /// Events replayed so far.
    pub done: u64,
    /// Events replayed per second, by this process since it began.
    pub rate: f64,
    /// How long the rest should take at that rate (`None` before the rate is known).
    pub eta: Option<Duration>,
    /// Whether it is still running, and if not how it ended.
    pub outcome: RebuildOutcome,
}

/// A projection's rebuild record, as stored: the last rebuild of the projection, running or
/// ended.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RebuildProgress {
    /// The projection rebuilt (the live name, also for a rebuild into shadow tables).
    pub projection: String,
    /// The rebuilding process: host, pid and a random suffix, as in leases.
    pub owner: String,
    /// In place or into shadow tables.
    pub mode: RebuildMode,
    /// When the rebuilding process began (a rebuild resumed by another process begins anew).
    pub started_at: DateTime<Utc>,
    /// When it last wrote the record, by the store's clock.
    pub updated_at: DateTime<Utc>,
    /// The last figures reported.
    pub update: RebuildUpdate,
    /// A running record not written for this long is stale: its process died.
    pub stale_after: Duration,
    /// How long ago it was last written, by the store's clock.
    pub age: Duration,
}

impl RebuildProgress {
    /// Whether the record says running but has not been written for [`Self::stale_after`]:
    /// its process died (kill -9, a lost machine) without saying how the rebuild ended.
    pub fn stale(&self) -> bool {
        self.update.outcome == RebuildOutcome::Running && self.age > self.stale_after
    }
}

/// How long a rebuild record may go unwritten before it is stale, for a rebuild that writes it
/// every `every` under a lease period of `lease`: the larger of the lease and three writes.
pub fn rebuild_stale_after(lease: Duration, every: Duration) -> Duration {
    lease.max(every * 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for mode in [RebuildMode::InPlace, RebuildMode::Shadow] {
            assert_eq!(RebuildMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(RebuildMode::parse("sideways"), None);
        let outcomes = [
            RebuildOutcome::Running,
            RebuildOutcome::SwappedIn,
            RebuildOutcome::Resumed,
            RebuildOutcome::LeftPaused,
            RebuildOutcome::Failed { reason: "boom".into() },
            RebuildOutcome::Interrupted,
        ];
        for outcome in outcomes {
            let reason = outcome.reason().map(str::to_owned);
            assert_eq!(RebuildOutcome::parse(outcome.as_str(), reason), Some(outcome));
        }
        assert_eq!(RebuildOutcome::parse("exploded", None), None);
    }

    #[test]
    fn rebuild_stale_after_is_the_lease_or_three_writes() {
        let second = Duration::from_secs(1);
        assert_eq!(rebuild_stale_after(Duration::from_secs(10), second), Duration::from_secs(10));
        assert_eq!(rebuild_stale_after(Duration::from_millis(500), second), Duration::from_secs(3));
    }
}
