//! A portable event loop for device backends: one thread, one [`mio::Poll`] (epoll on Linux,
//! kqueue on macOS).
//!
//! Devices add an [`EventHandler`] with [`EventLoop::add`]; the handler registers its sources
//! (Unix listeners and streams) through the [`EventCtl`] it is given in every callback, using
//! its own small token numbers. vCPU threads wake a handler through its [`WakeHandle`] (a shared
//! [`mio::Waker`] plus a per-handler flag): that is how "queue notified" reaches the device
//! without any I/O on the vCPU thread.
//!
//! ```no_run
//! use skiff_devices::event_loop::EventLoop;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut el = EventLoop::new()?;
//! // let vsock = Vsock::new(3, "/run/vm/v.sock", &mut el)?;   // devices attach here
//! let running = el.spawn()?;            // own thread, named "skiff-events"
//! // ... run the VM ...
//! running.stop()?;                      // wakes the loop, joins the thread
//! # Ok(()) }
//! ```

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::event::Source;
use mio::{Events, Interest, Poll, Registry, Token, Waker};

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the poller or its waker failed.
    #[error("cannot create the event poller: {0}")]
    Create(#[source] io::Error),
    /// Waiting for events failed.
    #[error("polling failed: {0}")]
    Poll(#[source] io::Error),
    /// A handler's initial registration failed.
    #[error("cannot register a handler: {0}")]
    Register(#[source] io::Error),
    /// Too many handlers on one loop.
    #[error("too many event handlers")]
    TooManyHandlers,
    /// The loop thread could not be started.
    #[error("cannot start the event loop thread: {0}")]
    Spawn(#[source] io::Error),
    /// The loop thread panicked.
    #[error("the event loop thread panicked")]
    Panicked,
    /// The loop thread's start hook failed (see [`EventLoop::spawn_with`]).
    #[error("the event loop thread's setup failed: {0}")]
    ThreadStart(#[source] io::Error),
}

/// Bits of a token left to a handler (the high bits carry the handler's index).
const HANDLER_SHIFT: u32 = usize::BITS - 16;
/// Largest token a handler may use.
pub const MAX_HANDLER_TOKEN: usize = (1 << HANDLER_SHIFT) - 1;
const WAKER_TOKEN: Token = Token(usize::MAX);
const MAX_HANDLERS: usize = (1 << 16) - 2;

/// Readiness reported for one source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Readable (or a listener has a pending connection).
    pub readable: bool,
    /// Writable.
    pub writable: bool,
    /// The peer closed its write half, or an error is pending.
    pub read_closed: bool,
    /// The peer closed its read half.
    pub write_closed: bool,
    /// An error is pending on the source.
    pub error: bool,
}

impl Readiness {
    fn from_event(e: &mio::event::Event) -> Self {
        Readiness {
            readable: e.is_readable(),
            writable: e.is_writable(),
            read_closed: e.is_read_closed(),
            write_closed: e.is_write_closed(),
            error: e.is_error(),
        }
    }
}

/// What a handler uses to (de)register its sources; tokens are the handler's own numbers
/// (`0..=MAX_HANDLER_TOKEN`).
#[derive(Debug)]
pub struct EventCtl<'a> {
    registry: &'a Registry,
    handler: usize,
}

impl EventCtl<'_> {
    fn token(&self, token: usize) -> io::Result<Token> {
        if token > MAX_HANDLER_TOKEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "token too large",
            ));
        }
        Ok(Token((self.handler << HANDLER_SHIFT) | token))
    }

    /// Registers `source` (edge-triggered) under `token`.
    pub fn register<S: Source + ?Sized>(
        &self,
        source: &mut S,
        token: usize,
        interest: Interest,
    ) -> io::Result<()> {
        self.registry.register(source, self.token(token)?, interest)
    }

    /// Changes the interest or token of a registered `source`.
    pub fn reregister<S: Source + ?Sized>(
        &self,
        source: &mut S,
        token: usize,
        interest: Interest,
    ) -> io::Result<()> {
        self.registry
            .reregister(source, self.token(token)?, interest)
    }

    /// Deregisters `source` (call before dropping it).
    pub fn deregister<S: Source + ?Sized>(&self, source: &mut S) -> io::Result<()> {
        self.registry.deregister(source)
    }
}

