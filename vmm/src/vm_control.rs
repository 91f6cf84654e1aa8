//! Host-side control of a running VM's vCPUs: pause, resume and stop.
//!
//! A [`VmControl`] is shared between whoever controls the VM (the shim through `Sandbox`, a
//! test) and the VM's vCPU threads. Each vCPU thread registers with [`VmControl::enter`] once
//! its vCPU exists and asks its [`VcpuGate`] before every entry into the guest. A pause sets a
//! flag, kicks every vCPU out of the guest with its [`VcpuKicker`] and waits until every
//! registered vCPU is parked on the gate (a condition variable); resume clears the flag and
//! wakes them. A stop wakes parked vCPUs too, and the gate then tells them to leave.
//!
//! Only guest execution stops: device threads (vsock, virtio-fs workers) keep running. A vCPU
//! thread that has not registered yet (still being created) never blocks a pause: it parks on
//! its first gate check. An AP waiting for INIT/SIPI (KVM) or `CPU_ON` (HVF) waits inside
//! `Vcpu::run`, which a kick ends, so it parks like the others.
//!
//! No hypervisor types here: the only link to the backend is the [`VcpuKicker`] trait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::hypervisor::VcpuKicker;

/// How long [`VmControl::pause`] waits for every vCPU to park before it gives up (and resumes).
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a pause re-kicks vCPUs that have not parked yet.
const REKICK: Duration = Duration::from_millis(1);

/// Why a pause or resume failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The VM has stopped (or is stopping): there is nothing to pause or resume.
    #[error("the VM has stopped")]
    Stopped,
    /// Some vCPU did not leave the guest in time; the pause was undone.
    #[error("the vCPUs did not pause within {0:?}; the VM keeps running")]
    Timeout(Duration),
}

/// Pause/resume/stop handle of one VM. Cheap to clone; every clone controls the same VM.
///
/// Create it before the VM runs and hand a clone to [`crate::vm::run_controlled`].
#[derive(Clone, Default)]
pub struct VmControl {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.inner.lock();
        f.debug_struct("VmControl")
            .field("paused", &s.pause_requested)
            .field("stopped", &s.stopped)
            .field("vcpus", &s.vcpus.iter().flatten().count())
            .field("parked", &s.parked())
            .finish()
    }
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Signalled on every state change (pause, resume, stop, a vCPU parking or leaving).
    cv: Condvar,
    /// Fast path of the vCPU loop: true while a pause or a stop is requested.
    attention: AtomicBool,
}

#[derive(Default)]
struct State {
    pause_requested: bool,
    stopped: bool,
    /// Bumped by [`VmControl::collect_vcpu_states`]: each parked vCPU whose gate has seen an
    /// older value saves its state and files it in `saved`.
    save_gen: u64,
    /// The states filed for the current `save_gen`: (vCPU id, blob or error).
    saved: Vec<(u32, Result<Vec<u8>, String>)>,
    /// Registered vCPUs by slot (`None` once the vCPU thread left).
    vcpus: Vec<Option<VcpuSlot>>,
    /// Called once by [`VmControl::stop`] so the VM's main loop notices a host stop.
    on_stop: Option<Box<dyn FnOnce() + Send>>,
}

struct VcpuSlot {
    kicker: Arc<dyn VcpuKicker>,
    parked: bool,
    /// The last `save_gen` this vCPU answered.
    saved_gen: u64,
}

