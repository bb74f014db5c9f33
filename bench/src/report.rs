//! The report: one object per measurement (name, value, unit, baseline, ratio, goal), the
//! machine it ran on, and each figure's change since the previous report.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) machine: Machine,
    /// How the program was called.
    pub(crate) command: String,
    /// Whether this was a `--quick` run.
    pub(crate) quick: bool,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) wall_seconds: f64,
    pub(crate) measurements: Vec<Measurement>,
}

/// What the run ran on; the figures are only comparable as ratios.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) cpu: String,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    /// The load average when the run started: others' work on a shared machine.
    pub(crate) load_average: String,
    pub(crate) postgres: String,
}

impl Machine {
    /// Describes this machine and the PostgreSQL server behind `admin`.
    pub(crate) async fn describe(admin: &PgPool) -> anyhow::Result<Self> {
        let read = |path| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown CPU".to_owned(), |s| s.trim().to_owned());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_default();
        let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(admin).await?;
        let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(admin).await?;
        let sync_commit: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(admin).await?;
        Ok(Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load_average: read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            postgres: format!("PostgreSQL {version} (fsync={fsync}, synchronous_commit={sync_commit}), same machine"),
        })
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cores, {}, {} GiB, Linux {}, load {}; {}",
            self.cores, self.cpu, self.memory_gib, self.kernel, self.load_average, self.postgres
        )
    }
}

/// Which way is better for a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Better {
    Higher,
    Lower,
}

/// One figure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Measurement {
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) better: Better,
    /// What the value is compared with, measured in the same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) baseline: Option<Baseline>,
    /// `value / baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) goal: Option<Goal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
    /// The same measurement in the previous report, if it had it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) previous: Option<Previous>,
}

/// The figure a measurement is compared with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Baseline {
    pub(crate) name: String,
    pub(crate) value: f64,
}

/// A goal from the issue, and whether this run met it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Goal {
    pub(crate) target: String,
    pub(crate) met: bool,
}

/// The previous report's figure, and how this one moved from it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Previous {
    pub(crate) value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ratio: Option<f64>,
    /// `ratio / previous ratio - 1` where both have a ratio (the comparison that survives a
    /// noisy machine), else `value / previous value - 1`.
    pub(crate) change: f64,
    /// What `change` compares: "ratio" or "value".
    pub(crate) of: String,
}

impl Measurement {
    /// A figure with no baseline.
    pub(crate) fn new(name: impl Into<String>, value: f64, unit: &str, better: Better) -> Self {
        Measurement {
            name: name.into(),
            value,
            unit: unit.to_owned(),
            better,
            baseline: None,
            ratio: None,
            goal: None,
            note: None,
            previous: None,
        }
    }

    /// A figure beside its baseline; the ratio is `value / baseline`.
    pub(crate) fn against(
        name: impl Into<String>,
        value: f64,
        unit: &str,
        better: Better,
        baseline_name: &str,
        baseline: f64,
    ) -> Self {
        Measurement {
            baseline: Some(Baseline { name: baseline_name.to_owned(), value: baseline }),
            ratio: (baseline != 0.0).then(|| value / baseline),
            ..Measurement::new(name, value, unit, better)
        }
    }

    /// Goal: ratio at least `min`.
    pub(crate) fn ratio_at_least(mut self, min: f64) -> Self {
        let met = self.ratio.is_some_and(|r| r >= min);
        self.goal = Some(Goal { target: format!("ratio ≥ {min}"), met });
        self
    }

    /// Goal: ratio at most `max`.
    pub(crate) fn ratio_at_most(mut self, max: f64) -> Self {
        let met = self.ratio.is_some_and(|r| r <= max);
        self.goal = Some(Goal { target: format!("ratio ≤ {max}"), met });
        self
    }

    /// Goal: value below `max`.
    pub(crate) fn below(mut self, max: f64) -> Self {
        self.goal = Some(Goal { target: format!("< {max} {}", self.unit), met: self.value < max });
        self
    }

    /// Goal: value at least `min`.
    pub(crate) fn at_least(mut self, min: f64) -> Self {
        self.goal = Some(Goal { target: format!("≥ {min} {}", self.unit), met: self.value >= min });
        self
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

impl Report {
    pub(crate) fn new(machine: Machine, quick: bool, command: String) -> Self {
        Report { machine, command, quick, started_at: Utc::now(), wall_seconds: 0.0, measurements: Vec::new() }
    }

    pub(crate) fn extend(&mut self, measurements: impl IntoIterator<Item = Measurement>) {
        for m in measurements {
            println!("{}", row(&m));
            self.measurements.push(m);
        }
    }

    /// The report at `path`, if there is one.
    pub(crate) fn read(path: &Path) -> anyhow::Result<Option<Report>> {
        match std::fs::read_to_string(path) {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(report) => Ok(Some(report)),
                Err(error) => {
                    eprintln!("ignoring the previous report {}: {error}", path.display());
                    Ok(None)
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Records, for every measurement the previous report also has, its previous figure and the
    /// change: of the ratio where both runs have one, since absolute figures on a shared
    /// machine move with the neighbours' load.
    pub(crate) fn compare(&mut self, previous: Option<&Report>) {
        let Some(previous) = previous else { return };
        for m in &mut self.measurements {
            let Some(old) = previous.measurements.iter().find(|p| p.name == m.name) else { continue };
            let (change, of) = match (m.ratio, old.ratio) {
                (Some(now), Some(then)) if then != 0.0 => (now / then - 1.0, "ratio"),
                _ if old.value != 0.0 => (m.value / old.value - 1.0, "value"),
                _ => continue,
            };
            m.previous = Some(Previous { value: old.value, ratio: old.ratio, change, of: of.to_owned() });
        }
    }

    pub(crate) fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)?).with_context(|| format!("writing {}", path.display()))
    }

    /// The report as a Markdown table.
    pub(crate) fn table(&self) -> String {
        let mut out = String::from(
            "| measurement | baseline | baseline value | value | ratio | goal | vs previous run |\n\
             |---|---|---:|---:|---:|---|---:|\n",
        );
        for m in &self.measurements {
            out.push_str(&row(m));
            out.push('\n');
        }
        out
    }
}

fn figure(value: f64, unit: &str) -> String {
    let digits = if value.abs() >= 100.0 {
        0
    } else if value.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {unit}")
}

fn row(m: &Measurement) -> String {
    let (baseline_name, baseline) =
        m.baseline.as_ref().map_or((String::new(), String::new()), |b| (b.name.clone(), figure(b.value, &m.unit)));
    let ratio = m.ratio.map_or_else(String::new, |r| format!("{r:.2}"));
    let goal =
        m.goal.as_ref().map_or_else(String::new, |g| format!("{} {}", g.target, if g.met { "✅" } else { "❌" }));
    let previous = m.previous.as_ref().map_or_else(String::new, |p| format!("{:+.0}% ({})", p.change * 100.0, p.of));
    let name = match &m.note {
        Some(note) => format!("{} ({note})", m.name),
        None => m.name.clone(),
    };
    format!("| {name} | {baseline_name} | {baseline} | {} | {ratio} | {goal} | {previous} |", figure(m.value, &m.unit))
}
