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
/// closes, half-closes the stream (EOF for the process). The returned clone of the stream is
/// what `CloseIO` shuts down.
pub fn copy_in(fifo: String, to: UnixStream) -> std::io::Result<UnixStream> {
    let handle = to.try_clone()?;
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
    });
    Ok(handle)
}

/// Joins output copy threads, waiting at most `limit` in all (a copy whose stream never ends
/// is abandoned; the agent drains and closes the streams before it answers Wait, so this only
/// bounds a broken connection).
pub fn join_all(threads: Vec<JoinHandle<()>>, limit: Duration) {
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
            return;
        }
    }
}
