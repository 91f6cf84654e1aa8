//! containerd's stdio FIFOs connected to the agent's per-stream vsock connections.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Copies an output stream (stdout, stderr or pty) from the agent into the FIFO at `fifo`
/// (nothing when empty) until the stream ends. A FIFO that cannot be opened or written is
/// dropped, but the stream is still read to its end so the guest never blocks on it.
pub fn copy_out(mut from: UnixStream, fifo: String) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut sink = if fifo.is_empty() {
            None
        } else {
            // Blocks until containerd's reader is open (it is, before Create/Exec).
            match OpenOptions::new().write(true).open(&fifo) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!("opening {fifo}: {e}; discarding that output");
                    None
                }
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(f) = sink.as_mut() {
                        if let Err(e) = f.write_all(&buf[..n]) {
                            tracing::warn!("writing {fifo}: {e}; discarding further output");
                            sink = None;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("output stream for {fifo}: {e}");
                    break;
                }
            }
        }
        // Dropping the FIFO writer here lets containerd's reader see EOF.
    })
}

/// Copies containerd's stdin FIFO into the agent's stdin stream; when the FIFO's writer
/// closes, half-closes the stream (EOF for the process). Returns a clone of the stream (what
/// `CloseIO` shuts down) and a receiver that gets a message once the copy has finished.
pub fn copy_in(fifo: String, to: UnixStream) -> std::io::Result<(UnixStream, mpsc::Receiver<()>)> {
    let handle = to.try_clone()?;
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut to = to;
        // Blocks until containerd opens the writer.
        match OpenOptions::new().read(true).open(&fifo) {
            Ok(mut f) => {
                let _ = std::io::copy(&mut f, &mut to);
            }
            Err(e) => tracing::warn!("opening {fifo}: {e}; closing stdin"),
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = done_tx.send(());
    });
    Ok((handle, done_rx))
}

/// Joins output copy threads, waiting at most `limit` in all (a copy whose stream never ends
/// is abandoned; the agent drains and closes the streams before it answers Wait, so this only
/// bounds a broken connection). Returns whether every copy finished.
pub fn join_all(threads: Vec<JoinHandle<()>>, limit: Duration) -> bool {
    let (tx, rx) = mpsc::channel();
    let n = threads.len();
    for t in threads {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = t.join();
            let _ = tx.send(());
        });
    }
    let deadline = Instant::now() + limit;
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        if rx.recv_timeout(left).is_err() {
            tracing::warn!("an output copy did not finish within {limit:?}");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fifo(name: &str) -> String {
        let dir = std::env::temp_dir().join(format!("skiff-shim-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        let st = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        p.display().to_string()
    }

    #[test]
    fn stdin_is_copied_then_half_closed() {
        let path = fifo("stdin");
        let (host, mut agent) = UnixStream::pair().unwrap();
        let (_handle, done) = copy_in(path.clone(), host).unwrap();
        let mut w = OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all(b"abc").unwrap();
        drop(w);
        let mut got = Vec::new();
        agent.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc");
        done.recv_timeout(Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn output_without_a_fifo_is_drained() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let t = copy_out(host, String::new());
        agent.write_all(&[7u8; 200_000]).unwrap();
        drop(agent);
        assert!(join_all(vec![t], Duration::from_secs(2)));
    }
}
