//! `pause`, `resume`, `reset --to` and the takeover they share with `rebuild --in-place`: pause
//! the projection for this process, wait until no other runner holds its partitions, change
//! its checkpoints, then resume (or restore the pause an operator had set).

use std::sync::Arc;
use std::time::Duration;

use annal_eventstore::{EventStore, Filter, Position};
use annal_projections::{Pause, Projection, ProjectionStore};
use chrono::{DateTime, Utc};

use crate::{Error, Result};

/// How long a takeover waits for other runners to let go: they do so on their next lease round
/// (a third of the lease), after their current batch; a runner frozen mid-batch loses its
/// lease after one lease period, and on PostgreSQL its batch is ended by the server before
/// that (`batch_timeouts`). One lease period plus those bounds, plus a round.
pub(crate) fn drain_bound(lease: Duration) -> Duration {
    let (idle, statement) = annal_projections::batch_timeouts(lease);
    lease + idle + statement + lease / 3
}

/// A projection taken over by this process: paused for `owner`, no other runner holding it.
pub(crate) struct Takeover {
    name: String,
    owner: String,
    /// The pause in force before (an operator's), restored at the end instead of resuming.
    before: Option<Pause>,
}

impl Takeover {
    /// Pauses `name` for `owner` and waits until no other runner holds a live lease on it.
    ///
    /// # Errors
    /// [`Error::Takeover`] when another runner still holds a partition after [`drain_bound`];
    /// the projection is then left paused, which the message says.
    pub(crate) async fn start(
        store: &dyn ProjectionStore,
        name: &str,
        owner: &str,
        reason: &str,
        lease: Duration,
    ) -> Result<Takeover> {
        let before = store.control(name).await?.paused;
        store.pause(name, &Pause::new(owner, reason)).await?;
        let takeover = Takeover { name: name.to_owned(), owner: owner.to_owned(), before };
        if let Some((partition, holder)) = wait_for_drain(store, name, Some(owner), drain_bound(lease)).await? {
            return Err(takeover.failed(format!(
                "runner {holder} still holds partition {partition} after {:.1} s",
                drain_bound(lease).as_secs_f64()
            )));
        }
        Ok(takeover)
    }

    /// The owner name this process runs the projection under while it holds it.
    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    /// Ends the takeover: resumes the projection, or puts back the pause an operator had set
    /// (a rebuild of a paused projection leaves it paused). Returns whether it was resumed.
    pub(crate) async fn finish(self, store: &dyn ProjectionStore) -> Result<bool> {
        match &self.before {
            Some(pause) => {
                store.pause(&self.name, pause).await?;
                Ok(false)
            }
            None => {
                store.resume(&self.name).await?;
                Ok(true)
            }
        }
    }

    /// The error for a takeover that failed part way: the projection stays paused.
    pub(crate) fn failed(&self, why: String) -> Error {
        Error::Takeover { projection: self.name.clone(), why }
    }
}

/// Polls until no runner but `except` holds a live lease on `name`, or `bound` passes; returns
/// the partition and holder still there in that case.
pub(crate) async fn wait_for_drain(
    store: &dyn ProjectionStore,
    name: &str,
    except: Option<&str>,
    bound: Duration,
) -> Result<Option<(u32, String)>> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let now = Utc::now();
        let held = store
            .leases(name)
            .await?
            .into_iter()
            .find(|l| l.expires_at > now && except.is_none_or(|owner| l.owner != owner));
        let Some(lease) = held else { return Ok(None) };
        if tokio::time::Instant::now() >= deadline {
            return Ok(Some((lease.partition, lease.owner)));
        }
        // Other runners let go on their own lease rounds; this polls for the outcome.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `pause NAME`: no runner holds its partitions from its next lease round on; waits (bounded)
/// until none does.
pub(crate) async fn pause(store: &dyn ProjectionStore, name: &str, reason: &str, lease: Duration) -> Result<()> {
    let by = operator();
    store.pause(name, &Pause::new(&by, reason)).await?;
    match wait_for_drain(store, name, Some(&by), drain_bound(lease)).await? {
        None => out!("paused {name}: no runner holds its partitions (resume with `annal-runner resume {name}`)"),
        Some((partition, holder)) => out!(
            "paused {name}, but runner {holder} still holds partition {partition}: it lets go on its next lease \
             round, or its lease expires"
        ),
    }
    Ok(())
}

