//! Instant messaging on the embedded SQLite store. A conversation is an aggregate: only its
//! members may write in it, and reading marks every message up to one as read. Two exactly-once
//! projections keep SQL read models in the same file: each conversation's timeline with a
//! delivery and read receipt per recipient, and unread counts per user. Grace goes offline,
//! messages pile up and her unread count grows; she reconnects, catches up from her timeline,
//! reads everything, and her count is back to 0.
//!
//! ```text
//! cargo run --example chat --features projections
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use annal::projections::{Projection, ProjectionRunner, RunningProjections, SqliteProjectionStore, Tx, WorkerOptions};
use annal::{
    Aggregate, BoxError, CommandError, Decide, Event, Executed, Filter, RecordedEvent, Repository, SqliteEventStore,
};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum ChatEvent {
    ConversationStarted { members: Vec<String> },
    MessageSent { message_id: u32, from: String, to: Vec<String>, text: String },
    MessageDelivered { message_id: u32, to: String },
    MessageRead { message_id: u32, by: String },
}

/// A conversation's state: its members, who sent each message (message `n` at index `n - 1`),
/// and per member the last message delivered to them and the last they read.
#[derive(Debug, Default, Clone, Aggregate)]
#[aggregate(category = "conversation", event = ChatEvent)]
struct Conversation {
    members: Vec<String>,
    senders: Vec<String>,
    delivered: HashMap<String, u32>,
    read: HashMap<String, u32>,
}

#[derive(Debug, Clone)]
enum ChatCommand {
    Start {
        members: Vec<String>,
    },
    Send {
        from: String,
        text: String,
    },
    /// A member's phone received every message up to this one.
    Receive {
        by: String,
        up_to: u32,
    },
    /// A member read every message up to this one (which also delivers them).
    Read {
        by: String,
        up_to: u32,
    },
}

#[derive(Debug, thiserror::Error)]
enum ChatError {
    #[error("the conversation has already started")]
    AlreadyStarted,
    #[error("{0} is not a member of this conversation")]
    NotAMember(String),
    #[error("there is no message {0}")]
    NoSuchMessage(u32),
}

impl Conversation {
    /// The messages others sent after `by`'s mark, up to `up_to`.
    fn after(&self, mark: &HashMap<String, u32>, by: &str, up_to: u32) -> impl Iterator<Item = u32> {
        (mark.get(by).map_or(1, |last| last + 1)..=up_to).filter(move |id| self.senders[*id as usize - 1] != by)
    }
}

impl Decide for Conversation {
    type Command = ChatCommand;
    type Error = ChatError;

    fn handle(&self, command: ChatCommand) -> Result<Vec<ChatEvent>, ChatError> {
        use {ChatCommand::*, ChatEvent::*};
        let reading = matches!(command, Read { .. });
        match command {
            Start { .. } if !self.members.is_empty() => Err(ChatError::AlreadyStarted),
            Start { members } => Ok(vec![ConversationStarted { members }]),
            Send { from: who, .. } | Receive { by: who, .. } | Read { by: who, .. } if !self.members.contains(&who) => {
                Err(ChatError::NotAMember(who))
            }
            Send { from, text } => {
                let to = self.members.iter().filter(|m| **m != from).cloned().collect();
                Ok(vec![MessageSent { message_id: self.senders.len() as u32 + 1, from, to, text }])
            }
            Receive { up_to, .. } | Read { up_to, .. } if up_to as usize > self.senders.len() => {
                Err(ChatError::NoSuchMessage(up_to))
            }
            Receive { by, up_to } | Read { by, up_to } => {
                let delivered = self
                    .after(&self.delivered, &by, up_to)
                    .map(|id| MessageDelivered { message_id: id, to: by.clone() });
                let read = self
                    .after(&self.read, &by, up_to)
                    .filter(|_| reading)
                    .map(|id| MessageRead { message_id: id, by: by.clone() });
                Ok(delivered.chain(read).collect())
            }
        }
    }

    fn apply(&mut self, event: &ChatEvent) {
        match event {
            ChatEvent::ConversationStarted { members } => self.members.clone_from(members),
            ChatEvent::MessageSent { from, .. } => self.senders.push(from.clone()),
            ChatEvent::MessageDelivered { message_id, to } => _ = self.delivered.insert(to.clone(), *message_id),
            ChatEvent::MessageRead { message_id, by } => _ = self.read.insert(by.clone(), *message_id),
        }
    }
}

const READ_MODELS: [&str; 3] = [
    "CREATE TABLE chat_messages (conversation TEXT, message_id INTEGER, sender TEXT, body TEXT,
        PRIMARY KEY (conversation, message_id))",
    "CREATE TABLE chat_receipts (conversation TEXT, message_id INTEGER, recipient TEXT,
        delivered BOOLEAN NOT NULL DEFAULT FALSE, read BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (conversation, message_id, recipient))",
    "CREATE TABLE chat_unread (member TEXT, conversation TEXT, unread INTEGER, PRIMARY KEY (member, conversation))",
];