impl State {
    fn parked(&self) -> usize {
        self.vcpus.iter().flatten().filter(|v| v.parked).count()
    }
    fn all_parked(&self) -> bool {
        self.vcpus.iter().flatten().all(|v| v.parked)
    }
    fn unparked_kickers(&self) -> Vec<Arc<dyn VcpuKicker>> {
        self.vcpus
            .iter()
            .flatten()
            .filter(|v| !v.parked)
            .map(|v| v.kicker.clone())
            .collect()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a thread panicked while holding it (and panics abort in
        // release builds); the counters stay consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_attention(&self, s: &State) {
        self.attention
            .store(s.pause_requested || s.stopped, Ordering::SeqCst);
    }
}

impl VmControl {
    /// A control for a VM that has not started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops guest execution: kicks every vCPU out of the guest and returns once each one is
    /// parked outside it. Idempotent (pausing a paused VM returns at once). Device threads
    /// keep running. Fails when the VM has stopped, or when a vCPU does not leave the guest
    /// within [`PAUSE_TIMEOUT`] (the pause is then undone).
    pub fn pause(&self) -> Result<(), ControlError> {
        self.pause_within(PAUSE_TIMEOUT)
    }

    fn pause_within(&self, timeout: Duration) -> Result<(), ControlError> {
        let deadline = Instant::now() + timeout;
        let inner = &*self.inner;
        let mut s = inner.lock();
        if s.stopped {
            return Err(ControlError::Stopped);
        }
        s.pause_requested = true;
        inner.update_attention(&s);
        loop {
            if s.stopped {
                return Err(ControlError::Stopped);
            }
            if !s.pause_requested {
                // A concurrent resume won: the last request stands.
                return Ok(());
            }
            if s.all_parked() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                s.pause_requested = false;
                inner.update_attention(&s);
                drop(s);
                inner.cv.notify_all();
                tracing::warn!("vCPUs did not pause within {timeout:?}; resumed");
                return Err(ControlError::Timeout(timeout));
            }
            // Kick outside the lock (a kicker takes locks of its own). A kick is sticky (KVM:
            // `immediate_exit`; HVF: a pending cancel), so a vCPU about to enter the guest
            // leaves at once; kicking again each round costs nothing and covers any gap.
            let kickers = s.unparked_kickers();
            drop(s);
            for k in &kickers {
                k.kick();
            }
            s = inner.lock();
            if !s.stopped && s.pause_requested && !s.all_parked() {
                let wait = REKICK.min(deadline.saturating_duration_since(Instant::now()));
                s = match inner.cv.wait_timeout(s, wait) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                };
            }
        }
    }

    /// Asks for a pause without waiting for it (a vCPU thread asks for its own VM's pause this
    /// way: each vCPU, itself included, parks at its next gate check). Kicks the vCPUs in the
    /// guest. [`VmControl::pause`] then waits for them.
    pub(crate) fn request_pause(&self) {
        let inner = &*self.inner;
        let mut s = inner.lock();
        if s.stopped {
            return;
        }
        s.pause_requested = true;
        inner.update_attention(&s);
        let kickers = s.unparked_kickers();
        drop(s);
        for k in &kickers {
            k.kick();
        }
    }

    /// Lets parked vCPUs re-enter the guest. Idempotent; returns without waiting for them.
    /// Fails only when the VM has stopped.
    pub fn resume(&self) -> Result<(), ControlError> {
        let inner = &*self.inner;
        let mut s = inner.lock();
        if s.stopped {
            return Err(ControlError::Stopped);
        }
        s.pause_requested = false;
        inner.update_attention(&s);
        drop(s);
        inner.cv.notify_all();
        Ok(())
    }

    /// Whether the VM is paused (a pause was requested and not undone, and it has not stopped).
    pub fn is_paused(&self) -> bool {
        let s = self.inner.lock();
        s.pause_requested && !s.stopped
    }

    /// Whether the VM has stopped (or is stopping).
    pub fn is_stopped(&self) -> bool {
        self.inner.lock().stopped
    }

    /// Ends the VM from the host, paused or not: every vCPU leaves the guest (parked ones are
    /// woken) and `run_controlled` returns [`crate::vm::GuestExit::Stopped`]. Idempotent.
    pub fn stop(&self) {
        let hook = self.halt();
        if let Some(h) = hook {
            h();
        }
    }

    /// Marks the VM stopped, wakes parked vCPUs and kicks running ones once. Returns the
    /// host-stop hook if this call was the first stop.
    fn halt(&self) -> Option<Box<dyn FnOnce() + Send>> {
        let inner = &*self.inner;
        let mut s = inner.lock();
        let first = !s.stopped;
        s.stopped = true;
        inner.update_attention(&s);
        let hook = if first { s.on_stop.take() } else { None };
        let kickers = s.unparked_kickers();
        drop(s);
        inner.cv.notify_all();
        for k in &kickers {
            k.kick();
        }
        hook
    }

    /// Stops the vCPUs on the VM's own behalf (the guest ended, or the VMM failed): like
    /// [`VmControl::stop`] without the host-stop notification.
    pub(crate) fn stop_vcpus(&self) {
        let _ = self.halt();
    }

    /// Kicks every vCPU that is not parked (used while waiting for vCPU threads to end).
    pub(crate) fn kick_all(&self) {
        let kickers = self.inner.lock().unparked_kickers();
        for k in &kickers {
            k.kick();
        }
    }

    /// Has `expected` vCPUs save their state, each on its own thread (a Hypervisor.framework
    /// vCPU is bound to it), and returns the blobs by vCPU id. The VM must be paused; a vCPU
    /// that registers late parks and saves on its first gate check. Fails when the VM is not
    /// paused or stops, when a vCPU's save fails, or after `timeout`.
    pub(crate) fn collect_vcpu_states(
        &self,
        expected: usize,
        timeout: Duration,
    ) -> Result<Vec<(u32, Vec<u8>)>, String> {
        let deadline = Instant::now() + timeout;
        let inner = &*self.inner;
        let mut s = inner.lock();
        if s.stopped || !s.pause_requested {
            return Err("the VM is not paused".into());
        }
        s.save_gen += 1;
        s.saved.clear();
        let gen = s.save_gen;
        inner.cv.notify_all();
        loop {
            if s.stopped {
                return Err("the VM stopped while its vCPUs were being saved".into());
            }
            let registered = s.vcpus.iter().flatten().count();
            let pending = s
                .vcpus
                .iter()
                .flatten()
                .filter(|v| v.saved_gen < gen)
                .count();
            if pending == 0 && registered >= expected {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{} of {expected} vCPU(s) did not save within {timeout:?}",
                    expected.saturating_sub(registered) + pending
                ));
            }
            s = match inner.cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        let mut out = Vec::new();
        for (id, r) in std::mem::take(&mut s.saved) {
            out.push((id, r.map_err(|e| format!("vCPU {id}: {e}"))?));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Installs what [`VmControl::stop`] calls (once) to tell the VM's main loop. If the VM
    /// was already stopped, the hook runs at once.
    pub(crate) fn set_on_stop(&self, hook: Box<dyn FnOnce() + Send>) {
        let mut s = self.inner.lock();
        if s.stopped {
            drop(s);
            hook();
        } else {
            s.on_stop = Some(hook);
        }
    }

    /// Registers a vCPU thread whose vCPU exists. Check the returned gate before every entry
    /// into the guest; dropping it unregisters the vCPU.
    pub(crate) fn enter(&self, kicker: Arc<dyn VcpuKicker>) -> VcpuGate<'_> {
        let mut s = self.inner.lock();
        let slot = VcpuSlot {
            kicker,
            parked: false,
            saved_gen: 0,
        };
        let index = match s.vcpus.iter().position(Option::is_none) {
            Some(i) => {
                s.vcpus[i] = Some(slot);
                i
            }
            None => {
                s.vcpus.push(Some(slot));
                s.vcpus.len() - 1
            }
        };
        VcpuGate { ctl: self, index }
    }
}

