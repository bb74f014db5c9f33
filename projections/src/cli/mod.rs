//! The `annal-runner` command line, as a library: build your own runner binary with Rust
//! projections beside the configured SQL ones, with the same commands.
//!
//! ```no_run
//! # async fn example() {
//! // src/main.rs of your own runner:
//! let rust_projections = vec![/* Arc<dyn Projection> */];
//! std::process::exit(annal_projections::cli::main_with(rust_projections).await);
//! # }
//! ```

mod config;
mod sql;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use annal_eventstore::{EventStore, PgEventStore, SqliteEventStore};
use clap::{Parser, Subcommand, ValueEnum};
use sqlx::{AssertSqlSafe, Executor, SqlSafeStr};

pub use config::{Config, PARAMETERS, SHADOW_SUFFIX, SqlProjectionConfig, Statement, compile, shadow_sql};
pub use sql::SqlProjection;

use crate::{
    PgProjectionStore, Projection, ProjectionRunner, ProjectionStore, RunningProjections, SqliteProjectionStore,
    WorkerOptions, retry_dead_letter, skip_dead_letter,
};

/// Runs projections and lets operators inspect and control them.
#[derive(Debug, Parser)]
#[command(name = "annal-runner", version, about)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, short, env = "ANNAL_CONFIG", default_value = "annal.toml")]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value = "human")]
    pub log: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Human,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The runner's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the projections until SIGINT or SIGTERM, serving /health and /metrics.
    Run,
    /// Print every projection partition's checkpoint, lag, dead letters and lease.
    Status,
    /// Replay a projection from the first event, with progress. A SQL projection that lists
    /// its `tables` is rebuilt into shadow tables while the live read model keeps serving, then
    /// swapped in; others (or with `--in-place`) are emptied and replayed in place. An
    /// interrupted shadow rebuild resumes where it stopped.
    Rebuild {
        /// The projection.
        name: String,
        /// Empty the live read model and replay into it, even if shadow tables are possible.
        #[arg(long)]
        in_place: bool,
    },
    /// List, retry or skip parked events.
    DeadLetters {
        /// What to do.
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Create or upgrade the tables (events, checkpoints, projections' setup).
    Migrate,
    /// Check the configuration and every handler's SQL against the database, changing nothing.
    Check,
}

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// List a projection's dead letters.
    List {
        /// The projection.
        projection: String,
    },
    /// Apply a dead letter's event again (exactly once) and remove it.
    Retry {
        /// The projection.
        projection: String,
        /// The dead letter's id.
        id: i64,
    },
    /// Remove a dead letter without applying it.
    Skip {
        /// The projection.
        projection: String,
        /// The dead letter's id.
        id: i64,
    },
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The database the runner works on.
enum Database {
    Postgres(PgEventStore),
    Sqlite(SqliteEventStore),
}

impl Database {
    async fn connect(url: &str) -> Result<Self, Failure> {
        Ok(if url.starts_with("postgres") {
            Database::Postgres(PgEventStore::connect(url).await?)
        } else {
            Database::Sqlite(SqliteEventStore::connect(url).await?)
        })
    }

    fn events(&self) -> Arc<dyn EventStore> {
        match self {
            Database::Postgres(store) => Arc::new(store.clone()),
            Database::Sqlite(store) => Arc::new(store.clone()),
        }
    }

    async fn projection_store(&self) -> Result<Arc<dyn ProjectionStore>, Failure> {
        Ok(match self {
            Database::Postgres(store) => Arc::new(PgProjectionStore::new(store).await?),
            Database::Sqlite(store) => Arc::new(SqliteProjectionStore::new(store).await?),
        })
    }

    /// Runs statements in one transaction, committing only if `commit`.
    async fn execute(&self, statements: &[String], commit: bool) -> Result<(), Failure> {
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await?;
                for statement in statements {
                    sqlx::raw_sql(AssertSqlSafe(statement.clone())).execute(&mut *tx).await?;
                }
                if commit { tx.commit().await? } else { tx.rollback().await? }
            }};
        }
        match self {
            Database::Postgres(store) => run!(store.pool()),
            Database::Sqlite(store) => run!(store.writer()),
        }
        Ok(())
    }

    /// Runs the `setup` statements, then prepares every handler statement: invalid SQL, or SQL
    /// naming a table that does not exist, is found here, before anything runs.
    async fn check(&self, setup: &[String], projections: &[SqlProjection], commit: bool) -> Result<(), Failure> {
        macro_rules! check {
            ($pool:expr, $statements:ident, $begin:literal) => {{
                // Serialised between runners starting together: concurrent `CREATE TABLE IF NOT
                // EXISTS` can fail on PostgreSQL.
                let mut tx = $pool.begin_with($begin).await?;
                if $begin == "BEGIN" {
                    sqlx::query("SELECT pg_advisory_xact_lock(7046716111)").execute(&mut *tx).await?;
                }
                for statement in setup {
                    sqlx::raw_sql(AssertSqlSafe(statement.clone())).execute(&mut *tx).await?;
                }
                for projection in projections {
                    for (event_type, statement) in projection.$statements() {
                        tx.prepare(AssertSqlSafe(statement.sql.clone()).into_sql_str())
                            .await
                            .map_err(|e| format!("projection {:?}, handler {event_type:?}: {e}", projection.name()))?;
                    }
                }
                if commit { tx.commit().await? } else { tx.rollback().await? }
            }};
        }
        match self {
            Database::Postgres(store) => check!(store.pool(), postgres_statements, "BEGIN"),
            Database::Sqlite(store) => check!(store.writer(), sqlite_statements, "BEGIN IMMEDIATE"),
        }
        Ok(())
    }
}

