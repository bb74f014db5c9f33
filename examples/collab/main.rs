//! Collaborative editing: fifty clients type into one shared document at once, and every one of
//! them ends with the same text as the server.
//!
//! A document is an aggregate whose stream version is its operation sequence: version 0 creates
//! it, version `n` is its `n`-th edit. A client applies its own edit at once (no waiting for the
//! server) and sends it with the version it last saw, its *base*. The repository orders edits:
//! each one is appended at the next version, and one made against an older base is first
//! transformed against every edit committed since (operational transformation). Every client
//! follows the document's stream through a subscription, and transforms what arrives against
//! its own edit still in flight, so its text converges to the server's.
//!
//! # The transformation rule
//!
//! `transform(a, b)` rewrites edit `a` so that it applies after `b`, both having been made on
//! the same text. Positions count characters.
//!
//! - insert vs insert: `a` moves right by `b`'s length if `b` inserts before it; at the same
//!   position the client with the lower id goes first;
//! - insert vs delete: `a` moves left by what `b` deleted before it; an insert strictly inside
//!   the deleted range is deleted with it (it becomes a no-op: *delete wins*);
//! - delete vs insert: `a` moves right past an insert before it, and grows to swallow an insert
//!   strictly inside it (the same rule from the other side);
//! - delete vs delete: `a` keeps only what `b` did not delete already.
//!
//! Applying `a` then `transform(b, a)` gives the same text as `b` then `transform(a, b)` (the
//! property called TP1, tested with proptest in `ot.rs`). With one edit in flight per client, TP1 is
//! all that convergence needs: the client transforms its edit against the same edits, in the
//! same order, as the server does. `docs/collab.md` explains the choice.
//!
//! The run prints the time from each edit's commit to its arrival at all fifty clients.
//!
//! ```text
//! cargo run --example collab            # 50 clients for 20 s, on SQLite
//! cargo test --test collab_ot            # the transformation's tests
//! cargo run --example collab -- --short # 50 clients for 2 s
//! DATABASE_URL=postgres://... cargo run --example collab --features postgres
//! ```

#[macro_use]
#[path = "../support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use annal::{Aggregate, Decide, Event, Filter, Position, Repository};
use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use support::{Rng, Store};
use tokio::sync::{Barrier, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use ot::{Edit, Op};

pub mod ot;

/// What happens to a document: created, then edited, one operation per version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum DocumentEvent {
    /// Version 0.
    Created { text: String },
    /// An edit as ordered by the server: already transformed to apply to the previous version.
    /// `base` is the version its client had seen, `seq` the client's own count of its edits.
    Edited { edit: Edit, base: u64, seq: u64 },
    /// An edit the server could not order (its base is unknown or too old, or it does not fit
    /// the text). It takes its version as a no-op, so that its client hears back; that client
    /// must reload.
    Refused { site: u32, seq: u64, reason: String },
}

/// How many recent edits a document keeps to transform late ones against. A client further
/// behind than this is refused and must reload.
const HISTORY: usize = 500;

/// A document's state: its text, its version, and its recent edits.
#[derive(Debug, Default, Clone, Serialize, Deserialize, Aggregate)]
#[aggregate(category = "document", event = DocumentEvent, snapshot(every = 100, version = 1))]
struct Document {
    created: bool,
    text: String,
    version: u64,
    /// The edits of versions `version - recent.len() + 1 ..= version`.
    recent: VecDeque<Edit>,
}

/// A client's edit, sent with the version it last saw.
#[derive(Debug, Clone)]
struct Submission {
    edit: Edit,
    base: u64,
    seq: u64,
}

#[derive(Debug, Clone)]
enum DocumentCommand {
    Create {
        text: String,
    },
    /// Orders edits, in the order given: one version each.
    Edit(Vec<Submission>),
}

