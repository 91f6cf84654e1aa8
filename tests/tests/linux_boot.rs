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

/// The value after `what` on the first line of `text` starting with `what` (GDB's
/// `rip            0x10004a0 ...` and `$1 = 0x10004a0`).
fn gdb_value(text: &str, what: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(what))
        .map(|rest| rest.split_whitespace().next().unwrap_or(""))
        .find_map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
}

/// The Skiff kernel under Debian's GDB (`vmm --gdb 127.0.0.1:PORT`), two VMs of 2 vCPUs, in
/// the nested VM (a Linux guest does not get to userspace on PVM):
/// 1. batch GDB at the first instruction: both vCPUs are threads; RIP is the PVH entry
///    (`pvh_start_xen` in the kernel's physical addresses); `x/4i $pc` reads code;
///    `linux_banner` reads by its virtual address before the kernel has paging; two single
///    steps move RIP; detach, and the guest boots to its agent and powers off (status 0).
/// 2. on a busybox root with /bin/sh as init: GDB lets the guest run to the shell's prompt
///    (userspace), then the remote protocol's Ctrl-C stops it; RIP is a kernel address and the
///    code read there through the kernel's own page tables equals vmlinux's bytes; GDB
///    detaches, a command typed at the console powers the guest off, status 0.
///
/// Breakpoints are tested on this host's /dev/kvm instead (the next test, and tiny_guests.rs):
/// in tools/kvm-vm's L1 (QEMU TCG emulating SVM) hardware breakpoints never fire in an L2
/// guest, and an `int3` reaches the L2 guest instead of KVM (both measured).
#[test]
fn skiff_kernel_under_gdb_steps_reads_memory_and_stops_on_ctrl_c() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, i) = skiff_kernel_and_initrd();
    let sym = k.parent().unwrap().join("vmlinux.sym");
    assert!(
        sym.exists(),
        "kernel/build.sh keeps {} for GDB",
        sym.display()
    );
    let out = skiff_tests::repo_root()
        .join("target")
        .join(format!("gdb-kernel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let root = out.join("root");
    skiff_tests::busybox_root(
        &root,
        &["dev", "proc", "sys"],
        "root:x:0:0:root:/root:/bin/sh\n",
        "root:x:0:\n",
    );
    let o = out.display().to_string();
    std::fs::write(
        out.join("cmds.gdb"),
        "set pagination off\nset confirm off\ntarget remote 127.0.0.1:1234\ninfo threads\n\
         info registers rip\nprint/x (unsigned long)&pvh_start_xen - 0xffffffff80000000\n\
         x/4i $pc\nx/s (char *)&linux_banner\nstepi\nstepi\ninfo registers rip\ndetach\n",
    )
    .unwrap();
    let client = skiff_tests::repo_root().join("tests/scripts/gdb_interrupt.py");
    let script = out.join("gdb.sh");
    std::fs::write(
        &script,
        format!(
            "cd {o}\nip link set lo up 2>/dev/null\n\
             C='{CMDLINE}'\n\
             wait_port() {{ for n in $(seq 200); do ss -ltn | grep -q \":$1 \" && return 0; sleep 0.1; done; return 1; }}\n\
             timeout 150 {v} --kernel {k} --initrd {i} --cmdline \"$C\" --cpus 2 --no-input --gdb 127.0.0.1:1234 > vmm1.out 2> vmm1.err & p=$!\n\
             wait_port 1234 && timeout 90 gdb -batch -nx -x {o}/cmds.gdb {s} > gdb.out 2>&1\n\
             wait $p; rc1=$?; echo $rc1 > rc1\n\
             rm -f /tmp/gdb-in; mkfifo /tmp/gdb-in\n\
             timeout 150 {v} --kernel {k} --rootfs {o}/root --cmdline \"$C root=rootfs rootfstype=virtiofs rw init=/bin/sh\" --cpus 2 --gdb 127.0.0.1:1235 < /tmp/gdb-in > vmm2.out 2> vmm2.err & p=$!\n\
             exec 3> /tmp/gdb-in\n\
             wait_port 1235 && timeout 150 python3 {c} 127.0.0.1:1235 '{o}/vmm2.out~# ' {o}/int.json detach {s} > client.out 2>&1\n\
             echo 'reboot -f' >&3\n\
             wait $p; rc2=$?; echo $rc2 > rc2\n\
             [ $rc1 = 124 ] || [ $rc2 = 124 ] && exit 124\nexit 0\n",
            v = vmm_binary().display(),
            k = k.display(),
            i = i.display(),
            s = sym.display(),
            c = client.display(),
        ),
    )
    .unwrap();
    let rc = skiff_tests::run_script_on_real_kvm("gdb", &script, &out, 600);
    let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap_or_default();
    let all = format!(
        "gdb:\n{}\nvmm1:\n{}{}\nclient:\n{}\nvmm2:\n{}{}",
        read("gdb.out"),
        read("vmm1.out"),
        read("vmm1.err"),
        read("client.out"),
        read("vmm2.out"),
        read("vmm2.err")
    );
    assert_eq!(rc, 0, "the nested run failed: {all}");
    let g = read("gdb.out");
    assert!(g.contains("Thread 1.2"), "two vCPUs, two threads: {all}");
    let entry = gdb_value(&g, "rip").unwrap_or_else(|| panic!("no rip: {all}"));
    assert_eq!(
        Some(entry),
        gdb_value(&g, "$1 = "),
        "stopped at the PVH entry: {all}"
    );
    let insns = g
        .lines()
        .filter(|l| l.starts_with("=> 0x") || l.starts_with("   0x"))
        .count();
    assert!(insns >= 4, "x/4i: {all}");
    assert!(
        g.contains("<linux_banner>:\t\"Linux version 6.1"),
        "a virtual address before paging: {all}"
    );
    let stepped = g
        .lines()
        .filter_map(|l| l.strip_prefix("rip"))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    assert!(
        stepped.is_some_and(|r| r > entry && r < entry + 32),
        "two single steps: {stepped:?} after {entry:#x}: {all}"
    );
    assert!(g.contains("detached"), "{all}");
    assert!(
        read("vmm1.out").contains("SKIFF-AGENT: userspace reached"),
        "the guest goes on after the detach: {all}"
    );
    assert_eq!(read("rc1").trim(), "0", "{all}");
    let r: serde_json::Value =
        serde_json::from_str(&read("int.json")).unwrap_or_else(|e| panic!("int.json: {e}: {all}"));
    assert_eq!(r["threads"], serde_json::json!(["01", "02"]), "{all}");
    assert_eq!(r["waited_for"], "# ", "{all}");
    assert_eq!(r["stop"], "T02thread:01;", "{all}");
    let rip = r["rip"].as_u64().unwrap_or(0);
    assert!(
        rip >= 0xffff_ffff_8000_0000,
        "a kernel address: {rip:#x}: {all}"
    );
    assert!(r["code"].as_str().is_some_and(|c| c.len() == 32), "{all}");
    assert_eq!(
        r["code"], r["elf_code"],
        "read through the kernel's page tables: {all}"
    );
    assert_eq!(r["end"], "OK", "detached: {all}");
    assert!(
        read("vmm2.err").contains("GDB detached; the guest runs on"),
        "{all}"
    );
    assert_eq!(
        read("rc2").trim(),
        "0",
        "the guest powered off after the detach: {all}"
    );
}

/// `hbreak start_kernel` on this host's /dev/kvm (PVM here: a Linux guest gets well past
/// start_kernel before PVM's trouble starts at its first syscall): the breakpoint hits, RIP
/// is the symbol, `x/4i $pc` disassembles it through the kernel's page tables, a single step
/// moves one instruction, and GDB's kill ends the VM.
#[test]
fn skiff_kernel_stops_at_a_breakpoint_on_start_kernel() {
    let (k, i) = skiff_kernel_and_initrd();
    let sym = k.parent().unwrap().join("vmlinux.sym");
    let dir = skiff_tests::temp_dir("gdb-start-kernel");
    let socket = dir.join("gdb.sock");
    let cmds = dir.join("cmds.gdb");
    std::fs::write(
        &cmds,
        format!(
            "set pagination off\nset confirm off\ntarget remote {}\nhbreak start_kernel\n\
             continue\ninfo registers rip\nprint/x (unsigned long)&start_kernel\nx/4i $pc\n\
             stepi\ninfo registers rip\nkill\n",
            socket.display()
        ),
    )
    .unwrap();
    let vmm = std::process::Command::new("timeout")
        .arg("120")
        .arg(vmm_binary())
        .args(["--no-input", "--kernel"])
        .arg(&k)
        .arg("--initrd")
        .arg(&i)
        .args(["--cmdline", CMDLINE, "--gdb"])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let gdb = std::process::Command::new("timeout")
        .args(["90", "gdb", "-batch", "-nx", "-x"])
        .arg(&cmds)
        .arg(&sym)
        .output()
        .expect("gdb (Debian's gdb package, installed by tools/setup) is needed");
    let (g, ge) = text(&gdb);
    let out = vmm.wait_with_output().unwrap();
    let (o, e) = text(&out);
    let all = format!("gdb:\n{g}{ge}\nvmm:\n{o}{e}");
    assert!(
        g.contains("in start_kernel ()"),
        "the breakpoint hit: {all}"
    );
    let sk = gdb_value(&g, "$1 = ").unwrap_or_else(|| panic!("no &start_kernel: {all}"));
    assert_eq!(gdb_value(&g, "rip"), Some(sk), "RIP is start_kernel: {all}");
    assert!(
        g.contains(&format!("=> {sk:#x} <start_kernel>:")),
        "x/4i at the symbol: {all}"
    );
    assert!(
        g.contains("<start_kernel+"),
        "a single step inside it: {all}"
    );
    assert!(e.contains("GDB killed the VM"), "{all}");
    assert_eq!(out.status.code(), Some(0), "{all}");
}
