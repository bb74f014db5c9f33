//! A small bank. Accounts are aggregates; a transfer is two
//! commands tied together by one correlation id; a withdrawal larger than the balance is
//! refused; and several tasks deposit into one account at once while the repository retries
//! the conflicts, so that no deposit is lost. Beside the commands, an exactly-once projection
//! keeps a balances read model in the store's database, and at the end it must agree with the
//! accounts' own state. It ends with its figures: commands per second, on one busy account and
//! on many, and how far the read model lags behind the commands.
//!
//! ```text
//! cargo run --example bank            # on SQLite; --short for fewer commands
//! DATABASE_URL=postgres://... cargo run --example bank --features postgres
//! ```

#[macro_use]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use annal::projections::{Projection, ProjectionRunner, Tx, WorkerOptions};
use annal::{Aggregate, BoxError, CommandError, Decide, Event, Filter, Metadata, Position, RecordedEvent, Repository};
use anyhow::Context;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use support::{Db, Store};
use uuid::Uuid;

/// What happens to an account. The stored names are pinned, so the variants can be renamed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(name = "AccountOpened")]
    Opened { owner: String },
    #[event(name = "MoneyDeposited")]
    Deposited { amount: u64 },
    #[event(name = "MoneyWithdrawn")]
    Withdrawn { amount: u64 },
}

/// An account's state: only what the rules need (the owner's name is for read models).
#[derive(Debug, Default, Clone, Serialize, Deserialize, Aggregate)]
#[aggregate(category = "account", event = AccountEvent, id = u64, snapshot(every = 50, version = 1))]
struct Account {
    open: bool,
    balance: u64,
}

/// What an account can be asked to do. Clone, because a command is decided again after a conflict.
#[derive(Debug, Clone)]
enum AccountCommand {
    Open { owner: String },
    Deposit { amount: u64 },
    Withdraw { amount: u64 },
}

/// Why an account refuses a command.
#[derive(Debug, PartialEq, thiserror::Error)]
enum AccountError {
    #[error("the account is not open")]
    NotOpen,
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("insufficient funds: the balance is {balance}, {requested} was requested")]
    InsufficientFunds { balance: u64, requested: u64 },
    #[error("an amount must be more than zero")]
    InvalidAmount,
}

impl Decide for Account {
    type Command = AccountCommand;
    type Error = AccountError;

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { .. } if self.open => Err(AccountError::AlreadyOpen),
            AccountCommand::Open { owner } => Ok(vec![AccountEvent::Opened { owner }]),
            _ if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit { amount: 0 } | AccountCommand::Withdraw { amount: 0 } => {
                Err(AccountError::InvalidAmount)
            }
            AccountCommand::Deposit { amount } => Ok(vec![AccountEvent::Deposited { amount }]),
            AccountCommand::Withdraw { amount } if amount > self.balance => {
                Err(AccountError::InsufficientFunds { balance: self.balance, requested: amount })
            }
            AccountCommand::Withdraw { amount } => Ok(vec![AccountEvent::Withdrawn { amount }]),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { .. } => self.open = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }
}

/// The balances read model: one row per account, moved by each deposit and withdrawal, in the
/// same transaction as the projection's checkpoint (exactly once). The SQL suits both SQLite
/// and PostgreSQL.
struct Balances;

#[annal::async_trait]
impl Projection for Balances {
    fn name(&self) -> &str {
        "balances"
    }
    fn filter(&self) -> Filter {
        Filter::categories([Account::CATEGORY])
    }
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        for recorded in events {
            let account: i64 = recorded.stream.id().unwrap_or_default().parse()?;
            let change = match AccountEvent::from_recorded(recorded)? {
                AccountEvent::Opened { .. } => 0,
                AccountEvent::Deposited { amount } => i64::try_from(amount)?,
                AccountEvent::Withdrawn { amount } => -i64::try_from(amount)?,
            };
            let upsert = "INSERT INTO balances VALUES ($1, $2)
                 ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance";
            on_tx!(tx, |conn| annal::sqlx::query(upsert).bind(account).bind(change).execute(&mut **conn).await?);
        }
        Ok(())
    }
}

/// An account's balance in the read model.
async fn read_balance(db: &Db, account: u64) -> anyhow::Result<u64> {
    let sql = "SELECT balance FROM balances WHERE account = $1";
    let account = i64::try_from(account)?;
    let balance: i64 = on_db!(db, |pool| annal::sqlx::query_scalar(sql).bind(account).fetch_one(pool).await?);
    Ok(u64::try_from(balance)?)
}