/// A device backend served by the loop. All methods run on the loop thread.
pub trait EventHandler: Send {
    /// Called once by [`EventLoop::add`] to register the handler's initial sources.
    fn register(&mut self, ctl: &EventCtl<'_>) -> io::Result<()>;
    /// A source registered under `token` is ready.
    fn ready(&mut self, ctl: &EventCtl<'_>, token: usize, readiness: Readiness);
    /// The handler's [`WakeHandle`] was woken (e.g. a queue notification from a vCPU).
    fn woken(&mut self, ctl: &EventCtl<'_>);
    /// Called once per loop iteration after the handler got events or a wakeup (batch work
    /// such as filling queues and raising one interrupt goes here).
    fn after_events(&mut self, _ctl: &EventCtl<'_>) {}
    /// The next time the handler wants [`EventHandler::timer`] called, if any.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// Called when the handler's deadline passed.
    fn timer(&mut self, _ctl: &EventCtl<'_>, _now: Instant) {}
}

/// Wakes one handler of an [`EventLoop`] from any thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct WakeHandle {
    waker: Arc<Waker>,
    flag: Arc<AtomicBool>,
}

impl WakeHandle {
    /// Asks the loop to call the handler's [`EventHandler::woken`]. Never blocks; coalesces.
    pub fn wake(&self) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::error!("event loop wake failed: {e}");
            }
        }
    }
}

struct Slot {
    handler: Box<dyn EventHandler>,
    flag: Arc<AtomicBool>,
    touched: bool,
}

/// The event loop. Build it, add handlers, then [`EventLoop::spawn`] it (or drive it with
/// [`EventLoop::run_once`] in tests).
pub struct EventLoop {
    poll: Poll,
    events: Events,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    slots: Vec<Slot>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("handlers", &self.slots.len())
            .finish()
    }
}

/// Index of a handler in its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerId(usize);

impl EventLoop {
    /// A loop with no handlers.
    pub fn new() -> Result<Self, Error> {
        let poll = Poll::new().map_err(Error::Create)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER_TOKEN).map_err(Error::Create)?);
        Ok(EventLoop {
            poll,
            events: Events::with_capacity(256),
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            slots: Vec::new(),
        })
    }

    /// Adds `handler` (calling its [`EventHandler::register`]) and returns its wake handle.
    pub fn add(&mut self, mut handler: Box<dyn EventHandler>) -> Result<WakeHandle, Error> {
        let index = self.slots.len();
        if index >= MAX_HANDLERS {
            return Err(Error::TooManyHandlers);
        }
        let ctl = EventCtl {
            registry: self.poll.registry(),
            handler: index,
        };
        handler.register(&ctl).map_err(Error::Register)?;
        let flag = Arc::new(AtomicBool::new(false));
        self.slots.push(Slot {
            handler,
            flag: flag.clone(),
            touched: false,
        });
        Ok(WakeHandle {
            waker: self.waker.clone(),
            flag,
        })
    }

    /// Waits up to `timeout` (or the nearest handler deadline) and dispatches what happened.
    /// Returns whether a stop was requested.
    pub fn run_once(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        let now = Instant::now();
        let mut timeout = timeout;
        for s in &self.slots {
            if let Some(d) = s.handler.deadline() {
                let t = d.saturating_duration_since(now);
                timeout = Some(timeout.map_or(t, |x| x.min(t)));
            }
        }
        if let Err(e) = self.poll.poll(&mut self.events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::Poll(e));
            }
        }
        let registry = self.poll.registry();
        for event in self.events.iter() {
            if event.token() == WAKER_TOKEN {
                continue;
            }
            let index = event.token().0 >> HANDLER_SHIFT;
            let token = event.token().0 & MAX_HANDLER_TOKEN;
            if let Some(slot) = self.slots.get_mut(index) {
                let ctl = EventCtl {
                    registry,
                    handler: index,
                };
                slot.handler
                    .ready(&ctl, token, Readiness::from_event(event));
                slot.touched = true;
            }
        }
        // Flags are checked every iteration: a wake racing with this poll is never lost.
        let now = Instant::now();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let ctl = EventCtl {
                registry,
                handler: index,
            };
            if slot.flag.swap(false, Ordering::AcqRel) {
                slot.handler.woken(&ctl);
                slot.touched = true;
            }
            if slot.handler.deadline().is_some_and(|d| d <= now) {
                slot.handler.timer(&ctl, now);
                slot.touched = true;
            }
            if std::mem::take(&mut slot.touched) {
                slot.handler.after_events(&ctl);
            }
        }
        Ok(self.stop.load(Ordering::Acquire))
    }

    /// Runs on its own thread until [`RunningLoop::stop`].
    pub fn spawn(self) -> Result<RunningLoop, Error> {
        self.spawn_with(|| Ok(()))
    }

    /// Like [`EventLoop::spawn`], calling `start` first on the new thread (the VMM installs the
    /// thread's seccomp filter there). Returns once `start` has run; if it fails, the thread
    /// ends without serving anything and this returns [`Error::ThreadStart`].
    pub fn spawn_with(
        mut self,
        start: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> Result<RunningLoop, Error> {
        let stop = self.stop.clone();
        let waker = self.waker.clone();
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("skiff-events".into())
            .spawn(move || -> Result<(), Error> {
                let started = start();
                let ok = started.is_ok();
                let _ = started_tx.send(started);
                if !ok {
                    return Ok(());
                }
                while !self.run_once(None)? {}
                Ok(())
            })
            .map_err(Error::Spawn)?;
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(Error::ThreadStart(e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Panicked);
            }
        }
        Ok(RunningLoop {
            stop,
            waker,
            thread,
        })
    }
}

