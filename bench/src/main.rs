//! `annal-bench`: Annal measured beside a baseline taken in the same run on the same server
//! (raw SQL inserts, `COPY`, a hand-written replay loop, one subscriber, no snapshot), so that a
//! noisy machine moves both sides alike and the ratio stays meaningful.
//!
//! Run it through `scripts/bench` (a throwaway PostgreSQL with durable commits), or with
//! `DATABASE_URL` set: `cargo run --release -p annal-bench -- --help`. It prints a table and
//! writes a JSON report (by default `target/annal-bench/report.json`), each figure compared
//! with the previous report's, plus SVG charts beside it.

mod aggregate;
mod appends;
mod catchup;
mod charts;
mod commands;
mod cpu;
mod db;
mod fanout;
mod lag;
mod latency;
mod rebuild;
mod report;
mod store;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use annal_eventstore::GroupCommit;
use anyhow::Context;
use clap::{Parser, ValueEnum};

use crate::report::{Machine, Report};

/// Measures Annal against baselines taken in the same run on the same database.
#[derive(Parser, Debug)]
struct Args {
    /// Seconds each append measurement runs, per round.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds per append measurement; baseline and Annal alternate, and the rounds are averaged.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// A short run (about 1 s per measurement, one round, 100k events for the rebuild), to check
    /// that everything works; finishes in under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Where the JSON report goes; the previous report there is read first, for comparison. A
    /// Markdown table and the SVG charts are written beside it.
    #[arg(long, default_value = "target/annal-bench/report.json")]
    out: PathBuf,
    /// Also write the SVG charts into this directory (e.g. `docs/benchmarks`).
    #[arg(long)]
    charts: Option<PathBuf>,
    /// Run only these suites (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Suite>,
    /// Group commit of the appends and commands suites' stores: `on` (`GroupCommit::default()`,
    /// the store's default), `off`, or `MEMBERS,IN_FLIGHT` (see `GroupCommit::new`).
    #[arg(long, default_value = "on", value_parser = parse_group_commit)]
    group_commit: Grouping,
}

/// The `--group-commit` setting.
#[derive(Clone, Copy, Debug)]
struct Grouping(Option<GroupCommit>);

fn parse_group_commit(text: &str) -> Result<Grouping, String> {
    match text {
        "on" => Ok(Grouping(Some(GroupCommit::default()))),
        "off" => Ok(Grouping(None)),
        _ => {
            let (members, in_flight) = text.split_once(',').ok_or("expected off, on or MEMBERS,IN_FLIGHT")?;
            let number = |n: &str| n.trim().parse::<usize>().map_err(|e| format!("{n:?}: {e}"));
            GroupCommit::new(number(members)?, number(in_flight)?).map(|g| Grouping(Some(g))).map_err(|e| e.to_string())
        }
    }
}

/// A group of measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// PostgreSQL appends against raw INSERTs, NOTIFY costs.
    Appends,
    /// 1000-event appends against COPY.
    Bulk,
    /// Commit-to-read-model latency under a fixed write rate.
    Lag,
    /// Replaying the log into a SQL read model.
    Rebuild,
    /// One against 500 subscriptions.
    Fanout,
    /// `Repository::execute` at 1, 4 and 16 tasks against single-row and 50-row INSERTs.
    Commands,
    /// A subscription catching up on 1M stored events against a keyset query, PostgreSQL and SQLite.
    Catchup,
    /// Loading a 10k-event aggregate with and without a snapshot.
    Aggregate,
    /// SQLite appends and lag.
    Sqlite,
    /// Idempotent retries of big batches, and wake-ups across processes, on every backend.
    Store,
}

/// How long and how big each measurement is: `--quick` or the full run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) quick: bool,
    /// Per side and round, for throughput measurements.
    pub(crate) duration: Duration,
    pub(crate) rounds: u32,
    /// How long writers keep their fixed rate in a lag run.
    pub(crate) lag_duration: Duration,
    /// Events replayed by the rebuild.
    pub(crate) rebuild_events: u64,
    /// How long the writer runs in a fan-out run.
    pub(crate) fanout_duration: Duration,
    /// Loads of the aggregate, per side.
    pub(crate) aggregate_loads: u32,
    /// Group commit of the appends and commands suites' stores.
    pub(crate) group_commit: Option<GroupCommit>,
}