#[derive(Debug, thiserror::Error)]
enum DocumentError {
    #[error("the document already exists")]
    AlreadyCreated,
    #[error("there is no such document")]
    NotCreated,
    #[error("version {base} is not written yet (the document is at {version})")]
    UnknownBase { base: u64, version: u64 },
    #[error("version {base} is too old to transform against (the oldest kept is {oldest}): reload")]
    TooOld { base: u64, oldest: u64 },
    #[error(transparent)]
    OutOfRange(#[from] ot::OutOfRange),
}

impl Document {
    /// A client's edit rewritten for the current version: transformed against every edit
    /// committed after its base, in order, and checked against the text.
    fn order(&self, Submission { edit, base, .. }: Submission) -> Result<Edit, DocumentError> {
        if base > self.version {
            return Err(DocumentError::UnknownBase { base, version: self.version });
        }
        let oldest = self.version - self.recent.len() as u64;
        if base < oldest {
            return Err(DocumentError::TooOld { base, oldest });
        }
        let since = self.recent.iter().skip((base - oldest) as usize);
        let edit = since.fold(edit, |edit, committed| ot::transform(&edit, committed));
        ot::apply(&mut self.text.clone(), &edit.op)?;
        Ok(edit)
    }
}

impl Decide for Document {
    type Command = DocumentCommand;
    type Error = DocumentError;

    fn handle(&self, command: DocumentCommand) -> Result<Vec<DocumentEvent>, DocumentError> {
        match command {
            DocumentCommand::Create { .. } if self.created => Err(DocumentError::AlreadyCreated),
            DocumentCommand::Create { text } => Ok(vec![DocumentEvent::Created { text }]),
            DocumentCommand::Edit(_) if !self.created => Err(DocumentError::NotCreated),
            DocumentCommand::Edit(submissions) => {
                // Each edit is ordered after the ones before it in the batch.
                let mut next = self.clone();
                let mut events = Vec::with_capacity(submissions.len());
                for submission in submissions {
                    let (site, seq, base) = (submission.edit.site, submission.seq, submission.base);
                    let event = match next.order(submission) {
                        Ok(edit) => DocumentEvent::Edited { edit, base, seq },
                        Err(refused) => DocumentEvent::Refused { site, seq, reason: refused.to_string() },
                    };
                    next.apply(&event);
                    events.push(event);
                }
                Ok(events)
            }
        }
    }

    fn apply(&mut self, event: &DocumentEvent) {
        let edit = match event {
            DocumentEvent::Created { text } => return (self.created, self.text) = (true, text.clone()),
            DocumentEvent::Edited { edit, .. } => edit.clone(),
            DocumentEvent::Refused { site, .. } => Edit { site: *site, op: Op::Noop },
        };
        // `order` checked that the edit fits; one from elsewhere that does not still takes its
        // version, so that versions stay right.
        let _ = ot::apply(&mut self.text, &edit.op);
        self.version += 1;
        self.recent.push_back(edit);
        if self.recent.len() > HISTORY {
            self.recent.pop_front();
        }
    }
}

const DOCUMENT: &str = "notes";
const CLIENTS: u32 = 50;
/// The most edits the server orders in one append.
const BATCH: usize = 64;

/// The server's side: takes the clients' edits in arrival order and orders them through the
/// repository, all the edits waiting at that moment in one command (one append). Through the
/// repository, so that two servers on one document would still be correct: the one that loses
/// the race reloads and orders its batch again.
async fn sequencer<S: Store>(
    documents: Repository<Document, S>,
    mut submissions: mpsc::Receiver<Submission>,
) -> anyhow::Result<Totals> {
    let mut totals = Totals::default();
    while let Some(first) = submissions.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH
            && let Ok(next) = submissions.try_recv()
        {
            batch.push(next);
        }
        let done = documents.execute(DOCUMENT, DocumentCommand::Edit(batch)).await?;
        totals.appends += 1;
        for committed in &done.events {
            totals.edits += 1;
            match &committed.event {
                DocumentEvent::Edited { edit, base, .. } => {
                    totals.transformed += u64::from(committed.version > base + 1);
                    totals.noops += u64::from(edit.op == Op::Noop);
                }
                DocumentEvent::Refused { site, reason, .. } => {
                    anyhow::bail!("client {site}'s edit was refused: {reason}")
                }
                DocumentEvent::Created { .. } => {}
            }
        }
    }
    Ok(totals)
}

/// What the server ordered.
#[derive(Debug, Default)]
struct Totals {
    edits: u64,
    appends: u64,
    transformed: u64,
    noops: u64,
}

