//! A runner whose Rust projections have an effect outside the database (a line appended to a
//! file per event, as a mail or a call to another service would be): one at-least-once, one
//! at-most-once, to show what each mode promises when the process is killed mid-batch.
//!
//! ```text
//! ANNAL_EFFECTS=/tmp/effects cargo run -p annal-runner --example side_effects -- --config annal.toml run
//! ```
//!
//! Each projection appends `<event id>\n` to `$ANNAL_EFFECTS/<projection>.log`. With
//! `ANNAL_HOLD=1`, a handler stops after the first event of each batch the first time it sees
//! that batch (leaving `held-<event id>` in the directory) and waits forever: a crash window
//! that `runner/tests/delivery.rs` kills the process in, deterministically.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use annal_eventstore::{BoxError, Filter, RecordedEvent};
use annal_projections::{Delivery, Projection, Tx};

/// Appends one line per event it is handed, in a file of its own.
struct Effects {
    name: &'static str,
    delivery: Delivery,
    dir: PathBuf,
    hold: bool,
}

impl Effects {
    fn effect(&self, event: &RecordedEvent) -> Result<(), BoxError> {
        let mut log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{}.log", self.name)))?;
        // One write per line: a kill -9 leaves whole lines (the kernel keeps what was written).
        log.write_all(format!("{}\n", event.id).as_bytes())?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Projection for Effects {
    fn name(&self) -> &str {
        self.name
    }

    fn filter(&self) -> Filter {
        Filter::categories(["account"])
    }

    fn delivery(&self) -> Delivery {
        self.delivery
    }

    fn batch_size(&self) -> usize {
        10
    }

    async fn handle(&self, events: &[RecordedEvent], _tx: &mut Tx<'_>) -> Result<(), BoxError> {
        // At-least-once: an event may come again after a crash; a real handler makes its effect
        // idempotent by the event id (the receiver deduplicates, or the effect is a keyed upsert).
        // At-most-once: an event whose batch was cut short by a crash never comes again.
        for (i, event) in events.iter().enumerate() {
            self.effect(event)?;
            let held = self.dir.join(format!("held-{}-{}", self.name, events[0].id));
            if i == 0 && self.hold && !held.exists() {
                std::fs::write(&held, b"")?;
                std::future::pending::<()>().await;
            }
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let dir = PathBuf::from(std::env::var_os("ANNAL_EFFECTS").unwrap_or_else(|| ".".into()));
    let hold = std::env::var_os("ANNAL_HOLD").is_some();
    let projections: Vec<Arc<dyn Projection>> = vec![
        Arc::new(Effects { name: "at_least_once", delivery: Delivery::AtLeastOnce, dir: dir.clone(), hold }),
        Arc::new(Effects { name: "at_most_once", delivery: Delivery::AtMostOnce, dir, hold }),
    ];
    std::process::exit(annal_runner::main_with(projections).await);
}
