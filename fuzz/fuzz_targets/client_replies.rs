//! The host's agent client (`skiff_protocol::client::Client`): its reply demultiplexer (the
//! reader thread) fed whatever the agent sends, while up to three callers wait for answers.
//! The agent is hostile from the host's view: any frames, answers to ids never asked, several
//! answers to one id, answers of the wrong kind, events, a second Hello, requests, garbage,
//! truncated frames, a connection whose writes fail.
//!
//! Sequence: the Hello (valid, or the raw input as the whole connection), then the callers each send
//! one request and block; once all their frames are written, the rest of the input arrives and
//! the connection ends.
//!
//! Checked, besides "no panic, no hang": no caller times out (the end of the connection wakes
//! every one of them, answered or not); a caller gets a response only when the agent sent one
//! for some id; once the reader thread has ended (its event channel closes), a new call fails
//! with `Disconnected` at once.
//!
//! Input: byte 0 flags (bit 0 valid Hello, bits 1-2 number of callers, bit 3 writes fail,
//! bits 4-5 which requests), then the agent's bytes.
#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use skiff_protocol::client::{Client, ClientError};
use skiff_protocol::{encode, Hello, Message, Request, PROTOCOL_VERSION};

/// The agent's side of the connection: chunks sent by the target; EOF when the sender goes.
struct Incoming {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: VecDeque<u8>,
}

impl Read for Incoming {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.recv() {
                Ok(c) => self.buf.extend(c),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        for (o, b) in out.iter_mut().zip(self.buf.drain(..n)) {
            *o = b;
        }
        Ok(n)
    }
}

/// Counts the request frames the client writes (or fails to write).
struct Outgoing {
    frames: Arc<(Mutex<usize>, Condvar)>,
    fail: bool,
}

impl Outgoing {
    fn count(&self) {
        *self.frames.0.lock().unwrap() += 1;
        self.frames.1.notify_all();
    }
}

impl Write for Outgoing {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.fail {
            self.count();
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "agent gone"));
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.count();
        Ok(())
    }
}

/// Threads of this process (the reader thread has no handle to join: the target waits for the
/// count to drop back, so LeakSanitizer never sees a thread still running its TLS destructors).
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let baseline = threads();
    let (tx, rx) = mpsc::channel();
    let reader = Incoming {
        rx,
        buf: VecDeque::new(),
    };
    let frames = Arc::new((Mutex::new(0usize), Condvar::new()));
    let writer = Outgoing {
        frames: frames.clone(),
        fail: flags & 8 != 0,
    };
    if flags & 1 != 0 {
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "fuzz".into(),
            boot_stamps: vec![("agent_start".into(), 1)],
        });
        tx.send(encode(&hello).expect("hello")).expect("send");
    } else {
        // The raw input is the whole connection (Hello first, then whatever follows).
        tx.send(rest.to_vec()).expect("send");
    }
    let tx = (flags & 1 != 0).then_some(tx);
    let Ok((client, _hello)) = Client::new(reader, writer) else {
        return;
    };
    // From here on, the reader thread runs: wait for it on every path below.
    let client = Arc::new(client);
    client.set_call_timeout(Duration::from_secs(20));
    let events = client.take_events().expect("events");
    let callers = usize::from(flags >> 1 & 3);
    let which = flags >> 4 & 3;
    let handles: Vec<_> = (0..callers)
        .map(|i| {
            let c = client.clone();
            let frames = frames.clone();
            std::thread::spawn(move || -> Result<(), ClientError> {
                let r = match (usize::from(which) + i) % 4 {
                    0 => c.pids("c").map(drop),
                    1 => c.wait("c", Some("e")).map(drop),
                    2 => c.start("c", None).map(drop),
                    _ => c.call(Request::Shutdown).map(drop),
                };
                // A caller that never wrote (the connection was already closed) is done too.
                *frames.0.lock().unwrap() += 1;
                frames.1.notify_all();
                r
            })
        })
        .collect();
    // Every caller has registered its id and written (or failed to write) its frame, or
    // returned already.
    {
        let (m, cv) = &*frames;
        let mut n = m.lock().unwrap();
        while *n < callers {
            let (g, t) = cv.wait_timeout(n, Duration::from_secs(20)).unwrap();
            assert!(!t.timed_out(), "callers never wrote their requests");
            n = g;
        }
    }
    if let Some(tx) = tx {
        let _ = tx.send(rest.to_vec());
    }
    for h in handles {
        match h.join().expect("caller panicked") {
            Err(ClientError::TimedOut) => panic!("a caller timed out after the connection ended"),
            Ok(()) | Err(ClientError::Agent(_)) | Err(ClientError::Protocol(_)) => {
                assert!(flags & 8 == 0, "an answer to a request never written");
            }
            Err(ClientError::Disconnected) | Err(ClientError::Frame(_)) => {}
        }
    }
    // The reader thread ends: its event sender goes.
    loop {
        match events.recv_timeout(Duration::from_secs(20)) {
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the reader thread did not end"),
        }
    }
    assert!(
        matches!(
            client.call_timeout(Request::Shutdown, Duration::from_secs(20)),
            Err(ClientError::Disconnected)
        ),
        "a call after the end of the connection did not fail at once"
    );
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while threads() > baseline {
        assert!(
            std::time::Instant::now() < end,
            "the reader thread did not exit"
        );
        std::thread::yield_now();
    }
});
