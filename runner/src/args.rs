//! The command line: its arguments and commands.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
