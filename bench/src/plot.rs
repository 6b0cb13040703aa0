//! Line charts of benchmark results, drawn with `plotters` to a PNG and an SVG.
//!
//! Text is laid out (and, in the PNG, rasterised) with DejaVu Sans, whose bytes the `dejavu`
//! crate embeds in the binary; plotters reads it through its `ab_glyph` feature. So charts draw
//! the same on a bare machine: no system font, fontconfig or freetype is needed. The font is
//! registered under the generic family `sans-serif`, which is also the family the SVG names, so
//! an SVG viewer renders the text with whatever sans-serif face it has.
//!
//! DejaVu's licence (Bitstream Vera's terms, DejaVu's changes in the public domain) allows
//! embedding and redistribution as part of a larger program.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The name shown in the legend.
    pub name: String,
    /// The points `(x, y)`; the line joins them in increasing order of x.
    pub points: Vec<(f64, f64)>,
}

/// Size of the PNG in pixels; the SVG uses the same view box.
const SIZE: (u32, u32) = (1024, 640);

/// The font family every text of a chart uses; [`register_fonts`] binds it to DejaVu Sans.
const FAMILY: &str = "sans-serif";

/// The most ticks on the x axis, so that labels do not run into each other.
const MAX_X_TICKS: usize = 12;

/// Draws `series` as lines with markers; x axis logarithmic (base 2) when `log_x`; y from 0 to
/// the max y rounded up (y is a hit ratio in percent). Writes `png` (1024x640) and `svg`.
///
/// Each series gets its own colour and marker shape and an entry in the legend. The PNG's
/// format is taken from the extension of `png`, which must be `.png`.
///
/// Fails when there is no point at all, when a coordinate is not finite, when a y is negative,
/// when `log_x` and an x is not positive, or when a file cannot be written.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    log_x: bool,
    series: &[Series],
    png: &Path,
    svg: &Path,
) -> Result<()> {
    register_fonts()?;
    let axes = Axes::fit(series, log_x)?;
    let text = Text {
        title,
        x_label,
        y_label,
    };
    draw(
        BitMapBackend::new(png, SIZE).into_drawing_area(),
        &text,
        &axes,
        series,
    )
    .with_context(|| format!("drawing the chart {title:?} to {}", png.display()))?;
    draw(
        SVGBackend::new(svg, SIZE).into_drawing_area(),
        &text,
        &axes,
        series,
    )
    .with_context(|| format!("drawing the chart {title:?} to {}", svg.display()))?;
    Ok(())
}

/// Registers the embedded DejaVu Sans (regular and bold) as [`FAMILY`], once per process.
fn register_fonts() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FAMILY, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans is not a valid font".to_string())?;
            register_font(FAMILY, FontStyle::Bold, dejavu::sans::bold())
                .map_err(|_| "the embedded DejaVu Sans Bold is not a valid font".to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The texts around the plot.
struct Text<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
}

/// Ranges and ticks of both axes. On a logarithmic x axis the chart's x coordinate is
/// `log2(x)`, so ticks are whole exponents and labels show `2^t`.
struct Axes {
    log_x: bool,
    x: Range<f64>,
    x_ticks: Vec<f64>,
    x_step: f64,
    y_top: f64,
    y_ticks: Vec<f64>,
    y_step: f64,
}

impl Axes {
    /// Chooses the axes for `series`, checking every point.
    fn fit(series: &[Series], log_x: bool) -> Result<Self> {
        let mut x_min = f64::INFINITY;
        let mut x_max = f64::NEG_INFINITY;
        let mut y_max = 0.0_f64;
        for s in series {
            for &(x, y) in &s.points {
                if !x.is_finite() || !y.is_finite() {
                    bail!(
                        "series {:?} has a point that is not finite: ({x}, {y})",
                        s.name
                    );
                }
                if y < 0.0 {
                    bail!("series {:?} has a negative y: ({x}, {y})", s.name);
                }
                if log_x && x <= 0.0 {
                    bail!(
                        "series {:?} has x = {x}, which a logarithmic axis cannot show",
                        s.name
                    );
                }
                let x = if log_x { x.log2() } else { x };
                x_min = x_min.min(x);
                x_max = x_max.max(x);
                y_max = y_max.max(y);
            }
        }
        if x_min > x_max {
            bail!("no point to plot");
        }

        let (x, x_ticks, x_step) = if log_x {
            let mut lo = x_min.floor();
            let mut hi = x_max.ceil();
            if lo == hi {
                lo -= 1.0;
                hi += 1.0;
            }
            // Whole exponents, thinned out to at most MAX_X_TICKS.
            let step = ((hi - lo) / MAX_X_TICKS as f64).ceil().max(1.0);
            (lo..hi, ticks(lo, hi, step), step)
        } else {
            if x_min == x_max {
                let half = (x_min.abs() / 2.0).max(1.0);
                x_min -= half;
                x_max += half;
            }
            let step = nice_step((x_max - x_min) / 8.0);
            let lo = (x_min / step).floor() * step;
            let hi = (x_max / step).ceil() * step;
            (lo..hi, ticks(lo, hi, step), step)
        };

        let y_step = if y_max > 0.0 {
            nice_step(y_max / 5.0)
        } else {
            0.2
        };
        let y_top = ((y_max / y_step).ceil() * y_step).max(y_step);
        Ok(Self {
            log_x,
            x,
            x_ticks,
            x_step,
            y_top,
            y_ticks: ticks(0.0, y_top, y_step),
            y_step,
        })
    }

