//! Plots like the FGD paper's Fig. 9(a): unallocated GPU % against arrived workload %, the median
//! over seeds with its 25–75% band, one line per policy; the published FGD curve dashed.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;
use tessera_sched::policy::PolicyKind;

use crate::metrics::{Curve, MAX_ARRIVED_PCT};
use crate::published::Published;
use crate::replay::RunResult;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {file}: {message}")]
pub struct PlotError {
    pub file: String,
    pub message: String,
}

/// Each policy's colour, by name; a policy not listed gets a neutral one (adding a policy needs
/// nothing here).
const COLORS: [(&str, RGBColor); 7] = [
    ("Random", RGBColor(150, 150, 150)),
    ("DotProd", RGBColor(148, 103, 189)),
    ("GpuClustering", RGBColor(140, 86, 75)),
    ("GpuPacking", RGBColor(227, 119, 194)),
    ("BestFit", RGBColor(44, 160, 44)),
    ("FGD", RGBColor(31, 119, 180)),
    ("Tessera", RGBColor(214, 39, 40)),
];

fn color(policy: PolicyKind) -> RGBColor {
    COLORS
        .iter()
        .find(|(name, _)| *name == policy.name())
        .map_or(RGBColor(90, 90, 90), |(_, c)| *c)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// (arrived %, 25th, median, 75th percentile of unallocated %) over curves.
fn bands<'a>(curves: impl Iterator<Item = &'a Curve> + Clone) -> Vec<(f64, f64, f64, f64)> {
    (0..=MAX_ARRIVED_PCT)
        .filter_map(|pct| {
            let mut v: Vec<f64> = curves
                .clone()
                .filter_map(|c| c.unallocated_at(pct))
                .collect();
            if v.is_empty() {
                return None;
            }
            v.sort_by(f64::total_cmp);
            Some((
                pct as f64,
                quantile(&v, 0.25),
                quantile(&v, 0.5),
                quantile(&v, 0.75),
            ))
        })
        .collect()
}

fn register_font() {
    // Registering twice is harmless; the font is compiled in, so no system font is needed.
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
}

/// Draws one trace's curves to a PNG.
pub fn plot_trace(
    path: &Path,
    trace: &str,
    results: &[RunResult],
    published: Option<&Published>,
) -> Result<(), PlotError> {
    register_font();
    let err = |e: String| PlotError {
        file: path.display().to_string(),
        message: e,
    };
    let root = BitMapBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (title, body) = root.split_vertically(40);
    title
        .titled(
            &format!("{trace}: unallocated GPU vs arrived workload (median, 25–75% band)"),
            ("sans-serif", 22),
        )
        .map_err(|e| err(e.to_string()))?;
    let (left, right) = body.split_horizontally(700);
    let mut policies: Vec<PolicyKind> = results
        .iter()
        .filter(|r| r.trace == trace)
        .map(|r| r.policy)
        .collect();
    policies.sort();
    policies.dedup();
    let fgd_published = published.and_then(|p| p.curves(trace, "06-FGD"));
    let zoom_from = 80usize;
    let zoom_top = results
        .iter()
        .filter(|r| r.trace == trace)
        .flat_map(|r| (zoom_from..=MAX_ARRIVED_PCT).filter_map(|p| r.curve.unallocated_at(p)))
        .fold(5.0f64, f64::max);
    let panels = [
        (left, 0.0..130.0, 0.0..100.0, "whole run"),
        (
            right,
            zoom_from as f64..130.0,
            0.0..(zoom_top * 1.05).ceil(),
            "saturation (zoom)",
        ),
    ];
    for (area, xr, yr, caption) in panels {
        let mut chart = ChartBuilder::on(&area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(xr.clone(), yr)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("arrived workload (% of GPU capacity)")
            .y_desc("unallocated GPU %")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let in_range = |x: f64| x >= xr.start && x <= xr.end;
        for &policy in &policies {
            let c = color(policy);
            let b = bands(
                results
                    .iter()
                    .filter(|r| r.trace == trace && r.policy == policy)
                    .map(|r| &r.curve),
            );
            let band: Vec<(f64, f64)> = b
                .iter()
                .filter(|p| in_range(p.0))
                .map(|p| (p.0, p.3))
                .chain(b.iter().rev().filter(|p| in_range(p.0)).map(|p| (p.0, p.1)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(band, c.mix(0.18))))
                .map_err(|e| err(e.to_string()))?;
            chart
                .draw_series(LineSeries::new(
                    b.iter().filter(|p| in_range(p.0)).map(|p| (p.0, p.2)),
                    c.stroke_width(2),
                ))
                .map_err(|e| err(e.to_string()))?
                .label(policy.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                });
        }
        if let Some(curves) = fgd_published {
            let b = bands(curves.iter().map(|(_, c)| c));
            chart
                .draw_series(DashedLineSeries::new(
                    b.iter().filter(|p| in_range(p.0)).map(|p| (p.0, p.2)),
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))
                .map_err(|e| err(e.to_string()))?
                .label("FGD (published)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
