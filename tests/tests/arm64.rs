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

/// One arm64 L1 at a time: each is a QEMU TCG process on a 2-core machine.
static L1: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `sh -c SCRIPT` in the arm64 L1 (one attempt more if the L1 itself failed: 125).
fn in_arm64_l1(script: &str) -> (i32, String) {
    let _g = L1.lock().unwrap_or_else(|p| p.into_inner());
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

/// A path from the environment `tools/test` sets, which must exist.
fn env_path(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: tools/test builds {what} and names it there"));
    assert!(p.exists(), "{var}={} does not exist", p.display());
    p
}

/// The Skiff arm64 kernel and agent under the arm64 VMM, in one arm64 L1 (2 vCPUs each):
/// - `vmm --kernel Image --initrd I --cpus 2 --timings` reaches the agent and ends with
///   status 0 (its reboot); with `skiff.exit=panic` (1 vCPU, so the agent's line and the
///   kernel's panic do not interleave on the console) the kernel panics: status 3 (a PSCI
///   SYSTEM_RESET2 after `reboot=panic_warm`);
/// - `vmm run -- uname -m` prints `aarch64`; an exit status (7), stdout and stderr come back;
///   10 MiB of stdout arrive whole;
/// - `vmm run --rootfs DIR -v HOST:/vol` reads a host file and writes one over virtio-fs.
#[test]
fn arm64_linux_boots_panics_and_runs_containers_under_arm64_kvm() {
    let vmm = vmm_arm64();
    let kernel = env_path(
        "SKIFF_ARM64_KERNEL",
        "the arm64 kernel (kernel/build.sh --arch arm64)",
    );
    let initrd = env_path(
        "SKIFF_ARM64_INITRD",
        "the arm64 initramfs (kernel/build-initramfs.sh --arch arm64)",
    );
    let busybox = env_path("SKIFF_ARM64_BUSYBOX", "busybox-static:arm64 (unpacked)");
    let out = repo_root()
        .join("target")
        .join(format!("arm64-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let root = out.join("root");
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "vol"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "echo", "uname"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    let vol = out.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("f"), "from-the-host\n").unwrap();
    let script = format!(
        "set -u; cd {o}; cp {k} /tmp/Image; cp {i} /tmp/initrd\n\
         export SKIFF_KERNEL=/tmp/Image SKIFF_INITRD=/tmp/initrd HOME=/tmp SKIFF_TEMPLATES=/tmp/t\n\
         C='console=ttyS0 quiet reboot=panic_warm panic=-1 nomodules'\n\
         {v} --no-input --kernel /tmp/Image --initrd /tmp/initrd --cpus 2 --timings --cmdline \"$C\" > boot.out 2>&1; echo $? > boot.rc\n\
         {v} --no-input --kernel /tmp/Image --initrd /tmp/initrd --cpus 1 --cmdline \"$C skiff.exit=panic\" > panic.out 2>&1; echo $? > panic.rc\n\
         {v} run --cpus 2 -- uname -m > uname.out 2> uname.err; echo $? > uname.rc\n\
         {v} run -- sh -c 'echo out; echo err >&2; exit 7' > x.out 2> x.err; echo $? > x.rc\n\
         {v} run -- head -c 10485760 /dev/zero 2> burst.err | wc -c > burst.out\n\
         {v} run --rootfs {o}/root -v {o}/vol:/vol -- sh -c 'cat /vol/f; echo from-the-guest > /vol/g; uname -m' > fs.out 2> fs.err; echo $? > fs.rc\n",
        o = out.display(),
        k = kernel.display(),
        i = initrd.display(),
        v = vmm.display(),
    );
    let _g = L1.lock().unwrap_or_else(|p| p.into_inner());
    let run = || {
        Command::new(repo_root().join("tools/kvm-vm"))
            .args(["--arch", "arm64", "--timeout", "900", "--ro"])
            .arg(kernel.parent().unwrap())
            .arg("--ro")
            .arg(initrd.parent().unwrap())
            .arg("--rw")
            .arg(&out)
            .args(["--", "sh", "-c", &script])
            .current_dir(repo_root())
            .output()
            .unwrap()
    };
    let mut l1 = run();
    if l1.status.code() == Some(125) {
        eprintln!("RETRY: the arm64 L1 failed (125): {}", text(&l1).1);
        l1 = run();
    }
    let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap_or_default();
    let mut all = format!("L1: {:?}\n{}{}\n", l1.status, text(&l1).0, text(&l1).1);
    for n in [
        "boot.out",
        "boot.rc",
        "panic.out",
        "panic.rc",
        "uname.out",
        "uname.err",
        "uname.rc",
        "x.out",
        "x.err",
        "x.rc",
        "burst.out",
        "burst.err",
        "fs.out",
        "fs.err",
        "fs.rc",
    ] {
        all.push_str(&format!("--- {n}\n{}", read(n)));
    }
    assert_eq!(l1.status.code(), Some(0), "{all}");
    let boot = read("boot.out");
    assert!(boot.contains("SKIFF-AGENT: userspace reached"), "{all}");
    assert!(boot.contains("boot-timer stamp (userspace)"), "{all}");
    assert_eq!(read("boot.rc").trim(), "0", "{all}");
    assert!(
        read("panic.out").contains("exiting PID 1 as asked"),
        "{all}"
    );
    assert_eq!(read("panic.rc").trim(), "3", "a guest panic: {all}");
    assert_eq!(read("uname.out"), "aarch64\n", "{all}");
    assert_eq!(read("uname.rc").trim(), "0", "{all}");
    assert_eq!(read("x.out"), "out\n", "{all}");
    assert!(read("x.err").contains("err\n"), "{all}");
    assert_eq!(read("x.rc").trim(), "7", "{all}");
    assert_eq!(read("burst.out").trim(), "10485760", "{all}");
    assert_eq!(read("fs.out"), "from-the-host\naarch64\n", "{all}");
    assert_eq!(read("fs.rc").trim(), "0", "{all}");
    assert_eq!(
        std::fs::read_to_string(vol.join("g")).unwrap_or_default(),
        "from-the-guest\n",
        "{all}"
    );
}