/// Runs the command line with `extra` Rust projections beside the configured SQL ones, and
/// returns the process exit code.
pub async fn main_with(extra: Vec<Arc<dyn Projection>>) -> i32 {
    let cli = Cli::parse();
    init_logs(cli.log);
    match run(cli, extra).await {
        Ok(()) => 0,
        Err(error) => {
            // The whole chain: "database error" alone says nothing about what to fix.
            let mut message = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                // Some errors repeat their source in their own message.
                if !message.contains(&cause_text) {
                    message.push_str(": ");
                    message.push_str(&cause_text);
                }
                source = cause.source();
            }
            eprintln!("annal-runner: {message}");
            1
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn run(cli: Cli, extra: Vec<Arc<dyn Projection>>) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&cli.config)
        .map_err(|e| format!("cannot read the configuration {}: {e}", cli.config.display()))?;
    let config = Config::parse(&text).map_err(|e| format!("{}: {e}", cli.config.display()))?;
    let sql: Vec<SqlProjection> = config.projections.iter().map(SqlProjection::new).collect::<Result<_, _>>()?;
    let setup: Vec<String> = config.projections.iter().flat_map(|p| p.setup.clone()).collect();
    let mut projections: Vec<Arc<dyn Projection>> = Vec::new();
    let database = Database::connect(&config.database).await?;
    let store = database.projection_store().await?;
    match cli.command {
        Command::Check => {
            database.check(&setup, &sql, false).await?;
            println!("configuration and SQL are valid: {} projection(s)", config.projections.len());
        }
        Command::Migrate => {
            database.check(&setup, &sql, true).await?;
            println!("tables are up to date");
        }
        Command::Run => {
            database.check(&setup, &sql, true).await?;
            projections.extend(sql.into_iter().map(|p| Arc::new(p) as Arc<dyn Projection>));
            projections.extend(extra);
            let mut runner = ProjectionRunner::new(database.events(), store.clone())
                .lease(Duration::from_secs_f64(config.lease_seconds.max(0.1)));
            for projection in &projections {
                runner = runner.with(projection.clone(), options_for(&config, projection.name()))?;
            }
            let running = Arc::new(runner.start());
            let names: Vec<String> = projections.iter().map(|p| p.name().to_owned()).collect();
            serve(&config.listen, running.clone(), names).await?;
            let running = Arc::try_unwrap(running).map_err(|_| "the HTTP server still holds the runner")?;
            running.shutdown().await?;
        }
        Command::Status => status(&database, &*store, &config, &extra).await?,
        Command::Rebuild { name, in_place } => {
            let configured = config.projections.iter().find(|p| p.name == name);
            match configured.and_then(|p| Some((p, p.shadow()?))) {
                Some((live, shadow)) if !in_place => {
                    rebuild_in_shadow(&database, store, &config, live, &shadow).await?
                }
                _ => {
                    let projections = sql.into_iter().map(|p| Arc::new(p) as _).chain(extra).collect::<Vec<_>>();
                    rebuild_in_place(&database, store, &config, find(&projections, &name)?).await?;
                }
            }
        }
        Command::DeadLetters { action } => {
            dead_letters(&database, &*store, sql.into_iter().map(|p| Arc::new(p) as _).chain(extra).collect(), action)
                .await?
        }
    }
    Ok(())
}

