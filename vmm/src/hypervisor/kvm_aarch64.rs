//! KVM backend on arm64 Linux. Names `kvm-ioctls`/`kvm-bindings` types, like `kvm.rs` (the
//! x86_64 one); what both share is in `kvm_common.rs`.
//!
//! A VM has KVM's in-kernel GICv3 (`KVM_DEV_TYPE_ARM_VGIC_V3`: the distributor and the
//! redistributors at the FDT's addresses, initialised once every vCPU exists) and its virtual
//! timer; PSCI 0.2 (CPU_ON, SYSTEM_OFF, SYSTEM_RESET) is served by KVM and ends in system-event
//! exits; WFI waits in the kernel. Registers go through ONE_REG; MMIO exits are completed in
//! the `kvm_run` page as on x86. Snapshots and guest debugging are not supported here yet.

use std::sync::Arc;

use firmware_free_boot::aarch64::layout;
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init,
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_VGIC_V3_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, Kvm as KvmFd, VcpuFd, VmFd};

use super::aarch64::{kvm_core_reg_id, kvm_spi_irq_line, kvm_sys_reg_id, Reg, SysReg};
use super::kvm_common::{self, errno, KvmKicker};
use super::{
    Access, Error, GuestDebug, Hypervisor, MemoryRegion, Result, Vcpu, VcpuAarch64, VcpuExit,
    VcpuKicker, Vm,
};

const SNAPSHOT_UNSUPPORTED: &str = "snapshots of arm64 KVM VMs";

/// The opened `/dev/kvm`.
#[derive(Debug)]
pub struct Kvm {
    kvm: Arc<KvmFd>,
}

impl Hypervisor for Kvm {
    type Vm = KvmVm;

    fn new() -> Result<Self> {
        Ok(Kvm {
            kvm: kvm_common::open()?,
        })
    }

    fn max_vcpus(&self) -> u32 {
        kvm_common::max_vcpus(&self.kvm)
    }

    fn create_vm(&self, vcpus: u32) -> Result<KvmVm> {
        let max = self.max_vcpus().min(crate::arch::current::MAX_CPUS);
        if vcpus == 0 || vcpus > max {
            return Err(Error::TooManyVcpus {
                requested: vcpus,
                max,
            });
        }
        let vm = self
            .kvm
            .create_vm()
            .map_err(|e| Error::call("KVM_CREATE_VM", errno(e)))?;
        let gic = create_gic(&vm)?;
        let mut target = kvm_vcpu_init::default();
        vm.get_preferred_target(&mut target)
            .map_err(|e| Error::call("KVM_ARM_PREFERRED_TARGET", errno(e)))?;
        Ok(KvmVm { vm, gic, target })
    }
}

/// The in-kernel GICv3 with its distributor and redistributor regions where the FDT says.
fn create_gic(vm: &VmFd) -> Result<DeviceFd> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm
        .create_device(&mut dev)
        .map_err(|e| Error::call("KVM_CREATE_DEVICE (GICv3)", errno(e)))?;
    for (kind, addr) in [
        (KVM_VGIC_V3_ADDR_TYPE_DIST, layout::GIC_DIST_ADDR),
        (KVM_VGIC_V3_ADDR_TYPE_REDIST, layout::GIC_REDIST_ADDR),
    ] {
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_ARM_VGIC_GRP_ADDR,
            attr: u64::from(kind),
            // KVM reads the address from this pointer during the call.
            addr: std::ptr::addr_of!(addr) as u64,
        };
        gic.set_device_attr(&attr)
            .map_err(|e| Error::call("KVM_SET_DEVICE_ATTR (GIC address)", errno(e)))?;
    }
    Ok(gic)
}

/// A KVM VM on arm64.
#[derive(Debug)]
pub struct KvmVm {
    vm: VmFd,
    gic: DeviceFd,
    /// The host's preferred vCPU target (KVM_ARM_PREFERRED_TARGET), for every vCPU.
    target: kvm_vcpu_init,
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn add_memory_region(&self, r: MemoryRegion) -> Result<()> {
        kvm_common::add_memory_region(&self.vm, r)
    }

