//! The SVG charts of `docs/benchmarks.md`, drawn from the run's own figures.

use std::path::Path;

use plotters::prelude::*;

use crate::latency::Curve;

/// Throughput of one append shape, Annal and raw.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Throughput {
    pub(crate) writers: usize,
    pub(crate) batch: usize,
    pub(crate) raw: f64,
    pub(crate) annal: f64,
}

/// What the charts are drawn from.
#[derive(Debug, Default)]
pub(crate) struct Data {
    pub(crate) throughput: Vec<Throughput>,
    pub(crate) lag: Vec<Curve>,
    pub(crate) fanout: Vec<Curve>,
}

impl Data {
    /// Writes `throughput.svg`, `lag.svg` and `fanout.svg` (those it has figures for) into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        if !self.throughput.is_empty() {
            throughput(&dir.join("throughput.svg"), &self.throughput)?;
        }
        if !self.lag.is_empty() {
            latency(
                &dir.join("lag.svg"),
                "Commit to read-model-visible latency (exactly-once SQL projection)",
                &self.lag,
            )?;
        }
        if !self.fanout.is_empty() {
            latency(&dir.join("fanout.svg"), "Delivery latency to each subscription, PostgreSQL", &self.fanout)?;
        }
        Ok(())
    }
}

fn color(i: usize) -> RGBAColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    PALETTE[i % PALETTE.len()].to_rgba()
}

/// Events per second by number of writers, Annal beside raw INSERTs: one panel for single-event
/// appends, one for 50-event batches.
fn throughput(path: &Path, data: &[Throughput]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled("PostgreSQL appends: events/s by concurrent writers", ("sans-serif", 20))?;
    let panels = root.split_evenly((1, 2));
    for (panel, batch) in panels.iter().zip([1, 50]) {
        let shapes: Vec<&Throughput> = data.iter().filter(|t| t.batch == batch).collect();
        if shapes.is_empty() {
            continue;
        }
        let top = shapes.iter().map(|t| t.raw.max(t.annal)).fold(0.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{batch}-event appends"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(shapes.len() as f64 - 0.5), 0f64..top)?;
        let labels: Vec<String> = shapes.iter().map(|t| t.writers.to_string()).collect();
        chart
            .configure_mesh()
            .x_labels(shapes.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_desc("writers")
            .y_desc("events/s")
            .disable_x_mesh()
            .draw()?;
        for (i, (name, pick)) in [("raw INSERT", 0), ("Annal", 1)].into_iter().enumerate() {
            let c = color(pick);
            let values: Vec<(f64, f64)> =
                shapes.iter().enumerate().map(|(x, t)| (x as f64, if i == 0 { t.raw } else { t.annal })).collect();
            let offset = if i == 0 { -0.2 } else { 0.0 };
            chart
                .draw_series(
                    values.iter().map(|&(x, y)| Rectangle::new([(x + offset, 0.0), (x + offset + 0.2, y)], c.filled())),
                )?
                .label(name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

/// Latency by percentile, one line per run; the x axis is spaced in "nines" so the tail shows.
fn latency(path: &Path, title: &str, curves: &[Curve]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let values = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1));
    let low = values.clone().fold(f64::INFINITY, f64::min).max(0.01) * 0.8;
    let high = values.fold(0.0, f64::max).max(low * 10.0) * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..3f64, (low..high).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(7)
        .x_label_formatter(&|x| format!("p{}", trim(100.0 * (1.0 - 10f64.powf(-x)))))
        .y_label_formatter(&|y| trim(*y))
        .x_desc("percentile")
        .y_desc("milliseconds (log scale)")
        .draw()?;
    for (i, curve) in curves.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(curve.points.iter().copied(), c.stroke_width(2)))?
            .label(curve.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A number with as few digits as it needs.
fn trim(value: f64) -> String {
    let text = if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_owned() } else { text }
}
