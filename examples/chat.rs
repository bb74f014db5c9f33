//! Instant messaging. A conversation is an aggregate: only its members may write in it, and
//! reading marks every message up to one as read. Two exactly-once projections keep SQL read
//! models in the store's database: each conversation's timeline with a delivery and read receipt
//! per recipient, and unread counts per user.
//!
//! First a story: Grace goes offline, messages pile up and her unread count grows; she
//! reconnects, catches up from her timeline, reads everything, and her count is back to 0.
//!
//! Then a measured run: many users in many conversations, each user on two devices (a phone
//! and a laptop) that follow the log through their own subscription. A device that receives a
//! message sends its delivery receipt; one of the user's devices reads it, and the read receipt
//! reaches the other device through its subscription. One user is offline while 25 to 45
//! messages queue up for her, then both her devices catch up. It prints the time from a
//! message's commit to its delivery receipt, and from a read to the read state on the reader's
//! other device, beside published figures.
//!
//! ```text
//! cargo run --example chat            # on SQLite; --short for a brief measured run
//! DATABASE_URL=postgres://... cargo run --example chat --features postgres
//! ```

#[macro_use]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use annal::projections::{Projection, ProjectionRunner, RunningProjections, Tx, WorkerOptions};
use annal::{Aggregate, BoxError, CommandError, Decide, Event, Executed, Filter, Position, RecordedEvent, Repository};
use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use support::{Db, Rng, Store};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

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

// The SQL suits both SQLite and PostgreSQL.
const READ_MODELS: [&str; 3] = [
    "CREATE TABLE chat_messages (conversation TEXT, message_id BIGINT, sender TEXT, body TEXT,
        PRIMARY KEY (conversation, message_id))",
    "CREATE TABLE chat_receipts (conversation TEXT, message_id BIGINT, recipient TEXT,
        delivered BOOLEAN NOT NULL DEFAULT FALSE, read BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (conversation, message_id, recipient))",
    "CREATE TABLE chat_unread (member TEXT, conversation TEXT, unread BIGINT, PRIMARY KEY (member, conversation))",
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
        use annal::sqlx::query;
        for recorded in events {
            let conversation = recorded.stream.id().unwrap_or_default();
            let (message_id, recipient, read) = match ChatEvent::from_recorded(recorded)? {
                ChatEvent::ConversationStarted { .. } => continue,
                ChatEvent::MessageSent { message_id, from, to, text } => {
                    let id = i64::from(message_id);
                    on_tx!(tx, |conn| {
                        let insert = query("INSERT INTO chat_messages VALUES ($1, $2, $3, $4)");
                        insert.bind(conversation).bind(id).bind(&from).bind(&text).execute(&mut **conn).await?;
                        for recipient in &to {
                            let insert = query("INSERT INTO chat_receipts VALUES ($1, $2, $3, FALSE, FALSE)");
                            insert.bind(conversation).bind(id).bind(recipient).execute(&mut **conn).await?;
                        }
                    });
                    continue;
                }
                ChatEvent::MessageDelivered { message_id, to } => (message_id, to, false),
                ChatEvent::MessageRead { message_id, by } => (message_id, by, true),
            };
            let update = "UPDATE chat_receipts SET delivered = TRUE, read = read OR $4
                 WHERE conversation = $1 AND message_id = $2 AND recipient = $3";
            let id = i64::from(message_id);
            on_tx!(tx, |conn| {
                query(update).bind(conversation).bind(id).bind(&recipient).bind(read).execute(&mut **conn).await?;
            });
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
        for recorded in events {
            let conversation = recorded.stream.id().unwrap_or_default();
            let (members, change) = match ChatEvent::from_recorded(recorded)? {
                ChatEvent::ConversationStarted { members } => (members, 0i64),
                ChatEvent::MessageSent { to, .. } => (to, 1),
                ChatEvent::MessageRead { by, .. } => (vec![by], -1),
                ChatEvent::MessageDelivered { .. } => continue,
            };
            let upsert = "INSERT INTO chat_unread VALUES ($1, $2, $3) ON CONFLICT (member, conversation)
                 DO UPDATE SET unread = chat_unread.unread + excluded.unread";
            for member in members {
                on_tx!(tx, |conn| {
                    annal::sqlx::query(upsert)
                        .bind(&member)
                        .bind(conversation)
                        .bind(change)
                        .execute(&mut **conn)
                        .await?;
                });
            }
        }
        Ok(())
    }
}

