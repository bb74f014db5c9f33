//! A small bank on the embedded SQLite store. Accounts are aggregates; a transfer is two
//! commands tied together by one correlation id; a withdrawal larger than the balance is
//! refused; and several tasks deposit into one account at once while the repository retries
//! the conflicts, so that no deposit is lost. Beside the commands, an exactly-once projection
//! keeps a balances read model in the same SQLite file, and at the end it must agree with the
//! accounts' own state.
//!
//! ```text
//! cargo run --example bank --features projections
//! ```

use std::sync::Arc;
use std::time::Duration;

use annal::projections::{Projection, ProjectionRunner, SqliteProjectionStore, Tx, WorkerOptions};
use annal::{
    Aggregate, BoxError, CommandError, Decide, Event, EventStore, Filter, Metadata, Position, RecordedEvent,
    Repository, SqliteEventStore,
};
use anyhow::Context;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
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
/// same transaction as the projection's checkpoint (exactly once).
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
        let conn = tx.sqlite().ok_or("the balances live in the SQLite store")?;
        for recorded in events {
            let account: i64 = recorded.stream.id().unwrap_or_default().parse()?;
            let change = match AccountEvent::from_recorded(recorded)? {
                AccountEvent::Opened { .. } => 0,
                AccountEvent::Deposited { amount } => i64::try_from(amount)?,
                AccountEvent::Withdrawn { amount } => -i64::try_from(amount)?,
            };
            sqlx::query(
                "INSERT INTO balances VALUES (?, ?) ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance",
            )
            .bind(account)
            .bind(change)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// An account's balance in the read model.
async fn read_balance(db: &sqlx::SqlitePool, account: u64) -> anyhow::Result<u64> {
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM balances WHERE account = ?")
        .bind(i64::try_from(account)?)
        .fetch_one(db)
        .await?;
    Ok(u64::try_from(balance)?)
}

const PATIENCE: Duration = Duration::from_secs(10);
const ADA: u64 = 1;
const GRACE: u64 = 2;
const TASKS: u64 = 8;
const DEPOSITS_PER_TASK: u64 = 25;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SqliteEventStore::open(dir.path().join("bank.db")).await?;
    // The read model lives in the same file; the projection runs beside the commands.
    let db = store.writer().clone();
    sqlx::query("CREATE TABLE balances (account INTEGER PRIMARY KEY, balance INTEGER NOT NULL)").execute(&db).await?;
    let projections =
        ProjectionRunner::new(Arc::new(store.clone()), Arc::new(SqliteProjectionStore::new(&store).await?))
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
    println!("\n{TASKS} tasks each deposit {DEPOSITS_PER_TASK} times into Grace's account at once");
    let before = accounts.load(&GRACE).await?.state.balance;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let accounts = accounts.clone();
            tokio::spawn(async move {
                let (mut sum, mut most_attempts, mut last) = (0, 0, Position::START);
                for i in 1..=DEPOSITS_PER_TASK {
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
    let grace = accounts.load(&GRACE).await?;
    println!(
        "  deposited {deposited} in {} commands; the unluckiest command was decided {most_attempts} times",
        TASKS * DEPOSITS_PER_TASK
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
    let lag = projections.lag("balances").await?;
    let (behind, applied, p50, p99) = (lag.events_behind, lag.latency.count, lag.latency.p50, lag.latency.p99);
    println!("  lag: {behind} events behind; {applied} applied, commit-to-applied p50 {p50:.1?}, p99 {p99:.1?}");
    projections.shutdown().await?;
    Ok(())
}
