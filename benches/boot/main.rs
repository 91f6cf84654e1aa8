//! `boot`: launch→first serial byte, launch→marker, launch→exit and peak RSS of `vmm` against
//! QEMU microvm, interleaved in the same run. Figures and ratios, never assertions.
//!
//! usage: boot [--runs N] [--vmm PATH] [--qemu PATH] [--linux KERNEL INITRD]
//!   default: the tiny PVH guest (tests/guests/pvh.S), QEMU `-M microvm` lean flags; and
//!            a counting guest (tests/guests/snapcount.S) launched cold vs restored from a
//!            snapshot taken after its first line (`vmm --snapshot-to`, `vmm --restore`)
//!   --linux: the Skiff kernel + initramfs; QEMU `-M microvm,rtc=on`; marker = agent line.
//!            Needs real KVM: run it inside tools/kvm-vm on a PVM host.
//!   built for aarch64, --linux only: the Skiff arm64 Image + initramfs under `vmm` against
//!            `qemu-system-aarch64 -M virt -accel kvm` (console on its PL011), plus `vmm run --
//!            true` for the phases up to agent ready. Run by `benches/arm64.sh` in the arm64 L1.
//!
//! Phases: `vmm --timings` lines (first vCPU entry, boot-timer stamp, agent ready, ...) for the
//! vmm cases; for every case that prints the agent line, the guest's own uptime at userspace
//! (`/proc/uptime`, counted from the kernel's timekeeping start) and "kernel entry" estimated
//! as launch->marker minus that uptime (what the VMM, or QEMU, spent before the kernel ran).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod sys;

struct Case {
    name: &'static str,
    argv: Vec<String>,
    /// Text whose arrival on stdout is timed; `None`: only the exit (and `--timings`) count.
    marker: Option<&'static str>,
    env: Vec<(String, String)>,
}

#[derive(Default)]
struct Sample {
    first_byte: Option<Duration>,
    marker: Option<Duration>,
    exit: Duration,
    rss_kib: i64,
    setup_ms: Option<f64>,
    /// The guest's uptime (s) in the agent's "userspace reached (uptime X s" line.
    uptime_s: Option<f64>,
    /// `vmm --timings` phases: (label, ms since VMM start).
    phases: Vec<(String, f64)>,
}

/// `vmm --timings` report lines: `  <label>   <ms> ms  (+<delta>)`.
fn parse_timings(stderr: &str) -> Vec<(String, f64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let (head, _) = l.split_once(" ms  (+")?;
            let head = head.trim_end();
            let at = head.rfind(' ')?;
            let ms = head[at + 1..].parse().ok()?;
            Some((head[..at].trim().to_string(), ms))
        })
        .collect()
}