const PATIENCE: Duration = Duration::from_secs(10);
const ADA: u64 = 1;
const GRACE: u64 = 2;
const TASKS: u64 = 8;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    on_backend!("bank", run)
}

async fn run<S: Store>(store: S, projection_store: support::Projections, db: Db) -> anyhow::Result<()> {
    let short = support::short();
    let deposits_per_task: u64 = if short { 10 } else { 25 };
    // The read model lives in the store's database; the projection runs beside the commands.
    db.execute_all(&["CREATE TABLE balances (account BIGINT PRIMARY KEY, balance BIGINT NOT NULL)"]).await?;
    let projections = ProjectionRunner::new(Arc::new(store.clone()), projection_store)
        .with(Arc::new(Balances), WorkerOptions::default())?
        .start();
    // Later, eight tasks write to one account at once. Each conflict costs a reload and a new
    // decision; with eight writers a command loses about seven times in eight, and sometimes
    // dozens of times in a row, so allow far more retries than the default 3.
    let accounts = Repository::<Account, _>::new(store.clone()).with_max_retries(1_000);

    accounts.execute(&ADA, AccountCommand::Open { owner: "Ada".into() }).await?;
    let ada = accounts.execute(&ADA, AccountCommand::Deposit { amount: 100 }).await?;
    accounts.execute(&GRACE, AccountCommand::Open { owner: "Grace".into() }).await?;
    println!("Ada opens account {ADA} and deposits 100: balance {}", ada.state.balance);
    println!("Grace opens account {GRACE}: balance 0");

    // A transfer is two commands. Both carry the transfer's id as their correlation id, and the
    // deposit names the withdrawal that caused it. (Had the deposit been refused, a real bank
    // would refund Ada with a third command under the same correlation id.)
    let transfer = Uuid::now_v7();
    println!("\nTransfer {transfer}: 30 from Ada to Grace");
    let metadata = Metadata::default().with_correlation_id(transfer);
    let withdrawn = accounts.execute_with(&ADA, AccountCommand::Withdraw { amount: 30 }, metadata.clone()).await?;
    let cause = withdrawn.events[0].id;
    let deposited = accounts
        .execute_with(&GRACE, AccountCommand::Deposit { amount: 30 }, metadata.with_causation_id(cause))
        .await?;
    println!("  Ada's balance {}, Grace's balance {}", withdrawn.state.balance, deposited.state.balance);
    // The events of one transfer, found in the global log by their correlation id.
    let log: Vec<_> = store.read_all(Position::START, Filter::categories([Account::CATEGORY])).try_collect().await?;
    let moves: Vec<_> = log.iter().filter(|e| e.metadata.correlation_id == Some(transfer)).collect();
    for event in &moves {
        let cause = moves.iter().find(|c| event.metadata.causation_id == Some(c.id));
        let cause = cause.map(|c| format!(", caused by {}@{}", c.stream, c.version)).unwrap_or_default();
        println!(
            "  {}@{} {} {}, position {}{cause}",
            event.stream, event.version, event.event_type, event.data, event.position
        );
    }
    // The read model catches up a moment later. Waiting until it has passed the deposit's
    // position reads our own writes (the withdrawal comes before it in the global order).
    let position = deposited.position().context("a deposit writes an event")?;
    projections.wait_for("balances", position, PATIENCE).await?;
    let (ada, grace) = (read_balance(&db, ADA).await?, read_balance(&db, GRACE).await?);
    println!("  the balances read model, once past position {position}: Ada {ada}, Grace {grace}");

    // The rules hold: Ada has 70 and cannot take out 500. Nothing is written.
    println!("\nAda tries to withdraw 500");
    match accounts.execute(&ADA, AccountCommand::Withdraw { amount: 500 }).await {
        Err(CommandError::Rejected(reason)) => println!("  refused: {reason}"),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
    let ada = accounts.load(&ADA).await?;
    let version = ada.version.unwrap_or_default();
    println!(
        "  nothing was written: Ada's balance is still {}, her account still at version {version}",
        ada.state.balance
    );

    // Concurrent deposits into Grace's account. Each command loads the account, decides and
    // appends at the version it loaded; a task that loses the race reloads and decides again.
    println!("\n{TASKS} tasks each deposit {deposits_per_task} times into Grace's account at once");
    let before = accounts.load(&GRACE).await?.state.balance;
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let accounts = accounts.clone();
            tokio::spawn(async move {
                let (mut sum, mut most_attempts, mut last) = (0, 0, Position::START);
                for i in 1..=deposits_per_task {
                    let amount = task * 100 + i;
                    let done = accounts.execute(&GRACE, AccountCommand::Deposit { amount }).await?;
                    sum += amount;
                    most_attempts = most_attempts.max(done.attempts);
                    last = last.max(done.position().unwrap_or_default());
                }
                anyhow::Ok((sum, most_attempts, last))
            })
        })
        .collect();
    let (mut deposited, mut most_attempts, mut last) = (0, 0, Position::START);
    for task in tasks {
        let (sum, attempts, position) = task.await??;
        deposited += sum;
        most_attempts = most_attempts.max(attempts);
        last = last.max(position);
    }
    let busy = (TASKS * deposits_per_task, started.elapsed(), most_attempts);
    let grace = accounts.load(&GRACE).await?;
    println!(
        "  deposited {deposited} in {} commands; the unluckiest command was decided {most_attempts} times",
        TASKS * deposits_per_task
    );
    println!("  Grace's balance: {} = {before} + {deposited}", grace.state.balance);
    anyhow::ensure!(grace.state.balance == before + deposited, "a deposit was lost");

    // Every 50 events the repository saved a snapshot, so a load replays only the events after it.
    let version = grace.version.unwrap_or_default();
    if let Some(snapshot) = store.load_snapshot(&Account::stream_name(&GRACE)?).await? {
        let replayed = version - snapshot.version;
        println!(
            "  account at version {version}; snapshot at version {}, so a load replays {replayed} events",
            snapshot.version
        );
    }

    // The read model, once it has passed the last deposit, agrees with every account's state.
    println!("\nThe balances read model after waiting for position {last}");
    projections.wait_for("balances", last, PATIENCE).await?;
    for (name, id) in [("Ada", ADA), ("Grace", GRACE)] {
        let (loaded, projected) = (accounts.load(&id).await?.state.balance, read_balance(&db, id).await?);
        println!("  {name}: read model {projected}, account {loaded}");
        anyhow::ensure!(projected == loaded, "the read model disagrees with account {id}");
    }

    // Throughput without contention: one task per account, each depositing in a loop.
    let per_task = if short { 25 } else { 250 };
    println!("\n{TASKS} tasks each deposit {per_task} times into an account of their own");
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let accounts = accounts.clone();
            tokio::spawn(async move {
                let id = 100 + task;
                accounts.execute(&id, AccountCommand::Open { owner: format!("saver {task}") }).await?;
                let mut last = Position::START;
                for _ in 0..per_task {
                    last =
                        accounts.execute(&id, AccountCommand::Deposit { amount: 1 }).await?.position().unwrap_or(last);
                }
                anyhow::Ok(last)
            })
        })
        .collect();
    let mut last = Position::START;
    for task in tasks {
        last = last.max(task.await??);
    }
    let (commands, took) = (TASKS * (per_task + 1), started.elapsed());
    // How long after the last command the read model has it too.
    let done = Instant::now();
    projections.wait_for("balances", last, PATIENCE).await?;
    let caught_up = done.elapsed();
    for task in 0..TASKS {
        anyhow::ensure!(read_balance(&db, 100 + task).await? == per_task, "the read model lost a deposit");
    }
    println!("  every balance in the read model is {per_task}");

    let lag = projections.lag("balances").await?;
    let (behind, applied, p50, p99) = (lag.events_behind, lag.latency.count, lag.latency.p50, lag.latency.p99);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    println!("\nFigures");
    println!(
        "  commands: {} on one account by {TASKS} tasks at once, {:.0} commands/s (the unluckiest decided {} times)",
        busy.0,
        rate(busy.0, busy.1),
        busy.2
    );
    println!("  commands: {commands} on {TASKS} accounts, one task each, {:.0} commands/s", rate(commands, took));
    println!(
        "  read-model lag: {behind} events behind; commit to applied p50 {:.1} ms, p99 {:.1} ms over {applied} events; \
         caught up {:.1} ms after the last command",
        ms(p50),
        ms(p99),
        ms(caught_up)
    );
    println!("    published: read models typically synchronise 50-250 ms after a write, 99.9% within 500 ms");
    projections.shutdown().await?;
    Ok(())
}
