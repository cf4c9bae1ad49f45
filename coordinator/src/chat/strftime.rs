//! `strftime_now(format)`: the current date for templates that print it (Llama 3.x, Granite, ...).
//!
//! transformers defines it as `datetime.now().strftime(format)`. This runtime uses UTC (no time
//! zone database), and implements the C `strftime` directives templates use: `%Y %y %m %d %e %j
//! %H %I %M %S %p %a %A %b %B %h %Z %z %%`, plus glibc's `-` flag (`%-d`: no padding). Any other
//! directive is copied as written.

use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC calendar time, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday
    weekday: u32,
    /// 1..=366
    day_of_year: u32,
}

impl DateTime {
    /// The current UTC time (the epoch if the clock is before it).
    pub(super) fn now_utc() -> Self {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self::from_unix(i64::try_from(secs).unwrap_or(i64::MAX))
    }

    /// The UTC calendar time `secs` seconds after 1970-01-01T00:00:00Z (Howard Hinnant's
    /// `civil_from_days`).
    pub(crate) fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let day_of_year = CUMULATIVE[month as usize - 1] + day + u32::from(leap && month > 2);
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as u32,
            day_of_year,
        }
    }

    /// Formats like C `strftime` (see the module documentation for the directives).
    pub(crate) fn format(&self, fmt: &str) -> String {
        let mut out = String::new();
        let mut chars = fmt.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let no_pad = chars.next_if_eq(&'-').is_some();
            let Some(d) = chars.next() else {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                break;
            };
            let num = |v: u32, width: usize| {
                if no_pad { v.to_string() } else { format!("{v:0width$}") }
            };
            let hour12 = if self.hour.is_multiple_of(12) { 12 } else { self.hour % 12 };
            let month_name = MONTHS[self.month as usize - 1];
            let day_name = DAYS[self.weekday as usize];
            match d {
                'Y' => out.push_str(&self.year.to_string()),
                'y' => out.push_str(&num(self.year.rem_euclid(100) as u32, 2)),
                'm' => out.push_str(&num(self.month, 2)),
                'd' => out.push_str(&num(self.day, 2)),
                'e' => out.push_str(&if no_pad { self.day.to_string() } else { format!("{:2}", self.day) }),
                'j' => out.push_str(&num(self.day_of_year, 3)),
                'H' => out.push_str(&num(self.hour, 2)),
                'I' => out.push_str(&num(hour12, 2)),
                'M' => out.push_str(&num(self.minute, 2)),
                'S' => out.push_str(&num(self.second, 2)),
                'p' => out.push_str(if self.hour < 12 { "AM" } else { "PM" }),
                'a' => out.push_str(&day_name[..3]),
                'A' => out.push_str(day_name),
                'b' | 'h' => out.push_str(&month_name[..3]),
                'B' => out.push_str(month_name),
                'Z' => out.push_str("UTC"),
                'z' => out.push_str("+0000"),
                '%' => out.push('%'),
                other => {
                    out.push('%');
                    if no_pad {
                        out.push('-');
                    }
                    out.push(other);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        let t = DateTime::from_unix(0);
        assert_eq!(t.format("%Y-%m-%d %H:%M:%S %a %j"), "1970-01-01 00:00:00 Thu 001");
        // 2024-02-29T13:05:09Z, a leap day.
        let t = DateTime::from_unix(1_709_211_909);
        assert_eq!(t.format("%d %b %Y"), "29 Feb 2024");
        assert_eq!(t.format("%B %-d, %Y %I:%M %p %A %j %e %y %%"), "February 29, 2024 01:05 PM Thursday 060 29 24 %");
        assert_eq!(t.format("%Q %-Q %"), "%Q %-Q %");
        // Before the epoch.
        assert_eq!(DateTime::from_unix(-1).format("%Y-%m-%d %H:%M:%S"), "1969-12-31 23:59:59");
        assert_eq!(DateTime::from_unix(951_782_400).format("%Y-%m-%d %j"), "2000-02-29 060");
    }
}