    /// The chart's x coordinate of a data x.
    fn to_chart_x(&self, x: f64) -> f64 {
        if self.log_x { x.log2() } else { x }
    }

    /// The label of an x tick (a chart coordinate).
    fn x_tick_label(&self, t: f64) -> String {
        if !self.log_x {
            return format_number(t, self.x_step);
        }
        let value = t.exp2();
        if t.abs() > 24.0 {
            format!("2^{t:.0}")
        } else if t >= 0.0 {
            format!("{value:.0}")
        } else {
            format!("{value}")
        }
    }

    fn x_coord(&self) -> Ticked {
        Ticked::new(self.x.clone(), self.x_ticks.clone())
    }

    fn y_coord(&self) -> Ticked {
        Ticked::new(0.0..self.y_top, self.y_ticks.clone())
    }
}

/// A linear f64 axis whose ticks (and grid lines) are exactly the given ones. (plotters'
/// `with_key_points` does the same, but its f64 axis then loses the label formatter hook.)
struct Ticked {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(range: Range<f64>, ticks: Vec<f64>) -> Self {
        Self {
            linear: range.into(),
            ticks,
        }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Only bold grid lines: light ones would all be requested with their own hint.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.linear.range()
    }
}

/// `lo, lo + step, ...` up to `hi` (inclusive, allowing for rounding).
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let n = ((hi - lo) / step + 1e-9).floor() as usize;
    (0..=n).map(|i| lo + step * i as f64).collect()
}

/// The smallest of 1, 2 and 5 times a power of ten that is at least `raw` (which is > 0).
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// `value` with as many decimals as a tick `step` needs.
fn format_number(value: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let s = format!("{value:.decimals$}");
    // No "-0" for a tick at zero reached by rounding.
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}

/// The colour of series `i`: the ten "tab10" colours, then hues spread by the golden
/// ratio.
fn colour(i: usize) -> RGBAColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    match TAB10.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b).to_rgba(),
        None => HSLColor((i as f64 * 0.618_034).fract(), 0.7, 0.42).to_rgba(),
    }
}

/// The outline of the marker of series `i`, in pixels around its point: a disc, a square, a
/// triangle, a diamond or a cross, in turn. All are polygons, so that one element type draws
/// them all.
fn marker_outline(i: usize) -> Vec<(i32, i32)> {
    match i % 5 {
        0 => (0..16)
            .map(|k| {
                let a = f64::from(k) * std::f64::consts::TAU / 16.0;
                (
                    (5.5 * a.cos()).round() as i32,
                    (5.5 * a.sin()).round() as i32,
                )
            })
            .collect(),
        1 => vec![(-5, -5), (5, -5), (5, 5), (-5, 5)],
        2 => vec![(0, -7), (7, 5), (-7, 5)],
        3 => vec![(0, -7), (7, 0), (0, 7), (-7, 0)],
        _ => vec![
            (-6, -4),
            (-4, -6),
            (0, -2),
            (4, -6),
            (6, -4),
            (2, 0),
            (6, 4),
            (4, 6),
            (0, 2),
            (-4, 6),
            (-6, 4),
            (-2, 0),
        ],
    }
}

