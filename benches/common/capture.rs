//! What the VM benchmarks share: running a VMM with its console captured line by line.
//! Included by `#[path]` from each bench binary.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Output lines of one process, each with the time it arrived (since spawn).
pub struct Captured {
    pub lines: Vec<(Duration, String)>,
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
}

/// Runs `argv` with stdout captured line by line (timestamped) and stderr appended to
/// `stderr_log`; kills it after `timeout` or once `interrupted()` says so (SIGINT/SIGTERM).
/// Lines starting with `@` (phase markers) and error lines are echoed to stderr as
/// `TAG: <seconds> <line>`, so a slow or stalled run shows where it is.
pub fn run_capture(
    argv: &[String],
    timeout: Duration,
    stderr_log: &Path,
    tag: &str,
    interrupted: fn() -> bool,
) -> Result<Captured> {
    let err =
        File::create(stderr_log).with_context(|| format!("creating {}", stderr_log.display()))?;
    let start = Instant::now();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let child = Arc::new(Mutex::new(child));
    // Watchdog: a hung guest prints nothing, so the reads below would block forever.
    let (tx, rx) = mpsc::channel::<()>();
    let watchdog = {
        let child = child.clone();
        std::thread::spawn(move || {
            let end = start + timeout;
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return false,
                }
                if interrupted() || Instant::now() >= end {
                    if let Ok(mut c) = child.lock() {
                        let _ = c.kill();
                    }
                    return true;
                }
            }
        })
    };
    let mut lines = Vec::new();
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            break;
        }
        let now = start.elapsed();
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let s = String::from_utf8_lossy(&line).trim().to_string();
            // Progress, and where a stalled run stopped: markers and errors as they come.
            if s.starts_with('@') || s.contains("_error") {
                eprintln!("{tag}:     {:7.1} s {s}", now.as_secs_f64());
            }
            lines.push((now, s));
        }
    }
    if !pending.is_empty() {
        lines.push((
            start.elapsed(),
            String::from_utf8_lossy(&pending).trim().to_string(),
        ));
    }
    let _ = tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let status = child
        .lock()
        .map_err(|_| anyhow::anyhow!("child lock poisoned"))?
        .wait()
        .ok();
    Ok(Captured {
        lines,
        status,
        timed_out,
    })
}
