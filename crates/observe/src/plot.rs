//! `logs/loss.svg`: the loss curve of a run drawn from its `logs/metrics.jsonl` — train loss and eval
//! loss on the left axis, the learning rate on the right — as an SVG (no font files needed).

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Width and height of the plot, in pixels.
pub const SIZE: (u32, u32) = (960, 540);

/// The series of a run's metrics: (step, value) pairs.
#[derive(Debug, Default, PartialEq)]
pub struct Curves {
    /// Train loss per step.
    pub loss: Vec<(f64, f64)>,
    /// Eval loss where evaluated.
    pub eval_loss: Vec<(f64, f64)>,
    /// Learning rate per step.
    pub lr: Vec<(f64, f64)>,
}

impl Curves {
    /// The curves of `logs/metrics.jsonl` text; lines that do not parse, and values that are not
    /// finite, are left out.
    pub fn from_metrics(metrics: &str) -> Self {
        let mut c = Curves::default();
        for line in metrics.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(step) = v["step"].as_f64() else {
                continue;
            };
            for (field, series) in [
                ("loss", &mut c.loss),
                ("eval_loss", &mut c.eval_loss),
                ("lr", &mut c.lr),
            ] {
                if let Some(x) = v[field].as_f64().filter(|x| x.is_finite()) {
                    series.push((step, x));
                }
            }
        }
        c
    }
}

/// Points drawn per curve at most: a longer curve is thinned (see [`thin`]), so a run of a million
/// steps draws as fast, and as small a file, as one of a few thousand.
pub const MAX_POINTS: usize = 2000;

/// `points` thinned to at most about `max`: each bucket of consecutive points keeps its lowest and
/// highest, in step order, so spikes stay visible.
pub fn thin(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max < 2 {
        return points.to_vec();
    }
    let bucket = points.len().div_ceil(max / 2);
    let mut out = Vec::with_capacity(max + 2);
    for chunk in points.chunks(bucket) {
        let by_y = |a: &&(f64, f64), b: &&(f64, f64)| a.1.total_cmp(&b.1);
        let (Some(lo), Some(hi)) = (chunk.iter().min_by(by_y), chunk.iter().max_by(by_y)) else {
            continue;
        };
        let (first, second) = if lo.0 <= hi.0 { (lo, hi) } else { (hi, lo) };
        out.push(*first);
        if second != first {
            out.push(*second);
        }
    }
    out
}

/// The range of `values` widened a little (and never empty), for an axis.
fn axis(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
    (lo - pad)..(hi + pad)
}

/// The SVG text of the plot of `curves`, titled `title`.
pub fn render_svg(curves: &Curves, title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow!("drawing the plot: {e}"))?;
        let last_step = curves.loss.last().map_or(1.0, |(s, _)| *s).max(1.0);
        let loss_range = axis(curves.loss.iter().chain(&curves.eval_loss).map(|(_, y)| *y));
        let lr_range = axis(curves.lr.iter().map(|(_, y)| *y));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(70)
            .build_cartesian_2d(0.0..last_step, loss_range)
            .map_err(|e| anyhow!("drawing the plot: {e}"))?
            .set_secondary_coord(0.0..last_step, lr_range);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .y_label_formatter(&|y| format!("{y:.3}"))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| anyhow!("drawing the plot: {e}"))?;
        chart
            .configure_secondary_axes()
            .y_desc("learning rate")
            .y_label_formatter(&|y| format!("{y:.1e}"))
            .draw()
            .map_err(|e| anyhow!("drawing the plot: {e}"))?;
        let train = BLUE.stroke_width(2);
        chart
            .draw_series(LineSeries::new(thin(&curves.loss, MAX_POINTS), train))
            .map_err(|e| anyhow!("drawing the plot: {e}"))?
            .label("train loss")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], train));
        if !curves.eval_loss.is_empty() {
            let eval = RED.stroke_width(2);
            chart
                .draw_series(LineSeries::new(thin(&curves.eval_loss, MAX_POINTS), eval))
                .map_err(|e| anyhow!("drawing the plot: {e}"))?
                .label("eval loss")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], eval));
        }
        let lr = RGBColor(0, 150, 0).stroke_width(1);
        chart
            .draw_secondary_series(LineSeries::new(thin(&curves.lr, MAX_POINTS), lr))
            .map_err(|e| anyhow!("drawing the plot: {e}"))?
            .label("learning rate (right axis)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], lr));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow!("drawing the plot: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("drawing the plot: {e}"))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_come_from_metrics_lines() {
        let text = "{\"step\":1,\"loss\":3.0,\"lr\":0.1}\nnot json\n{\"step\":2,\"loss\":2.0,\
                    \"lr\":0.2,\"eval_loss\":2.5}\n{\"step\":3,\"loss\":null,\"lr\":0.3}\n";
        let c = Curves::from_metrics(text);
        assert_eq!(c.loss, vec![(1.0, 3.0), (2.0, 2.0)]);
        assert_eq!(c.eval_loss, vec![(2.0, 2.5)]);
        assert_eq!(c.lr, vec![(1.0, 0.1), (2.0, 0.2), (3.0, 0.3)]);
    }

    #[test]
    fn long_curves_are_thinned_keeping_each_buckets_extremes() {
        let points: Vec<(f64, f64)> = (0..10_000)
            .map(|i| (i as f64, if i == 4321 { 100.0 } else { (i % 7) as f64 }))
            .collect();
        let thinned = thin(&points, 2000);
        assert!(thinned.len() <= 2000, "{}", thinned.len());
        assert!(
            thinned.windows(2).all(|w| w[0].0 < w[1].0),
            "not in step order"
        );
        assert!(thinned.contains(&(4321.0, 100.0)), "the spike is lost");
        assert_eq!(thinned.first().map(|p| p.0), Some(0.0));
        let short = &points[..50];
        assert_eq!(thin(short, 2000), short.to_vec());
    }

    #[test]
    fn the_plot_is_an_svg_with_the_curves_and_labels() {
        let text: String = (1..=50)
            .map(|s| {
                format!(
                    "{{\"step\":{s},\"loss\":{},\"lr\":{},\"eval_loss\":{}}}\n",
                    5.0 / s as f64,
                    1e-3 * s as f64,
                    6.0 / s as f64
                )
            })
            .collect();
        let svg = render_svg(&Curves::from_metrics(&text), "run demo").unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("width=\"960\"") && svg.contains("height=\"540\""));
        for label in [
            "train loss",
            "eval loss",
            "learning rate",
            "run demo",
            "step",
        ] {
            assert!(svg.contains(label), "missing {label}");
        }
        // Three polylines: train, eval, lr (legend samples are paths of two points).
        assert!(svg.matches("<polyline").count() >= 3);
        // An empty run draws axes without failing.
        let empty = render_svg(&Curves::default(), "empty").unwrap();
        assert!(empty.contains("</svg>"));
    }
}
