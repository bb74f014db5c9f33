//! The command line: its arguments and commands.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Runs projections and lets operators inspect and control them.
#[derive(Debug, Parser)]
#[command(name = "annal-runner", version, about)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, short, env = "ANNAL_CONFIG", default_value = "annal.toml", global = true)]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value = "human", global = true)]
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
    /// Run the projections until SIGINT or SIGTERM, serving /health, /metrics and the console.
    Run {
        /// Run only these projections (repeat the option for several).
        #[arg(long, value_name = "NAME")]
        only: Vec<String>,
        /// Serve HTTP here instead of the configuration's `listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Print every projection partition's checkpoint, lag, dead letters and lease.
    Status {
        /// Only this projection (and its rebuild, if one is in progress).
        projection: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Print again every SECONDS (default 2) until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// List the streams, by category, with their event counts.
    Streams {
        /// Only streams of this category.
        #[arg(long)]
        category: Option<String>,
    },
    /// Print a stream's events, one JSON object per line.
    Read {
        /// The stream, such as `account-42`.
        stream: String,
        /// The first version to print.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Follow the global log, one JSON object per line, until interrupted.
    Tail {
        /// Only events of streams of this category (repeat for several).
        #[arg(long, value_name = "CATEGORY")]
        filter: Vec<String>,
        /// Start at the first event instead of the head.
        #[arg(long)]
        from_start: bool,
    },
    /// Replay a projection from the first event, with progress. A SQL projection that lists
    /// its `tables` is rebuilt into shadow tables while the live read model keeps serving, then
    /// swapped in; others (or with `--in-place`) are emptied and replayed in place, taking the
    /// projection over from the runners (paused meanwhile, resumed after; one that was paused
    /// stays paused). An interrupted shadow rebuild resumes where it stopped; an interrupted
    /// in-place one leaves the projection paused.
    Rebuild {
        /// The projection.
        name: String,
        /// Empty the live read model and replay into it, even if shadow tables are possible.
        #[arg(long)]
        in_place: bool,
    },
    /// Pause a projection: every runner lets go of its partitions on its next lease round
    /// (within a lease period) and takes none until `resume`. Waits until none holds one.
    Pause {
        /// The projection.
        name: String,
        /// Why, shown by `status` and the console.
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
    },
    /// Resume a paused projection: runners take its partitions on their next lease round.
    Resume {
        /// The projection.
        name: String,
    },
    /// Move every partition's checkpoint of a projection to a position or a time, taking it
    /// over from the runners meanwhile. Forward skips events (their count is printed; dead
    /// letters in the range stay). Backward replays events already applied, so it is refused
    /// unless --allow-replay (every handler must then be idempotent); dead letters after the
    /// new position are removed, as the replay meets their events again.
    Reset {
        /// The projection.
        name: String,
        /// The position, `transaction/sequence` as `status` prints it.
        #[arg(long, value_name = "POSITION", required_unless_present = "to_time", conflicts_with = "to_time")]
        to: Option<annal_eventstore::Position>,
        /// Just before the first event recorded at or after this RFC 3339 time.
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        to_time: Option<chrono::DateTime<chrono::Utc>>,
        /// Allow moving a checkpoint back (replaying events whose effects are in the read
        /// model): only for idempotent handlers.
        #[arg(long)]
        allow_replay: bool,
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
    /// Show one dead letter: its event (type, payload, metadata), error, attempts and when it
    /// was parked.
    Show {
        /// The projection.
        projection: String,
        /// The dead letter's id.
        id: i64,
    },
    /// Apply dead letters' events again (exactly once) and remove them: one by id, `--all`,
    /// or those of `--stream`, oldest first.
    Retry {
        /// The projection.
        projection: String,
        /// The dead letter's id.
        #[arg(required_unless_present_any = ["all", "stream"], conflicts_with_all = ["all", "stream"])]
        id: Option<i64>,
        /// Every dead letter of the projection.
        #[arg(long, conflicts_with = "stream")]
        all: bool,
        /// Every dead letter of this stream.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Remove a dead letter without applying it. Any dead letter can be skipped, in any order;
    /// later events of its stream that were parked behind it stay parked, and can be retried
    /// once no older dead letter of the stream is left (retry goes oldest first).
    Skip {
        /// The projection.
        projection: String,
        /// The dead letter's id.
        id: i64,
    },
}

/// An RFC 3339 time, such as `2026-12-02T07:00:00Z`.
fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e}: expected an RFC 3339 time such as 2026-12-02T07:00:00Z"))
}
