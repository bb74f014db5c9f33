//! `rebuild`: replay a projection from the first event, in place or into shadow tables swapped in
//! when caught up.

use std::sync::Arc;
use std::time::Duration;

use annal_projections::{Projection, ProjectionRunner, ProjectionStore, RebuildMode, RebuildOutcome};

use crate::config::{Config, SqlProjectionConfig};
use crate::control::Takeover;
use crate::database::Database;
use crate::progress::Publisher;
use crate::{Error, Result, SqlProjection, options_for};

/// How often a rebuild logs its progress when standard error is not a terminal.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// Takes the projection over (paused for this process, no other runner holding it), empties
/// the read model (the `reset` statements) and the checkpoints, replays with this process's
/// configuration until the head as it was at the start, then resumes it (or puts back an
/// operator's pause). A failure or an interrupt leaves it paused, and says so.
pub(crate) async fn rebuild_in_place(
    database: &Database,
    store: Arc<dyn ProjectionStore>,
    config: &Config,
    projection: Arc<dyn Projection>,
    reset: &[String],
) -> Result<()> {
    let stop = crate::serve::shutdown_signal();
    let name = projection.name().to_owned();
    let owner = crate::dispatch::owner_name();
    let lease = crate::dispatch::lease(config);
    let progress = Publisher::start(store.clone(), &name, &owner, RebuildMode::InPlace, lease).await;
    let takeover = match Takeover::start(&*store, &name, &owner, "rebuild --in-place", lease).await {
        Ok(takeover) => takeover,
        Err(error) => {
            progress.end(RebuildOutcome::Failed { reason: error.report() }).await;
            return Err(error);
        }
    };
    let work = async {
        let reset_at = chrono::Utc::now();
        let started = std::time::Instant::now();
        database.execute(reset, true).await?;
        store.reset(&name).await?;
        let total =
            replay(database, store.clone(), config, projection, &name, Some(takeover.owner()), &progress).await?;
        Ok::<_, Error>((total, reset_at, started.elapsed()))
    };
    let done = tokio::select! {
        done = work => done,
        () = stop => Err(Error::Interrupted),
    };
    let (total, reset_at, took) = match done {
        Ok(done) => done,
        Err(Error::Interrupted) => {
            progress.end(RebuildOutcome::Interrupted).await;
            return Err(takeover.failed(Error::Interrupted.report()));
        }
        Err(error) => {
            progress.end(RebuildOutcome::Failed { reason: error.report() }).await;
            return Err(takeover.failed(error.report()));
        }
    };
    let resumed = match takeover.finish(&*store).await {
        Ok(resumed) => resumed,
        Err(error) => {
            progress.end(RebuildOutcome::Failed { reason: error.report() }).await;
            return Err(error);
        }
    };
    progress.end(if resumed { RebuildOutcome::Resumed } else { RebuildOutcome::LeftPaused }).await;
    out!(
        "rebuilt {name} in place: {total} events replayed in {:.3} s (reset at {}, caught up at {}){}",
        took.as_secs_f64(),
        reset_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        if resumed { "" } else { "; it stays paused, as it was before" }
    );
    Ok(())
}

/// Builds the read model anew in shadow tables while the live one keeps serving (and its
/// projection keeps running in other runners), then swaps it in: one transaction copies the
/// shadow rows over the live ones, drops the shadow tables and gives the shadow's checkpoints to
/// the live projection. Resumes from the shadow's checkpoint if a previous rebuild stopped.
pub(crate) async fn rebuild_in_shadow(
    database: &Database,
    store: Arc<dyn ProjectionStore>,
    config: &Config,
    live: &SqlProjectionConfig,
    shadow: &SqlProjectionConfig,
) -> Result<()> {
    let stop = crate::serve::shutdown_signal();
    let owner = crate::dispatch::owner_name();
    let lease = crate::dispatch::lease(config);
    let progress = Publisher::start(store.clone(), &live.name, &owner, RebuildMode::Shadow, lease).await;
    let work = async {
        if has_checkpoints(&*store, &shadow.name, shadow.partitions).await? {
            out!("resuming the rebuild of {} in its shadow tables", live.name);
        } else {
            database.execute(&live.drop_shadow(), true).await?;
            store.reset(&shadow.name).await?;
        }
        let projection = SqlProjection::new(shadow)?;
        database.check(&shadow.setup, std::slice::from_ref(&projection), true).await?;
        database.install(std::slice::from_ref(&projection)).await;
        let total = replay(database, store.clone(), config, Arc::new(projection), &live.name, None, &progress).await?;
        store.promote(&shadow.name, &live.name, &live.promotion(database.is_postgres())).await?;
        Ok::<_, Error>(total)
    };
    // An interrupt leaves the shadow and its checkpoints: the next rebuild resumes from them.
    let done = tokio::select! {
        done = work => done,
        () = stop => Err(Error::Interrupted),
    };
    match done {
        Ok(total) => {
            progress.end(RebuildOutcome::SwappedIn).await;
            out!("rebuilt {} in shadow tables and swapped them in: {total} events replayed", live.name);
            Ok(())
        }
        Err(Error::Interrupted) => {
            progress.end(RebuildOutcome::Interrupted).await;
            Err(Error::Interrupted)
        }
        Err(error) => {
            progress.end(RebuildOutcome::Failed { reason: error.report() }).await;
            Err(error)
        }
    }
}

/// Whether projection `name` has moved the checkpoint of any of its `partitions`.
pub(crate) async fn has_checkpoints(store: &dyn ProjectionStore, name: &str, partitions: u32) -> Result<bool> {
    for partition in 0..partitions.max(1) {
        if store.checkpoint(name, partition).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs `projection` alone until it reaches the head as it was when the replay started,
/// showing progress on the terminal, in the log (without a terminal) and in the rebuild record
/// (`progress`); returns how many events that was. `options_of` names the configured
/// projection whose retry settings apply; `owner`, the name to run it under (that of a
/// takeover's pause).
async fn replay(
    database: &Database,
    store: Arc<dyn ProjectionStore>,
    config: &Config,
    projection: Arc<dyn Projection>,
    options_of: &str,
    owner: Option<&str>,
    progress: &Publisher,
) -> Result<u64> {
    let name = projection.name().to_owned();
    let filter = projection.filter();
    let events = database.events();
    let head = events.head().await?;
    let total = events.count(annal_eventstore::Position::START, head, &filter).await?;
    let mut runner = ProjectionRunner::new(events.clone(), store);
    if let Some(owner) = owner {
        runner = runner.owner(owner);
    }
    let running = runner
        .lease(Duration::from_secs_f64(config.lease_seconds))
        .with(projection, options_for(config, options_of))?
        .start();
    // Without a terminal (a Kubernetes job, a log file) the bar draws nothing: log instead.
    let logged = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_log = None::<std::time::Instant>;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let checkpoint = running.checkpoint(&name).await?;
        let done = total - events.count(checkpoint, head, &filter).await?.min(total);
        bar.set_position(done);
        progress.progress(done, total);
        if logged && last_log.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) {
            last_log = Some(std::time::Instant::now());
            tracing::info!(projection = %name, done, total, "rebuild progress");
        }
        if checkpoint >= head || !running.is_running(&name)? {
            break;
        }
        let _ = running.wait_for(&name, head, Duration::from_millis(250)).await;
    }
    bar.finish();
    if logged {
        tracing::info!(projection = %name, total, "rebuild replayed every event");
    }
    running.shutdown().await?;
    Ok(total)
}