/// Each conversation's messages in order, with a receipt per recipient.
struct Timelines;

#[annal::async_trait]
impl Projection for Timelines {
    fn name(&self) -> &str {
        "chat_timelines"
    }
    fn filter(&self) -> Filter {
        Filter::categories([Conversation::CATEGORY])
    }
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        let conn = tx.sqlite().ok_or("the timelines live in the SQLite store")?;
        for recorded in events {
            let conversation = recorded.stream.id().unwrap_or_default();
            let (message_id, recipient, read) = match ChatEvent::from_recorded(recorded)? {
                ChatEvent::ConversationStarted { .. } => continue,
                ChatEvent::MessageSent { message_id, from, to, text } => {
                    let insert = sqlx::query("INSERT INTO chat_messages VALUES (?, ?, ?, ?)");
                    insert.bind(conversation).bind(message_id).bind(from).bind(text).execute(&mut *conn).await?;
                    for recipient in to {
                        let insert = sqlx::query("INSERT INTO chat_receipts VALUES (?, ?, ?, FALSE, FALSE)");
                        insert.bind(conversation).bind(message_id).bind(recipient).execute(&mut *conn).await?;
                    }
                    continue;
                }
                ChatEvent::MessageDelivered { message_id, to } => (message_id, to, false),
                ChatEvent::MessageRead { message_id, by } => (message_id, by, true),
            };
            let update = sqlx::query(
                "UPDATE chat_receipts SET delivered = TRUE, read = read OR ?4
                 WHERE conversation = ?1 AND message_id = ?2 AND recipient = ?3",
            );
            update.bind(conversation).bind(message_id).bind(recipient).bind(read).execute(&mut *conn).await?;
        }
        Ok(())
    }
}

/// Unread messages per member and conversation. A selective consumer: it skips deliveries.
struct UnreadCounts;

#[annal::async_trait]
impl Projection for UnreadCounts {
    fn name(&self) -> &str {
        "unread_counts"
    }
    fn filter(&self) -> Filter {
        let wanted = ["ConversationStarted", "MessageSent", "MessageRead"];
        Filter::categories([Conversation::CATEGORY]).with_event_types(wanted)
    }
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        let conn = tx.sqlite().ok_or("the unread counts live in the SQLite store")?;
        for recorded in events {
            let conversation = recorded.stream.id().unwrap_or_default();
            let (members, change) = match ChatEvent::from_recorded(recorded)? {
                ChatEvent::ConversationStarted { members } => (members, 0),
                ChatEvent::MessageSent { to, .. } => (to, 1),
                ChatEvent::MessageRead { by, .. } => (vec![by], -1),
                ChatEvent::MessageDelivered { .. } => continue,
            };
            for member in members {
                let upsert = sqlx::query(
                    "INSERT INTO chat_unread VALUES (?, ?, ?)
                     ON CONFLICT (member, conversation) DO UPDATE SET unread = unread + excluded.unread",
                );
                upsert.bind(member).bind(conversation).bind(change).execute(&mut *conn).await?;
            }
        }
        Ok(())
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

/// The chat service: commands on the write side, queries on the read models.
struct Chat {
    conversations: Repository<Conversation, SqliteEventStore>,
    projections: RunningProjections,
    db: SqlitePool,
}

impl Chat {
    /// Runs a command, then waits until both read models have applied it: read your writes.
    async fn run(&self, conversation: &str, command: ChatCommand) -> anyhow::Result<Executed<Conversation>> {
        let done = self.conversations.execute(conversation, command).await?;
        if let Some(position) = done.position() {
            for projection in ["chat_timelines", "unread_counts"] {
                self.projections.wait_for(projection, position, PATIENCE).await?;
            }
        }
        Ok(done)
    }

    /// Sends a message; the recipients who are online read it at once.
    async fn send(&self, conversation: &str, from: &str, text: &str, online: &[&str]) -> anyhow::Result<()> {
        let done = self.run(conversation, ChatCommand::Send { from: from.into(), text: text.into() }).await?;
        let Some(ChatEvent::MessageSent { message_id, to, .. }) = done.events.first().map(|c| &c.event) else {
            anyhow::bail!("a message was expected");
        };
        for by in to.iter().filter(|to| online.contains(&to.as_str())) {
            self.run(conversation, ChatCommand::Read { by: by.clone(), up_to: *message_id }).await?;
        }
        let message = format!("{conversation} #{message_id} {from}: {text}");
        println!("  {message:<46} unread: {}", self.unread().await?);
        Ok(())
    }