/// `resume NAME`.
pub(crate) async fn resume(store: &dyn ProjectionStore, name: &str) -> Result<()> {
    if store.resume(name).await? {
        out!("resumed {name}: runners take its partitions on their next lease round");
    } else {
        out!("{name} was not paused");
    }
    Ok(())
}

/// Who `pause` names as the pauser: no runner has this name, so none runs the projection.
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "someone".to_owned());
    format!("operator {user} ({})", crate::dispatch::owner_name())
}

/// Where `reset --to` puts the checkpoints.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    /// A position of the log.
    Position(Position),
    /// Before the first event recorded at or after this time.
    Time(DateTime<Utc>),
}

/// The position before the first event (of any stream) recorded at or after `time`; the head
/// if there is none.
async fn position_at(events: &dyn EventStore, time: DateTime<Utc>) -> Result<Position> {
    let mut at = Position::START;
    loop {
        let page = events.read_all_page(at, &Filter::all(), 1000).await?;
        for event in &page.events {
            if event.recorded_at >= time {
                return Ok(at);
            }
            at = event.position;
        }
        if page.events.is_empty() {
            return Ok(at.max(page.next));
        }
        at = page.next;
    }
}

/// How one partition moves.
struct Move {
    partition: u32,
    from: Position,
    /// Events of the partition skipped (forward) or replayed (backward).
    events: u64,
    forward: bool,
}

/// `reset NAME --to ...`: moves every partition's checkpoint, with the rule of
/// docs/runner.md: forward skips events (allowed, the count is printed; dead letters in the
/// skipped range stay), backward replays events already applied (refused unless
/// `allow_replay`: the handlers must be idempotent; dead letters after the target go, their
/// events are met again).
pub(crate) async fn reset_to(
    events: Arc<dyn EventStore>,
    store: &dyn ProjectionStore,
    projection: &dyn Projection,
    target: Target,
    allow_replay: bool,
    lease: Duration,
) -> Result<()> {
    let name = projection.name();
    let head = events.head().await?;
    let to = match target {
        Target::Position(position) => position,
        Target::Time(time) => position_at(&*events, time).await?,
    };
    if to > head {
        return Err(Error::Config(format!("--to {to} is after the head of the log ({head}): nothing is there")));
    }
    let count = projection.partitions().max(1);
    let mut moves = Vec::new();
    for partition in 0..count {
        let from = store.checkpoint(name, partition).await?.map_or(Position::START, |c| c.position);
        let filter = projection.filter().with_partition(partition, count);
        let forward = to >= from;
        let (low, high) = if forward { (from, to) } else { (to, from) };
        moves.push(Move { partition, from, events: events.count(low, high, &filter).await?, forward });
    }
    let back: Vec<&Move> = moves.iter().filter(|m| !m.forward).collect();
    if !back.is_empty() && !allow_replay {
        let replayed: u64 = back.iter().map(|m| m.events).sum();
        let partitions: Vec<String> = back.iter().map(|m| format!("{} (at {})", m.partition, m.from)).collect();
        return Err(Error::Config(format!(
            "reset {name} --to {to} moves partition(s) {} back, replaying {replayed} event(s) whose effects are already \
             in the read model: a handler that is not idempotent applies them twice. Rebuild instead (`annal-runner \
             rebuild {name}` empties the read model and replays), or pass --allow-replay if every handler is idempotent",
            partitions.join(", ")
        )));
    }
    let owner = crate::dispatch::owner_name();
    let takeover = Takeover::start(store, name, &owner, &format!("reset --to {to}"), lease).await?;
    if let Err(error) = store.move_checkpoints(name, count, to).await {
        return Err(takeover.failed(format!("moving the checkpoints failed: {error}")));
    }
    let resumed = takeover.finish(store).await?;
    let skipped: u64 = moves.iter().filter(|m| m.forward).map(|m| m.events).sum();
    let replayed: u64 = moves.iter().filter(|m| !m.forward).map(|m| m.events).sum();
    out!(
        "moved {count} partition(s) of {name} to {to}: {skipped} event(s) skipped, {replayed} to replay{}",
        if resumed { "" } else { " (it stays paused, as it was)" }
    );
    Ok(())
}
