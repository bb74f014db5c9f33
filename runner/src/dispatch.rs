//! From a parsed command line to the command's work.
// Built without a backend, the runner can only refuse every URL.
#![cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(unreachable_code, unused_variables))]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use annal_projections::{Projection, ProjectionRunner, WorkerOptions};

use crate::args::{Cli, Command, DeadLetterAction};
use crate::config::Config;
use crate::database::{Access, Database, find};
use crate::{Error, Result, SqlProjection};

/// Runs one parsed command line.
pub(crate) async fn run(cli: Cli, extra: Vec<Arc<dyn Projection>>) -> Result<()> {
    let text = std::fs::read_to_string(&cli.config)
        .map_err(|source| Error::ReadConfig { path: cli.config.clone(), source })?;
    let text = crate::config::substitute_env(&text, |name| std::env::var(name).ok())
        .map_err(|source| Error::ConfigFile { path: cli.config.clone(), source: Box::new(source) })?;
    let config = Config::parse(&text)
        .map_err(|source| Error::ConfigFile { path: cli.config.clone(), source: Box::new(source) })?;
    let sql: Vec<SqlProjection> = config.projections.iter().map(SqlProjection::new).collect::<Result<_>>()?;
    let setup: Vec<String> = config.projections.iter().flat_map(|p| p.setup.clone()).collect();
    let mut projections: Vec<Arc<dyn Projection>> = Vec::new();
    let access = access(&cli.command);
    let database = Database::connect(&config.database, &config_dir(&cli.config)?, access).await?;
    let store = database.projection_store(access).await?;
    match cli.command {
        Command::Check => {
            // Against the tables as they are (`migrate` runs the setup statements): a
            // read-only role can check.
            database.check(&[], &sql, false).await?;
            out!("configuration and SQL are valid: {} projection(s)", config.projections.len());
        }
        Command::Migrate => {
            database.check(&setup, &sql, true).await?;
            database.install(&sql).await;
            out!("tables are up to date");
        }
        Command::Run { only, listen } => {
            // Before anything runs: a SIGTERM from now on is a graceful shutdown.
            let stop = crate::serve::shutdown_signal();
            database.check(&setup, &sql, true).await?;
            database.install(&sql).await;
            projections.extend(sql.into_iter().map(|p| Arc::new(p) as Arc<dyn Projection>));
            projections.extend(extra);
            if !only.is_empty() {
                for name in &only {
                    find(&projections, name)?;
                }
                projections.retain(|p| only.iter().any(|name| name == p.name()));
            }
            let mut runner = ProjectionRunner::new(database.events(), store.clone())
                .owner(owner_name())
                .lease(Duration::from_secs_f64(config.lease_seconds));
            for projection in &projections {
                runner = runner.with(projection.clone(), options_for(&config, projection.name()))?;
            }
            let running = Arc::new(runner.start());
            let observed = crate::observe::Observed {
                database: database.clone(),
                store: store.clone(),
                running: running.clone(),
                projections: projections
                    .iter()
                    .map(|p| (p.name().to_owned(), p.filter(), p.partitions().max(1)))
                    .collect(),
                health: config.health.clone(),
                handlers: projections.clone(),
                token: config.console_token.clone(),
            };
            crate::serve::serve(listen.as_deref().unwrap_or(&config.listen), observed, stop).await?;
            let running = Arc::try_unwrap(running).map_err(|_| Error::StillServing)?;
            running.shutdown().await?;
        }
        Command::Status { projection, json, watch } => {
            let options = crate::status::StatusOptions { projection, json, watch };
            crate::status::status(&database, &*store, &config, &extra, options).await?
        }
        Command::Streams { category } => crate::browse::streams(&database, category.as_deref()).await?,
        Command::Read { stream, from, limit } => crate::browse::read(&database, &stream, from, limit).await?,
        Command::Tail { filter, from_start } => crate::browse::tail(&database, &filter, from_start).await?,
        Command::Rebuild { name, in_place } => {
            let configured = config.projections.iter().find(|p| p.name == name);
            match configured.and_then(|p| Some((p, p.shadow()?))) {
                Some((live, shadow)) if !in_place => {
                    crate::rebuild::rebuild_in_shadow(&database, store, &config, live, &shadow).await?
                }
                _ => {
                    let projections = sql.into_iter().map(|p| Arc::new(p) as _).chain(extra).collect::<Vec<_>>();
                    let projection = find(&projections, &name)?;
                    let reset = match configured {
                        Some(p) if p.reset.is_empty() => {
                            return Err(Error::Config(format!(
                                "projection {name} has no `reset` statements: an in-place rebuild would forget its \
                                 checkpoints but keep its rows, and every replayed event would meet its old row. Add \
                                 `reset = [\"DELETE FROM ...\"]` to its configuration, or rebuild it in shadow tables \
                                 (list its `tables` and leave out --in-place)"
                            )));
                        }
                        Some(p) => p.reset.clone(),
                        None => {
                            tracing::warn!(projection = %name, "a Rust projection has no reset statements the runner \
                                knows of: its read model is not emptied, so its handler must take a replay");
                            Vec::new()
                        }
                    };
                    crate::rebuild::rebuild_in_place(&database, store, &config, projection, &reset).await?;
                }
            }
        }
        Command::Pause { name, reason } => {
            find_name(&config, &extra, &name)?;
            crate::control::pause(&*store, &name, &reason, lease(&config)).await?
        }
        Command::Resume { name } => {
            find_name(&config, &extra, &name)?;
            crate::control::resume(&*store, &name).await?
        }
        Command::Reset { name, to, to_time, allow_replay } => {
            let projections = sql.into_iter().map(|p| Arc::new(p) as _).chain(extra).collect::<Vec<_>>();
            let projection = find(&projections, &name)?;
            let target = match (to, to_time) {
                (Some(position), _) => crate::control::Target::Position(position),
                (None, Some(time)) => crate::control::Target::Time(time),
                (None, None) => return Err(Error::Config("give --to POSITION or --to-time RFC3339".into())),
            };
            crate::control::reset_to(database.events(), &*store, &*projection, target, allow_replay, lease(&config))
                .await?
        }
        Command::DeadLetters { action } => {
            crate::dead_letters::dead_letters(
                &database,
                &*store,
                sql.into_iter().map(|p| Arc::new(p) as _).chain(extra).collect(),
                action,
            )
            .await?
        }
    }
    Ok(())
}