/// The worker options a configured projection asks for (defaults for Rust projections).
fn options_for(config: &Config, name: &str) -> WorkerOptions {
    let Some(p) = config.projections.iter().find(|p| p.name == name) else { return WorkerOptions::default() };
    let retry =
        crate::RetryPolicy::default().attempts(p.retry_attempts).initial(Duration::from_millis(p.retry_initial_ms));
    WorkerOptions::default().retry(retry)
}

fn find(projections: &[Arc<dyn Projection>], name: &str) -> Result<Arc<dyn Projection>, Failure> {
    projections.iter().find(|p| p.name() == name).cloned().ok_or_else(|| format!("no projection named {name:?}").into())
}

/// Serves /health and /metrics until SIGINT or SIGTERM.
async fn serve(listen: &str, running: Arc<RunningProjections>, names: Vec<String>) -> Result<(), Failure> {
    use axum::http::StatusCode;
    use axum::routing::get;

    let health = {
        let (running, names) = (running.clone(), names.clone());
        move || async move {
            let stopped: Vec<&String> = names.iter().filter(|n| !running.is_running(n).unwrap_or(false)).collect();
            if stopped.is_empty() {
                (StatusCode::OK, "ok\n".to_owned())
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, format!("stopped: {stopped:?}\n"))
            }
        }
    };
    let metrics = {
        let running = running.clone();
        move || async move { metrics_text(&running, &names).await }
    };
    let app = axum::Router::new().route("/health", get(health)).route("/metrics", get(metrics));
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(address = %listen, "serving /health and /metrics");
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    tracing::info!("shutting down: finishing in-flight batches and releasing leases");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
}

/// The Prometheus text exposition of every projection's lag.
async fn metrics_text(running: &RunningProjections, names: &[String]) -> String {
    use std::fmt::Write;
    let mut lags = Vec::new();
    for name in names {
        lags.push((name, running.is_running(name).unwrap_or(false), running.lag(name).await.ok()));
    }
    let mut out = String::new();
    let gauges = [
        ("annal_projection_running", "1 while the projection runs"),
        ("annal_projection_events_behind", "events selected but not yet applied"),
        ("annal_projection_seconds_behind", "age of the oldest event not yet applied"),
        ("annal_projection_latency_seconds", "commit-to-applied latency quantiles"),
    ];
    for (metric, help) in gauges {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for (name, up, lag) in &lags {
            let label = format!("projection=\"{name}\"");
            match (metric, lag) {
                ("annal_projection_running", _) => {
                    let _ = writeln!(out, "{metric}{{{label}}} {}", u8::from(*up));
                }
                ("annal_projection_events_behind", Some(lag)) => {
                    let _ = writeln!(out, "{metric}{{{label}}} {}", lag.events_behind);
                }
                ("annal_projection_seconds_behind", Some(lag)) => {
                    let _ = writeln!(out, "{metric}{{{label}}} {}", lag.time_behind.as_secs_f64());
                }
                (_, Some(lag)) => {
                    for (quantile, value) in
                        [("0.5", lag.latency.p50), ("0.99", lag.latency.p99), ("0.999", lag.latency.p999)]
                    {
                        let _ = writeln!(out, "{metric}{{{label},quantile=\"{quantile}\"}} {}", value.as_secs_f64());
                    }
                }
                (_, None) => {}
            }
        }
    }
    out
}