/// An [`EventLoop`] running on its thread.
#[derive(Debug)]
pub struct RunningLoop {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: JoinHandle<Result<(), Error>>,
}

impl RunningLoop {
    /// Stops the loop and joins its thread (handlers, and the sockets they own, are dropped).
    pub fn stop(self) -> Result<(), Error> {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        self.thread.join().map_err(|_| Error::Panicked)?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Mutex;

    struct Echo {
        pair: Option<mio::net::UnixStream>,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl EventHandler for Echo {
        fn register(&mut self, ctl: &EventCtl<'_>) -> io::Result<()> {
            if let Some(s) = self.pair.as_mut() {
                ctl.register(s, 7, Interest::READABLE)?;
            }
            Ok(())
        }
        fn ready(&mut self, _ctl: &EventCtl<'_>, token: usize, r: Readiness) {
            let mut buf = [0u8; 16];
            if let Some(s) = self.pair.as_mut() {
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    self.log.lock().unwrap().push(format!(
                        "{token} {} {:?}",
                        r.readable,
                        &buf[..n]
                    ));
                }
            }
        }
        fn woken(&mut self, _ctl: &EventCtl<'_>) {
            self.log.lock().unwrap().push("woken".into());
        }
    }

    #[test]
    fn dispatches_sources_and_wakes_and_stops() {
        let (a, mut b) = mio::net::UnixStream::pair().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut el = EventLoop::new().unwrap();
        let wake = el
            .add(Box::new(Echo {
                pair: Some(a),
                log: log.clone(),
            }))
            .unwrap();
        b.write_all(&[1, 2]).unwrap();
        el.run_once(Some(Duration::from_secs(2))).unwrap();
        wake.wake();
        wake.wake();
        el.run_once(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["7 true [1, 2]", "woken"]);
        let running = el.spawn().unwrap();
        wake.wake();
        running.stop().unwrap();
    }

    #[test]
    fn a_failing_start_hook_fails_the_spawn() {
        let el = EventLoop::new().unwrap();
        let e = el
            .spawn_with(|| Err(io::Error::other("no filter")))
            .unwrap_err();
        assert!(e.to_string().contains("no filter"), "{e}");
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let running = EventLoop::new()
            .unwrap()
            .spawn_with(move || {
                r.store(true, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        assert!(ran.load(Ordering::SeqCst));
        running.stop().unwrap();
    }
}
