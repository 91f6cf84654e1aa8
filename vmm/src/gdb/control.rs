//! All-stop coordination between the GDB stub's thread and the vCPU threads.
//!
//! GDB sees the VM in "all-stop" mode: when one vCPU stops (a breakpoint, a finished step, a
//! Ctrl-C), every vCPU is parked outside the guest until GDB resumes them. The vCPU threads
//! ask [`DebugControl::gate`] before each entry into the guest and report debug exits with
//! [`DebugControl::on_debug_exit`]; the stub halts, inspects and resumes them from its own
//! thread. Whatever reads or writes a vCPU's registers runs as a job on that vCPU's own thread
//! while it is parked (Hypervisor.framework binds a vCPU to its thread; KVM does not mind).
//!
//! No hypervisor types: the vCPU type is a parameter, and kicks go through [`VmControl`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::hypervisor::{DebugExit, DebugKind, GuestDebug};
use crate::vm_control::VmControl;

/// How long the stub waits for a vCPU to park or to answer a job.
pub const VCPU_DEADLINE: Duration = Duration::from_secs(5);

/// How often a halt re-kicks vCPUs that have not parked yet.
const REKICK: Duration = Duration::from_millis(2);

/// What a vCPU does when GDB resumes the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Stays parked (GDB's scheduler locking: only the threads it named run).
    Hold,
    /// Runs until the next stop.
    Continue,
    /// Runs one instruction, then stops.
    Step,
}

/// Why the VM stopped, as the stub reports it to GDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// The vCPU that stopped.
    pub vcpu: u32,
    /// Why.
    pub kind: DebugKind,
}

/// Errors talking to the vCPUs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The VM has ended.
    #[error("the VM has ended")]
    Ended,
    /// A vCPU did not park or answer in time.
    #[error("vCPU {0} did not answer within {VCPU_DEADLINE:?}")]
    Timeout(u32),
    /// No such vCPU.
    #[error("no vCPU {0}")]
    NoVcpu(u32),
}

type Job<V> = Box<dyn FnOnce(&mut V) + Send>;

struct State<V> {
    /// All-stop: every vCPU parks until GDB resumes.
    halted: bool,
    /// Per vCPU: what to do once not halted.
    resume: Vec<Resume>,
    /// Per vCPU: parked in [`DebugControl::gate`].
    parked: Vec<bool>,
    /// Per vCPU: its thread has left (the guest ended or it failed).
    gone: Vec<bool>,
    /// Per vCPU: jobs to run on its thread while parked.
    jobs: Vec<VecDeque<Job<V>>>,
    /// The breakpoint settings every vCPU applies when it leaves the gate.
    debug: GuestDebug,
    /// Software breakpoint addresses GDB placed (other `int3`s go back to the guest).
    sw_breakpoints: Vec<u64>,
    /// Stops reported since the last resume, oldest first.
    stops: VecDeque<Stop>,
    /// GDB is gone: run freely with debugging off.
    detached: bool,
    /// Per vCPU: has applied the settings of a detach (debugging off).
    detach_applied: Vec<bool>,
    /// The guest ended with this `vmm` exit status.
    ended: Option<i32>,
}

/// The all-stop state shared by the stub and the vCPU threads of one VM.
pub struct DebugControl<V> {
    state: Mutex<State<V>>,
    cv: Condvar,
    /// Fast path of the vCPU loop: false once GDB detached and every vCPU applied it.
    attention: AtomicBool,
    control: VmControl,
    cpus: u32,
}

impl<V> std::fmt::Debug for DebugControl<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("DebugControl")
            .field("halted", &s.halted)
            .field("parked", &s.parked)
            .field("detached", &s.detached)
            .finish()
    }
}

