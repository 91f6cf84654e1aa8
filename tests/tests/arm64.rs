//! arm64 for real: the VMM cross-built for aarch64 (static, musl; `tools/test` builds it and
//! names it in SKIFF_VMM_ARM64) runs tiny arm64 guests under arm64 KVM, in the arm64 L1 of
//! `tools/kvm-vm --arch arm64` (qemu-system-aarch64 emulating EL2; Debian's arm64 kernel brings
//! up KVM with VHE there). Never skipped.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use skiff_tests::{repo_root, text};

/// The cross-built arm64 `vmm`.
fn vmm_arm64() -> PathBuf {
    let p = std::env::var_os("SKIFF_VMM_ARM64")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/aarch64-unknown-linux-musl/release/vmm"));
    assert!(
        p.exists(),
        "{} is missing: tools/test cross-builds it (cargo build --release --target \
         aarch64-unknown-linux-musl -p skiff-vmm, linker aarch64-linux-gnu-gcc)",
        p.display()
    );
    p
}

/// Assembles `tests/guests/arm64/<src>` into a raw arm64 Image under target/ (which the L1
/// sees: the checkout is shared into it).
fn arm64_guest(src: &str, defines: &[&str], name: &str) -> PathBuf {
    let dir = repo_root().join("target/arm64-guests");
    std::fs::create_dir_all(&dir).unwrap();
    let obj = dir.join(format!("{name}.o"));
    let img = dir.join(format!("{name}.img"));
    let mut cc = Command::new("aarch64-linux-gnu-gcc");
    cc.args(["-c", "-x", "assembler-with-cpp"]);
    for d in defines {
        cc.arg(format!("-D{d}"));
    }
    let out = cc
        .arg(repo_root().join("tests/guests/arm64").join(src))
        .arg("-o")
        .arg(&obj)
        .output()
        .expect("aarch64-linux-gnu-gcc (Debian's gcc-aarch64-linux-gnu, from tools/setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("aarch64-linux-gnu-objcopy")
        .args(["-O", "binary"])
        .arg(&obj)
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

/// Runs `sh -c SCRIPT` in the arm64 L1 (one attempt more if the L1 itself failed: 125).
fn in_arm64_l1(script: &str) -> (i32, String) {
    let run = || {
        Command::new(repo_root().join("tools/kvm-vm"))
            .args([
                "--arch",
                "arm64",
                "--timeout",
                "300",
                "--",
                "sh",
                "-c",
                script,
            ])
            .current_dir(repo_root())
            .output()
            .unwrap()
    };
    let mut out = run();
    if out.status.code() == Some(125) {
        eprintln!("RETRY: the arm64 L1 failed (125): {}", text(&out).1);
        out = run();
    }
    let (o, e) = text(&out);
    (out.status.code().unwrap_or(-1), format!("{o}{e}"))
}

/// A tiny arm64 guest on 2 vCPUs: it prints through the 16550 (MMIO exits), finds the FDT in
/// x0, stamps the boot timer and powers off with PSCI SYSTEM_OFF (status 0); another asks for
/// SYSTEM_RESET (a reboot: status 0 too). The boot phases are reported.
#[test]
fn arm64_tiny_guest_prints_stamps_and_powers_off_under_arm64_kvm() {
    let vmm = vmm_arm64();
    let off = arm64_guest("hello.S", &[], "hello");
    let reset = arm64_guest("hello.S", &["PANIC"], "hello-reset");
    let script = format!(
        "{v} --no-input --kernel {off} --cpus 2 --timings; echo \"status=$?\"; \
         {v} --no-input --kernel {reset}; echo \"status=$?\"",
        v = vmm.display(),
        off = off.display(),
        reset = reset.display()
    );
    let (rc, out) = in_arm64_l1(&script);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        out.matches("ARM64 hello from EL1, x0=fdt").count(),
        2,
        "{out}"
    );
    assert_eq!(out.matches("status=0").count(), 2, "{out}");
    for phase in [
        "first vCPU entry",
        "first serial byte",
        "boot-timer stamp (userspace)",
        "guest exit: PowerOff -> status 0",
    ] {
        assert!(out.contains(phase), "no {phase:?}: {out}");
    }
}
