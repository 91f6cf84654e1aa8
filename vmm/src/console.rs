//! The interactive serial console of `vmm --kernel`: the VMM's stdin feeds the guest's UART
//! (x86 COM1, arm64 16550). On a terminal, stdin goes to raw mode (every key reaches the
//! guest, Ctrl-C included) and **Ctrl-A x** stops the VM (Ctrl-A Ctrl-A sends one Ctrl-A), as
//! in QEMU; the terminal is restored on every way out, a guest panic and a VMM failure
//! included. Piped stdin is fed as it is (no escapes), so tests can drive the console.
//!
//! Threads: the reader (blocked in `read(0)`) and the terminal keeper (which alone restores
//! the terminal) start before the VM, so they run outside its seccomp allowlist, which has no
//! terminal ioctls; the VM side ([`SerialIn`]) only moves bytes into the UART.

use std::io::Read;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::vm_control::VmControl;

/// The escape key on a terminal: Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// Console input for the VM's UART: chunks of bytes from the reader thread.
#[derive(Clone, Default)]
pub struct SerialIn {
    rx: Arc<Mutex<Option<mpsc::Receiver<Vec<u8>>>>>,
}

impl std::fmt::Debug for SerialIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialIn")
    }
}

impl SerialIn {
    /// Input that comes from `rx` (tests, and [`start`]).
    pub fn from_channel(rx: mpsc::Receiver<Vec<u8>>) -> Self {
        SerialIn {
            rx: Arc::new(Mutex::new(Some(rx))),
        }
    }

    /// The receiving end, once (the VM's feeder takes it).
    pub fn take(&self) -> Option<mpsc::Receiver<Vec<u8>>> {
        self.rx.lock().ok().and_then(|mut g| g.take())
    }
}

/// Ctrl-A handling on a terminal.
#[derive(Debug, Default)]
pub struct Escapes {
    pending: bool,
}

impl Escapes {
    /// The bytes of `input` meant for the guest, and whether Ctrl-A x asked to stop. A Ctrl-A
    /// at the end of a chunk waits for the next one.
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if std::mem::take(&mut self.pending) {
                match b {
                    b'x' | b'X' => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Restores the terminal through the keeper thread (see the module docs). Cheap to call
/// more than once, and a no-op when stdin was not a terminal.
#[derive(Debug, Clone)]
pub struct Terminal {
    req: Option<mpsc::Sender<mpsc::Sender<()>>>,
}

impl Terminal {
    /// Puts the terminal back as it was (waits up to a second for the keeper).
    pub fn restore(&self) {
        if let Some(req) = &self.req {
            let (ack_tx, ack_rx) = mpsc::channel();
            if req.send(ack_tx).is_ok() {
                let _ = ack_rx.recv_timeout(Duration::from_secs(1));
            }
        }
    }
}

static TERMINAL: OnceLock<Terminal> = OnceLock::new();

/// Starts reading stdin for the guest's UART: raw mode and Ctrl-A escapes when stdin is a
/// terminal, plain bytes when it is a pipe or file (nothing when it is at EOF). Ctrl-A x stops
/// the VM through `control`. Call it before the VM runs (see the module docs); a panic
/// anywhere restores the terminal first.
pub fn start(control: VmControl) -> (SerialIn, Terminal) {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tty = crate::sys::is_tty(0);
    let terminal = match tty.then(|| crate::sys::raw_mode(0)) {
        Some(Ok(guard)) => {
            let (req_tx, req_rx) = mpsc::channel::<mpsc::Sender<()>>();
            std::thread::Builder::new()
                .name("terminal".into())
                .spawn(move || {
                    // A request, or every sender gone: restore (drop the guard), then answer.
                    let ack = req_rx.recv().ok();
                    drop(guard);
                    if let Some(a) = ack {
                        let _ = a.send(());
                    }
                    for a in req_rx {
                        let _ = a.send(());
                    }
                })
                .ok();
            Terminal { req: Some(req_tx) }
        }
        Some(Err(e)) => {
            tracing::warn!("console: stdin is a terminal but raw mode failed: {e}");
            Terminal { req: None }
        }
        None => Terminal { req: None },
    };
    if terminal.req.is_some() && TERMINAL.set(terminal.clone()).is_ok() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(t) = TERMINAL.get() {
                t.restore();
            }
            previous(info);
        }));
    }
    let escapes = tty && terminal.req.is_some();
    let keeper = terminal.clone();
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            let mut esc = Escapes::default();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let (bytes, quit) = if escapes {
                    esc.filter(&buf[..n])
                } else {
                    (buf[..n].to_vec(), false)
                };
                if !bytes.is_empty() && tx.send(bytes).is_err() {
                    break;
                }
                if quit {
                    keeper.restore();
                    eprintln!("\r\nvmm: Ctrl-A x: stopping the VM");
                    control.stop();
                    break;
                }
            }
        });
    (SerialIn::from_channel(rx), terminal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_twice_is_one_ctrl_a() {
        let mut e = Escapes::default();
        assert_eq!(e.filter(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(e.filter(b"a\x01\x01b"), (b"a\x01b".to_vec(), false));
        // An escape split across reads.
        assert_eq!(e.filter(b"c\x01"), (b"c".to_vec(), false));
        assert_eq!(e.filter(b"x"), (Vec::new(), true));
        let mut e = Escapes::default();
        assert_eq!(e.filter(b"\x01q"), (b"\x01q".to_vec(), false));
        assert_eq!(e.filter(b"12\x01xrest"), (b"12".to_vec(), true));
    }
}