impl<V> DebugControl<V> {
    /// A VM of `cpus` vCPUs, halted: no vCPU enters the guest before GDB resumes it (the stub
    /// waits for GDB before the first instruction).
    pub fn new(cpus: u32, control: VmControl) -> Self {
        let n = cpus as usize;
        DebugControl {
            state: Mutex::new(State {
                halted: true,
                resume: vec![Resume::Continue; n],
                parked: vec![false; n],
                gone: vec![false; n],
                jobs: (0..n).map(|_| VecDeque::new()).collect(),
                debug: GuestDebug::default(),
                sw_breakpoints: Vec::new(),
                stops: VecDeque::new(),
                detached: false,
                detach_applied: vec![false; n],
                ended: None,
            }),
            cv: Condvar::new(),
            attention: AtomicBool::new(true),
            control,
            cpus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<V>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of vCPUs.
    pub fn cpus(&self) -> u32 {
        self.cpus
    }

    // ---- vCPU side ----

    /// Called by vCPU `id` before each entry into the guest. Parks while the VM is halted (or
    /// this vCPU is held), running the stub's jobs; on leaving, applies the breakpoint
    /// settings (single step only where GDB asked this vCPU to step). Returns false when the
    /// VM is stopping: the caller then leaves its loop through its own stop check.
    pub fn gate<E>(
        &self,
        id: u32,
        vcpu: &mut V,
        apply: &mut dyn FnMut(&mut V, &GuestDebug) -> Result<(), E>,
    ) -> Result<bool, E> {
        if !self.attention.load(Ordering::SeqCst) {
            return Ok(true);
        }
        let i = id as usize;
        let mut s = self.lock();
        if i >= s.parked.len() {
            return Ok(true);
        }
        loop {
            if self.control.is_stopped() || s.ended.is_some() {
                s.parked[i] = false;
                return Ok(false);
            }
            if let Some(job) = s.jobs[i].pop_front() {
                drop(s);
                job(vcpu);
                s = self.lock();
                continue;
            }
            let hold = s.halted || s.resume[i] == Resume::Hold;
            if !hold {
                break;
            }
            if !s.parked[i] {
                s.parked[i] = true;
                self.cv.notify_all();
            }
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.parked[i] = false;
        let mut debug = s.debug;
        debug.single_step = debug.enabled && s.resume[i] == Resume::Step;
        if s.detached {
            s.detach_applied[i] = true;
            let all = (0..s.gone.len()).all(|j| s.gone[j] || s.detach_applied[j]);
            if all {
                self.attention.store(false, Ordering::SeqCst);
            }
        }
        drop(s);
        apply(vcpu, &debug)?;
        Ok(true)
    }

    /// Called by vCPU `id` on a debug exit. Returns whether the exit was the guest's own
    /// breakpoint instruction (not one GDB placed): the caller then hands it back to the
    /// guest. Otherwise the VM halts and the stop goes to GDB.
    pub fn on_debug_exit(&self, id: u32, exit: DebugExit) -> bool {
        let mut s = self.lock();
        if s.detached {
            // A late exit from the time GDB was attached: nothing to report.
            return exit.kind == DebugKind::SwBreakpoint && !s.sw_breakpoints.contains(&exit.pc);
        }
        if exit.kind == DebugKind::SwBreakpoint && !s.sw_breakpoints.contains(&exit.pc) {
            return true;
        }
        s.stops.push_back(Stop {
            vcpu: id,
            kind: exit.kind,
        });
        s.halted = true;
        drop(s);
        self.cv.notify_all();
        self.control.kick_all();
        false
    }

    /// The current breakpoint settings (for a vCPU re-injecting the guest's own `int3`).
    pub fn current_debug(&self) -> GuestDebug {
        self.lock().debug
    }

    /// Called when vCPU `id`'s thread leaves.
    pub fn vcpu_gone(&self, id: u32) {
        let mut s = self.lock();
        if let Some(g) = s.gone.get_mut(id as usize) {
            *g = true;
        }
        s.jobs.get_mut(id as usize).map(VecDeque::clear);
        drop(s);
        self.cv.notify_all();
    }

    /// Called when the guest ended, with the `vmm` exit status it will have.
    pub fn vm_ended(&self, status: i32) {
        self.lock().ended = Some(status);
        self.cv.notify_all();
    }

    // ---- stub side ----

    /// The guest's exit status once it ended.
    pub fn ended(&self) -> Option<i32> {
        self.lock().ended
    }

    /// Halts every vCPU and waits until each is parked (or gone).
    pub fn halt(&self) -> Result<(), ControlError> {
        let deadline = Instant::now() + VCPU_DEADLINE;
        let mut s = self.lock();
        s.halted = true;
        loop {
            if s.ended.is_some() {
                return Err(ControlError::Ended);
            }
            let waiting = (0..s.parked.len()).find(|&i| !s.parked[i] && !s.gone[i]);
            let Some(i) = waiting else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(ControlError::Timeout(i as u32));
            }
            drop(s);
            self.control.kick_all();
            s = self.lock();
            s = self
                .cv
                .wait_timeout(s, REKICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs `f` on vCPU `id`'s thread (the VM must be halted) and returns its result.
    pub fn run_on<R: Send + 'static>(
        &self,
        id: u32,
        f: impl FnOnce(&mut V) -> R + Send + 'static,
    ) -> Result<R, ControlError> {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut s = self.lock();
            if s.ended.is_some() {
                return Err(ControlError::Ended);
            }
            let i = id as usize;
            if i >= s.jobs.len() || s.gone[i] {
                return Err(ControlError::NoVcpu(id));
            }
            s.jobs[i].push_back(Box::new(move |v: &mut V| {
                let _ = tx.send(f(v));
            }));
        }
        self.cv.notify_all();
        rx.recv_timeout(VCPU_DEADLINE)
            .map_err(|_| ControlError::Timeout(id))
    }

    /// Sets the breakpoints every vCPU applies when it next leaves the gate.
    pub fn set_breakpoints(&self, debug: GuestDebug, sw_breakpoints: Vec<u64>) {
        let mut s = self.lock();
        s.debug = debug;
        s.sw_breakpoints = sw_breakpoints;
    }

    /// Resumes the VM: each vCPU does what `actions` says. Stops not yet reported are dropped.
    pub fn resume(&self, actions: &[Resume]) {
        let mut s = self.lock();
        for (i, r) in s.resume.iter_mut().enumerate() {
            *r = actions.get(i).copied().unwrap_or(Resume::Continue);
        }
        s.stops.clear();
        s.halted = false;
        drop(s);
        self.cv.notify_all();
    }

    /// Waits up to `timeout` for a vCPU to stop; the VM is then halted.
    pub fn wait_stop(&self, timeout: Duration) -> Option<Stop> {
        let s = self.lock();
        let (mut s, _) = self
            .cv
            .wait_timeout_while(s, timeout, |s| s.stops.is_empty() && s.ended.is_none())
            .unwrap_or_else(|e| e.into_inner());
        s.stops.pop_front()
    }

    /// Ends the VM (GDB's `kill`).
    pub fn stop_vm(&self) {
        self.control.stop();
    }

    /// GDB is gone: debugging off, every vCPU runs freely.
    pub fn detach(&self) {
        let mut s = self.lock();
        s.detached = true;
        s.debug = GuestDebug::default();
        s.sw_breakpoints.clear();
        s.stops.clear();
        for r in s.resume.iter_mut() {
            *r = Resume::Continue;
        }
        s.halted = false;
        drop(s);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    /// A fake vCPU: counts its "instructions" and records the settings it was given.
    #[derive(Default)]
    struct FakeVcpu {
        pc: u64,
        applied: Vec<GuestDebug>,
    }

    fn spawn_vcpu(
        dbg: &Arc<DebugControl<FakeVcpu>>,
        id: u32,
        breakpoint_at: u64,
    ) -> std::thread::JoinHandle<FakeVcpu> {
        let dbg = dbg.clone();
        std::thread::spawn(move || {
            let mut v = FakeVcpu::default();
            let mut apply = |v: &mut FakeVcpu, d: &GuestDebug| -> Result<(), ()> {
                v.applied.push(*d);
                Ok(())
            };
            for _ in 0..1_000_000 {
                if !dbg.gate(id, &mut v, &mut apply).unwrap() {
                    break;
                }
                v.pc += 1;
                let d = *v.applied.last().unwrap();
                if d.single_step {
                    dbg.on_debug_exit(
                        id,
                        DebugExit {
                            kind: DebugKind::Step,
                            pc: v.pc,
                        },
                    );
                } else if d.sw_breakpoints && v.pc == breakpoint_at {
                    dbg.on_debug_exit(
                        id,
                        DebugExit {
                            kind: DebugKind::SwBreakpoint,
                            pc: v.pc,
                        },
                    );
                }
                std::thread::yield_now();
            }
            dbg.vcpu_gone(id);
            v
        })
    }

    #[test]
    fn the_vm_waits_for_gdb_then_stops_on_a_breakpoint_and_steps() {
        let control = VmControl::new();
        let dbg = Arc::new(DebugControl::<FakeVcpu>::new(2, control.clone()));
        let t0 = spawn_vcpu(&dbg, 0, 50);
        let t1 = spawn_vcpu(&dbg, 1, u64::MAX);
        // Halted from the start: nothing ran.
        dbg.halt().unwrap();
        assert_eq!(dbg.run_on(0, |v| v.pc).unwrap(), 0);
        assert_eq!(dbg.run_on(1, |v| v.pc).unwrap(), 0);
        let debug = GuestDebug {
            enabled: true,
            sw_breakpoints: true,
            ..GuestDebug::default()
        };
        dbg.set_breakpoints(debug, vec![50]);
        dbg.resume(&[Resume::Continue, Resume::Continue]);
        let stop = dbg.wait_stop(Duration::from_secs(10)).unwrap();
        assert_eq!(
            stop,
            Stop {
                vcpu: 0,
                kind: DebugKind::SwBreakpoint
            }
        );
        dbg.halt().unwrap();
        let pc0 = dbg.run_on(0, |v| v.pc).unwrap();
        assert_eq!(pc0, 50);
        let pc1 = dbg.run_on(1, |v| v.pc).unwrap();
        // Scheduler locking: step vCPU 0 alone.
        dbg.resume(&[Resume::Step, Resume::Hold]);
        let stop = dbg.wait_stop(Duration::from_secs(10)).unwrap();
        assert_eq!(stop.kind, DebugKind::Step);
        dbg.halt().unwrap();
        assert_eq!(dbg.run_on(0, |v| v.pc).unwrap(), 51);
        assert_eq!(dbg.run_on(1, |v| v.pc).unwrap(), pc1, "a held vCPU ran");
        // Detach: debugging goes off and both run on until the VM stops.
        dbg.detach();
        std::thread::sleep(Duration::from_millis(50));
        control.stop();
        let v0 = t0.join().unwrap();
        let v1 = t1.join().unwrap();
        assert!(v0.pc > 51 && v1.pc > pc1);
        assert!(!v0.applied.last().unwrap().enabled);
        assert!(!v1.applied.last().unwrap().enabled);
        assert!(dbg.run_on(0, |v| v.pc).is_err());
    }

    #[test]
    fn an_int3_gdb_did_not_place_goes_back_to_the_guest() {
        let dbg = DebugControl::<FakeVcpu>::new(1, VmControl::new());
        dbg.set_breakpoints(GuestDebug::default(), vec![0x1000]);
        let guest_own = DebugExit {
            kind: DebugKind::SwBreakpoint,
            pc: 0x2000,
        };
        assert!(dbg.on_debug_exit(0, guest_own));
        assert!(dbg.wait_stop(Duration::from_millis(1)).is_none());
        let ours = DebugExit {
            kind: DebugKind::SwBreakpoint,
            pc: 0x1000,
        };
        assert!(!dbg.on_debug_exit(0, ours));
        assert_eq!(dbg.wait_stop(Duration::from_millis(1)).unwrap().vcpu, 0);
    }

    #[test]
    fn a_halt_gives_up_on_a_vcpu_that_never_parks_and_the_end_wakes_the_stub() {
        let dbg = DebugControl::<FakeVcpu>::new(1, VmControl::new());
        // vCPU 0 never registers: the halt times out instead of hanging.
        let t = Instant::now();
        assert_eq!(dbg.halt(), Err(ControlError::Timeout(0)));
        assert!(t.elapsed() < VCPU_DEADLINE * 2);
        dbg.vm_ended(0);
        assert_eq!(dbg.wait_stop(Duration::from_secs(5)), None);
        assert_eq!(dbg.ended(), Some(0));
        assert_eq!(dbg.halt(), Err(ControlError::Ended));
    }
}
