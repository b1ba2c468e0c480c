//! How the command line shows things: aligned tables on stdout, colour and progress only
//! where a person looks at a terminal (colour also honours `NO_COLOR`, through anstream),
//! and durations and times in words.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anstyle::{AnsiColor, Style};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{AUTH, Failure};

pub const BOLD: Style = Style::new().bold();
pub const DIM: Style = Style::new().dimmed();
pub const GOOD: Style = AnsiColor::Green.on_default();
pub const BAD: Style = AnsiColor::Red.on_default();
pub const BUSY: Style = AnsiColor::Yellow.on_default();
pub const QUIET: Style = AnsiColor::Blue.on_default();
pub const NAME: Style = AnsiColor::Cyan.on_default();

/// The colour of a sandbox's, a deployment's, a step's or an instance's state.
pub fn state_style(state: &str) -> Style {
    match state {
        "ready" | "running" | "done" | "connected" => GOOD,
        "failed" | "crashed" | "unhealthy" | "cancelled" | "offline" => BAD,
        "sleeping" | "expired" | "deleted" | "stopped" => QUIET,
        _ => BUSY,
    }
}

/// A cell: its text, and how to show it on a terminal.
pub struct Cell {
    text: String,
    style: Style,
}

impl Cell {
    pub fn new(text: impl Into<String>) -> Cell {
        Cell {
            text: text.into(),
            style: Style::new(),
        }
    }

    pub fn styled(text: impl Into<String>, style: Style) -> Cell {
        Cell {
            text: text.into(),
            style,
        }
    }
}

/// Columns aligned on the width of their longest cell, headers in bold.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.text.chars().count());
            }
        }
        let headers: Vec<Cell> = self
            .headers
            .iter()
            .map(|h| Cell::styled(*h, BOLD))
            .collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                let last = i + 1 == row.len();
                let pad = if last {
                    0
                } else {
                    width - cell.text.chars().count() + 2
                };
                line.push_str(&format!(
                    "{}{}{}{}",
                    cell.style.render(),
                    cell.text,
                    cell.style.render_reset(),
                    " ".repeat(pad)
                ));
            }
            out(format_args!("{}\n", line.trim_end()));
        }
    }
}

/// Writes `text` to stdout, without colour where it does not belong. A reader that went away
/// (`sdp logs demo | head`) ends the command quietly, as SIGPIPE ends other tools.
pub fn out(text: impl std::fmt::Display) {
    let mut stdout = anstream::stdout().lock();
    if let Err(e) = write!(stdout, "{text}")
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Prints `value` as pretty JSON on stdout, for programs.
pub fn print_json<T: serde::Serialize>(value: &T) {
    let text = serde_json::to_string_pretty(value).expect("API types serialize");
    out(format_args!("{text}\n"));
}

/// Prints `value` as one line of JSON on stdout: a stream of objects for programs.
pub fn print_json_line<T: serde::Serialize>(value: &T) {
    let text = serde_json::to_string(value).expect("API types serialize");
    out(format_args!("{text}\n"));
}

/// Prints `text` in `style` on stdout (plain when stdout is not a terminal, or `NO_COLOR`).
pub fn say(style: Style, text: impl std::fmt::Display) {
    out(format_args!(
        "{}{text}{}\n",
        style.render(),
        style.render_reset()
    ));
}

/// The same on stderr: notes about the command, apart from its output.
pub fn note(style: Style, text: impl std::fmt::Display) {
    anstream::eprintln!("{}{text}{}", style.render(), style.render_reset());
}

/// Awaits `work` with a spinner and `what` on stderr, drawn only on a terminal.
pub async fn spin<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    let out = work.await;
    bar.finish_and_clear();
    out
}

/// A line from the person at the terminal (`prompt` on stderr).
pub fn ask(prompt: &str) -> Result<String, Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(AUTH, "no terminal to ask for the username")
            .hint("set SDP_USERNAME and SDP_PASSWORD"));
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::new(AUTH, format!("cannot read the answer: {e}")))?;
    Ok(line.trim().to_owned())
}

/// The password of `user`, read from the terminal without echo.
pub fn ask_password(user: &str) -> Result<String, Failure> {
    rpassword::prompt_password(format!("Bitbucket password for {user}: ")).map_err(|e| {
        Failure::new(AUTH, format!("cannot ask for the password: {e}"))
            .hint("set SDP_USERNAME and SDP_PASSWORD when no terminal is attached")
    })
}

/// `at` as words relative to now: `in 7h 59m`, `3m ago`.
pub fn relative(at: &str) -> String {
    let Ok(when) = OffsetDateTime::parse(at, &Rfc3339) else {
        return at.to_owned();
    };
    let delta = when - OffsetDateTime::now_utc();
    let words = span(delta.unsigned_abs());
    if delta.is_negative() {
        format!("{words} ago")
    } else {
        format!("in {words}")
    }
}

/// A duration in the two largest units: `2h 5m`, `41s`, `1.2s`.
pub fn span(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..10 => format!("{:.1}s", d.as_secs_f64()),
        10..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// The seconds between two RFC 3339 times, when both parse.
pub fn between(from: &str, to: &str) -> Option<Duration> {
    let from = OffsetDateTime::parse(from, &Rfc3339).ok()?;
    let to = OffsetDateTime::parse(to, &Rfc3339).ok()?;
    Some((to - from).unsigned_abs())
}

/// A commit as people read it: its first 10 hex digits.
pub fn short_commit(commit: Option<&str>) -> String {
    commit.map_or_else(|| "-".to_owned(), |c| c.chars().take(10).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_in_their_two_largest_units() {
        assert_eq!(span(Duration::from_millis(1200)), "1.2s");
        assert_eq!(span(Duration::from_secs(41)), "41s");
        assert_eq!(span(Duration::from_secs(125)), "2m 5s");
        assert_eq!(span(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(span(Duration::from_secs(90000)), "1d 1h");
    }
}