/// A vCPU thread's registration with its [`VmControl`].
pub(crate) struct VcpuGate<'a> {
    ctl: &'a VmControl,
    index: usize,
}

impl VcpuGate<'_> {
    /// Call before every entry into the guest. Returns `true` to run the guest; parks (outside
    /// the guest) while the VM is paused; returns `false` once the VM is stopping.
    #[cfg(test)]
    pub(crate) fn may_run(&self) -> bool {
        self.may_run_or_save(0, &mut || Err("this vCPU cannot save its state".into()))
    }

    /// [`VcpuGate::may_run`] for vCPU `id`, which while parked answers
    /// [`VmControl::collect_vcpu_states`] by calling `save` (outside the lock).
    pub(crate) fn may_run_or_save(
        &self,
        id: u32,
        save: &mut dyn FnMut() -> Result<Vec<u8>, String>,
    ) -> bool {
        let inner = &*self.ctl.inner;
        if !inner.attention.load(Ordering::SeqCst) {
            return true;
        }
        let mut s = inner.lock();
        if s.pause_requested && !s.stopped {
            self.set_parked(&mut s, true);
            inner.cv.notify_all();
            while s.pause_requested && !s.stopped {
                let gen = s.save_gen;
                let asked = matches!(s.vcpus.get(self.index), Some(Some(v)) if v.saved_gen < gen);
                if asked {
                    drop(s);
                    let r = save();
                    s = inner.lock();
                    if let Some(Some(v)) = s.vcpus.get_mut(self.index) {
                        v.saved_gen = gen;
                    }
                    if s.save_gen == gen {
                        s.saved.push((id, r));
                    }
                    inner.cv.notify_all();
                    continue;
                }
                s = match inner.cv.wait(s) {
                    Ok(g) => g,
                    Err(e) => e.into_inner(),
                };
            }
            self.set_parked(&mut s, false);
        }
        !s.stopped
    }

    fn set_parked(&self, s: &mut State, parked: bool) {
        if let Some(Some(v)) = s.vcpus.get_mut(self.index) {
            v.parked = parked;
        }
    }
}

