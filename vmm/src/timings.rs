//! Per-phase boot timings: VMM start → VM created → memory mapped → kernel loaded → first vCPU
//! entry → first serial byte → boot-timer stamps → exit.

use std::time::{Duration, Instant};

/// A boot phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The VM got a boot slot (marked only when it waited 1 ms or more for one; see
    /// [`crate::boot_slots`]).
    BootSlot,
    /// The run's inputs were checked and its kernel and initramfs found (`vmm run`).
    RunPrepared,
    /// An existing template was found, read and checked (warm start).
    TemplateChecked,
    /// `KVM_CREATE_VM` (or `hv_vm_create`) returned.
    VmCreated,
    /// Guest RAM allocated and mapped into the VM.
    MemoryMapped,
    /// Kernel, initrd, command line and boot tables written.
    KernelLoaded,
    /// A snapshot was read, checked and mapped, and the VM's state restored (instead of
    /// loading a kernel).
    SnapshotRestored,
    /// No template existed: one was made (a cold boot of a template VM) before this VM.
    TemplateMade,
    /// The boot vCPU is about to enter the guest for the first time.
    FirstVcpuEntry,
    /// The guest wrote its first byte to the serial console.
    FirstSerialByte,
    /// The guest wrote this value to the boot timer (123 = userspace reached).
    BootStamp(u8),
    /// The guest agent connected to the host (ready to run containers).
    AgentReady,
    /// The agent answered the handshake and the guest was prepared for containers (a restored
    /// one reseeded and its clock set; shares mounted; the network configured).
    GuestPrepared,
    /// The agent created the container (namespaces, mounts, its process waiting to exec).
    ContainerCreated,
    /// The container's stdio streams reached the host.
    StreamsAttached,
    /// The container's process was started.
    ContainerStarted,
    /// The container's process exited and its output was drained.
    ContainerExited,
    /// The VM was saved as a snapshot.
    SnapshotSaved,
    /// The VM ended.
    Exit,
}

impl Phase {
    fn label(&self) -> String {
        match self {
            Phase::BootSlot => "boot slot acquired".into(),
            Phase::RunPrepared => "run prepared".into(),
            Phase::TemplateChecked => "template checked".into(),
            Phase::VmCreated => "VM created".into(),
            Phase::MemoryMapped => "memory mapped".into(),
            Phase::KernelLoaded => "kernel loaded".into(),
            Phase::SnapshotRestored => "snapshot restored".into(),
            Phase::TemplateMade => "template made (cold boot)".into(),
            Phase::SnapshotSaved => "snapshot saved".into(),
            Phase::FirstVcpuEntry => "first vCPU entry".into(),
            Phase::FirstSerialByte => "first serial byte".into(),
            Phase::BootStamp(123) => "boot-timer stamp (userspace)".into(),
            Phase::BootStamp(v) => format!("boot-timer stamp ({v})"),
            Phase::AgentReady => "agent ready".into(),
            Phase::GuestPrepared => "guest prepared".into(),
            Phase::ContainerCreated => "container created".into(),
            Phase::StreamsAttached => "stdio streams attached".into(),
            Phase::ContainerStarted => "container started".into(),
            Phase::ContainerExited => "container exited".into(),
            Phase::Exit => "exit".into(),
        }
    }
}

/// Timestamps relative to the VMM's start.
#[derive(Debug, Clone)]
pub struct Timings {
    start: Instant,
    marks: Vec<(Phase, Instant)>,
}

impl Timings {
    /// Starts the clock at `start` (the top of `main`).
    pub fn new(start: Instant) -> Self {
        Timings {
            start,
            marks: Vec::new(),
        }
    }

    /// The clock's start.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Milliseconds from the start to `at`.
    pub fn ms_since_start(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64() * 1e3
    }

    /// Records `phase` now.
    pub fn mark(&mut self, phase: Phase) {
        self.mark_at(phase, Instant::now());
    }

    /// Records `phase` at `at`; only the first mark of a phase counts.
    pub fn mark_at(&mut self, phase: Phase, at: Instant) {
        if !self.marks.iter().any(|(p, _)| *p == phase) {
            self.marks.push((phase, at));
        }
    }

    /// Every recorded phase with its instant.
    pub fn phases(&self) -> Vec<(Phase, Instant)> {
        self.marks.clone()
    }

    /// Time from start to `phase`, if it happened.
    pub fn get(&self, phase: Phase) -> Option<Duration> {
        self.marks
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, t)| t.duration_since(self.start))
    }

    /// The report printed by `--timings`, one phase per line, in time order.
    pub fn report(&self) -> String {
        let mut marks = self.marks.clone();
        marks.sort_by_key(|(_, t)| *t);
        let mut s =
            String::from("skiff timings (ms since VMM start, +delta from previous phase):\n");
        let mut prev = self.start;
        for (p, t) in marks {
            let total = t.duration_since(self.start).as_secs_f64() * 1e3;
            let delta = t.duration_since(prev).as_secs_f64() * 1e3;
            s.push_str(&format!(
                "  {:<30} {:>10.3} ms  (+{:.3})\n",
                p.label(),
                total,
                delta
            ));
            prev = t;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_ordered_and_first_mark_wins() {
        let start = Instant::now();
        let mut t = Timings::new(start);
        t.mark_at(Phase::Exit, start + Duration::from_millis(9));
        t.mark_at(Phase::VmCreated, start + Duration::from_millis(1));
        t.mark_at(Phase::VmCreated, start + Duration::from_millis(5));
        let r = t.report();
        let created = r.find("VM created").unwrap_or(usize::MAX);
        let exit = r.find("exit").unwrap_or(0);
        assert!(created < exit, "{r}");
        assert_eq!(t.get(Phase::VmCreated), Some(Duration::from_millis(1)));
    }
}