impl Plan {
    fn new(args: &Args) -> Self {
        if args.quick {
            Plan {
                quick: true,
                duration: Duration::from_secs(1),
                rounds: 1,
                lag_duration: Duration::from_secs(5),
                rebuild_events: 100_000,
                fanout_duration: Duration::from_secs(5),
                aggregate_loads: 20,
                group_commit: args.group_commit.0,
            }
        } else {
            Plan {
                quick: false,
                duration: Duration::from_secs_f64(args.seconds),
                rounds: args.rounds.max(1),
                lag_duration: Duration::from_secs(20),
                rebuild_events: 1_000_000,
                fanout_duration: Duration::from_secs(15),
                aggregate_loads: 100,
                group_commit: args.group_commit.0,
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan::new(&args);
    let began = Instant::now();
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set: run scripts/bench")?;
    let admin = sqlx::PgPool::connect(&url).await?;
    let machine = Machine::describe(&admin).await?;
    println!("machine: {machine}");
    let wanted = |suite| args.only.is_empty() || args.only.contains(&suite);

    let mut report = Report::new(machine, plan.quick, std::env::args().collect::<Vec<_>>().join(" "));
    let mut charts = charts::Data::default();
    if wanted(Suite::Appends) {
        eprintln!("== appends");
        let (measurements, throughput) = appends::postgres(&admin, &url, plan).await?;
        report.extend(measurements);
        charts.throughput = throughput;
    }
    if wanted(Suite::Commands) {
        eprintln!("== commands");
        report.extend(commands::postgres(&admin, &url, plan).await?);
    }
    if wanted(Suite::Catchup) {
        eprintln!("== catch-up");
        report.extend(catchup::postgres(&admin, &url, plan).await?);
        report.extend(catchup::sqlite(plan).await?);
    }
    if wanted(Suite::Bulk) {
        eprintln!("== bulk");
        report.extend(appends::bulk(&admin, &url, plan).await?);
    }
    if wanted(Suite::Lag) {
        eprintln!("== lag");
        let (measurements, curves) = lag::postgres(&admin, &url, plan).await?;
        report.extend(measurements);
        charts.lag.extend(curves);
    }
    if wanted(Suite::Sqlite) {
        eprintln!("== sqlite");
        report.extend(appends::sqlite(plan).await?);
        let (measurements, curves) = lag::sqlite(plan).await?;
        report.extend(measurements);
        charts.lag.extend(curves);
    }
    if wanted(Suite::Rebuild) {
        eprintln!("== rebuild");
        report.extend(rebuild::postgres(&admin, &url, plan).await?);
    }
    if wanted(Suite::Fanout) {
        eprintln!("== fan-out");
        let (measurements, curves) = fanout::postgres(&admin, &url, plan).await?;
        report.extend(measurements);
        charts.fanout = curves;
    }
    if wanted(Suite::Store) {
        eprintln!("== store");
        report.extend(store::all(&admin, &url, plan).await?);
    }
    if wanted(Suite::Aggregate) {
        eprintln!("== aggregate");
        report.extend(aggregate::postgres(&admin, &url, plan).await?);
    }
    report.wall_seconds = began.elapsed().as_secs_f64();

    let previous = Report::read(&args.out)?;
    report.compare(previous.as_ref());
    let table = report.table();
    println!("\n{table}");
    let dir = args.out.parent().filter(|d| !d.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), PathBuf::from);
    report.write(&args.out)?;
    std::fs::write(dir.join("report.md"), &table)?;
    let mut chart_dirs = vec![dir];
    chart_dirs.extend(args.charts.clone());
    for chart_dir in &chart_dirs {
        charts.write(chart_dir)?;
    }
    println!(
        "report: {}; charts: {}",
        args.out.display(),
        chart_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    println!("wall time: {:.0} s", report.wall_seconds);
    Ok(())
}