    fn create_vcpu(&self, id: u32) -> Result<KvmVcpu> {
        let mut fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::call("KVM_CREATE_VCPU", errno(e)))?;
        let mut init = self.target;
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        if id != 0 {
            // Secondary CPUs wait for the guest's PSCI CPU_ON.
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        fd.vcpu_init(&init)
            .map_err(|e| Error::call("KVM_ARM_VCPU_INIT", errno(e)))?;
        let kicker = KvmKicker::for_this_thread(&mut fd);
        Ok(KvmVcpu { fd, kicker })
    }

    fn vcpus_created(&self) -> Result<()> {
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_ARM_VGIC_GRP_CTRL,
            attr: u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
            addr: 0,
        };
        self.gic
            .set_device_attr(&attr)
            .map_err(|e| Error::call("KVM_SET_DEVICE_ATTR (GIC init)", errno(e)))
    }

    fn set_irq_line(&self, irq: u32, high: bool) -> Result<()> {
        self.vm
            .set_irq_line(kvm_spi_irq_line(irq), high)
            .map_err(|e| Error::call("KVM_IRQ_LINE", errno(e)))
    }

    fn save_state(&self) -> Result<Vec<u8>> {
        Err(Error::Unsupported(SNAPSHOT_UNSUPPORTED.into()))
    }

    fn restore_state(&self, _state: &[u8]) -> Result<()> {
        Err(Error::Unsupported(SNAPSHOT_UNSUPPORTED.into()))
    }
}

/// A KVM vCPU on arm64.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    kicker: Arc<KvmKicker>,
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.kicker.vcpu_gone();
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit> {
        kvm_common::run(&mut self.fd, |_debug| {
            VcpuExit::Other(kvm_bindings::KVM_EXIT_DEBUG)
        })
    }

    fn handle_io(&mut self, _f: &mut dyn FnMut(Access<'_>)) -> Result<()> {
        Err(Error::Unsupported("port I/O on arm64".into()))
    }

    fn handle_mmio(&mut self, f: &mut dyn FnMut(Access<'_>)) -> Result<()> {
        kvm_common::handle_mmio(&mut self.fd, f)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::clone(&self.kicker) as Arc<dyn VcpuKicker>
    }

    fn save_state(&mut self) -> Result<Vec<u8>> {
        Err(Error::Unsupported(SNAPSHOT_UNSUPPORTED.into()))
    }

    fn restore_state(&mut self, _state: &[u8]) -> Result<()> {
        Err(Error::Unsupported(SNAPSHOT_UNSUPPORTED.into()))
    }

    fn set_guest_debug(&mut self, _debug: &GuestDebug) -> Result<()> {
        Err(Error::Unsupported(super::GUEST_DEBUG_UNSUPPORTED.into()))
    }

    fn reinject_breakpoint(&mut self, _debug: &GuestDebug) -> Result<()> {
        Err(Error::Unsupported(super::GUEST_DEBUG_UNSUPPORTED.into()))
    }
}

impl VcpuAarch64 for KvmVcpu {
    fn reg(&self, reg: Reg) -> Result<u64> {
        let mut b = [0u8; 8];
        self.fd
            .get_one_reg(kvm_core_reg_id(reg), &mut b)
            .map_err(|e| Error::call("KVM_GET_ONE_REG", errno(e)))?;
        Ok(u64::from_le_bytes(b))
    }

    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()> {
        self.fd
            .set_one_reg(kvm_core_reg_id(reg), &value.to_le_bytes())
            .map(|_| ())
            .map_err(|e| Error::call("KVM_SET_ONE_REG", errno(e)))
    }

    fn set_sys_reg(&mut self, reg: SysReg, value: u64) -> Result<()> {
        self.fd
            .set_one_reg(kvm_sys_reg_id(reg), &value.to_le_bytes())
            .map(|_| ())
            .map_err(|e| Error::call("KVM_SET_ONE_REG (system register)", errno(e)))
    }
}