/// The uptime in `SKIFF-AGENT: userspace reached (uptime 0.60 s, pid 1)`.
fn parse_uptime(stdout: &str) -> Option<f64> {
    let rest = stdout.split("userspace reached (uptime ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn run_once(case: &Case, timeout: Duration) -> Result<Sample> {
    let start = Instant::now();
    let mut child = Command::new(&case.argv[0])
        .args(&case.argv[1..])
        .envs(case.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", case.argv[0]))?;
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.take().context("no stdout")?;
    // Watchdog: a hung guest prints nothing, so the read below would block forever.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + timeout;
            while Instant::now() < end {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            sys::kill(pid);
            true
        })
    };
    let mut stderr = child.stderr.take().context("no stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut s = Sample::default();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        let now = start.elapsed();
        s.first_byte.get_or_insert(now);
        seen.extend_from_slice(&buf[..n]);
        if let Some(m) = case.marker {
            if s.marker.is_none() && String::from_utf8_lossy(&seen).contains(m) {
                s.marker = Some(now);
            }
        }
    }
    let reaped = sys::wait_rss_kib(pid);
    s.exit = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let timed_out = watchdog.join().unwrap_or(false);
    let (rss, status) = reaped.with_context(|| format!("wait4 for {}", case.name))?;
    s.rss_kib = rss;
    let err = err_thread.join().unwrap_or_default();
    s.setup_ms = err
        .lines()
        .find(|l| l.contains("first vCPU entry"))
        .and_then(|l| {
            l.split_whitespace()
                .rev()
                .nth(2)
                .and_then(|v| v.parse().ok())
        });
    if timed_out {
        bail!(
            "{}: no exit within {timeout:?} (hung guest); killed",
            case.name
        );
    }
    s.phases = parse_timings(&err);
    s.uptime_s = parse_uptime(&String::from_utf8_lossy(&seen));
    if case.marker.is_none() && status != 0 {
        bail!("{}: wait status {status:#x}; stderr {err:?}", case.name);
    }
    if case.marker.is_some() && s.marker.is_none() {
        bail!(
            "{}: marker {:?} never seen; stdout {:?} stderr {:?}",
            case.name,
            case.marker,
            String::from_utf8_lossy(&seen),
            err
        );
    }
    Ok(s)
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (v[0], med, v[v.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn build_tiny_guest(root: &Path, src: &str, defines: &[&str]) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("skiff-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let obj = dir.join(format!("{src}.o"));
    let elf = dir.join(format!("{src}.elf"));
    let ok = Command::new("gcc")
        .args(["-c", "-x", "assembler-with-cpp"])
        .args(defines)
        .arg(root.join("tests/guests").join(src))
        .arg("-o")
        .arg(&obj)
        .status()?
        .success()
        && Command::new("ld")
            .args(["--no-warn-rwx-segments", "-nostdlib", "-static", "-T"])
            .arg(root.join("tests/guests/link.ld"))
            .arg(&obj)
            .arg("-o")
            .arg(&elf)
            .status()?
            .success();
    if !ok {
        bail!("assembling the tiny guest failed");
    }
    Ok(elf)
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut runs = 20usize;
    let mut vmm = root.join("target/release/vmm");
    let mut qemu = PathBuf::from(if cfg!(target_arch = "aarch64") {
        "qemu-system-aarch64"
    } else {
        "qemu-system-x86_64"
    });
    let mut linux: Option<(String, String)> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .context("--runs N")?
                    .parse()
                    .context("--runs N")?
            }
            "--vmm" => vmm = args.next().context("--vmm PATH")?.into(),
            "--qemu" => qemu = args.next().context("--qemu PATH")?.into(),
            "--linux" => {
                linux = Some((
                    args.next().context("--linux KERNEL INITRD")?,
                    args.next().context("--linux KERNEL INITRD")?,
                ))
            }
            "-h" | "--help" => {
                println!(
                    "usage: boot [--runs N] [--vmm PATH] [--qemu PATH] [--linux KERNEL INITRD]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if !vmm.exists() {
        bail!(
            "{} does not exist: cargo build --release -p skiff-vmm",
            vmm.display()
        );
    }
    let vmm = vmm.to_string_lossy().to_string();
    let qemu = qemu.to_string_lossy().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let qemu_common = s(&[
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "128",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]);
    let cases = match &linux {
        None if cfg!(target_arch = "aarch64") => {
            bail!("on aarch64 only --linux KERNEL INITRD is measured (the tiny guests are x86)")
        }
        None => {
            let tiny = build_tiny_guest(&root, "pvh.S", &["-DACTION=0"])?
                .to_string_lossy()
                .to_string();
            // Restore against cold launch of one guest: it counts to 2, the snapshot is taken
            // after 1 (SSE off: PVM cannot run it).
            let counter = build_tiny_guest(
                &root,
                "snapcount.S",
                &["-DSNAP_AT=1", "-DLIMIT=2", "-DDELAY=1000", "-DSSE=0"],
            )?
            .to_string_lossy()
            .to_string();
            let snap =
                std::env::temp_dir().join(format!("skiff-bench-snap-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&snap);
            let st = Command::new(&vmm)
                .args(["--kernel", &counter, "--memory", "128", "--snapshot-to"])
                .arg(&snap)
                .stdout(Stdio::null())
                .status()?;
            if !st.success() {
                bail!("taking the tiny guest's snapshot failed: {st}");
            }
            let snap = snap.to_string_lossy().to_string();
            let mut q = vec![
                qemu.clone(),
                "-M".into(),
                "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,acpi=off".into(),
            ];
            q.extend(qemu_common.clone());
            q.extend(s(&["-kernel", &tiny, "-append", "console=ttyS0"]));
            vec![
                Case {
                    name: "vmm",
                    argv: s(&[&vmm, "--kernel", &tiny, "--memory", "128", "--timings"]),
                    marker: Some("PVH magic=ok"),
                    env: vec![],
                },
                Case {
                    name: "qemu microvm (lean)",
                    argv: q,
                    marker: Some("PVH magic=ok"),
                    env: vec![],
                },
                Case {
                    name: "vmm counter, cold",
                    argv: s(&[&vmm, "--kernel", &counter, "--memory", "128", "--timings"]),
                    marker: Some("sum="),
                    env: vec![],
                },
                Case {
                    name: "vmm counter, restored",
                    argv: s(&[&vmm, "--restore", &snap, "--timings"]),
                    marker: Some("sum="),
                    env: vec![],
                },
            ]
        }
        Some((k, i)) if cfg!(target_arch = "aarch64") => {
            // Same kernel and initramfs; QEMU's -M virt console is its PL011 (ttyAMA0),
            // Skiff's the 16550 in its device tree (ttyS0). Both end on the agent's reboot.
            let cmdline = "quiet panic=-1 nomodules";
            let mut q = vec![
                qemu.clone(),
                "-M".into(),
                "virt,gic-version=3".into(),
                "-accel".into(),
                "kvm".into(),
                "-cpu".into(),
                "host".into(),
            ];
            q.extend(s(&[
                "-m",
                "128",
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
                k,
                "-initrd",
                i,
                "-append",
                &format!("console=ttyAMA0 {cmdline}"),
            ]));
            let skiff_cmdline = format!("console=ttyS0 {cmdline}");
            vec![
                Case {
                    name: "vmm",
                    argv: s(&[
                        &vmm,
                        "--no-input",
                        "--kernel",
                        k,
                        "--initrd",
                        i,
                        "--memory",
                        "128",
                        "--cmdline",
                        &skiff_cmdline,
                        "--timings",
                    ]),
                    marker: Some("SKIFF-AGENT: userspace reached"),
                    env: vec![],
                },
                Case {
                    name: "qemu virt (kvm)",
                    argv: q,
                    marker: Some("SKIFF-AGENT: userspace reached"),
                    env: vec![],
                },
                Case {
                    name: "vmm run -- true",
                    argv: s(&[&vmm, "run", "--timings", "--", "true"]),
                    marker: None,
                    env: vec![
                        ("SKIFF_KERNEL".into(), k.clone()),
                        ("SKIFF_INITRD".into(), i.clone()),
                    ],
                },
            ]
        }
        Some((k, i)) => {
            let cmdline = "console=ttyS0 quiet reboot=k,panic_warm panic=-1 pci=off nomodules";
            let mut q = vec![qemu.clone(), "-M".into(), "microvm,rtc=on".into()];
            q.extend(qemu_common.clone());
            // QEMU microvm has no i8042 to reboot through: a triple fault ends it (-no-reboot).
            let qcmdline = cmdline.replace("reboot=k", "reboot=t");
            q.extend(s(&["-kernel", k, "-initrd", i, "-append", &qcmdline]));
            vec![
                Case {
                    name: "vmm",
                    argv: s(&[
                        &vmm,
                        "--kernel",
                        k,
                        "--initrd",
                        i,
                        "--memory",
                        "128",
                        "--cmdline",
                        cmdline,
                        "--timings",
                    ]),
                    marker: Some("SKIFF-AGENT: userspace reached"),
                    env: vec![],
                },
                Case {
                    name: "qemu microvm,rtc=on",
                    argv: q,
                    marker: Some("SKIFF-AGENT: userspace reached"),
                    env: vec![],
                },
            ]
        }
    };
    let timeout = Duration::from_secs(if linux.is_some() { 60 } else { 20 });
    // One discarded warm-up round, then interleaved runs.
    for c in &cases {
        if let Err(e) = run_once(c, timeout) {
            eprintln!("boot: warm-up run failed: {e:#}");
        }
    }
    let mut results: Vec<Vec<Sample>> = cases.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<usize> = cases.iter().map(|_| 0).collect();
    for _ in 0..runs {
        for (i, (c, r)) in cases.iter().zip(results.iter_mut()).enumerate() {
            match run_once(c, timeout) {
                Ok(s) => r.push(s),
                Err(e) => {
                    eprintln!("boot: run failed: {e:#}");
                    failures[i] += 1;
                }
            }
        }
    }
    println!(
        "boot benchmark: {} ({} interleaved runs each, ms min / median / max)",
        if linux.is_some() && cfg!(target_arch = "aarch64") {
            "Skiff arm64 Linux kernel + agent initramfs"
        } else if linux.is_some() {
            "Skiff Linux kernel + agent initramfs"
        } else {
            "tiny PVH guest"
        },
        runs
    );
    println!(
        "{:<22} {:>26} {:>26} {:>26} {:>10}",
        "case", "launch->first byte", "launch->marker", "launch->exit", "RSS MiB"
    );
    let mut medians = Vec::new();
    for (c, r) in cases.iter().zip(results.iter()) {
        let fb = stats(r.iter().filter_map(|x| x.first_byte.map(ms)).collect());
        let mk = stats(r.iter().filter_map(|x| x.marker.map(ms)).collect());
        let ex = stats(r.iter().map(|x| ms(x.exit)).collect());
        let rss = stats(r.iter().map(|x| x.rss_kib as f64 / 1024.0).collect());
        let f = |t: (f64, f64, f64)| format!("{:.1} / {:.1} / {:.1}", t.0, t.1, t.2);
        println!(
            "{:<22} {:>26} {:>26} {:>26} {:>10.1}",
            c.name,
            f(fb),
            f(mk),
            f(ex),
            rss.1
        );
        medians.push((fb.1, mk.1, ex.1, rss.1));
    }
    for (c, n) in cases.iter().zip(&failures) {
        if *n > 0 {
            println!(
                "{}: {n} of {runs} runs failed or hung (not in the figures)",
                c.name
            );
        }
    }
    println!("phases (ms, min / median / max):");
    for (c, r) in cases.iter().zip(results.iter()) {
        let f = |t: (f64, f64, f64)| format!("{:.1} / {:.1} / {:.1}", t.0, t.1, t.2);
        let up = stats(
            r.iter()
                .filter_map(|x| x.uptime_s.map(|u| u * 1e3))
                .collect(),
        );
        if !up.1.is_nan() {
            let entry = stats(
                r.iter()
                    .filter_map(|x| Some(ms(x.marker?) - x.uptime_s? * 1e3))
                    .collect(),
            );
            println!(
                "  {:<22} {:<40} {:>26}",
                c.name,
                "kernel entry (launch->marker - uptime)",
                f(entry)
            );
            println!(
                "  {:<22} {:<40} {:>26}",
                c.name,
                "guest uptime at userspace (its clock)",
                f(up)
            );
        }
        let mut labels: Vec<&str> = Vec::new();
        for x in r {
            for (l, _) in &x.phases {
                if !labels.contains(&l.as_str()) {
                    labels.push(l);
                }
            }
        }
        for l in labels {
            let v = stats(
                r.iter()
                    .filter_map(|x| x.phases.iter().find(|(p, _)| p == l).map(|(_, ms)| *ms))
                    .collect(),
            );
            println!("  {:<22} {:<40} {:>26}", c.name, l, f(v));
        }
    }
    let setup = stats(results[0].iter().filter_map(|x| x.setup_ms).collect());
    println!(
        "vmm setup before first vCPU entry (its --timings): {:.2} / {:.2} / {:.2} ms",
        setup.0, setup.1, setup.2
    );
    if medians.len() == 4 {
        let (c, r) = (medians[2], medians[3]);
        println!(
            "restored / cold launch of the counter guest: marker {:.2}x, exit {:.2}x, RSS {:.2}x",
            r.1 / c.1,
            r.2 / c.2,
            r.3 / c.3
        );
    }
    if medians.len() >= 2 {
        let (a, b) = (medians[0], medians[1]);
        println!(
            "ratio vmm/{}: first byte {:.2}x, marker {:.2}x, exit {:.2}x, RSS {:.2}x",
            cases[1].name,
            a.0 / b.0,
            a.1 / b.1,
            a.2 / b.2,
            a.3 / b.3
        );
    }
    Ok(())
}
