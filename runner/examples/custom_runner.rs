//! Your own runner binary: Rust projections beside the configured SQL ones, with the same
//! command line as `annal-runner` (run, status, rebuild, dead-letters, migrate, check). Its
//! configuration, `custom_runner.toml` beside it, puts the database beside itself (a relative
//! SQLite path is relative to the configuration's directory).
//!
//! ```text
//! cargo run -p annal-runner --example custom_runner -- --config runner/examples/custom_runner.toml run
//! ```

use std::sync::Arc;

use annal_eventstore::{BoxError, Filter, RecordedEvent};
use annal_projections::{Dedup, Delivery, Projection, Tx};

/// Sends a (pretend) welcome email for every opened account: an effect outside the database,
/// so at-least-once, deduplicated by event id in memory.
struct WelcomeMails {
    sent: Dedup,
}

#[async_trait::async_trait]
impl Projection for WelcomeMails {
    fn name(&self) -> &str {
        "welcome_mails"
    }

    fn filter(&self) -> Filter {
        Filter::event_types(["AccountOpened"])
    }

    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn handle(&self, events: &[RecordedEvent], _tx: &mut Tx<'_>) -> Result<(), BoxError> {
        for event in events {
            if self.sent.first_time(event.id) {
                tracing::info!(account = %event.stream, "sending a welcome mail");
            }
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let projections: Vec<Arc<dyn Projection>> = vec![Arc::new(WelcomeMails { sent: Dedup::new(100_000) })];
    std::process::exit(annal_runner::main_with(projections).await);
}
