//! The guest console as a file on the host, bounded: the guest decides how much it prints, so
//! the file is capped ([`CappedLog`], rotated once) and reading its end ([`tail`]) never reads
//! more than [`TAIL_BYTES`] of it.
//!
//! Rotation: when `console.log` holds [`CONSOLE_LOG_CAP`] bytes it is renamed to
//! `console.log.1` (replacing the previous one) and a new `console.log` is started. At most
//! twice the cap is on disk, the newest output is always at the end of `console.log`, and the
//! MiB before it is in `console.log.1`. If the rename fails (the directory went away, say), the
//! file is truncated in place and writing goes on from its start.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes in the console file before it is rotated.
pub const CONSOLE_LOG_CAP: u64 = 1 << 20;

/// Most bytes [`tail`] reads (from the end of the console file and, right after a rotation, of
/// the rotated one).
pub const TAIL_BYTES: u64 = 64 << 10;

/// Errors of the console log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The console file could not be created.
    #[error("cannot create serial output file {path}: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// `path` with `.1` appended: where a full console file goes.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// A console file that never grows past its cap (see the module docs).
#[derive(Debug)]
pub struct CappedLog {
    path: PathBuf,
    file: File,
    written: u64,
    cap: u64,
}

impl CappedLog {
    /// Creates (or truncates) `path`, to hold at most `cap` bytes (at least 1) before it rotates.
    pub fn create(path: &Path, cap: u64) -> Result<Self, Error> {
        let file = File::create(path).map_err(|source| Error::Create {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(CappedLog {
            path: path.to_path_buf(),
            file,
            written: 0,
            cap: cap.max(1),
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let renamed = std::fs::rename(&self.path, rotated_path(&self.path))
            .and_then(|()| File::create(&self.path));
        match renamed {
            Ok(f) => self.file = f,
            Err(_) => {
                self.file.set_len(0)?;
                self.file.seek(SeekFrom::Start(0))?;
            }
        }
        self.written = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.written >= self.cap {
            self.rotate()?;
        }
        let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Up to `max` bytes from the end of `path` (nothing if it cannot be read), and whether that
/// is the whole file.
fn read_end(path: &Path, max: u64) -> (Vec<u8>, bool) {
    let Ok(mut f) = File::open(path) else {
        return (Vec::new(), true);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.take(max).read_to_end(&mut buf);
    }
    (buf, start == 0)
}

/// The last `lines` lines of a console file, read from its end (at most [`TAIL_BYTES`]; right
/// after a rotation, also from the end of `<path>.1`). Bytes that are not UTF-8 show as U+FFFD.
pub fn tail(path: &Path, lines: usize) -> String {
    let (mut buf, mut whole) = read_end(path, TAIL_BYTES);
    let newlines = buf.iter().filter(|&&b| b == b'\n').count();
    if whole && newlines <= lines && (buf.len() as u64) < TAIL_BYTES {
        let (mut older, older_whole) = read_end(&rotated_path(path), TAIL_BYTES - buf.len() as u64);
        if !older.is_empty() {
            older.extend_from_slice(&buf);
            buf = older;
            whole = older_whole;
        }
    }
    let mut text = buf.as_slice();
    if !whole {
        // The read started mid-line: drop the partial first line.
        if let Some(nl) = text.iter().position(|&b| b == b'\n') {
            text = &text[nl + 1..];
        }
    }
    let s = String::from_utf8_lossy(text);
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A fresh directory for one test, removed when dropped.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("skiff-console-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn ten_mib_of_console_stays_under_the_cap_and_the_tail_has_the_last_line() {
        let d = TempDir::new("ten-mib");
        let path = d.path().join("console.log");
        let mut log = CappedLog::create(&path, CONSOLE_LOG_CAP).unwrap();
        let mut total = 0u64;
        let mut i = 0u64;
        while total < 10 << 20 {
            let line = format!("guest line {i} {}\n", "x".repeat((i % 97) as usize));
            // The serial device writes a byte at a time; bigger writes must be capped too.
            if i & 15 == 0 {
                for b in line.as_bytes() {
                    log.write_all(&[*b]).unwrap();
                }
            } else {
                log.write_all(line.as_bytes()).unwrap();
            }
            total += line.len() as u64;
            i += 1;
        }
        log.write_all(b"the very last line\n").unwrap();
        log.flush().unwrap();
        let cur = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(rotated_path(&path)).unwrap().len();
        assert!(cur <= CONSOLE_LOG_CAP, "{cur}");
        assert_eq!(old, CONSOLE_LOG_CAP);
        let t = tail(&path, 20);
        assert_eq!(t.lines().count(), 20, "{t}");
        assert!(t.ends_with("the very last line"), "{t}");
        assert!(t.contains(&format!("guest line {} ", i - 1)), "{t}");
    }

    #[test]
    fn tail_right_after_a_rotation_reaches_into_the_rotated_file() {
        let d = TempDir::new("rotation");
        let path = d.path().join("console.log");
        let mut log = CappedLog::create(&path, 100).unwrap();
        for i in 0..12 {
            log.write_all(format!("line {i:02}\n").as_bytes()).unwrap();
        }
        // 96 bytes so far; this write fills the file (100 bytes, "line" of line 12 included),
        // the rest starts the new console.log.
        log.write_all(b"line 12\nline 13\n").unwrap();
        let t = tail(&path, 5);
        assert_eq!(t, "line 09\nline 10\nline 11\nline 12\nline 13", "{t}");
        assert!(std::fs::metadata(&path).unwrap().len() < 100);
    }

    #[test]
    fn tail_of_a_big_file_reads_its_end_and_survives_binary_bytes() {
        let d = TempDir::new("big");
        let path = d.path().join("console.log");
        // 8 MiB the guest printed, not UTF-8 and without a newline, then the lines that matter.
        let mut data = vec![0xffu8; 8 << 20];
        for i in 0..100 {
            data.extend_from_slice(format!("late line {i}\n").as_bytes());
        }
        std::fs::write(&path, &data).unwrap();
        let t = tail(&path, 20);
        let want: Vec<String> = (80..100).map(|i| format!("late line {i}")).collect();
        assert_eq!(t, want.join("\n"));
        // What the sandbox puts in its errors (it read the whole file, and a single byte that
        // is not UTF-8 anywhere in it made the tail empty).
        assert_eq!(crate::sandbox::console_tail(&path), want.join("\n"));
        // Small files: exactly the old behaviour (last lines of the whole file).
        std::fs::write(&path, "a\nb\nc").unwrap();
        assert_eq!(tail(&path, 2), "b\nc");
        assert_eq!(tail(&path, 20), "a\nb\nc");
        assert_eq!(tail(&d.path().join("missing"), 20), "");
    }
}
