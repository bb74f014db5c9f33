//! The runner's one error type: what can stop a command.

use std::path::PathBuf;

use annal_eventstore::BoxError;

/// `Result` with the runner's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop a runner command. [`Error::report`] gives the message with its causes, as the
/// command line prints it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file could not be read.
    #[error("cannot read the configuration {}", path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file was read but is not valid; the source says why.
    #[error("{}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        #[source]
        source: Box<Error>,
    },
    /// A configuration breaks a rule (the message names it).
    #[error("{0}")]
    Config(String),
    /// A handler statement uses a parameter that does not exist.
    #[error("unknown parameter :{name}; the parameters are :{}", crate::PARAMETERS.join(", :"))]
    UnknownParameter {
        /// The parameter, without its colon.
        name: String,
    },
    /// A handler statement of a SQL projection is wrong; the source says how.
    #[error("projection {projection:?}, handler {event_type:?}")]
    Handler {
        /// The projection.
        projection: String,
        /// The event type the statement handles.
        event_type: String,
        /// What is wrong with it (an unknown parameter, or the database's verdict on the SQL).
        #[source]
        source: BoxError,
    },
    /// The database URL names a backend this runner was not built with.
    #[error("database {0:?}: this runner was built without its backend (features `postgres`, `sqlite`)")]
    UnsupportedDatabase(String),
    /// No projection with this name is configured or built in.
    #[error("no projection named {0:?}")]
    UnknownProjection(String),
    /// `read` named a stream that has no events.
    #[error("no stream named {0:?}")]
    UnknownStream(String),
    /// A command-line argument is out of its range (the message names it).
    #[error("{0}")]
    InvalidArgument(String),
    /// `dead-letters retry` of several dead letters: some failed again or could not be retried
    /// (each is reported on standard output); they stay parked.
    #[error("{failed} of {total} dead letters are still parked")]
    StillParked {
        /// How many were not applied.
        failed: usize,
        /// How many were retried.
        total: usize,
    },
    /// A retried dead letter failed again (it stays parked).
    #[error("dead letter {id} failed again")]
    DeadLetterFailed {
        /// The dead letter.
        id: i64,
        /// The handler's error.
        #[source]
        source: BoxError,
    },
    /// The HTTP address could not be bound.
    #[error("cannot listen on {address}")]
    Listen {
        /// The address configured.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
    /// The HTTP server did not let go of the running projections at shutdown.
    #[error("the HTTP server still holds the runner")]
    StillServing,
    /// Standard output could not be written (a closed pipe ends the command quietly).
    #[error("cannot write to standard output")]
    Output(#[source] std::io::Error),
    /// The database could not be reached or opened; `target` names the host or file.
    #[error("cannot connect to {target}")]
    Connect {
        /// The host and port, or the file.
        target: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The database's tables are missing or older than this runner's (a command other than
    /// `migrate` and `run`, which never migrates); the source names the missing migrations.
    #[error("{target} is not set up for this runner (tables missing or older); run `annal-runner migrate` first")]
    NotMigrated {
        /// The database, or the projection store.
        target: String,
        /// The missing migrations.
        #[source]
        source: BoxError,
    },
    /// The SQLite file does not exist (a command other than `migrate` and `run`, which create
    /// it); a relative path is relative to the configuration file's directory.
    #[error(
        "SQLite database {} does not exist (a relative path is relative to the configuration file's directory); \
         run `annal-runner migrate` to create it",
        file.display()
    )]
    NoDatabase {
        /// The file, as resolved.
        file: PathBuf,
    },
    /// The configuration names an environment variable that is not set.
    #[error("line {line}: environment variable {name} is not set")]
    MissingEnv {
        /// The variable.
        name: String,
        /// The line of the configuration naming it.
        line: usize,
    },
    /// The metrics recorder could not be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    /// A rebuild or reset that took a projection over failed part way: the projection is left
    /// paused, so that no runner applies events on top of a half-done change.
    #[error(
        "{why}. {projection} is left paused: fix the cause and run the command again, or `annal-runner resume \
         {projection}` to let the runners carry on from its checkpoints as they are"
    )]
    Takeover {
        /// The projection.
        projection: String,
        /// What failed.
        why: String,
    },
    /// The command was interrupted (SIGINT or SIGTERM).
    #[error("interrupted")]
    Interrupted,
    /// Running the projections failed.
    #[error(transparent)]
    Projections(#[from] annal_projections::Error),
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] annal_eventstore::Error),
    /// A statement of the configuration (setup, reset, a rebuild's swap) failed in the database.
    #[error(transparent)]
    Database(BoxError),
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        Error::Database(Box::new(error))
    }
}

impl Error {
    /// The message followed by its chain of causes, each once: what the command line prints
    /// ("database error" alone says nothing about what to fix).
    pub fn report(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // Some errors repeat their source in their own message.
            if !message.contains(&cause_text) {
                message.push_str(": ");
                message.push_str(&cause_text);
            }
            source = cause.source();
        }
        message
    }
}
