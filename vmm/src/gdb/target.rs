//! The `gdbstub` target of an x86_64 VM: threads are vCPUs, memory is read through the page
//! tables of the vCPU GDB has selected.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::run_blocking::{self, BlockingEventLoop, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use vm_memory::GuestMemoryMmap;

use super::control::{ControlError, DebugControl, Resume, Stop};
use super::x86_64::{from_gdb, read_virt, to_gdb, write_virt, Paging};
use super::Connection;
use crate::hypervisor::x86_64::{Regs, Sregs, VcpuX86_64};
use crate::hypervisor::{DebugKind, GuestDebug, MAX_HW_BREAKPOINTS};

/// The `int3` instruction.
const INT3: u8 = 0xcc;

/// How often the stub looks at GDB's socket while the guest runs.
const POLL: Duration = Duration::from_millis(20);

/// One VM as GDB sees it.
pub struct GdbTarget<V> {
    dbg: Arc<DebugControl<V>>,
    mem: GuestMemoryMmap,
    /// Software breakpoints: address -> the byte the `int3` replaced.
    sw: BTreeMap<u64, u8>,
    hw: [Option<u64>; MAX_HW_BREAKPOINTS],
    actions: Vec<Option<Resume>>,
    scheduler_lock: bool,
    /// Registers read since the VM stopped (dropped on resume).
    cache: HashMap<u32, (Regs, Sregs)>,
}

fn vcpu_of(tid: Tid) -> u32 {
    (tid.get() - 1) as u32
}

fn tid_of(vcpu: u32) -> Tid {
    NonZeroUsize::new(vcpu as usize + 1).unwrap_or(NonZeroUsize::MIN)
}

impl<V: VcpuX86_64 + 'static> GdbTarget<V> {
    /// A target for the VM behind `dbg`, whose guest memory is `mem`.
    pub fn new(dbg: Arc<DebugControl<V>>, mem: GuestMemoryMmap) -> Self {
        let n = dbg.cpus() as usize;
        GdbTarget {
            dbg,
            mem,
            sw: BTreeMap::new(),
            hw: [None; MAX_HW_BREAKPOINTS],
            actions: vec![None; n],
            scheduler_lock: false,
            cache: HashMap::new(),
        }
    }

    fn regs(&mut self, vcpu: u32) -> Result<(Regs, Sregs), String> {
        if let Some(r) = self.cache.get(&vcpu) {
            return Ok(*r);
        }
        let r = self
            .dbg
            .run_on(vcpu, |v: &mut V| -> Result<(Regs, Sregs), String> {
                Ok((
                    v.regs().map_err(|e| e.to_string())?,
                    v.sregs().map_err(|e| e.to_string())?,
                ))
            })
            .map_err(|e| e.to_string())??;
        self.cache.insert(vcpu, r);
        Ok(r)
    }

    fn paging(&mut self, vcpu: u32) -> Result<Paging, String> {
        Ok(Paging::from(&self.regs(vcpu)?.1))
    }

    fn debug_settings(&self) -> GuestDebug {
        GuestDebug {
            enabled: true,
            single_step: false,
            sw_breakpoints: !self.sw.is_empty(),
            hw_breakpoints: self.hw,
        }
    }
}

macro_rules! try_nonfatal {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!("gdb: {e}");
                return Err(TargetError::NonFatal);
            }
        }
    };
}

impl<V: VcpuX86_64 + 'static> Target for GdbTarget<V> {
    type Arch = X86_64_SSE;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

impl<V: VcpuX86_64 + 'static> MultiThreadBase for GdbTarget<V> {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let (r, s) = try_nonfatal!(self.regs(vcpu_of(tid)));
        *regs = to_gdb(&r, &s);
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = vcpu_of(tid);
        let (old, s) = try_nonfatal!(self.regs(vcpu));
        let new = from_gdb(regs, &old);
        let set = self.dbg.run_on(vcpu, move |v: &mut V| {
            v.set_regs(&new).map_err(|e| e.to_string())
        });
        try_nonfatal!(set.map_err(|e| e.to_string()).and_then(|r| r));
        self.cache.insert(vcpu, (new, s));
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let p = try_nonfatal!(self.paging(vcpu_of(tid)));
        match read_virt(&self.mem, p, start, data) {
            0 if !data.is_empty() => Err(TargetError::Errno(14)),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let p = try_nonfatal!(self.paging(vcpu_of(tid)));
        if write_virt(&self.mem, p, start, data) {
            Ok(())
        } else {
            Err(TargetError::Errno(14))
        }
    }

    fn list_active_threads(&mut self, thread_is_active: &mut dyn FnMut(Tid)) -> Result<(), String> {
        for id in 0..self.dbg.cpus() {
            thread_is_active(tid_of(id));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl<V: VcpuX86_64 + 'static> MultiThreadResume for GdbTarget<V> {
    fn resume(&mut self) -> Result<(), String> {
        let default = if self.scheduler_lock {
            Resume::Hold
        } else {
            Resume::Continue
        };
        let actions: Vec<Resume> = self.actions.iter().map(|a| a.unwrap_or(default)).collect();
        self.dbg
            .set_breakpoints(self.debug_settings(), self.sw.keys().copied().collect());
        self.cache.clear();
        self.dbg.resume(&actions);
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), String> {
        self.actions.iter_mut().for_each(|a| *a = None);
        self.scheduler_lock = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), String> {
        if let Some(a) = self.actions.get_mut(vcpu_of(tid) as usize) {
            *a = Some(Resume::Continue);
        }
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl<V: VcpuX86_64 + 'static> MultiThreadSingleStep for GdbTarget<V> {
    fn set_resume_action_step(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), String> {
        if let Some(a) = self.actions.get_mut(vcpu_of(tid) as usize) {
            *a = Some(Resume::Step);
        }
        Ok(())
    }
}

impl<V: VcpuX86_64 + 'static> MultiThreadSchedulerLocking for GdbTarget<V> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), String> {
        self.scheduler_lock = true;
        Ok(())
    }
}

