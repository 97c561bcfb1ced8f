//! `distlock locks --watch`: the live view of every advisory lock, refreshed in place like `top`.
//!
//! It takes the terminal's alternate screen and reads keys one by one (no echo, no line editing);
//! `q` or Ctrl-C (or SIGTERM, SIGHUP) quits and gives the terminal back as it was. Each refresh
//! draws the table anew, cut to the terminal's width (it follows a resize), and marks in reverse
//! video the keys whose holders or waiters changed since the one before.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use rustix::termios::{self, LocalModes, OptionalActions, Termios};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::duration::human;

/// One refresh of the view, as the caller builds it.
pub struct Frame {
    /// Locks held, and waits.
    pub held: usize,
    pub waiting: usize,
    /// The table's lines, header first, each with the text of its key (empty for the header).
    pub lines: Vec<(String, String)>,
    /// Per key, who holds or waits, in order: a key whose entry changed since the last refresh
    /// is marked.
    pub state: HashMap<String, Vec<(i32, bool)>>,
}

/// The terminal as it was, given back when dropped: its modes, the main screen, the cursor.
struct Restore(Option<Termios>);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, saved);
        }
        let mut out = std::io::stdout();
        let _ = write!(out, "\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
    }
}

/// Shows the frame `frame` builds every `every` until `q`, Ctrl-C, SIGTERM or SIGHUP.
pub fn run(every: Duration, mut frame: impl FnMut() -> Result<Frame>) -> Result<()> {
    let quit = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&quit))?;
    }
    let saved = termios::tcgetattr(std::io::stdin()).ok();
    if let Some(saved) = &saved {
        let mut keys = saved.clone();
        keys.local_modes
            .remove(LocalModes::ICANON | LocalModes::ECHO);
        termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &keys)?;
    }
    let _restore = Restore(saved);
    print!("\x1b[?1049h\x1b[?25l");
    {
        let quit = Arc::clone(&quit);
        thread::spawn(move || {
            // One key at a time (the terminal no longer waits for a line). At the end of input
            // (not a terminal) it stops reading; Ctrl-C still quits.
            let (mut stdin, mut key) = (std::io::stdin(), [0u8; 1]);
            while let Ok(1) = stdin.read(&mut key) {
                if matches!(key[0], b'q' | b'Q') {
                    quit.store(true, Ordering::Relaxed);
                    return;
                }
            }
        });
    }
    let mut before: HashMap<String, Vec<(i32, bool)>> = HashMap::new();
    while !quit.load(Ordering::Relaxed) {
        let now = frame()?;
        draw(&now, every, &before)?;
        before = now.state;
        let until = Instant::now() + every;
        while !quit.load(Ordering::Relaxed) && Instant::now() < until {
            thread::sleep(Duration::from_millis(20).min(every));
        }
    }
    Ok(())
}

fn draw(frame: &Frame, every: Duration, before: &HashMap<String, Vec<(i32, bool)>>) -> Result<()> {
    let width = termios::tcgetwinsize(std::io::stdout())
        .map(|w| usize::from(w.ws_col))
        .ok()
        .filter(|&w| w > 0)
        .unwrap_or(120);
    let cut = |line: &str| line.chars().take(width).collect::<String>();
    let mut out = std::io::stdout().lock();
    write!(out, "\x1b[H\x1b[2J")?;
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() % 86_400);
    let title = format!(
        "distlock locks --watch: every {}, {} held, {} waiting, {:02}:{:02}:{:02} UTC (q or Ctrl-C quits)",
        if every < Duration::from_secs(1) {
            format!("{}ms", every.as_millis())
        } else {
            human(every)
        },
        frame.held,
        frame.waiting,
        at / 3600,
        at / 60 % 60,
        at % 60
    );
    write!(out, "{}\r\n\r\n", cut(&title))?;
    for (key, line) in &frame.lines {
        let changed = !key.is_empty() && before.get(key) != frame.state.get(key);
        if changed {
            write!(out, "\x1b[7m{}\x1b[0m\r\n", cut(line))?;
        } else {
            write!(out, "{}\r\n", cut(line))?;
        }
    }
    if frame.lines.len() <= 1 {
        write!(out, "(no advisory locks)\r\n")?;
    }
    out.flush()?;
    Ok(())
}