async fn status(
    database: &Database,
    store: &dyn ProjectionStore,
    config: &Config,
    extra: &[Arc<dyn Projection>],
) -> Result<(), Failure> {
    let events = database.events();
    let head = events.head().await?;
    let mut targets: Vec<(String, annal_eventstore::Filter, u32)> = config
        .projections
        .iter()
        .map(|p| SqlProjection::new(p).map(|s| (p.name.clone(), s.filter(), p.partitions.max(1))))
        .collect::<Result<_, _>>()?;
    targets.extend(extra.iter().map(|p| (p.name().to_owned(), p.filter(), p.partitions().max(1))));
    // A rebuild in progress (or interrupted) shows as its shadow projection.
    for shadow in config.projections.iter().filter_map(SqlProjectionConfig::shadow) {
        if has_checkpoints(store, &shadow.name, shadow.partitions).await? {
            let filter = SqlProjection::new(&shadow)?.filter();
            targets.push((shadow.name, filter, shadow.partitions.max(1)));
        }
    }
    println!(
        "{:<24} {:>4} {:<8} {:<22} {:<22} {:>10} {:>10} {:>10} {:>6}  lease",
        "projection", "part", "state", "checkpoint", "head", "behind", "seconds", "p99 ms", "dead"
    );
    for (name, filter, partitions) in targets {
        let dead = store.dead_letters(&name).await?;
        let leases = store.leases(&name).await?;
        for partition in 0..partitions {
            let checkpoint = store.checkpoint(&name, partition).await?;
            let position = checkpoint.as_ref().map_or(annal_eventstore::Position::START, |c| c.position);
            let lag = crate::runner::partition_lag(&*events, &filter, (partition, partitions), position, head).await?;
            let (behind, seconds) = (lag.events_behind, lag.time_behind.as_secs_f64());
            let lease = leases.iter().find(|l| l.partition == partition);
            let held = lease.is_some_and(|l| l.expires_at > chrono::Utc::now());
            let lease = lease.map_or("-".to_owned(), |l| {
                format!("{} ({}, token {})", l.owner, if held { "held" } else { "expired" }, l.token)
            });
            let state = if held { "running" } else { "stopped" };
            let p99 = checkpoint
                .as_ref()
                .and_then(|c| c.latency_p99)
                .map_or("-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1e3));
            let dead = dead.iter().filter(|d| d.partition == partition).count();
            println!(
                "{name:<24} {partition:>4} {state:<8} {:<22} {:<22} {behind:>10} {seconds:>10.1} {p99:>10} {dead:>6}  {lease}",
                position.to_string(),
                head.to_string()
            );
        }
    }
    Ok(())
}

/// Empties the read model (the `reset` statements) and the checkpoints, then replays.
async fn rebuild_in_place(
    database: &Database,
    store: Arc<dyn ProjectionStore>,
    config: &Config,
    projection: Arc<dyn Projection>,
) -> Result<(), Failure> {
    let name = projection.name().to_owned();
    let reset = config.projections.iter().find(|p| p.name == name).map(|p| p.reset.clone()).unwrap_or_default();
    database.execute(&reset, true).await?;
    store.reset(&name).await?;
    let total = replay(database, store, config, projection, &name).await?;
    println!("rebuilt {name} in place: {total} events replayed");
    Ok(())
}

/// Builds the read model anew in shadow tables while the live one keeps serving (and its
/// projection keeps running in other runners), then swaps it in: one transaction copies the
/// shadow rows over the live ones, drops the shadow tables and gives the shadow's checkpoints to
/// the live projection. Resumes from the shadow's checkpoint if a previous rebuild stopped.
async fn rebuild_in_shadow(
    database: &Database,
    store: Arc<dyn ProjectionStore>,
    config: &Config,
    live: &SqlProjectionConfig,
    shadow: &SqlProjectionConfig,
) -> Result<(), Failure> {
    if has_checkpoints(&*store, &shadow.name, shadow.partitions).await? {
        println!("resuming the rebuild of {} in its shadow tables", live.name);
    } else {
        database.execute(&live.drop_shadow(), true).await?;
        store.reset(&shadow.name).await?;
    }
    let projection = SqlProjection::new(shadow)?;
    database.check(&shadow.setup, std::slice::from_ref(&projection), true).await?;
    let total = replay(database, store.clone(), config, Arc::new(projection), &live.name).await?;
    store.promote(&shadow.name, &live.name, &live.promotion(matches!(database, Database::Postgres(_)))).await?;
    println!("rebuilt {} in shadow tables and swapped them in: {total} events replayed", live.name);
    Ok(())
}

/// Whether projection `name` has moved the checkpoint of any of its `partitions`.
async fn has_checkpoints(store: &dyn ProjectionStore, name: &str, partitions: u32) -> Result<bool, Failure> {
    for partition in 0..partitions.max(1) {
        if store.checkpoint(name, partition).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs `projection` alone until it reaches the head as it was when the replay started,
/// showing progress; returns how many events that was. `options_of` names the configured
/// projection whose retry settings apply.
async fn replay(
    database: &Database,
    store: Arc<dyn ProjectionStore>,
    config: &Config,
    projection: Arc<dyn Projection>,
    options_of: &str,
) -> Result<u64, Failure> {
    let name = projection.name().to_owned();
    let filter = projection.filter();
    let events = database.events();
    let head = events.head().await?;
    let total = events.count(annal_eventstore::Position::START, head, &filter).await?;
    let running = ProjectionRunner::new(events.clone(), store)
        .lease(Duration::from_secs_f64(config.lease_seconds.max(0.1)))
        .with(projection, options_for(config, options_of))?
        .start();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let checkpoint = running.checkpoint(&name).await?;
        bar.set_position(total - events.count(checkpoint, head, &filter).await?.min(total));
        if checkpoint >= head || !running.is_running(&name)? {
            break;
        }
        let _ = running.wait_for(&name, head, Duration::from_millis(250)).await;
    }
    bar.finish();
    running.shutdown().await?;
    Ok(total)
}

async fn dead_letters(
    database: &Database,
    store: &dyn ProjectionStore,
    projections: Vec<Arc<dyn Projection>>,
    action: DeadLetterAction,
) -> Result<(), Failure> {
    match action {
        DeadLetterAction::List { projection } => {
            println!("{:>6} {:<36} {:<28} {:>8} {:>4}  error", "id", "event", "stream@version", "attempts", "part");
            for dead in store.dead_letters(&projection).await? {
                println!(
                    "{:>6} {:<36} {:<28} {:>8} {:>4}  {}",
                    dead.id,
                    dead.event_id,
                    format!("{}@{}", dead.stream, dead.version),
                    dead.attempts,
                    dead.partition,
                    dead.error
                );
            }
        }
        DeadLetterAction::Retry { projection, id } => {
            let projection = find(&projections, &projection)?;
            match retry_dead_letter(&*database.events(), store, &*projection, id).await? {
                crate::Applied::Committed => println!("dead letter {id} applied and removed"),
                crate::Applied::Moved => println!("dead letter {id} was already gone"),
                crate::Applied::Failed(error) => return Err(format!("dead letter {id} failed again: {error}").into()),
            }
        }
        DeadLetterAction::Skip { projection, id } => {
            skip_dead_letter(store, &projection, id).await?;
            println!("dead letter {id} removed without applying it");
        }
    }
    Ok(())
}
