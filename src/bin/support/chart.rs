//! A small line-chart renderer to PNG for the soak run: stacked panels of time series with a
//! title, y-range labels, minute ticks and an optional target line. A 5×7 bitmap font and a
//! PNG encoder (zlib through flate2, CRC-32 here) keep it free of font files and heavy
//! plotting crates.

use std::io::Write;

use anyhow::Result;
use flate2::Compression;
use flate2::write::ZlibEncoder;

pub type Rgb = [u8; 3];

pub const BLUE: Rgb = [31, 119, 180];
pub const ORANGE: Rgb = [255, 127, 14];
pub const GREEN: Rgb = [44, 160, 44];
pub const RED: Rgb = [214, 39, 40];
pub const PURPLE: Rgb = [148, 103, 189];
const GRID: Rgb = [225, 225, 225];
const AXIS: Rgb = [90, 90, 90];
const TEXT: Rgb = [30, 30, 30];

/// One line of a panel: a label for the legend, a color, (x, y) points.
pub struct Series {
    pub label: String,
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
}

pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
    /// A horizontal target line (drawn dashed red) and its label.
    pub target: Option<(f64, String)>,
}

const WIDTH: usize = 1000;
const PANEL_H: usize = 200;
const LEFT: usize = 90;
const RIGHT: usize = 20;
const TOP: usize = 30;
const BOTTOM: usize = 28;
const SCALE: usize = 2;

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, dash: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err, mut n) = (x0, y0, dx + dy, 0u32);
        loop {
            if !dash || (n / 6) % 2 == 0 {
                self.set(x, y, c);
                self.set(x, y + 1, c);
            }
            n += 1;
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, s: &str, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        for dy in 0..SCALE {
                            for dx in 0..SCALE {
                                self.set(
                                    (x + i * 6 * SCALE + col * SCALE + dx) as i64,
                                    (y + r * SCALE + dy) as i64,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> usize {
    s.chars().count() * 6 * SCALE
}

/// Renders the panels stacked vertically, sharing the x axis (minutes), to a PNG file.
pub fn render(path: &std::path::Path, title: &str, panels: &[Panel]) -> Result<()> {
    let h = TOP + panels.len() * PANEL_H + 10;
    let mut cv = Canvas::new(WIDTH, h);
    cv.text(LEFT, 8, title, TEXT);
    let xmax = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)))
        .fold(0.0_f64, f64::max)
        .max(1.0);
    for (n, panel) in panels.iter().enumerate() {
        let top = TOP + n * PANEL_H + 16;
        let bottom = TOP + (n + 1) * PANEL_H - BOTTOM;
        let (left, right) = (LEFT, WIDTH - RIGHT);
        let ys = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|q| q.1));
        let mut ymax = ys.fold(0.0_f64, f64::max);
        if let Some((t, _)) = &panel.target {
            ymax = ymax.max(*t);
        }
        let ymax = if ymax <= 0.0 { 1.0 } else { ymax * 1.1 };
        let px = |x: f64| left as i64 + ((x / xmax) * (right - left) as f64) as i64;
        let py = |y: f64| bottom as i64 - ((y / ymax) * (bottom - top) as f64) as i64;
        for k in 0..=4 {
            let y = ymax * k as f64 / 4.0;
            cv.line((left as i64, py(y)), (right as i64, py(y)), GRID, false);
            let label = short(y);
            cv.text(
                left - 6 - text_width(&label),
                py(y) as usize - 7,
                &label,
                AXIS,
            );
        }
        // Minute ticks: the first step that gives at most 12 of them.
        let step = [0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 240.0]
            .into_iter()
            .find(|s| xmax / s <= 12.0)
            .unwrap_or(480.0);
        let mut x = 0.0;
        while x <= xmax + 1e-9 {
            cv.line((px(x), top as i64), (px(x), bottom as i64), GRID, false);
            let label = if step < 1.0 {
                format!("{x:.1}")
            } else {
                format!("{x:.0}")
            };
            if px(x) as usize + text_width(&label) <= right {
                cv.text(px(x) as usize, bottom + 6, &label, AXIS);
            }
            x += step;
        }
        if n + 1 == panels.len() {
            cv.text(left - 6 - text_width("MIN"), bottom + 6, "MIN", AXIS);
        }
        cv.line(
            (left as i64, top as i64),
            (left as i64, bottom as i64),
            AXIS,
            false,
        );
        cv.line(
            (left as i64, bottom as i64),
            (right as i64, bottom as i64),
            AXIS,
            false,
        );
        if let Some((t, label)) = &panel.target {
            cv.line((left as i64, py(*t)), (right as i64, py(*t)), RED, true);
            cv.text(
                right - text_width(label) - 4,
                py(*t) as usize - 18,
                label,
                RED,
            );
        }
        for s in &panel.series {
            for w in s.points.windows(2) {
                cv.line(
                    (px(w[0].0), py(w[0].1)),
                    (px(w[1].0), py(w[1].1)),
                    s.color,
                    false,
                );
            }
        }
        let mut lx = left + 8;
        cv.text(lx, top - 16, &panel.title, TEXT);
        lx += text_width(&panel.title) + 24;
        for s in &panel.series {
            cv.line(
                (lx as i64, top as i64 - 10),
                (lx as i64 + 20, top as i64 - 10),
                s.color,
                false,
            );
            cv.text(lx + 26, top - 16, &s.label, s.color);
            lx += 26 + text_width(&s.label) + 20;
        }
    }
    std::fs::write(path, png(&cv)?)?;
    Ok(())
}

/// 1234.5 → "1234", 0.25 → "0.25", 25000 → "25K", 3.2e6 → "3.2M".
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}K", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn png(cv: &Canvas) -> Result<Vec<u8>> {
    let mut raw = Vec::with_capacity((cv.w * 3 + 1) * cv.h);
    for row in cv.px.chunks(cv.w * 3) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
    z.write_all(&raw)?;
    let idat = z.finish()?;
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(cv.w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(cv.h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    for (kind, data) in [(b"IHDR", &ihdr), (b"IDAT", &idat), (b"IEND", &Vec::new())] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    Ok(out)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rows of a 5×7 glyph (bit 4 = leftmost column); lowercase letters draw as uppercase.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '<' => [2, 4, 8, 16, 8, 4, 2],
        '>' => [8, 4, 2, 1, 2, 4, 8],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_png_one() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn renders_a_png_with_the_declared_size() {
        let dir = std::env::temp_dir().join(format!("tw-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("t.png");
        let panel = Panel {
            title: "P99 MS".into(),
            series: vec![Series {
                label: "P99".into(),
                color: BLUE,
                points: vec![(0.0, 1.0), (1.0, 30.0), (2.0, 5.0)],
            }],
            target: Some((20.0, "TARGET".into())),
        };
        render(&path, "TEST", &[panel]).expect("render");
        let bytes = std::fs::read(&path).expect("read png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        assert_eq!(
            u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes")),
            WIDTH as u32
        );
        assert_eq!(
            u32::from_be_bytes(bytes[20..24].try_into().expect("4 bytes")),
            (TOP + PANEL_H + 10) as u32
        );
        assert!(bytes.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