const PATIENCE: Duration = Duration::from_secs(30);
const PROJECTIONS: [&str; 2] = ["chat_timelines", "unread_counts"];

/// The chat service: commands on the write side, queries on the read models.
struct Chat<S> {
    conversations: Repository<Conversation, S>,
    projections: RunningProjections,
    db: Db,
}

impl<S: Store> Chat<S> {
    /// Runs a command, then waits until both read models have applied it: read your writes.
    async fn run(&self, conversation: &str, command: ChatCommand) -> anyhow::Result<Executed<Conversation>> {
        let done = self.conversations.execute(conversation, command).await?;
        if let Some(position) = done.position() {
            self.caught_up(position).await?;
        }
        Ok(done)
    }

    /// Waits until both read models have passed `position`.
    async fn caught_up(&self, position: Position) -> anyhow::Result<()> {
        for projection in PROJECTIONS {
            self.projections.wait_for(projection, position, PATIENCE).await?;
        }
        Ok(())
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

    /// Every story user's unread count, from the read model.
    async fn unread(&self) -> anyhow::Result<String> {
        let sql = "SELECT member, CAST(SUM(unread) AS BIGINT) FROM chat_unread
             WHERE conversation NOT LIKE 'room%' GROUP BY member ORDER BY member";
        let counts: Vec<(String, i64)> = on_db!(&self.db, |pool| annal::sqlx::query_as(sql).fetch_all(pool).await?);
        Ok(counts.iter().map(|(member, count)| format!("{member} {count}")).collect::<Vec<_>>().join(", "))
    }

    /// A conversation's timeline from the read model, with receipts; only what `unread_by` has
    /// not read, if given.
    async fn timeline(&self, conversation: &str, unread_by: Option<&str>) -> anyhow::Result<Vec<String>> {
        let sql = "SELECT message_id, sender, body, COUNT(*),
                CAST(SUM(CASE WHEN delivered THEN 1 ELSE 0 END) AS BIGINT),
                CAST(SUM(CASE WHEN read THEN 1 ELSE 0 END) AS BIGINT),
                CAST(SUM(CASE WHEN recipient = $2 AND NOT read THEN 1 ELSE 0 END) AS BIGINT)
             FROM chat_messages JOIN chat_receipts USING (conversation, message_id)
             WHERE conversation = $1 GROUP BY message_id, sender, body ORDER BY message_id";
        let who = unread_by.unwrap_or_default();
        let rows: Vec<(i64, String, String, i64, i64, i64, i64)> =
            on_db!(&self.db, |pool| annal::sqlx::query_as(sql).bind(conversation).bind(who).fetch_all(pool).await?);
        let line = |(id, from, text, to, delivered, read, _)| {
            format!("{:<40} delivered {delivered}/{to}, read {read}/{to}", format!("#{id} {from}: {text}"))
        };
        Ok(rows.into_iter().filter(|row| unread_by.is_none() || row.6 > 0).map(line).collect())
    }
}

/// Grace goes offline, catches up and reads everything.
async fn story<S: Store>(chat: &Chat<S>) -> anyhow::Result<()> {
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
    Ok(())
}

/// The size of the measured run.
struct Load {
    users: usize,
    conversations: usize,
    /// How long the users chat (at least until the offline user's queue is full).
    chatting: Duration,
    /// The pause between two messages of one user, in seconds.
    pause: (f64, f64),
}

/// Reads started on one device, by (conversation, reader, message): which device, and when.
type ReadsStarted = Arc<Mutex<HashMap<(String, String, u32), (usize, Instant)>>>;

/// What one device measured.
#[derive(Default)]
struct DeviceReport {
    /// Commit of a message to the commit of its delivery receipt, for messages committed while
    /// the device was online.
    deliveries: Vec<Duration>,
    /// A read on the user's other device to its arrival here, for messages committed while
    /// this device was online.
    read_syncs: Vec<Duration>,
    /// Messages waiting for the user when the device connected, and how long it took to
    /// receive, deliver and read them all.
    caught_up: Option<(u32, Duration)>,
    /// Receipt commands sent, and the times they were decided (more than once after a conflict).
    commands: (u32, u32),
}

/// One of a user's devices: follows the log from `from`, sends a delivery receipt for every
/// message to its user, reads every other one (its twin reads the rest), and notes when the
/// twin's reads arrive. Once past the position of round 1 that `stop` announces, it reports
/// the position of the last receipt it wrote; once past round 2's, it ends.
async fn device<S: Store>(
    user: String,
    index: usize,
    conversations: Repository<Conversation, S>,
    from: Position,
    reads: ReadsStarted,
    mut stop: watch::Receiver<(u32, Position)>,
    reached: mpsc::Sender<Position>,
) -> anyhow::Result<DeviceReport> {
    let store = conversations.store().clone();
    let (connected, started) = (chrono::Utc::now(), Instant::now());
    let mut events = store.subscribe(from, Filter::categories([Conversation::CATEGORY]));
    let (mut position, mut report, mut reported) = (from, DeviceReport::default(), 0);
    // Messages committed before the device connected: how many, and when the last was done.
    let (mut queued, mut queue_done) = (0, Duration::ZERO);
    let (mut live, mut written) = (std::collections::HashSet::new(), Position::START);
    loop {
        let (round, last) = *stop.borrow_and_update();
        if round > reported && position >= last {
            if round == 2 {
                report.caught_up = Some((queued, queue_done));
                return Ok(report);
            }
            reported = round;
            reached.send(written).await?;
        }
        let recorded = tokio::select! {
            recorded = events.next() => recorded.context("a subscription does not end")??,
            changed = stop.changed() => { changed?; continue }
        };
        position = recorded.position;
        let conversation = recorded.stream.id().unwrap_or_default();
        match ChatEvent::from_recorded(&recorded)? {
            ChatEvent::MessageSent { message_id, to, .. } if to.contains(&user) => {
                let queued_up = recorded.recorded_at < connected;
                if !queued_up {
                    live.insert((conversation.to_owned(), message_id));
                }
                let receive = ChatCommand::Receive { by: user.clone(), up_to: message_id };
                let done = conversations.execute(conversation, receive).await?;
                written = written.max(done.position().unwrap_or_default());
                report.commands.0 += 1;
                report.commands.1 += done.attempts as u32;
                let delivered = done
                    .events
                    .iter()
                    .any(|c| matches!(&c.event, ChatEvent::MessageDelivered { message_id: m, .. } if *m == message_id));
                if delivered && !queued_up {
                    report.deliveries.push((chrono::Utc::now() - recorded.recorded_at).to_std().unwrap_or_default());
                }
                if message_id as usize % 2 == index {
                    let key = (conversation.to_owned(), user.clone(), message_id);
                    reads.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert(key.clone(), (index, Instant::now()));
                    let read = ChatCommand::Read { by: user.clone(), up_to: message_id };
                    let done = conversations.execute(conversation, read).await?;
                    written = written.max(done.position().unwrap_or_default());
                    report.commands.0 += 1;
                    report.commands.1 += done.attempts as u32;
                    if !done
                        .events
                        .iter()
                        .any(|c| matches!(&c.event, ChatEvent::MessageRead { message_id: m, .. } if *m == message_id))
                    {
                        reads.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.remove(&key);
                    }
                }
                if queued_up {
                    queued += 1;
                    queue_done = started.elapsed();
                }
            }
            ChatEvent::MessageRead { message_id, by } if by == user => {
                let key = (conversation.to_owned(), by, message_id);
                let mut reads = reads.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                if let Some(&(reader, at)) = reads.get(&key)
                    && reader != index
                {
                    if live.contains(&(conversation.to_owned(), message_id)) {
                        report.read_syncs.push(at.elapsed());
                    }
                    reads.remove(&key);
                }
            }
            _ => {}
        }
    }
}

/// How many messages may still be sent to the offline user: she gets exactly her quota.
struct Quota {
    sent: AtomicU32,
    of: u32,
}

impl Quota {
    /// Takes one place, if any is left.
    fn take(&self) -> bool {
        self.sent.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.of).then_some(n + 1)).is_ok()
    }
    fn full(&self) -> bool {
        self.sent.load(Ordering::SeqCst) >= self.of
    }
}

