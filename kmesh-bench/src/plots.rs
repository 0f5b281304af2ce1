//! SVG plots of the results (plotters, SVG backend: no font or image libraries needed).

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::results::{PATHS, Results};

#[derive(Debug, thiserror::Error)]
#[error("drawing {file}: {msg}")]
pub struct PlotError {
    file: String,
    msg: String,
}

const COLORS: [RGBColor; crate::results::PATHS.len()] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(23, 190, 207),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn path_color(id: &str) -> RGBColor {
    PATHS.iter().position(|(p, _)| *p == id).map(|i| COLORS[i]).unwrap_or(BLACK)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;
/// (path, value) bars of one panel.
type Bars = Vec<(&'static str, Option<f64>)>;
/// (title, y axis, bars).
type Panel<'a> = (&'a str, &'a str, Bars);
/// (label, color, points) of one line.
type Series = (String, RGBColor, Vec<(f64, f64)>);

/// One bar per path in a panel; missing values are left out.
fn bar_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    values: &[(&'static str, Option<f64>)],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let n = values.len() as u32;
    let ymax = values.iter().filter_map(|(_, v)| *v).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((0u32..n - 1).into_segmented(), 0f64..ymax)?;
    let names: Vec<&str> = values.iter().map(|(p, _)| *p).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .x_labels(values.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).map(|s| s.to_string()).unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 11))
        .draw()?;
    for (i, (p, v)) in values.iter().enumerate() {
        let Some(v) = v else { continue };
        let i = i as u32;
        let mut bar = Rectangle::new(
            [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *v)],
            path_color(p).filled(),
        );
        bar.set_margin(0, 0, 6, 6);
        chart.draw_series(std::iter::once(bar))?;
        let label = if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") };
        chart.draw_series(std::iter::once(Text::new(
            label,
            (SegmentValue::CenterOf(i), *v),
            ("sans-serif", 10).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Bottom,
            )),
        )))?;
    }
    Ok(())
}

fn bars_svg(file: &Path, panels: &[Panel]) -> DrawResult {
    let h = 300 * panels.len() as u32;
    let root = SVGBackend::new(file, (820, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels.len(), 1));
    for (a, (title, y, v)) in areas.iter().zip(panels) {
        bar_panel(a, title, y, v)?;
    }
    root.present()?;
    Ok(())
}

fn per_path(f: impl Fn(&str) -> Option<f64>) -> Bars {
    PATHS.iter().map(|(p, _)| (*p, f(p))).collect()
}

