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

/// `vmm --kernel K --rootfs DIR` boots on a host directory (virtio-fs root, no initrd) with
/// /bin/sh as init; a command typed at the console runs in the guest and its file appears
/// in DIR; with `DIR:ro` the write is refused.
#[test]
fn skiff_kernel_boots_on_a_directory_and_takes_console_input() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _) = skiff_kernel_and_initrd();
    let out = skiff_tests::repo_root()
        .join("target")
        .join(format!("rootfs-boot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let root = out.join("root");
    skiff_tests::busybox_root(
        &root,
        &["dev", "proc", "sys"],
        "root:x:0:0:root:/root:/bin/sh\n",
        "root:x:0:\n",
    );
    let driver = skiff_tests::repo_root().join("tests/scripts/rootfs_console.py");
    let script = out.join("rootfs.sh");
    let (v, k, r, o, d) = (
        vmm_binary().display().to_string(),
        k.display().to_string(),
        root.display().to_string(),
        out.display().to_string(),
        driver.display().to_string(),
    );
    std::fs::write(
        &script,
        format!(
            "python3 {d} {v} {k} {r} 'echo hi-from-the-console > /hello; reboot -f' {o}/rw.json\n\
             python3 {d} {v} {k} {r}:ro 'echo no > /hello2 || echo REFUSED; reboot -f' {o}/ro.json\n"
        ),
    )
    .unwrap();
    let rc = skiff_tests::run_script_on_real_kvm("rootfs", &script, &out, 600);
    assert_eq!(rc, 0, "the nested run failed; see {}", out.display());
    let read = |n: &str| -> serde_json::Value {
        let t = std::fs::read_to_string(out.join(n)).unwrap_or_default();
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("{n}: {e}: {t:?}"))
    };
    let rw = read("rw.json");
    assert_eq!(rw["prompt"], true, "no shell prompt: {rw}");
    assert_eq!(rw["status"], 0, "{rw}");
    assert_eq!(
        std::fs::read_to_string(root.join("hello")).unwrap_or_default(),
        "hi-from-the-console\n",
        "{rw}"
    );
    let ro = read("ro.json");
    assert_eq!(ro["prompt"], true, "no shell prompt: {ro}");
    assert_eq!(ro["status"], 0, "{ro}");
    assert!(
        ro["output"].as_str().unwrap_or("").contains("REFUSED"),
        "{ro}"
    );
    assert!(
        !root.join("hello2").exists(),
        "a read-only rootfs was written"
    );
}