/// What a client saw: its final text, and per edit that reached it, the version and the time
/// from the edit's commit to its arrival.
struct ClientReport {
    text: String,
    arrivals: Vec<(u64, Duration)>,
}

/// One client: applies its own edits at once, sends them to the server, and applies everyone's
/// edits as its subscription delivers them, transforming them against its own edit in flight.
async fn client<S: Store>(
    site: u32,
    store: S,
    server: mpsc::Sender<Submission>,
    ready: Arc<Barrier>,
    editing_for: Duration,
    quiet: mpsc::Sender<()>,
    mut last_version: watch::Receiver<Option<u64>>,
) -> anyhow::Result<ClientReport> {
    let mut events = store.subscribe(Position::START, Filter::categories([Document::CATEGORY]));
    let mut rng = Rng::new(u64::from(site));
    let rate = rng.uniform(0.5, 3.0);
    let (mut text, mut version) = (String::new(), None::<u64>);
    let mut in_flight: Option<(u64, Edit)> = None;
    let (mut seq, mut arrivals) = (0, Vec::new());
    let (mut deadline, mut next_edit) = (None::<Instant>, Instant::now());
    let mut told_quiet = false;
    loop {
        let editing = deadline.is_some_and(|d| Instant::now() < d);
        if !editing && deadline.is_some() && in_flight.is_none() && !told_quiet {
            told_quiet = true;
            quiet.send(()).await?;
        }
        if let (Some(last), Some(version)) = (*last_version.borrow(), version)
            && version >= last
        {
            anyhow::ensure!(in_flight.is_none(), "client {site} still has an edit in flight");
            return Ok(ClientReport { text, arrivals });
        }
        tokio::select! {
            recorded = events.next() => {
                let recorded = recorded.context("a subscription does not end")??;
                let arrival = (chrono::Utc::now() - recorded.recorded_at).to_std().unwrap_or_default();
                let edit = match DocumentEvent::from_recorded(&recorded)? {
                    DocumentEvent::Created { text: created } => {
                        (text, version) = (created, Some(recorded.version));
                        // Everyone starts editing once everyone has the document.
                        ready.wait().await;
                        let start = Instant::now();
                        deadline = Some(start + editing_for);
                        next_edit = start + Duration::from_secs_f64(rng.uniform(0.0, 1.0 / rate));
                        continue;
                    }
                    DocumentEvent::Edited { edit, seq: theirs, .. } => (edit, theirs),
                    DocumentEvent::Refused { site: theirs, seq, reason } if theirs == site => {
                        anyhow::bail!("client {site}'s edit {seq} was refused: {reason}")
                    }
                    DocumentEvent::Refused { site, seq, .. } => (Edit { site, op: Op::Noop }, seq),
                };
                arrivals.push((recorded.version, arrival));
                version = Some(recorded.version);
                match (in_flight.take(), edit) {
                    // Our own edit, ordered: the text has it already.
                    (Some((mine, _)), (edit, theirs)) if edit.site == site && theirs == mine => {}
                    (Some((mine, pending)), (edit, _)) => {
                        ot::apply(&mut text, &ot::transform(&edit, &pending).op)?;
                        in_flight = Some((mine, ot::transform(&pending, &edit)));
                    }
                    (None, (edit, _)) => ot::apply(&mut text, &edit.op)?,
                }
            }
            _ = tokio::time::sleep_until(next_edit), if editing && in_flight.is_none() => {
                let base = version.context("a client edits only once it has the document")?;
                let edit = Edit { site, op: random_op(&mut rng, text.chars().count()) };
                ot::apply(&mut text, &edit.op)?;
                seq += 1;
                in_flight = Some((seq, edit.clone()));
                server.send(Submission { edit, base, seq }).await?;
                next_edit = Instant::now() + Duration::from_secs_f64(rng.uniform(0.5, 1.5) / rate);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(next_edit)), if editing => {}
            changed = last_version.changed() => changed?,
        }
    }
}

