//! Output for people: aligned tables, sizes (`512M`, `1.5G`), durations (`3m12s`) and UTC
//! timestamps (`2024-05-01T12:34:56.789Z`, computed here: no date crate for one function).

use std::fmt::Write as _;
use std::io::{self, Write};

/// Columns separated by two spaces, each as wide as its widest cell; the last column is not
/// padded, so lines carry no trailing spaces.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are empty, extra cells dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The table's text, one line per row after the header line, each ending in `\n`.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Writes `text` to stdout; false when the reader has gone (`ferrovisor events -f | head`),
/// which is not an error.
pub fn write_out(text: &str) -> io::Result<bool> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `text` to stdout (a closed pipe is not an error).
pub fn emit(text: &str) -> io::Result<()> {
    write_out(text).map(|_| ())
}

/// A size for people: exact units when they fit (`512M`, `2G`), else one decimal (`1.5G`),
/// bytes below 1 KiB.
pub fn size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        let one = 1u64 << shift;
        if bytes >= one {
            if bytes.is_multiple_of(one) {
                return format!("{}{unit}", bytes >> shift);
            }
            let tenths = (u128::from(bytes) * 10 + u128::from(one) / 2) / u128::from(one);
            return format!("{}.{}{unit}", tenths / 10, tenths % 10);
        }
    }
    format!("{bytes}B")
}

/// A duration for people, two units at most: `45s`, `3m12s`, `2h05m`, `3d04h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// CPU time: seconds with milliseconds below a minute (`0.250s`, `12.034s`), else as
/// [`duration_ms`].
pub fn cpu_time_ms(ms: u64) -> String {
    if ms < 60_000 {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    } else {
        duration_ms(ms)
    }
}

/// Unix milliseconds as an RFC 3339 UTC timestamp with milliseconds.
pub fn timestamp_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day): Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An id shortened for a table column.
pub fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

/// An optional value, `-` when missing.
pub fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_have_no_trailing_spaces() {
        let mut t = Table::new(&["NAME", "STATE", "PID"]);
        t.row(vec!["web-1".into(), "running".into(), "1234".into()]);
        t.row(vec!["db".into(), "stopped".into(), String::new()]);
        t.row(vec!["x".into()]);
        assert_eq!(
            t.render(),
            "NAME   STATE    PID\nweb-1  running  1234\ndb     stopped\nx\n"
        );
        let empty = Table::new(&["A", "B"]);
        assert_eq!(empty.render(), "A  B\n");
    }

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0B");
        assert_eq!(size(512), "512B");
        assert_eq!(size(1024), "1K");
        assert_eq!(size(512 << 20), "512M");
        assert_eq!(size(1536 << 20), "1.5G");
        assert_eq!(size(2 << 30), "2G");
        assert_eq!(size((1 << 20) + 1), "1.0M");
        assert_eq!(size(123_456_789), "117.7M");
        assert_eq!(size(3 << 40), "3T");
        assert_eq!(size(u64::MAX), "16777216.0T");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms(0), "0s");
        assert_eq!(duration_ms(999), "0s");
        assert_eq!(duration_ms(45_000), "45s");
        assert_eq!(duration_ms(192_000), "3m12s");
        assert_eq!(duration_ms(60_000), "1m00s");
        assert_eq!(duration_ms(2 * 3_600_000 + 5 * 60_000 + 7_000), "2h05m");
        assert_eq!(duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(cpu_time_ms(250), "0.250s");
        assert_eq!(cpu_time_ms(12_034), "12.034s");
        assert_eq!(cpu_time_ms(61_000), "1m01s");
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(timestamp_ms(1_714_566_896_789), "2024-05-01T12:34:56.789Z");
        assert_eq!(timestamp_ms(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert_eq!(timestamp_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn ids_and_dashes() {
        assert_eq!(short_id("3f2a9c0d5e6b7a8190a1b2c3d4e5f607"), "3f2a9c0d5e6b");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(or_dash(Some(3)), "3");
        assert_eq!(or_dash(None::<u32>), "-");
    }
}
