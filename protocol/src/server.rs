//! Agent side: the serve loop over the control connection.

use crate::{
    decode_body, read_frame, write_message, ErrorReply, Event, FrameError, Hello, Message, Request,
    Response,
};
use serde::Deserialize;
use std::fmt;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

/// Shared writer half of the control connection (responses and events from any thread).
#[derive(Clone)]
pub struct Outbox {
    w: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    pub fn new<W: Write + Send + 'static>(w: W) -> Self {
        Self {
            w: Arc::new(Mutex::new(Box::new(w))),
        }
    }

    pub fn send(&self, msg: &Message) -> Result<(), FrameError> {
        let mut w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        write_message(&mut **w, msg)
    }

    /// Sends an event; failures (host gone) are ignored: the serve loop sees them too.
    pub fn event(&self, e: Event) {
        let _ = self.send(&Message::Event(e));
    }
}

/// The right (and duty) to answer one request; may be used from another thread later.
#[derive(Debug)]
pub struct Replier {
    id: u64,
    out: Outbox,
}

impl Replier {
    pub fn send(self, result: Result<Response, ErrorReply>) {
        let _ = self.out.send(&Message::Response {
            id: self.id,
            result,
        });
    }

    pub fn outbox(&self) -> &Outbox {
        &self.out
    }
}

/// Handles requests. `handle` runs on the serve thread: answer quickly, or move the
/// [`Replier`] to another thread for long operations (Wait).
pub trait Handler: Send + Sync {
    fn handle(&self, request: Request, reply: Replier);
    /// Called when the host sent `Shutdown`, before it is answered: whatever must outlive the
    /// VM (data written to shares) is made durable here, because once the answer is sent the
    /// host may stop the VM without waiting for it to power off.
    fn before_shutdown(&self) {}
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// The host sent `Shutdown` (already answered).
    Shutdown,
    /// The host closed the control connection.
    Disconnected,
}

#[derive(Deserialize)]
struct LooseRequest {
    request: LooseId,
}

#[derive(Deserialize)]
struct LooseId {
    id: u64,
}

/// Sends `hello`, then reads requests and hands them to `handler` until `Shutdown` or EOF.
/// A frame that is well delimited but undecodable gets an error reply (when its id can be
/// recovered) and the loop goes on; oversized frames and I/O errors end it with an error.
pub fn serve<R: Read, W: Write + Send + 'static>(
    mut reader: R,
    writer: W,
    hello: Hello,
    handler: &dyn Handler,
) -> Result<ServeEnd, FrameError> {
    let out = Outbox::new(writer);
    out.send(&Message::Hello(hello))?;
    loop {
        let body = match read_frame(&mut reader) {
            Ok(b) => b,
            Err(FrameError::Eof) => return Ok(ServeEnd::Disconnected),
            Err(e) => return Err(e),
        };
        match decode_body(&body) {
            Ok(Message::Request {
                id,
                request: Request::Shutdown,
            }) => {
                handler.before_shutdown();
                Replier {
                    id,
                    out: out.clone(),
                }
                .send(Ok(Response::Ok));
                return Ok(ServeEnd::Shutdown);
            }
            Ok(Message::Request { id, request }) => handler.handle(
                request,
                Replier {
                    id,
                    out: out.clone(),
                },
            ),
            Ok(_) => {} // not for the agent: ignore
            Err(e) => {
                if let Ok(l) = serde_json::from_slice::<LooseRequest>(&body) {
                    Replier {
                        id: l.request.id,
                        out: out.clone(),
                    }
                    .send(Err(ErrorReply::new(libc_einval(), e.to_string())));
                }
            }
        }
    }
}

const fn libc_einval() -> i32 {
    22
}