impl Drop for VcpuGate<'_> {
    fn drop(&mut self) {
        let inner = &*self.ctl.inner;
        let mut s = inner.lock();
        if let Some(v) = s.vcpus.get_mut(self.index) {
            *v = None;
        }
        drop(s);
        // A pause waiting for this vCPU no longer needs to.
        inner.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::thread;

    /// A fake vCPU: "in the guest" it spins, counting, until kicked (like KVM_RUN returning
    /// EINTR); the kick is sticky like `immediate_exit`.
    #[derive(Debug, Default)]
    struct FakeKicker {
        kicked: AtomicBool,
        kicks: AtomicU64,
    }
    impl VcpuKicker for FakeKicker {
        fn kick(&self) {
            self.kicks.fetch_add(1, Ordering::SeqCst);
            self.kicked.store(true, Ordering::SeqCst);
        }
    }

    /// Runs a fake vCPU loop; `progress` counts guest "instructions".
    fn spawn_vcpu(ctl: &VmControl, progress: Arc<AtomicU64>) -> thread::JoinHandle<()> {
        let ctl = ctl.clone();
        thread::spawn(move || {
            let kicker = Arc::new(FakeKicker::default());
            let gate = ctl.enter(kicker.clone());
            while gate.may_run() {
                // The guest: runs until a kick.
                while !kicker.kicked.swap(false, Ordering::SeqCst) {
                    progress.fetch_add(1, Ordering::SeqCst);
                    thread::yield_now();
                }
            }
        })
    }

    fn advances(p: &AtomicU64) -> bool {
        let a = p.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if p.load(Ordering::SeqCst) > a + 10 {
                return true;
            }
            thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn pause_parks_every_vcpu_resume_releases_stop_ends_paused_vcpus() {
        let ctl = VmControl::new();
        let progress: Vec<_> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let threads: Vec<_> = progress
            .iter()
            .map(|p| spawn_vcpu(&ctl, p.clone()))
            .collect();
        for p in &progress {
            assert!(advances(p), "vCPU runs before any pause");
        }
        for _ in 0..20 {
            ctl.pause().unwrap();
            ctl.pause().unwrap(); // idempotent
            assert!(ctl.is_paused());
            let before: Vec<u64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
            thread::sleep(Duration::from_millis(5));
            let after: Vec<u64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
            assert_eq!(before, after, "no vCPU runs while paused");
            ctl.resume().unwrap();
            ctl.resume().unwrap(); // idempotent
            assert!(!ctl.is_paused());
            for p in &progress {
                assert!(advances(p), "every vCPU runs again after resume");
            }
        }
        ctl.pause().unwrap();
        ctl.stop();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!ctl.is_paused());
        assert_eq!(ctl.pause(), Err(ControlError::Stopped));
        assert_eq!(ctl.resume(), Err(ControlError::Stopped));
    }

    #[test]
    fn pause_before_any_vcpu_registers_parks_it_on_first_check() {
        let ctl = VmControl::new();
        // No vCPU yet (still being created, or an AP not started): pause returns at once.
        ctl.pause().unwrap();
        let p = Arc::new(AtomicU64::new(0));
        let t = spawn_vcpu(&ctl, p.clone());
        thread::sleep(Duration::from_millis(50));
        assert_eq!(
            p.load(Ordering::SeqCst),
            0,
            "a late vCPU never ran while paused"
        );
        ctl.resume().unwrap();
        assert!(advances(&p));
        ctl.stop();
        t.join().unwrap();
    }

    #[test]
    fn a_vcpu_that_never_leaves_the_guest_times_out_and_the_pause_is_undone() {
        let ctl = VmControl::new();
        let kicker = Arc::new(FakeKicker::default());
        let gate = ctl.enter(kicker.clone());
        assert!(gate.may_run());
        // This "vCPU" ignores kicks (stays in the guest).
        let e = ctl.pause_within(Duration::from_millis(30)).unwrap_err();
        assert_eq!(e, ControlError::Timeout(Duration::from_millis(30)));
        assert!(!ctl.is_paused());
        assert!(kicker.kicks.load(Ordering::SeqCst) >= 1, "it was kicked");
        assert!(gate.may_run(), "the undone pause does not park it later");
        // Once it leaves, a vCPU thread that ended no longer counts.
        drop(gate);
        ctl.pause().unwrap();
        ctl.stop();
    }

    #[test]
    fn parked_vcpus_save_their_state_on_their_own_threads() {
        let ctl = VmControl::new();
        assert!(
            ctl.collect_vcpu_states(3, Duration::from_secs(1)).is_err(),
            "not paused"
        );
        let threads: Vec<_> = (0..3u32)
            .map(|id| {
                let ctl = ctl.clone();
                thread::spawn(move || {
                    let kicker = Arc::new(FakeKicker::default());
                    let gate = ctl.enter(kicker.clone());
                    let me = thread::current().id();
                    let mut save = || {
                        assert_eq!(thread::current().id(), me);
                        Ok(vec![id as u8; id as usize + 1])
                    };
                    while gate.may_run_or_save(id, &mut save) {
                        while !kicker.kicked.swap(false, Ordering::SeqCst) {
                            thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        ctl.pause().unwrap();
        for _ in 0..2 {
            // The threads may not have registered yet: they park and save when they do.
            let got = ctl.collect_vcpu_states(3, Duration::from_secs(5)).unwrap();
            assert_eq!(
                got,
                vec![(0, vec![0]), (1, vec![1, 1]), (2, vec![2, 2, 2])],
                "each vCPU saves once per request"
            );
        }
        ctl.stop();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn stop_hook_runs_once_and_stop_during_a_pause_wait_ends_it() {
        let ctl = VmControl::new();
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        ctl.set_on_stop(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        let kicker = Arc::new(FakeKicker::default());
        let gate = ctl.enter(kicker);
        assert!(gate.may_run());
        let pauser = {
            let ctl = ctl.clone();
            thread::spawn(move || ctl.pause())
        };
        thread::sleep(Duration::from_millis(20));
        ctl.stop();
        ctl.stop();
        assert_eq!(pauser.join().unwrap(), Err(ControlError::Stopped));
        assert!(!gate.may_run(), "a stopped VM's vCPU leaves");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        ctl.stop_vcpus();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