impl<V: VcpuX86_64 + 'static> Breakpoints for GdbTarget<V> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl<V: VcpuX86_64 + 'static> SwBreakpoint for GdbTarget<V> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.sw.contains_key(&addr) {
            return Ok(true);
        }
        // Kernel addresses are the same on every vCPU: vCPU 0's tables decide.
        let p = try_nonfatal!(self.paging(0));
        let mut old = [0u8];
        if read_virt(&self.mem, p, addr, &mut old) != 1 || !write_virt(&self.mem, p, addr, &[INT3])
        {
            return Ok(false);
        }
        self.sw.insert(addr, old[0]);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(old) = self.sw.remove(&addr) else {
            return Ok(false);
        };
        let p = try_nonfatal!(self.paging(0));
        Ok(write_virt(&self.mem, p, addr, &[old]))
    }
}

impl<V: VcpuX86_64 + 'static> HwBreakpoint for GdbTarget<V> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.hw.contains(&Some(addr)) {
            return Ok(true);
        }
        match self.hw.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some(addr);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        match self.hw.iter_mut().find(|s| **s == Some(addr)) {
            Some(slot) => {
                *slot = None;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

fn stop_reason(stop: Stop) -> MultiThreadStopReason<u64> {
    let tid = tid_of(stop.vcpu);
    match stop.kind {
        DebugKind::SwBreakpoint => MultiThreadStopReason::SwBreak(tid),
        DebugKind::HwBreakpoint(_) => MultiThreadStopReason::HwBreak(tid),
        DebugKind::Step | DebugKind::Other => MultiThreadStopReason::SignalWithThread {
            tid,
            signal: Signal::SIGTRAP,
        },
    }
}

struct EventLoop<V>(PhantomData<V>);

impl<V: VcpuX86_64 + 'static> BlockingEventLoop for EventLoop<V> {
    type Target = GdbTarget<V>;
    type Connection = Connection;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut GdbTarget<V>,
        conn: &mut Connection,
    ) -> Result<run_blocking::Event<Self::StopReason>, WaitForStopReasonError<String, std::io::Error>>
    {
        loop {
            if let Some(stop) = target.dbg.wait_stop(POLL) {
                target.cache.clear();
                match target.dbg.halt() {
                    Ok(()) => return Ok(run_blocking::Event::TargetStopped(stop_reason(stop))),
                    Err(ControlError::Ended) => {}
                    Err(e) => return Err(WaitForStopReasonError::Target(e.to_string())),
                }
            }
            if let Some(status) = target.dbg.ended() {
                return Ok(run_blocking::Event::TargetStopped(
                    MultiThreadStopReason::Exited(status as u8),
                ));
            }
            if conn
                .peek()
                .map_err(WaitForStopReasonError::Connection)?
                .is_some()
            {
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(run_blocking::Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut GdbTarget<V>) -> Result<Option<Self::StopReason>, String> {
        target.cache.clear();
        match target.dbg.halt() {
            Ok(()) => Ok(Some(MultiThreadStopReason::SignalWithThread {
                tid: tid_of(0),
                signal: Signal::SIGINT,
            })),
            Err(ControlError::Ended) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Serves GDB on `conn` until it detaches, the connection drops or the guest ends; then turns
/// debugging off and lets the vCPUs run. Runs on the stub's own thread.
pub fn serve<V: VcpuX86_64 + 'static>(
    conn: Connection,
    dbg: Arc<DebugControl<V>>,
    mem: GuestMemoryMmap,
) {
    let mut target = GdbTarget::new(dbg.clone(), mem);
    let mut killed = false;
    let result = match GdbStub::new(conn).run_blocking::<EventLoop<V>>(&mut target) {
        Ok(DisconnectReason::Disconnect) => "GDB detached".to_string(),
        Ok(DisconnectReason::TargetExited(code)) => format!("the guest ended ({code})"),
        Ok(DisconnectReason::TargetTerminated(sig)) => format!("the guest was terminated ({sig})"),
        Ok(DisconnectReason::Kill) => {
            killed = true;
            "GDB killed the VM".to_string()
        }
        Err(e) => format!("GDB session ended: {e}"),
    };
    // Whatever GDB left in memory goes (a connection that dropped mid-session leaves its
    // breakpoints behind otherwise).
    if !target.sw.is_empty() && dbg.halt().is_ok() {
        if let Ok(p) = target.paging(0) {
            for (addr, old) in std::mem::take(&mut target.sw) {
                let _ = write_virt(&target.mem, p, addr, &[old]);
            }
        }
    }
    dbg.detach();
    if killed {
        dbg.stop_vm();
        tracing::info!("{result}");
        eprintln!("vmm: {result}");
    } else if dbg.ended().is_some() {
        tracing::info!("{result}");
    } else {
        tracing::info!("{result}; the guest runs on without the debugger");
        eprintln!("vmm: {result}; the guest runs on without the debugger");
    }
}