/// A random edit on a text of `len` characters: mostly short inserts, some deletes.
fn random_op(rng: &mut Rng, len: usize) -> Op {
    let at = rng.below(len as u64 + 1) as usize;
    if len < 40 || rng.below(10) < 6 {
        let words = ["a", "the", "note", "edit", "sync", " ", "\n", "OT", "and"];
        Op::Insert { at, text: words[rng.below(words.len() as u64) as usize].to_owned() }
    } else {
        let at = at.min(len - 1);
        Op::Delete { at, len: 1 + rng.below(3.min(len - at) as u64) as usize }
    }
}

async fn run<S: Store>(store: S, _projections: support::Projections, _db: support::Db) -> anyhow::Result<()> {
    let editing_for = if support::short() { Duration::from_secs(2) } else { Duration::from_secs(20) };
    let documents = Repository::<Document, S>::new(store.clone());
    documents.execute(DOCUMENT, DocumentCommand::Create { text: "Shared notes\n".into() }).await?;
    println!("{CLIENTS} clients edit document {DOCUMENT:?} for {editing_for:?}, each at 0.5 to 3 edits per second");

    let (to_server, submissions) = mpsc::channel(1_024);
    let mut server = tokio::spawn(sequencer(documents.clone(), submissions));
    let ready = Arc::new(Barrier::new(CLIENTS as usize));
    let (quiet_tx, mut quiet) = mpsc::channel(CLIENTS as usize);
    let (last_version, watch_last) = watch::channel(None);
    let mut clients = JoinSet::new();
    for site in 1..=CLIENTS {
        let (store, to_server, ready) = (store.clone(), to_server.clone(), ready.clone());
        let (quiet, last) = (quiet_tx.clone(), watch_last.clone());
        let client = client(site, store, to_server, ready, editing_for, quiet, last);
        clients.spawn(async move { (site, client.await) });
    }
    drop((to_server, quiet_tx));

    // Once every client has stopped editing and heard back about its last edit, the server's
    // version is final; each client then reads up to it.
    let mut quiet_clients = 0;
    while quiet_clients < CLIENTS {
        tokio::select! {
            Some(()) = quiet.recv() => quiet_clients += 1,
            // No client ends before it is told the last version: this one failed.
            Some(joined) = clients.join_next() => {
                let (site, failed) = joined?;
                return Err(failed.err().unwrap_or_else(|| anyhow::anyhow!("client {site} stopped early")));
            }
            stopped = &mut server => {
                stopped??;
                anyhow::bail!("the server stopped early");
            }
        }
    }
    let document = documents.load(DOCUMENT).await?;
    let version = document.version.context("the document exists")?;
    last_version.send(Some(version))?;
    let mut reports = Vec::new();
    while let Some(joined) = clients.join_next().await {
        let (site, report) = joined?;
        reports.push((site, report.with_context(|| format!("client {site}"))?));
    }
    // The clients are gone, and with them the last senders: the server ends.
    let totals = server.await??;

    let per_second = totals.edits as f64 / editing_for.as_secs_f64();
    println!(
        "{} edits ordered ({per_second:.1}/s) in {} appends; {} made against an older version and transformed, \
         {} of these became no-ops",
        totals.edits, totals.appends, totals.transformed, totals.noops
    );
    anyhow::ensure!(totals.edits == version, "{} edits ordered, the document is at version {version}", totals.edits);
    for (site, report) in &reports {
        anyhow::ensure!(report.text == document.state.text, "client {site}'s text differs from the server's");
    }
    println!(
        "every client's text equals the server's: {} clients, {} characters at version {version}",
        reports.len(),
        document.state.text.chars().count()
    );
    // An edit has reached all clients when the last one has it.
    let mut at_all = vec![Duration::ZERO; version as usize + 1];
    let mut received = vec![0u32; version as usize + 1];
    for (_, report) in &reports {
        for &(v, latency) in &report.arrivals {
            at_all[v as usize] = at_all[v as usize].max(latency);
            received[v as usize] += 1;
        }
    }
    anyhow::ensure!(received[1..].iter().all(|&n| n == CLIENTS), "an edit did not reach every client exactly once");
    println!("commit to arrival at all {CLIENTS} clients: {}", support::distribution(at_all.split_off(1)));
    println!("  published: sync with remote users typically within 50-200 ms; collaboration friction above 300 ms");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    on_backend!("collab", run)
}