/// A user sending messages into their conversations at random pauses, until the chatting time
/// is over and the offline user's quota is full.
async fn sender<S: Store>(
    user: String,
    rooms: Vec<(String, bool)>,
    conversations: Repository<Conversation, S>,
    load: Arc<Load>,
    quota: Arc<Quota>,
    mut rng: Rng,
) -> anyhow::Result<(u32, Position)> {
    let until = Instant::now() + load.chatting;
    let (mut sent, mut last) = (0, Position::START);
    while Instant::now() < until || !quota.full() {
        anyhow::ensure!(until.elapsed() < Duration::from_secs(60), "the offline user's quota never filled");
        tokio::time::sleep(Duration::from_secs_f64(rng.uniform(load.pause.0, load.pause.1))).await;
        let (room, with_offline) = &rooms[rng.below(rooms.len() as u64) as usize];
        if *with_offline && !quota.take() {
            continue;
        }
        let text = format!("message {sent} from {user}");
        let done = conversations.execute(room, ChatCommand::Send { from: user.clone(), text }).await?;
        last = last.max(done.position().unwrap_or_default());
        sent += 1;
    }
    Ok((sent, last))
}

/// Many users on two devices each, one of them offline for a while.
async fn measured<S: Store>(chat: &Chat<S>, short: bool) -> anyhow::Result<()> {
    let load = Arc::new(if short {
        Load { users: 10, conversations: 6, chatting: Duration::from_millis(1_500), pause: (0.15, 0.5) }
    } else {
        Load { users: 40, conversations: 24, chatting: Duration::from_secs(15), pause: (0.5, 3.0) }
    });
    let mut rng = Rng::new(14);
    let users: Vec<String> = (1..=load.users).map(|u| format!("u{u:02}")).collect();
    let offline = users[0].clone();
    // Rooms of 2 to 4 members; the offline user is in the first four.
    // Devices follow the log from the last conversation's start.
    let (mut rooms, mut start) = (Vec::new(), Position::START);
    for r in 0..load.conversations {
        let mut members: Vec<String> = Vec::new();
        if r < 4 {
            members.push(offline.clone());
        }
        let size = 2 + rng.below(3) as usize;
        while members.len() < size {
            let user = &users[1 + rng.below(load.users as u64 - 1) as usize];
            if !members.contains(user) {
                members.push(user.clone());
            }
        }
        let room = format!("room{r:02}");
        let started = chat.conversations.execute(&room, ChatCommand::Start { members: members.clone() }).await?;
        start = start.max(started.position().unwrap_or_default());
        rooms.push((room, members));
    }
    let quota = Arc::new(Quota { sent: AtomicU32::new(0), of: 25 + rng.below(21) as u32 });
    println!(
        "\nMeasured run: {} users on two devices each, {} conversations of 2 to 4, chatting for {:?}; {offline} is \
         offline until {} messages wait for her",
        load.users, load.conversations, load.chatting, quota.of
    );

    let reads = ReadsStarted::default();
    let (stop_tx, stop) = watch::channel((0, Position::START));
    let (reached_tx, mut reached) = mpsc::channel(4 * load.users);
    let mut devices = JoinSet::new();
    let spawn_devices = |devices: &mut JoinSet<_>, user: &String| {
        for index in 0..2 {
            let (conversations, reads) = (chat.conversations.clone(), reads.clone());
            let (stop, reached) = (stop.clone(), reached_tx.clone());
            let device = device(user.clone(), index, conversations, start, reads, stop, reached);
            let user = user.clone();
            devices.spawn(async move {
                device.await.with_context(|| format!("{user}'s device {index}")).map(|r| (user, r))
            });
        }
    };
    for user in &users[1..] {
        spawn_devices(&mut devices, user);
    }
    let mut senders = JoinSet::new();
    for user in &users[1..] {
        let mine: Vec<(String, bool)> = rooms
            .iter()
            .filter(|(_, members)| members.contains(user))
            .map(|(room, members)| (room.clone(), members.contains(&offline)))
            .collect();
        if !mine.is_empty() {
            let sender =
                sender(user.clone(), mine, chat.conversations.clone(), load.clone(), quota.clone(), rng.clone());
            senders.spawn(sender);
            rng.next_u64();
        }
    }
    let (mut messages, mut last_message) = (0, start);
    while let Some(sent) = senders.join_next().await {
        let (sent, last) = sent??;
        messages += sent;
        last_message = last_message.max(last);
    }

    // The offline user's devices come back and catch up from where they left.
    spawn_devices(&mut devices, &offline);
    drop(reached_tx);
    // Once every device has passed the last message, every receipt is written; a device ends
    // once it has passed the last receipt, when every read has reached the twin device.
    stop_tx.send((1, last_message))?;
    let (mut passed, mut last_receipt) = (0, last_message);
    while passed < 2 * load.users {
        tokio::select! {
            Some(written) = reached.recv() => (passed, last_receipt) = (passed + 1, last_receipt.max(written)),
            Some(failed) = devices.join_next() => {
                failed??;
                anyhow::bail!("a device stopped early");
            }
        }
    }
    stop_tx.send((2, last_receipt))?;
    let (mut deliveries, mut read_syncs, mut caught_up) = (Vec::new(), Vec::new(), Vec::new());
    let (mut commands, mut decided) = (0, 0);
    while let Some(done) = devices.join_next().await {
        let (user, report) = done??;
        commands += report.commands.0;
        decided += report.commands.1;
        deliveries.extend(report.deliveries);
        read_syncs.extend(report.read_syncs);
        if user == offline {
            caught_up.push(report.caught_up.unwrap_or_default());
        }
    }
    chat.caught_up(last_receipt).await?;

    println!(
        "  {messages} messages, {} delivery receipts and {} reads synchronised to the twin device",
        deliveries.len(),
        read_syncs.len()
    );
    // Twin devices and the other recipients write receipts into the same conversation at once.
    let per_command = f64::from(decided) / f64::from(commands.max(1));
    println!("  {commands} receipt commands, each decided {per_command:.2} times on average (conflicts retried)");
    println!("  commit to delivery receipt: {}", support::distribution(deliveries));
    println!("    published: delivery receipts in 3-8 ms of processing");
    println!("  read to read state on the reader's other device: {}", support::distribution(read_syncs));
    println!("    published: read receipts across devices in 15-45 ms");
    for (device, (queued, took)) in ["phone", "laptop"].iter().zip(&caught_up) {
        println!(
            "  {offline}'s {device} caught up on {queued} queued messages (received, delivered, read) in {took:.1?}"
        );
        anyhow::ensure!(*queued == quota.of, "{offline}'s {device} found {queued} queued messages, not {}", quota.of);
    }
    let sql = "SELECT COUNT(*) FROM chat_receipts WHERE conversation LIKE 'room%' AND NOT (delivered AND read)";
    let pending: i64 = on_db!(&chat.db, |pool| annal::sqlx::query_scalar(sql).fetch_one(pool).await?);
    let sql = "SELECT CAST(COALESCE(SUM(unread), 0) AS BIGINT) FROM chat_unread WHERE conversation LIKE 'room%'";
    let unread: i64 = on_db!(&chat.db, |pool| annal::sqlx::query_scalar(sql).fetch_one(pool).await?);
    println!("  read models: {pending} receipts not delivered and read, {unread} messages unread");
    anyhow::ensure!(pending == 0 && unread == 0, "the read models disagree with the devices");
    Ok(())
}

async fn run<S: Store>(store: S, projection_store: support::Projections, db: Db) -> anyhow::Result<()> {
    db.execute_all(&READ_MODELS).await?;
    let projections = ProjectionRunner::new(Arc::new(store.clone()), projection_store)
        .with(Arc::new(Timelines), WorkerOptions::default())?
        .with(Arc::new(UnreadCounts), WorkerOptions::default())?
        .start();
    // Devices write receipts into busy conversations at once: allow many conflict retries.
    let chat = Chat { conversations: Repository::new(store).with_max_retries(100), projections, db };
    story(&chat).await?;
    measured(&chat, support::short()).await?;
    println!();
    for projection in PROJECTIONS {
        let lag = chat.projections.lag(projection).await?;
        let (behind, applied, p50, p99) = (lag.events_behind, lag.latency.count, lag.latency.p50, lag.latency.p99);
        println!(
            "{projection}: {behind} events behind; {applied} applied, commit-to-applied p50 {p50:.1?}, p99 {p99:.1?}"
        );
    }
    chat.projections.shutdown().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    on_backend!("chat", run)
}