    /// Every user's unread count, from the read model.
    async fn unread(&self) -> anyhow::Result<String> {
        let sql = "SELECT member, SUM(unread) FROM chat_unread GROUP BY member ORDER BY member";
        let counts: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(&self.db).await?;
        Ok(counts.iter().map(|(member, count)| format!("{member} {count}")).collect::<Vec<_>>().join(", "))
    }

    /// A conversation's timeline from the read model, with receipts; only what `unread_by` has
    /// not read, if given.
    async fn timeline(&self, conversation: &str, unread_by: Option<&str>) -> anyhow::Result<Vec<String>> {
        let rows: Vec<(u32, String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT message_id, sender, body, COUNT(*), SUM(delivered), SUM(read) FROM chat_messages
             JOIN chat_receipts USING (conversation, message_id) WHERE conversation = ?1 GROUP BY message_id
             HAVING ?2 IS NULL OR SUM(recipient = ?2 AND NOT read) > 0 ORDER BY message_id",
        )
        .bind(conversation)
        .bind(unread_by)
        .fetch_all(&self.db)
        .await?;
        let line = |(id, from, text, to, delivered, read)| {
            format!("{:<40} delivered {delivered}/{to}, read {read}/{to}", format!("#{id} {from}: {text}"))
        };
        Ok(rows.into_iter().map(line).collect())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SqliteEventStore::open(dir.path().join("chat.db")).await?;
    let db = store.writer().clone();
    for table in READ_MODELS {
        sqlx::query(table).execute(&db).await?;
    }
    let projections =
        ProjectionRunner::new(Arc::new(store.clone()), Arc::new(SqliteProjectionStore::new(&store).await?))
            .with(Arc::new(Timelines), WorkerOptions::default())?
            .with(Arc::new(UnreadCounts), WorkerOptions::default())?
            .start();
    let chat = Chat { conversations: Repository::new(store.clone()), projections, db };

    let members = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
    chat.run("team", ChatCommand::Start { members: members(&["ada", "grace", "linus"]) }).await?;
    chat.run("ada_grace", ChatCommand::Start { members: members(&["ada", "grace"]) }).await?;
    println!("Conversations: team (ada, grace, linus) and ada_grace (ada, grace)\n\nEveryone is online");
    let everyone = ["ada", "grace", "linus"];
    chat.send("team", "ada", "Morning! Release today?", &everyone).await?;
    chat.send("team", "grace", "Yes, after the standup", &everyone).await?;

    println!("\nGrace's phone goes offline: it receives nothing, she reads nothing");
    let online = ["ada", "linus"];
    chat.send("team", "linus", "CI is red on main", &online).await?;
    chat.send("team", "ada", "Looking. A flaky test, I think", &online).await?;
    chat.send("team", "linus", "Fixed and merged", &online).await?;
    chat.send("ada_grace", "ada", "Lunch after the release?", &online).await?;
    chat.send("ada_grace", "ada", "The usual place, 12:30", &online).await?;
    let intruder = ChatCommand::Send { from: "linus".into(), text: "Can I come?".into() };
    match chat.conversations.execute("ada_grace", intruder).await {
        Err(CommandError::Rejected(reason)) => println!("  linus writes in ada_grace: refused, {reason}"),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }

    println!("\nGrace reconnects. Her phone receives what it missed, and she opens her conversations");
    for conversation in ["team", "ada_grace"] {
        let last = chat.conversations.load(conversation).await?.state.senders.len() as u32;
        let received = chat.run(conversation, ChatCommand::Receive { by: "grace".into(), up_to: last }).await?;
        println!(
            "  {conversation}: {} messages delivered; unread, from the timeline read model:",
            received.events.len()
        );
        for line in chat.timeline(conversation, Some("grace")).await? {
            println!("    {line}");
        }
        chat.run(conversation, ChatCommand::Read { by: "grace".into(), up_to: last }).await?;
    }
    let unread = chat.unread().await?;
    println!("  she has read everything. Unread: {unread}");
    anyhow::ensure!(unread == "ada 0, grace 0, linus 0", "unread messages are left");

    println!("\nThe team timeline, from the read model");
    for line in chat.timeline("team", None).await? {
        println!("  {line}");
    }
    println!();
    for projection in ["chat_timelines", "unread_counts"] {
        let lag = chat.projections.lag(projection).await?;
        let (behind, applied, p50, p99) = (lag.events_behind, lag.latency.count, lag.latency.p50, lag.latency.p99);
        println!(
            "{projection}: {behind} events behind; {applied} applied, commit-to-applied p50 {p50:.1?}, p99 {p99:.1?}"
        );
    }
    chat.projections.shutdown().await?;
    Ok(())
}
