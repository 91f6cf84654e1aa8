//! The Skiff kernel boots to its init (the agent) and back to power-off under the real `vmm`,
//! on real KVM: directly on a hardware-KVM host, through `tools/kvm-vm` on a PVM host (where a
//! Linux guest cannot run). Never skipped.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use skiff_tests::{run_on_real_kvm, skiff_kernel_and_initrd, text, vmm_binary};

/// One nested VM at a time: each is a QEMU TCG process on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

const CMDLINE: &str = "console=ttyS0 quiet reboot=k,panic_warm panic=-1 pci=off nomodules";

fn boot(kernel: &str, initrd: &str, cmdline: &str, cpus: &str) -> (i32, String, String) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vmm = vmm_binary();
    let out = run_on_real_kvm(
        &vmm,
        &[
            "--kernel",
            kernel,
            "--initrd",
            initrd,
            "--cmdline",
            cmdline,
            "--cpus",
            cpus,
            "--timings",
        ],
    );
    let (o, e) = text(&out);
    eprintln!("--- guest stdout ---\n{o}--- stderr ---\n{e}");
    (out.status.code().unwrap_or(-1), o, e)
}

#[test]
fn skiff_kernel_boots_to_init_and_powers_off() {
    let (k, i) = skiff_kernel_and_initrd();
    let (code, out, err) = boot(k.to_str().unwrap(), i.to_str().unwrap(), CMDLINE, "2");
    assert!(
        out.contains("SKIFF-AGENT: userspace reached"),
        "no agent marker:\n{out}\n{err}"
    );
    assert!(
        !out.contains("boot timer:"),
        "the agent could not stamp the boot timer:\n{out}"
    );
    assert_eq!(code, 0, "{err}");
    skiff_tests::assert_phases(
        &err,
        &[
            "first vCPU entry",
            "first serial byte",
            "boot-timer stamp (userspace)",
            "exit",
        ],
    );
}

#[test]
fn skiff_kernel_panic_is_status_3() {
    let (k, i) = skiff_kernel_and_initrd();
    let cmdline = format!("{CMDLINE} skiff.exit=panic");
    let (code, out, err) = boot(k.to_str().unwrap(), i.to_str().unwrap(), &cmdline, "1");
    assert!(out.contains("exiting PID 1 as asked"), "{out}\n{err}");
    assert_eq!(
        code, 3,
        "a PID 1 exit panics the kernel; vmm must say so:\n{err}"
    );
}

#[test]
fn skiff_bzimage_boots_through_the_64bit_protocol() {
    let (k, i) = skiff_kernel_and_initrd();
    let bz = k.parent().unwrap().join("bzImage");
    let (code, out, err) = boot(bz.to_str().unwrap(), i.to_str().unwrap(), CMDLINE, "1");
    assert!(
        out.contains("SKIFF-AGENT: userspace reached"),
        "{out}\n{err}"
    );
    assert_eq!(code, 0, "{err}");
}
