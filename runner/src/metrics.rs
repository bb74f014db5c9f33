//! The Prometheus text exposition of the projections' lag.

use annal_projections::RunningProjections;

/// The Prometheus text exposition of every projection's lag.
pub(crate) async fn text(running: &RunningProjections, names: &[String]) -> String {
    use std::fmt::Write;
    let mut lags = Vec::new();
    for name in names {
        lags.push((name, running.is_running(name).unwrap_or(false), running.lag(name).await.ok()));
    }
    let mut out = String::new();
    let gauges = [
        ("annal_projection_running", "1 while the projection runs"),
        ("annal_projection_events_behind", "events selected but not yet applied"),
        ("annal_projection_seconds_behind", "age of the oldest event not yet applied"),
        ("annal_projection_latency_seconds", "commit-to-applied latency quantiles"),
    ];
    for (metric, help) in gauges {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for (name, up, lag) in &lags {
            let label = format!("projection=\"{name}\"");
            match (metric, lag) {
                ("annal_projection_running", _) => {
                    let _ = writeln!(out, "{metric}{{{label}}} {}", u8::from(*up));
                }
                ("annal_projection_events_behind", Some(lag)) => {
                    let _ = writeln!(out, "{metric}{{{label}}} {}", lag.events_behind);
                }
                ("annal_projection_seconds_behind", Some(lag)) => {
                    let _ = writeln!(out, "{metric}{{{label}}} {}", lag.time_behind.as_secs_f64());
                }
                (_, Some(lag)) => {
                    for (quantile, value) in
                        [("0.5", lag.latency.p50), ("0.99", lag.latency.p99), ("0.999", lag.latency.p999)]
                    {
                        let _ = writeln!(out, "{metric}{{{label},quantile=\"{quantile}\"}} {}", value.as_secs_f64());
                    }
                }
                (_, None) => {}
            }
        }
    }
    out
}