/// Draws the whole chart on `root` and writes it out.
fn draw<DB>(
    root: DrawingArea<DB, Shift>,
    text: &Text<'_>,
    axes: &Axes,
    series: &[Series],
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(text.title, (FAMILY, 30, FontStyle::Bold))
        .margin(24)
        // Room on the right for the last x tick's label, centred on the plot's edge.
        .margin_right(48)
        .x_label_area_size(64)
        .y_label_area_size(84)
        .build_cartesian_2d(axes.x_coord(), axes.y_coord())?;

    let x_label = |t: &f64| axes.x_tick_label(*t);
    let y_label = |v: &f64| format_number(*v, axes.y_step);
    chart
        .configure_mesh()
        .x_desc(text.x_label)
        .y_desc(text.y_label)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style((FAMILY, 18))
        .axis_desc_style((FAMILY, 22))
        .bold_line_style(BLACK.mix(0.15))
        .axis_style(BLACK.stroke_width(1))
        .draw()?;

    for (i, s) in series.iter().enumerate() {
        let colour = colour(i);
        let mut points: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|&(x, y)| (axes.to_chart_x(x), y))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));

        let line = colour.stroke_width(3);
        let dot = colour.filled();
        let outline = marker_outline(i);
        let legend_outline: Vec<(i32, i32)> = outline.iter().map(|&(x, y)| (x + 11, y)).collect();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), line))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(-4, 0), (26, 0)], line)
                    + Polygon::new(legend_outline.clone(), dot)
            });
        chart.draw_series(
            points
                .iter()
                .map(|&p| EmptyElement::at(p) + Polygon::new(outline.clone(), dot)),
        )?;
    }

    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .margin(16)
            .legend_area_size(36)
            .label_font((FAMILY, 18))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.5))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

    fn two_series() -> Vec<Series> {
        let sizes = [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];
        vec![
            Series {
                name: "LRU (moka)".to_string(),
                points: sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| (x, 12.0 + 11.0 * i as f64))
                    .collect(),
            },
            Series {
                name: "shadow index".to_string(),
                points: sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| (x, 20.0 + 12.5 * i as f64))
                    .collect(),
            },
        ]
    }

    #[test]
    fn draws_png_and_svg_with_text() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let png = dir.path().join("hit_ratio.png");
        let svg = dir.path().join("hit_ratio.svg");
        line_chart(
            "Hit ratio by cache size",
            "cache size (MiB)",
            "hit ratio (%)",
            true,
            &two_series(),
            &png,
            &svg,
        )?;

        let png_bytes = std::fs::read(&png)?;
        assert!(png_bytes.starts_with(PNG_MAGIC), "not a PNG");
        assert!(
            png_bytes.len() > 8 * 1024,
            "PNG is only {} bytes",
            png_bytes.len()
        );

        let svg_text = std::fs::read_to_string(&svg)?;
        for needle in [
            "Hit ratio by cache size",
            "LRU (moka)",
            "shadow index",
            "cache size (MiB)",
            "hit ratio (%)",
        ] {
            assert!(svg_text.contains(needle), "SVG lacks {needle:?}");
        }
        // Tick labels: one of the base-2 x axis, and the top of the y axis (max 95 rounds up to
        // 100). plotters writes each text on a line of its own.
        for tick in ["1024", "100"] {
            assert!(
                svg_text.lines().any(|line| line.trim() == tick),
                "SVG lacks the tick label {tick}"
            );
        }
        Ok(())
    }

    #[test]
    fn linear_axis_and_one_point() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let png = dir.path().join("one.png");
        let svg = dir.path().join("one.svg");
        let series = [Series {
            name: "only".to_string(),
            points: vec![(3.0, 42.0)],
        }];
        line_chart("One point", "x", "y", false, &series, &png, &svg)?;
        assert!(std::fs::read(&png)?.starts_with(PNG_MAGIC));
        assert!(std::fs::read_to_string(&svg)?.contains("only"));
        Ok(())
    }

    #[test]
    fn bad_input_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let png = dir.path().join("bad.png");
        let svg = dir.path().join("bad.svg");
        let chart = |log_x, points: Vec<(f64, f64)>| {
            let series = [Series {
                name: "s".to_string(),
                points,
            }];
            line_chart("t", "x", "y", log_x, &series, &png, &svg)
        };
        assert!(chart(false, vec![]).is_err(), "no point");
        assert!(
            chart(true, vec![(0.0, 1.0)]).is_err(),
            "x = 0 on a log axis"
        );
        assert!(chart(false, vec![(1.0, f64::NAN)]).is_err(), "NaN");
        assert!(chart(false, vec![(1.0, -1.0)]).is_err(), "negative y");
        let missing_dir = dir.path().join("no/such/dir/chart.png");
        let series = two_series();
        assert!(
            line_chart("t", "x", "y", true, &series, &missing_dir, &svg).is_err(),
            "unwritable PNG"
        );
        Ok(())
    }

    #[test]
    fn axes() -> Result<()> {
        assert_eq!(nice_step(17.46), 20.0);
        assert_eq!(nice_step(9.0), 10.0);
        assert_eq!(nice_step(0.3), 0.5);
        let series = two_series();
        let log = Axes::fit(&series, true)?;
        assert_eq!(log.x, 6.0..12.0);
        assert_eq!(log.x_ticks, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]);
        assert_eq!(log.x_tick_label(10.0), "1024");
        assert_eq!(log.y_top, 100.0);
        assert_eq!(format_number(0.0, 0.5), "0.0");
        assert_eq!(format_number(-0.0001, 1.0), "0");
        Ok(())
    }
}