fn cpu_svg(file: &Path, r: &Results) -> DrawResult {
    let root = SVGBackend::new(file, (820, 340)).into_drawing_area();
    root.fill(&WHITE)?;
    let rows: Vec<(&str, [f64; 3])> = PATHS
        .iter()
        .map(|(p, _)| {
            let s = r.summary("short-c16", p);
            (
                *p,
                [
                    s.cpu10k_client.unwrap_or(0.0),
                    s.cpu10k_server.unwrap_or(0.0),
                    s.cpu10k_proxy.unwrap_or(0.0),
                ],
            )
        })
        .collect();
    let ymax = rows.iter().map(|(_, v)| v.iter().sum::<f64>()).fold(0.0, f64::max).max(1e-9) * 1.15;
    let n = rows.len() as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption("CPU seconds per 10,000 short requests, 16 clients", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((0u32..n - 1).into_segmented(), 0f64..ymax)?;
    let names: Vec<&str> = rows.iter().map(|(p, _)| *p).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("CPU s / 10k requests")
        .x_labels(rows.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).map(|s| s.to_string()).unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 11))
        .draw()?;
    let parts = [
        ("client", RGBColor(31, 119, 180)),
        ("server", RGBColor(44, 160, 44)),
        ("proxy / daemon", RGBColor(214, 39, 40)),
    ];
    for (k, (name, color)) in parts.iter().enumerate() {
        let bars: Vec<Rectangle<(SegmentValue<u32>, f64)>> = rows
            .iter()
            .enumerate()
            .map(|(i, (_, v))| {
                let y0: f64 = v[..k].iter().sum();
                let mut b = Rectangle::new(
                    [(SegmentValue::Exact(i as u32), y0), (SegmentValue::Exact(i as u32 + 1), y0 + v[k])],
                    color.filled(),
                );
                b.set_margin(0, 0, 6, 6);
                b
            })
            .collect();
        let c = *color;
        chart
            .draw_series(bars)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Log-log lines, one per series: (label, color, points).
fn loglog_svg(file: &Path, title: &str, y_desc: &str, series: &[Series]) -> DrawResult {
    let root = SVGBackend::new(file, (820, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let pts = series.iter().flat_map(|s| s.2.iter());
    let (mut ymin, mut ymax) = (f64::MAX, f64::MIN);
    let (mut xmin, mut xmax) = (f64::MAX, f64::MIN);
    for (x, y) in pts {
        ymin = ymin.min(*y);
        ymax = ymax.max(*y);
        xmin = xmin.min(*x);
        xmax = xmax.max(*x);
    }
    if ymin > ymax {
        (ymin, ymax, xmin, xmax) = (1.0, 10.0, 1.0, 10.0);
    }
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(65)
        .build_cartesian_2d((xmin / 1.5..xmax * 1.5).log_scale(), (ymin / 2.0..ymax * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("services")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| if *y >= 10.0 { format!("{y:.0}") } else { format!("{y:.2}") })
        .label_style(("sans-serif", 11))
        .draw()?;
    for (label, color, points) in series {
        let c = *color;
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes every plot into `dir`; returns the file names.
pub fn render(r: &Results, dir: &Path) -> Result<Vec<String>, PlotError> {
    let mut files = Vec::new();
    let mut go = |name: &str, f: &dyn Fn(&Path) -> DrawResult| -> Result<(), PlotError> {
        let path = dir.join(name);
        f(&path).map_err(|e| PlotError { file: path.display().to_string(), msg: e.to_string() })?;
        files.push(name.to_string());
        Ok(())
    };
    go("latency.svg", &|p| {
        bars_svg(
            p,
            &[
                (
                    "Short connections, 1 client: p50 latency (wrk)",
                    "us",
                    per_path(|x| r.summary("short-c1", x).p50_us),
                ),
                (
                    "Short transaction incl. connect(), 1 client: p50 (in-repo client)",
                    "us",
                    per_path(|x| r.summary("txn-c1", x).p50_us),
                ),
                (
                    "Keep-alive, 1 client: p50 latency (wrk)",
                    "us",
                    per_path(|x| r.summary("keepalive-c1", x).p50_us),
                ),
            ],
        )
    })?;
    go("throughput.svg", &|p| {
        bars_svg(
            p,
            &[
                (
                    "Keep-alive, 16 clients: requests/s",
                    "req/s",
                    per_path(|x| r.summary("keepalive-c16", x).rps),
                ),
                (
                    "Short connections, 16 clients: requests/s",
                    "req/s",
                    per_path(|x| r.summary("short-c16", x).rps),
                ),
                ("Bulk transfer (iperf3, 1 stream)", "Gbit/s", per_path(|x| r.summary("bulk", x).gbps)),
            ],
        )
    })?;
    go("cpu.svg", &|p| cpu_svg(p, r))?;
    let mut points: Vec<usize> = r.scale.iter().map(|s| s.services).collect();
    points.sort_unstable();
    points.dedup();
    go("connect_scale.svg", &|p| {
        let series: Vec<Series> = ["direct", "kmesh", "iptables", "nftables"]
            .iter()
            .map(|path| {
                let pts =
                    points.iter().filter_map(|n| r.connect_p50(*n, path).map(|v| (*n as f64, v))).collect();
                (path.to_string(), path_color(path), pts)
            })
            .collect();
        loglog_svg(p, "connect() p50 to a service VIP vs number of services", "us", &series)
    })?;
    go("control_plane.svg", &|p| {
        let series: Vec<Series> = [
            ("kmesh", "kmesh-daemon start to ready"),
            ("iptables", "iptables-restore"),
            ("nftables", "nft -f"),
        ]
        .iter()
        .map(|(path, label)| {
            let pts = r
                .control_plane
                .iter()
                .filter(|c| c.path == *path && c.error.is_none() && c.program_s > 0.0)
                .map(|c| (c.services as f64, c.program_s))
                .collect();
            (label.to_string(), path_color(path), pts)
        })
        .collect();
        loglog_svg(p, "Time to program the kernel vs number of services", "seconds", &series)
    })?;
    Ok(files)
}
