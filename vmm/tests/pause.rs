//! vCPU pause/resume/stop on a real VM: a tiny guest that spins incrementing a counter in
//! guest memory, under this host's `/dev/kvm` (PVM here, hardware KVM elsewhere).
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use skiff_devices::BusDevice;
use skiff_tests::{build_guest, kvm_kind, KvmKind};
use skiff_vmm::timings::Timings;
use skiff_vmm::vm::{
    self, ControlError, GuestExit, MmioDeviceFactory, PitMode, RunResult, SerialOut, VmConfig,
    VmControl,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where counter.S counts.
const COUNTER: u64 = 0x70000;

/// A device the guest never touches; its factory is how the test gets at guest memory.
struct Inert;
impl BusDevice for Inert {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

type Mem = Arc<Mutex<Option<GuestMemoryMmap>>>;

fn memory_grabber(slot: Mem) -> MmioDeviceFactory {
    Box::new(move |mem: &GuestMemoryMmap, _irq, _saved| {
        *slot.lock().unwrap() = Some(mem.clone());
        Ok(Arc::new(Mutex::new(Inert)) as Arc<Mutex<dyn BusDevice>>)
    })
}

fn counter(mem: &Mem) -> u32 {
    match mem.lock().unwrap().as_ref() {
        Some(m) => m.read_obj::<u32>(GuestAddress(COUNTER)).unwrap(),
        None => 0,
    }
}

/// Waits up to 10 s for the counter to move more than 1000 past `from`.
fn advances_from(mem: &Mem, from: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if counter(mem) > from.saturating_add(1000) {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    false
}

type VmThread = thread::JoinHandle<Result<RunResult, vm::Error>>;

fn boot_counter_guest(cpus: u32) -> (VmControl, Mem, VmThread) {
    assert_ne!(
        kvm_kind(),
        KvmKind::Missing,
        "this test needs /dev/kvm and the host has none"
    );
    let elf = build_guest("counter.S", &[]);
    let cfg = VmConfig {
        kernel: elf,
        initrd: None,
        cmdline: "pause test".into(),
        cpus,
        memory_mib: 16,
        serial: SerialOut::Null,
        pit: PitMode::Off,
        snapshot: None,
        restore: None,
        serial_in: None,
        gdb: None,
    };
    let control = VmControl::new();
    let mem: Mem = Arc::new(Mutex::new(None));
    let (c, m) = (control.clone(), mem.clone());
    let t = thread::spawn(move || {
        vm::run_controlled(
            &cfg,
            Timings::new(Instant::now()),
            vec![memory_grabber(m)],
            &c,
        )
    });
    (control, mem, t)
}

/// Joins the VM thread, failing after `limit`.
fn join_within(t: VmThread, limit: Duration) -> Result<RunResult, vm::Error> {
    let deadline = Instant::now() + limit;
    while !t.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the VM did not end within {limit:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    t.join().unwrap()
}

#[test]
fn pause_freezes_the_guest_resume_continues_stop_ends_a_paused_vm() {
    // Two vCPUs: the AP is never started and waits for INIT/SIPI inside KVM_RUN; it must
    // not keep a pause from completing.
    let (control, mem, t) = boot_counter_guest(2);
    assert!(advances_from(&mem, 0), "the guest counts before any pause");
    assert!(!control.is_paused());

    for round in 0..3 {
        let t0 = Instant::now();
        control.pause().unwrap();
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(1), "pause took {took:?}");
        control.pause().unwrap(); // idempotent
        assert!(control.is_paused());
        let frozen = counter(&mem);
        thread::sleep(Duration::from_millis(200));
        assert_eq!(
            counter(&mem),
            frozen,
            "round {round}: the counter moved while paused"
        );
        control.resume().unwrap();
        control.resume().unwrap(); // idempotent
        assert!(!control.is_paused());
        assert!(
            advances_from(&mem, frozen),
            "round {round}: the guest counts again after resume"
        );
    }

    // Stop while paused: parked vCPUs are woken and leave, the run returns Stopped.
    control.pause().unwrap();
    let frozen = counter(&mem);
    control.stop();
    let r = join_within(t, Duration::from_secs(5)).unwrap();
    assert_eq!(r.exit, GuestExit::Stopped);
    assert_eq!(counter(&mem), frozen, "the guest never ran again");
    assert_eq!(control.pause(), Err(ControlError::Stopped));
    assert_eq!(control.resume(), Err(ControlError::Stopped));
    assert!(!control.is_paused());
}

#[test]
fn stop_ends_a_running_vm_and_a_pause_after_the_end_fails() {
    let (control, mem, t) = boot_counter_guest(1);
    assert!(advances_from(&mem, 0));
    control.stop();
    let r = join_within(t, Duration::from_secs(5)).unwrap();
    assert_eq!(r.exit, GuestExit::Stopped);
    let after = counter(&mem);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(counter(&mem), after, "no vCPU runs after the VM ended");
    assert_eq!(control.pause(), Err(ControlError::Stopped));
}

#[test]
fn a_failed_boot_leaves_the_control_stopped() {
    let control = VmControl::new();
    let cfg = VmConfig {
        kernel: "/no/such/kernel".into(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        memory_mib: 16,
        serial: SerialOut::Null,
        pit: PitMode::Off,
        snapshot: None,
        restore: None,
        serial_in: None,
        gdb: None,
    };
    let e =
        vm::run_controlled(&cfg, Timings::new(Instant::now()), Vec::new(), &control).unwrap_err();
    assert!(e.is_user_error(), "{e}");
    assert_eq!(control.pause(), Err(ControlError::Stopped));
}
