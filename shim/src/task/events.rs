//! Events: the ordered publisher, the agent's unsolicited events (OOM), and the exit watchers
//! that record a process's exit once its output is drained.

use super::*;

impl TaskService {
    /// The service for shim `id` in containerd namespace `namespace`; one thread publishes
    /// its events in order (a TaskStart is always sent before its TaskExit).
    pub(crate) fn new(
        id: String,
        namespace: String,
        exit: Arc<ExitSignal>,
        publisher: RemotePublisher,
    ) -> Self {
        tracing::debug!(shim = id.as_str(), "task service");
        let (tx, rx) = mpsc::channel::<(String, Box<dyn MessageDyn + Send>)>();
        std::thread::spawn(move || {
            for (topic, event) in rx {
                let mut ctx = Context::default();
                ctx.add("containerd-namespace-ttrpc".into(), namespace.clone());
                ctx.timeout_nano = 5_000_000_000;
                if let Err(e) = publisher.publish(ctx, &topic, &namespace, event) {
                    tracing::warn!("publishing {topic}: {e}");
                }
            }
        });
        TaskService {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                events: Mutex::new(tx),
                exit,
            }),
        }
    }
}

/// The shortest interval between two TaskOOM events of one container.
const OOM_EVERY: Duration = Duration::from_millis(100);

/// When each container last had a TaskOOM published.
#[derive(Debug, Default)]
struct OomThrottle {
    last: HashMap<String, std::time::Instant>,
}

impl OomThrottle {
    fn allow(&mut self, id: &str, now: std::time::Instant) -> bool {
        match self.last.get(id) {
            Some(t) if now.saturating_duration_since(*t) < OOM_EVERY => false,
            _ => {
                // Only ids of live containers get here: the map stays as small as the pod.
                self.last.insert(id.to_owned(), now);
                true
            }
        }
    }
}

impl Inner {
    pub(super) fn publish<E: Event + Send + 'static>(&self, e: E) {
        let topic = e.topic();
        let tx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send((topic, Box::new(e)));
    }

    /// Publishes the agent's unsolicited events that containerd has a topic for: an OOM kill
    /// in the container's cgroup becomes TaskOOM. The thread ends with the control connection.
    pub(super) fn watch_events(self: &Arc<Self>, sandbox: &Sandbox) {
        let Some(rx) = sandbox.client().take_events() else {
            return;
        };
        let inner = self.clone();
        std::thread::spawn(move || {
            let mut throttle = OomThrottle::default();
            let mut dropped = 0u64;
            for e in rx {
                if let skiff_protocol::Event::Oom { id: guest } = e {
                    let id = inner
                        .lock()
                        .containers
                        .iter()
                        .find(|(_, c)| c.guest == guest)
                        .map(|(id, _)| id.clone());
                    tracing::warn!(
                        container = id.as_deref().unwrap_or("?"),
                        "the guest kernel's OOM killer killed a process of the container"
                    );
                    let Some(id) = id else { continue };
                    // The guest decides how often this arrives: at most one TaskOOM per
                    // container per OOM_EVERY reaches containerd (the rest are counted).
                    if throttle.allow(&id, std::time::Instant::now()) {
                        let mut ev = TaskOOM::new();
                        ev.container_id = id;
                        inner.publish(ev);
                    } else {
                        dropped += 1;
                        if dropped.is_power_of_two() {
                            tracing::warn!(
                                dropped,
                                "OOM events coalesced (more than one per {OOM_EVERY:?})"
                            );
                        }
                    }
                }
            }
        });
    }

    /// Watches a started process: the agent answers Wait once it exited and its output was
    /// drained in the guest; then the host copies are finished, the exit recorded (waking
    /// `Wait`), and TaskExit published.
    pub(super) fn watch_exit(
        self: &Arc<Self>,
        sandbox: Arc<Sandbox>,
        id: String,
        guest: String,
        exec_id: String,
        guest_exec: Option<String>,
        outputs: Vec<JoinHandle<()>>,
    ) {
        let inner = self.clone();
        std::thread::spawn(move || {
            let status = match sandbox.client().wait(&guest, guest_exec.as_deref()) {
                Ok(s) => u32::try_from(s).unwrap_or(255),
                Err(e) => {
                    tracing::warn!("waiting for process {exec_id:?}: {e}");
                    255
                }
            };
            let _ = io::join_all(outputs, DRAIN_TIMEOUT);
            tracing::info!(
                container = id.as_str(),
                exec = exec_id.as_str(),
                status,
                ms = format!("{:.1}", sandbox.ms_since_start()),
                "boot phase (ms since VMM start): process exited, output drained"
            );
            let at = Timestamp::now();
            {
                let mut st = inner.lock();
                if let Some(p) = st
                    .containers
                    .get_mut(&id)
                    .and_then(|c| c.procs.get_mut(&exec_id))
                {
                    p.status = Status::STOPPED;
                    p.exit = Some((status, at.clone()));
                    p.stdin_stream = None;
                }
                inner.changed.notify_all();
            }
            let mut ev = TaskExit::new();
            ev.pid = inner
                .lock()
                .containers
                .get(&id)
                .map_or(std::process::id(), |c| c.pid);
            ev.container_id = id.clone();
            ev.id = if exec_id.is_empty() { id } else { exec_id };
            ev.exit_status = status;
            ev.exited_at = MessageField::some(at);
            inner.publish(ev);
        });
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[test]
    fn oom_events_are_coalesced_per_container() {
        let mut t = OomThrottle::default();
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let got: Vec<bool> = [0, 10, 50, 99, 100, 150, 250]
            .iter()
            .map(|ms| t.allow("a", at(*ms)))
            .collect();
        assert_eq!(got, [true, false, false, false, true, false, true]);
        // Another container has its own interval.
        assert!(t.allow("b", at(10)));
        assert!(!t.allow("b", at(20)));
    }
}