/// The configured lease period.
pub(crate) fn lease(config: &Config) -> Duration {
    Duration::from_secs_f64(config.lease_seconds)
}

/// Refuses a name that is neither a configured nor a built-in projection.
fn find_name(config: &Config, extra: &[Arc<dyn Projection>], name: &str) -> Result<()> {
    let known = config.projections.iter().any(|p| p.name == name) || extra.iter().any(|p| p.name() == name);
    if known { Ok(()) } else { Err(Error::UnknownProjection(name.to_owned())) }
}

/// What `command` may do to the database: only `migrate` and `run` migrate, and only they,
/// `rebuild`, `pause`, `resume`, `reset` and the dead-letter commands that change something
/// write.
fn access(command: &Command) -> Access {
    match command {
        Command::Migrate | Command::Run { .. } => Access::Migrate,
        Command::Rebuild { .. }
        | Command::Pause { .. }
        | Command::Resume { .. }
        | Command::Reset { .. }
        | Command::DeadLetters { action: DeadLetterAction::Retry { .. } | DeadLetterAction::Skip { .. } } => {
            Access::Write
        }
        Command::Check
        | Command::Status { .. }
        | Command::Streams { .. }
        | Command::Read { .. }
        | Command::Tail { .. }
        | Command::DeadLetters { action: DeadLetterAction::List { .. } | DeadLetterAction::Show { .. } } => {
            Access::ReadOnly
        }
    }
}

/// The configuration file's directory, absolute: relative SQLite paths are taken from there.
fn config_dir(config: &Path) -> Result<PathBuf> {
    let dir = config.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::path::absolute(dir).map_err(|source| Error::ReadConfig { path: config.to_owned(), source })
}

/// This runner's name in leases: host name, pid and a random suffix (in containers every pid
/// is 1, and a restarted process may get its predecessor's pid).
pub(crate) fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &suffix[..8])
}

/// The worker options a configured projection asks for (defaults for Rust projections).
pub(crate) fn options_for(config: &Config, name: &str) -> WorkerOptions {
    let Some(p) = config.projections.iter().find(|p| p.name == name) else { return WorkerOptions::default() };
    let retry = annal_projections::RetryPolicy::default()
        .attempts(p.retry_attempts)
        .initial(Duration::from_millis(p.retry_initial_ms));
    WorkerOptions::default().retry(retry).on_failure(p.on_failure.into())
}
