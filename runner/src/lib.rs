//! `annal-runner`: runs Annal projections and lets operators inspect and control them, as a
//! binary and as a library to build your own runner binary with Rust projections beside the
//! configured SQL ones, with the same commands.
//!
//! ```no_run
//! # async fn example() {
//! // src/main.rs of your own runner:
//! let rust_projections = vec![/* Arc<dyn Projection> */];
//! std::process::exit(annal_runner::main_with(rust_projections).await);
//! # }
//! ```
//!
//! | feature    | default | databases                         |
//! |------------|---------|-----------------------------------|
//! | `sqlite`   | yes     | `sqlite://` URLs, SQLite built in |
//! | `postgres` |         | `postgres://` URLs                |
//!
//! With the `opentelemetry` feature, [`main_with_tracer`] exports spans too.
//!
//! Running it in production: `docs/runner.md`.
#![cfg_attr(docsrs, feature(doc_cfg))]

/// `println!` that returns [`Error::Output`] instead of panicking when standard output is gone
/// (`annal-runner dead-letters list x | head`): the command then ends quietly.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err($crate::Error::Output)?
    }};
}

mod args;
mod browse;
mod compile;
mod config;
mod console;
mod control;
mod database;
mod dead_letters;
mod dispatch;
mod error;
mod lexer;
mod metrics;
mod observe;
mod progress;
mod rebuild;
mod serve;
mod shadow;
mod sql_projection;
mod status;

use std::sync::Arc;

use annal_projections::Projection;
use clap::Parser;

#[doc(inline)]
pub use crate::args::{Cli, Command, DeadLetterAction, LogFormat};
#[doc(inline)]
pub use crate::compile::{PARAMETERS, Statement, compile};
#[doc(inline)]
pub use crate::config::{Config, HealthConfig, OnFailureConfig, SqlProjectionConfig, substitute_env};
pub(crate) use crate::dispatch::options_for;
#[doc(inline)]
pub use crate::error::{Error, Result};
#[doc(inline)]
pub use crate::shadow::{SHADOW_SUFFIX, shadow_sql};
#[doc(inline)]
pub use crate::sql_projection::SqlProjection;

/// Runs the command line with `extra` Rust projections beside the configured SQL ones, and
/// returns the process exit code.
pub async fn main_with(extra: Vec<Arc<dyn Projection>>) -> i32 {
    let cli = Cli::parse();
    init_logs(cli.log, None);
    run(cli, extra).await
}

/// [`main_with`], exporting spans through `tracer` as well as logging: the `batch` spans of the
/// workers (linked to the spans that appended their events) and the store's `annal.append`
/// spans, filtered by `RUST_LOG` as the logs are. Build the tracer from the exporter of your
/// choice (OTLP, for example) and shut its provider down after this returns, so that the last
/// spans are sent.
///
/// ```no_run
/// # async fn example(tracer: opentelemetry_sdk::trace::Tracer, provider: opentelemetry_sdk::trace::SdkTracerProvider) {
/// let code = annal_runner::main_with_tracer(vec![], tracer).await;
/// let _ = provider.shutdown();
/// std::process::exit(code);
/// # }
/// ```
#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub async fn main_with_tracer<T>(extra: Vec<Arc<dyn Projection>>, tracer: T) -> i32
where
    T: opentelemetry::trace::Tracer + Send + Sync + 'static,
    T::Span: Send + Sync,
{
    use tracing_subscriber::Layer;
    let cli = Cli::parse();
    init_logs(cli.log, Some(tracing_opentelemetry::layer().with_tracer(tracer).boxed()));
    run(cli, extra).await
}

async fn run(cli: Cli, extra: Vec<Arc<dyn Projection>>) -> i32 {
    match dispatch::run(cli, extra).await {
        Ok(()) => 0,
        // A reader that went away (`| head`) is no failure.
        Err(Error::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(error) => {
            eprintln!("annal-runner: {}", error.report());
            1
        }
    }
}

/// Logs to standard error: `RUST_LOG`, or `info` without PostgreSQL's notices (every
/// `CREATE TABLE IF NOT EXISTS` of a migration sends one); colours only on a terminal. `traces`
/// (an OpenTelemetry layer) sees the same spans the filter lets through.
fn init_logs(format: LogFormat, traces: Option<BoxedLayer>) {
    use std::io::IsTerminal;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Human => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let _ = tracing_subscriber::registry().with(logs.and_then(traces).with_filter(filter)).try_init();
}

type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
