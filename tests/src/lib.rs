//! Helpers shared by the end-to-end tests: find the `vmm` binary, assemble tiny guests, run
//! commands through `tools/kvm-vm` when this host's `/dev/kvm` cannot run a Linux guest.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `vmm` binary under test: `$SKIFF_VMM`, else the newest of `target/{release,debug}/vmm`.
/// Panics (fails the test, never skips) when there is none.
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SKIFF_VMM") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let mut found: Vec<PathBuf> = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("vmm"))
        .filter(|p| p.exists())
        .collect();
    found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    found.pop().unwrap_or_else(|| {
        panic!(
            "no vmm binary: build it first (`cargo build --release -p skiff-vmm`) or set SKIFF_VMM; \
             tools/test does both"
        )
    })
}

/// A fresh temporary directory (removed by the OS's tmp cleaning; tests keep artefacts for
/// inspection on failure).
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("skiff-test-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Assembles `tests/guests/<src>` with the given `-D` defines into a PVH/ELF guest.
pub fn build_guest(src: &str, defines: &[&str]) -> PathBuf {
    build_guest_as(src, defines, false)
}

/// Like [`build_guest`], as a 32-bit ELF (`gcc -m32`, `ld -m elf_i386`), the way tiny PVH
/// guests for QEMU and Firecracker are often built. Only for sources that are 32-bit code.
pub fn build_guest_elf32(src: &str, defines: &[&str]) -> PathBuf {
    build_guest_as(src, defines, true)
}

fn build_guest_as(src: &str, defines: &[&str], elf32: bool) -> PathBuf {
    let dir = temp_dir("guest");
    let guests = repo_root().join("tests/guests");
    let obj = dir.join("guest.o");
    let elf = dir.join(format!("{}.elf", src.trim_end_matches(".S")));
    let mut cc = Command::new("gcc");
    cc.args(["-c", "-x", "assembler-with-cpp"]);
    if elf32 {
        cc.arg("-m32");
    }
    for d in defines {
        cc.arg(format!("-D{d}"));
    }
    cc.arg(guests.join(src)).arg("-o").arg(&obj);
    let out = cc
        .output()
        .expect("gcc (build-essential) is needed to assemble the test guests");
    assert!(
        out.status.success(),
        "assembling {src}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("ld")
        .args(if elf32 { &["-m", "elf_i386"][..] } else { &[] })
        .args(["--no-warn-rwx-segments", "-nostdlib", "-static", "-T"])
        .arg(guests.join("link.ld"))
        .arg(&obj)
        .arg("-o")
        .arg(&elf)
        .output()
        .expect("ld (binutils) is needed to link the test guests");
    assert!(
        out.status.success(),
        "linking {src}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elf
}

/// What this host's `/dev/kvm` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware-assisted KVM (or nested KVM inside tools/kvm-vm): runs Linux guests.
    Hardware,
    /// PVM software virtualization: runs tiny guests, not Linux.
    Pvm,
    /// No /dev/kvm.
    Missing,
}

/// Detects the host's KVM flavour.
pub fn kvm_kind() -> KvmKind {
    if !Path::new("/dev/kvm").exists() {
        KvmKind::Missing
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}

/// Where VMs started through `tools/kvm-vm` keep their warm-start templates: L1's own tmpfs
/// (the host's `~/.cache/skiff` is read-only there).
pub const L1_TEMPLATES: &str = "/tmp/skiff-templates";

/// Runs `program args` on real KVM: directly when the host has it, else through
/// `tools/kvm-vm` (a nested VM under QEMU TCG). Nested guests occasionally hang mid-boot (see
/// tools/kvm-vm --help): a run that times out (status 124, 300 s) or whose L1 fails (125) is
/// retried (up to [`RETRIES`] times), loudly.
pub fn run_on_real_kvm(program: &Path, args: &[&str]) -> Output {
    let build = || {
        let mut cmd = match kvm_kind() {
            KvmKind::Hardware => {
                let mut c = Command::new("timeout");
                c.arg("300").arg(program);
                c
            }
            KvmKind::Pvm | KvmKind::Missing => {
                let mut c = Command::new(repo_root().join("tools/kvm-vm"));
                c.env("SKIFF_TEMPLATES", L1_TEMPLATES);
                c.args(["--timeout", "300", "--"]).arg(program);
                c
            }
        };
        cmd.args(args);
        cmd
    };
    let mut out = build()
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"));
    // 124: timed out (a hung guest); 125: the L1 VM failed or wedged (tools/kvm-vm says which).
    for _ in 0..RETRIES {
        if !matches!(out.status.code(), Some(124 | 125)) {
            break;
        }
        eprintln!(
            "RETRY: {program:?} {args:?} failed on nested KVM with status {:?} (124: a hung guest; 125: the L1 VM failed or wedged); running it once more",
            out.status.code()
        );
        out = build()
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"));
    }
    out
}

/// How many times a nested run that hung (124) or whose L1 failed or wedged (125) is run
/// again. On this substrate (QEMU TCG emulating SVM) an L1 wedges within minutes in about a
/// third of the runs on some days (measured: 2 of 4 short runs, cold and warm alike), and
/// tools/kvm-vm finds a wedge by its missing heartbeat within a minute.
pub const RETRIES: u32 = 4;

/// Runs `sh <script>` where real KVM is: directly on a hardware host, else in its own nested
/// VM (`tools/kvm-vm`, with `rw` writable). The timeout is enforced **on the host** (a nested
/// L1 under TCG can wedge so hard that nothing inside it, not even `timeout -k`, runs again);
/// on a timeout the script runs once more, loudly. Returns the last exit code (124 = timed
/// out twice).
pub fn run_script_on_real_kvm(name: &str, script: &Path, rw: &Path, timeout_s: u32) -> i32 {
    run_script_on_real_kvm_mem(name, script, rw, timeout_s, None)
}

/// [`run_script_on_real_kvm`] with the nested VM's memory in MiB (`tools/kvm-vm --mem`; its
/// default otherwise). Ignored on a hardware host.
pub fn run_script_on_real_kvm_mem(
    name: &str,
    script: &Path,
    rw: &Path,
    timeout_s: u32,
    mem_mib: Option<u32>,
) -> i32 {
    let build = || {
        let mut c = match kvm_kind() {
            KvmKind::Hardware => {
                let mut c = Command::new("timeout");
                c.args(["-k", "10", &timeout_s.to_string(), "sh"]);
                c
            }
            KvmKind::Pvm | KvmKind::Missing => {
                let mut c = Command::new(repo_root().join("tools/kvm-vm"));
                // The host's cache is read-only in L1: warm-start templates go to L1's /tmp
                // (the first VM of each nested run makes its template).
                c.env("SKIFF_TEMPLATES", L1_TEMPLATES);
                c.arg("--rw").arg(rw);
                if let Some(m) = mem_mib {
                    c.args(["--mem", &m.to_string()]);
                }
                c.args(["--timeout", &timeout_s.to_string(), "--", "sh"]);
                c
            }
        };
        c.arg(script);
        c
    };
    // One nested VM at a time (tests of one binary run in parallel; the host has 2 cores).
    static LOCK: OnceLock<std::sync::Mutex<()>> = OnceLock::new();
    let _g = LOCK
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let t0 = std::time::Instant::now();
    let mut rc = build()
        .status()
        .map(|s| s.code().unwrap_or(-1))
        .unwrap_or(-1);
    // Up to RETRIES retries: an L1 under TCG wedges now and then (see RETRIES).
    for attempt in 1..=RETRIES {
        // 124: timed out (or the script saw a VM fail the way the substrate does); 125: the L1
        // VM itself failed (an L1 kernel panic in nested SVM has been seen).
        if rc != 124 && rc != 125 {
            break;
        }
        eprintln!("RETRY {attempt}/{RETRIES}: case {name} failed on nested KVM with status {rc} (124: hung or a triple-faulted VM; 125: the L1 VM failed); running it again");
        rc = build()
            .status()
            .map(|s| s.code().unwrap_or(-1))
            .unwrap_or(-1);
    }
    eprintln!(
        "case {name}: script exit {rc} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    rc
}

/// A shell script running `cases` (name, body) one after the other that picks up where a
/// wedged attempt stopped: each finished case is appended to `OUT/.done` (`done_dir`), a
/// retry (the file exists) first forgets the last `redo` finished cases (the substrate may
/// already have been failing under them) and skips the rest. Each case is announced on
/// stderr (`case NAME: start <epoch>`). Bodies run in the script's shell (`{ }`); one that
/// sets `CASE_HUNG=1` (it saw the substrate fail under it) is not marked finished.
pub fn resumable_cases(done_dir: &Path, cases: &[(&str, String)], redo: usize) -> String {
    let done = done_dir.join(".done");
    let d = done.display();
    let mut s = format!(
        "if [ -e {d} ]; then n=$(wc -l < {d}); head -n $(( n > {redo} ? n - {redo} : 0 )) {d} > {d}.tmp; mv {d}.tmp {d}; \
         echo \"resuming after $(wc -l < {d}) finished cases\" >&2; else : > {d}; fi\n"
    );
    for (name, body) in cases {
        s.push_str(&format!(
            "if grep -qx '{name}' {d}; then echo \"case {name}: done before\" >&2; else\n\
             echo \"case {name}: start $(date +%s.%N)\" >&2\nCASE_HUNG=0\n{{ {body}\n}}\n[ $CASE_HUNG = 1 ] || echo '{name}' >> {d}\nfi\n"
        ));
    }
    s
}

/// Path of an artefact built by one of the repository's scripts (`kernel/build.sh`,
/// `kernel/build-initramfs.sh`) with `--print-path`; builds it when it is not cached yet.
pub fn artefact(script: &str) -> PathBuf {
    static LOCK: OnceLock<std::sync::Mutex<()>> = OnceLock::new();
    let _g = LOCK.get_or_init(Default::default).lock().unwrap();
    let out = Command::new(repo_root().join(script))
        .arg("--print-path")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The Skiff guest kernel (vmlinux) and initramfs, built by the repository's scripts.
pub fn skiff_kernel_and_initrd() -> (PathBuf, PathBuf) {
    let k = std::env::var_os("SKIFF_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| artefact("kernel/build.sh").join("vmlinux"));
    let i = std::env::var_os("SKIFF_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| artefact("kernel/build-initramfs.sh"));
    (k, i)
}

/// Stdout and stderr as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that a `vmm --timings` report (stderr) lists every phase.
pub fn assert_phases(stderr: &str, phases: &[&str]) {
    for phase in phases {
        assert!(stderr.contains(phase), "timings lack '{phase}':\n{stderr}");
    }
}

/// A busybox-static root filesystem in `dir` (applets as relative symlinks, so it works as any
/// root), with `extra_dirs` created and `passwd`/`group` as /etc/passwd and /etc/group.
pub fn busybox_root(dir: &Path, extra_dirs: &[&str], passwd: &str, group: &str) {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is missing (tools/setup installs it)");
    for d in ["bin", "etc", "tmp", "root"].iter().chain(extra_dirs) {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(bb, dir.join("bin/busybox")).unwrap();
    let list = Command::new(bb).arg("--list").output().unwrap();
    for name in String::from_utf8(list.stdout).unwrap().lines() {
        if name != "busybox" {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(name)).unwrap();
        }
    }
    std::fs::write(dir.join("etc/passwd"), passwd).unwrap();
    std::fs::write(dir.join("etc/group"), group).unwrap();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A batch whose L1 wedges under case b (simulated: the script dies there) runs again
    /// from the last finished case; a case that says the substrate failed is not skipped.
    #[test]
    fn a_resumed_batch_skips_finished_cases() {
        let dir = temp_dir("resumable");
        let d = dir.display();
        let cases = [
            ("a", format!("echo a >> {d}/log")),
            (
                "h",
                format!(
                    "echo h >> {d}/log; [ -e {d}/h-flag ] || {{ touch {d}/h-flag; CASE_HUNG=1; }}"
                ),
            ),
            (
                "b",
                format!("[ -e {d}/flag ] || {{ touch {d}/flag; exit 3; }}; echo b >> {d}/log"),
            ),
            ("c", format!("echo c >> {d}/log")),
        ];
        let script = dir.join("s.sh");
        std::fs::write(&script, resumable_cases(&dir, &cases, 1)).unwrap();
        let run = || Command::new("sh").arg(&script).status().unwrap().code();
        assert_eq!(run(), Some(3));
        assert_eq!(std::fs::read_to_string(dir.join("log")).unwrap(), "a\nh\n");
        // Resumed: a (the last finished case) runs again, h (hung) too, then the rest.
        assert_eq!(run(), Some(0));
        assert_eq!(
            std::fs::read_to_string(dir.join("log")).unwrap(),
            "a\nh\na\nh\nb\nc\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
