//! `fsbench`: virtio-fs throughput and metadata rate of Skiff's in-VMM server against the host
//! itself and Debian's C virtiofsd under QEMU microvm, same kernel, same run. Figures and
//! ratios, never assertions.
//!
//! The workload (`workload.c`, built here with `gcc -O2 -static`) writes a 256 MiB file in
//! 1 MiB writes + fsync, drops the page cache, reads it back in 1 MiB reads, then creates,
//! stats and unlinks 10 000 empty files. It runs three ways, interleaved `--runs` times, each
//! on a fresh directory under `--share-base` (default /tmp, L1's tmpfs inside tools/kvm-vm):
//!
//! * `host`: the workload directly on that directory;
//! * `skiff`: `vmm --share fsb=DIR`, guest `mount -t virtiofs fsb /mnt; /workload /mnt`;
//! * `qemu+virtiofsd`: `/usr/lib/qemu/virtiofsd -o cache=auto` + QEMU `-M microvm` with
//!   `vhost-user-fs-device` (memfd guest RAM, `share=on`), same initramfs and kernel. The
//!   device gets `event_idx=off`: Skiff's device does not offer EVENT_IDX either, so both
//!   rings work the same way.
//!
//! Both VMs get 1 vCPU and 512 MiB. Figures are the guest's own CLOCK_MONOTONIC; as a cross-check
//! the phases are also timed by when the workload's `@phase` lines arrive on the serial console
//! (L1 clock). Medians of the successful runs; a run that does not finish within `--timeout`
//! seconds (default 1200: under nested TCG C virtiofsd manages ~45 metadata ops/s, so 10 000
//! files take ~11 minutes) is killed and counted as failed. Serial logs, virtiofsd/QEMU/vmm stderr, the
//! initramfs and `results.txt` (this table, rewritten after every round so an outer timeout
//! still leaves the figures so far) are kept in `--out`; `--report-only` rebuilds the table
//! from those logs.
//!
//! Both guests raise the mount's read-ahead to `--readahead-kb` (default 1024, as Skiff's agent
//! does on its virtio-fs mounts; the kernel starts FUSE at 128 KiB) first, so sequential reads
//! go out as 1 MiB requests, several at once when the read-ahead is larger.
//!
//! usage: fsbench --kernel VMLINUX --out DIR [--runs N] [--timeout SECS] [--mib N]
//!                [--files N] [--vmm PATH] [--qemu PATH] [--virtiofsd PATH] [--share-base DIR]
//!                [--variants host,skiff,qemu] [--readahead-kb N]
//!        fsbench --report-only --out DIR [--runs N] [--mib N] [--files N]
//!
//! Needs real KVM: on a PVM host run it inside tools/kvm-vm, e.g.
//!   K=$(kernel/build.sh --print-path)/vmlinux
//!   tools/kvm-vm --cpus 1 --rw /work/rw/fsbench --timeout 1500 -- \
//!       target/release/fsbench --kernel "$K" --out /work/rw/fsbench --runs 3
//! `--cpus 1`: with two L1 vCPUs, QEMU + C virtiofsd in L2 wedged the whole L1 (both L1
//! vCPUs halted for good, "rcu_preempt kthread timer wakeup didn't happen") in every full-size
//! try; with one L1 vCPU, 3 of 5 C runs completed (the other 2 wedged L1 in the create phase,
//! so a run can end early: `results.txt` keeps the rounds so far). One L1 vCPU also serializes
//! Skiff's request thread with the guest's vCPU, so Skiff's seqread there is lower than with
//! two (0.28 vs 0.48 of host).
//! Each phase's `@marker` is printed on stderr as it arrives (where a stalled run stopped).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[path = "../common/capture.rs"]
mod capture;
use capture::{run_capture, Captured};

const WORKLOAD_C: &str = include_str!("workload.c");
const TAG: &str = "fsb";
const GUEST_MEM_MIB: u32 = 512;
const SKIFF_CMDLINE: &str = "console=ttyS0 quiet reboot=k,panic_warm panic=-1 pci=off nomodules";

/// The guest's PID 1: mount the share, run the workload on it, reboot (which ends both VMMs).
const INIT: &str = "#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
if mount -t virtiofs fsb /mnt; then
  # --readahead-kb (default 1024, as Skiff's agent sets on its virtio-fs mounts; the kernel
  # starts FUSE at 128 KiB); both VMMs get it.
  while read -r _ _ dev _ mp _; do [ \"$mp\" = /mnt ] && bdi=$dev; done < /proc/self/mountinfo
  ra=$(cat /ra)
  echo $ra > /sys/class/bdi/$bdi/read_ahead_kb && echo \"fsbench_note read_ahead_kb $ra on $bdi\"
  /workload /mnt \"$(cat /mib)\" \"$(cat /files)\"
  echo \"fsbench_rc $?\"
  umount /mnt
else
  echo 'fsbench_error mount -t virtiofs fsb /mnt failed'
fi
echo FSBENCH-END
reboot -f
";

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Host,
    Skiff,
    Qemu,
}

struct Variant {
    name: &'static str,
    kind: Kind,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "host (L1 tmpfs)",
        kind: Kind::Host,
    },
    Variant {
        name: "skiff vmm",
        kind: Kind::Skiff,
    },
    Variant {
        name: "qemu+C virtiofsd",
        kind: Kind::Qemu,
    },
];

fn slug(v: &Variant) -> String {
    v.name.replace(['+', ' ', '(', ')'], "_")
}

/// Rebuilds the table from `OUT/logs/<variant>-<run>.console` (runs 0..runs) of an earlier
/// invocation, e.g. one cut short by tools/kvm-vm's --timeout. Lines without the arrival-time
/// prefix (older logs) give no L1-clock cross-check.
fn report_from_logs(out: &Path, runs: usize, mib: u64, files: u64) -> Result<String> {
    let mut results: Vec<Vec<Figures>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<Vec<String>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (i, v) in VARIANTS.iter().enumerate() {
            let p = out.join(format!("logs/{}-{run}.console", slug(v)));
            let Ok(text) = std::fs::read_to_string(&p) else {
                failures[i].push(format!("run {}: no {}", run + 1, p.display()));
                continue;
            };
            let lines = text
                .lines()
                .map(|l| match l.split_once(' ') {
                    Some((t, rest)) if t.contains('.') && t.parse::<f64>().is_ok() => (
                        Duration::from_secs_f64(t.parse::<f64>().unwrap_or(0.0)),
                        rest.to_string(),
                    ),
                    _ => (Duration::ZERO, l.to_string()),
                })
                .collect();
            let f = parse(
                &Captured {
                    lines,
                    status: None,
                    timed_out: false,
                },
                mib,
                files,
            );
            if f.contains_key("fsbench_done") {
                results[i].push(f);
            } else {
                let last = text.lines().last().unwrap_or("").to_string();
                failures[i].push(format!(
                    "run {}: workload did not finish (last line {last:?})",
                    run + 1
                ));
            }
        }
    }
    Ok(report(&VARIANTS, &results, &failures, runs, mib, files))
}

struct Config {
    out: PathBuf,
    kernel: String,
    initrd: String,
    workload: String,
    vmm: String,
    qemu: String,
    virtiofsd: String,
    share_base: PathBuf,
    timeout: Duration,
    mib: u64,
    files: u64,
    /// Extra arguments appended to QEMU's and to virtiofsd's command lines.
    qemu_args: Vec<String>,
    virtiofsd_args: Vec<String>,
}

/// Figures of one run: the workload's `key value` lines plus `l1_*` cross-check figures.
type Figures = HashMap<String, f64>;

fn parse(c: &Captured, mib: u64, files: u64) -> Figures {
    let mut f = Figures::new();
    let mut at: HashMap<&str, Duration> = HashMap::new();
    for (t, l) in &c.lines {
        let mut it = l.split_whitespace();
        let (Some(k), v) = (it.next(), it.next()) else {
            continue;
        };
        if let Some(phase) = k.strip_prefix('@') {
            at.entry(phase).or_insert(*t);
        } else if let Some(v) = v.and_then(|v| v.parse::<f64>().ok()) {
            f.entry(k.to_string()).or_insert(v);
            // The line that ends a phase: its arrival time closes the phase on the L1 clock.
            if k == "seqwrite_s" || k == "seqread_s" {
                at.entry(k).or_insert(*t);
            }
        }
    }
    let bytes_mb = mib as f64 * 1048576.0 / 1e6;
    let span = |a: &str, b: &str| match (at.get(a), at.get(b)) {
        (Some(a), Some(b)) if b > a => Some((*b - *a).as_secs_f64()),
        _ => None,
    };
    if let Some(s) = span("seqwrite", "seqwrite_s") {
        f.insert("l1_seqwrite_MBps".into(), bytes_mb / s);
    }
    if let Some(s) = span("seqread", "seqread_s") {
        f.insert("l1_seqread_MBps".into(), bytes_mb / s);
    }
    if let Some(s) = span("create", "end") {
        f.insert("l1_meta_s".into(), s);
        f.insert("l1_meta_ops".into(), 3.0 * files as f64 / s);
    }
    f
}

fn share_dir(cfg: &Config, v: &Variant, run: usize) -> Result<PathBuf> {
    let d = cfg.share_base.join(format!(
        "fsbench-{}/{}-{run}",
        std::process::id(),
        v.kind as u8
    ));
    if d.exists() {
        std::fs::remove_dir_all(&d)?;
    }
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn wait_for_socket(sock: &Path, daemon: &mut Child, log: &Path) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if sock.exists() {
            return Ok(());
        }
        if let Some(st) = daemon.try_wait()? {
            bail!(
                "virtiofsd exited early ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    bail!("virtiofsd did not create {} within 20 s", sock.display())
}

/// One run of one variant; Err = failed run (with why).
fn run_once(cfg: &Config, v: &Variant, run: usize) -> Result<Figures> {
    let dir = share_dir(cfg, v, run)?;
    let d = dir.to_string_lossy().to_string();
    let slug = slug(v);
    let log = |what: &str| cfg.out.join(format!("logs/{slug}-{run}.{what}"));
    let (mib, files) = (cfg.mib.to_string(), cfg.files.to_string());
    let mem = GUEST_MEM_MIB.to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut daemon = None;
    let argv = match v.kind {
        Kind::Host => s(&[&cfg.workload, &d, &mib, &files]),
        Kind::Skiff => s(&[
            &cfg.vmm,
            "--kernel",
            &cfg.kernel,
            "--initrd",
            &cfg.initrd,
            "--memory",
            &mem,
            "--cpus",
            "1",
            "--cmdline",
            SKIFF_CMDLINE,
            "--share",
            &format!("{TAG}={d}"),
        ]),
        Kind::Qemu => {
            // Not in --out: a unix socket cannot be bound on 9p (tools/kvm-vm --rw).
            let sock = cfg.share_base.join(format!(
                "fsbench-{}/virtiofsd-{run}.sock",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&sock);
            let dlog = log("virtiofsd");
            let mut child = Command::new(&cfg.virtiofsd)
                .arg(format!("--socket-path={}", sock.display()))
                .args(["-o", &format!("source={d}"), "-o", "cache=auto"])
                .args(&cfg.virtiofsd_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(File::create(&dlog)?))
                .spawn()
                .with_context(|| format!("starting {}", cfg.virtiofsd))?;
            wait_for_socket(&sock, &mut child, &dlog)?;
            daemon = Some(child);
            // QEMU microvm has no i8042 to reboot through: a triple fault ends it (-no-reboot).
            // acpi=off: with ACPI QEMU describes virtio-mmio only in the DSDT and adds no
            // `virtio_mmio.device=` to the command line; the guest kernel then finds no tag.
            let cmdline = SKIFF_CMDLINE.replace("reboot=k", "reboot=t");
            let mut a = s(&[
                &cfg.qemu,
                "-M",
                "microvm,rtc=on,acpi=off,memory-backend=mem",
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
                "-enable-kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-m",
                &mem,
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-chardev",
                &format!("socket,id=char0,path={}", sock.display()),
                // No EVENT_IDX, like Skiff's device (the same ring features on both sides).
                // With it, C virtiofsd's guest also hung in seqwrite on the nested substrate.
                "-device",
                &format!("vhost-user-fs-device,chardev=char0,tag={TAG},event_idx=off"),
                "-kernel",
                &cfg.kernel,
                "-initrd",
                &cfg.initrd,
                "-append",
                &cmdline,
            ]);
            a.extend(cfg.qemu_args.iter().cloned());
            a
        }
    };
    let res = run_capture(&argv, cfg.timeout, &log("stderr"), "fsbench", || false);
    if let Some(mut dmn) = daemon {
        // virtiofsd exits when QEMU closes the vhost-user socket; give it a moment.
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && matches!(dmn.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = dmn.kill();
        let _ = dmn.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let c = res?;
    // "<seconds since launch, L1 clock> <line>": --report-only re-reads these.
    let console: String = c
        .lines
        .iter()
        .map(|(t, l)| format!("{:.3} {l}\n", t.as_secs_f64()))
        .collect();
    std::fs::write(log("console"), &console)?;
    let f = parse(&c, cfg.mib, cfg.files);
    let tail = || {
        let n = c.lines.len().saturating_sub(12);
        let out: Vec<&str> = c.lines[n..].iter().map(|(_, l)| l.as_str()).collect();
        let err = std::fs::read_to_string(log("stderr")).unwrap_or_default();
        let e: Vec<&str> = err.lines().rev().take(8).collect::<Vec<_>>();
        let e: Vec<&str> = e.into_iter().rev().collect();
        format!(
            "output tail {:?}; stderr tail {:?}",
            out.join(" | "),
            e.join(" | ")
        )
    };
    if c.timed_out {
        bail!(
            "no exit within {:?} (hung guest?); killed; {}",
            cfg.timeout,
            tail()
        );
    }
    if !f.contains_key("fsbench_done") {
        bail!(
            "workload did not finish (status {:?}); {}",
            c.status,
            tail()
        );
    }
    if v.kind == Kind::Host && !c.status.is_some_and(|s| s.success()) {
        bail!("workload failed: {:?}", c.status);
    }
    Ok(f)
}

fn build_inputs(
    root: &Path,
    out: &Path,
    mib: u64,
    files: u64,
    readahead_kb: u32,
) -> Result<(String, String)> {
    std::fs::create_dir_all(out.join("logs"))?;
    let src = out.join("workload.c");
    std::fs::write(&src, WORKLOAD_C)?;
    let wl = out.join("workload");
    let ok = Command::new("gcc")
        .args(["-O2", "-static", "-Wall", "-o"])
        .arg(&wl)
        .arg(&src)
        .status()
        .context("running gcc")?
        .success();
    if !ok {
        bail!("gcc -O2 -static workload.c failed");
    }
    let init = out.join("init");
    std::fs::write(&init, INIT)?;
    std::fs::write(out.join("mib"), format!("{mib}\n"))?;
    std::fs::write(out.join("files"), format!("{files}\n"))?;
    std::fs::write(out.join("ra"), format!("{readahead_kb}\n"))?;
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox missing: apt-get install busybox-static");
    }
    let p = |x: &Path| x.to_string_lossy().to_string();
    let mut entries = vec![
        "dir:dev".to_string(),
        "chr:dev/console:5:1:600".into(),
        "dir:bin".into(),
        "dir:proc".into(),
        "dir:sys".into(),
        "dir:mnt".into(),
        format!("file:bin/busybox:{}:755", p(busybox)),
        format!("file:init:{}:755", p(&init)),
        format!("file:workload:{}:755", p(&wl)),
        format!("file:mib:{}:644", p(&out.join("mib"))),
        format!("file:files:{}:644", p(&out.join("files"))),
        format!("file:ra:{}:644", p(&out.join("ra"))),
    ];
    for a in ["sh", "mount", "umount", "cat", "reboot"] {
        entries.push(format!("sym:bin/{a}:busybox"));
    }
    let list = out.join("initramfs.list");
    std::fs::write(&list, entries.join("\n") + "\n")?;
    let cpio = out.join("initramfs.cpio");
    let ok = Command::new("python3")
        .arg(root.join("tools/mkcpio.py"))
        .arg(&cpio)
        .arg(format!("@{}", p(&list)))
        .status()
        .context("running python3 tools/mkcpio.py")?
        .success();
    if !ok {
        bail!("tools/mkcpio.py failed");
    }
    Ok((p(&wl), p(&cpio)))
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
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

fn usage() -> &'static str {
    "usage: fsbench --kernel VMLINUX --out DIR [--runs N] [--timeout SECS] [--mib N] [--files N]\n\
     \x20              [--vmm PATH] [--qemu PATH] [--virtiofsd PATH] [--share-base DIR]\n\
     \x20              [--variants host,skiff,qemu]   (which to run; default all three)\n\
     \x20              [--readahead-kb N]   (the guest mount's read-ahead; default 1024)\n\
     \x20              [--qemu-arg ARG]... [--virtiofsd-arg ARG]...   (appended to the C row's\n\
     \x20               QEMU / virtiofsd command lines, e.g. --qemu-arg=-mem-prealloc)\n\
     \x20      fsbench --report-only --out DIR [--runs N] [--mib N] [--files N]   (table from DIR/logs)\n\
     Needs real KVM (inside tools/kvm-vm on a PVM host). See the module doc in benches/fs/main.rs."
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let (mut runs, mut timeout, mut mib, mut files) = (3usize, 1200u64, 256u64, 10_000u64);
    let mut kernel: Option<String> = None;
    let mut out: Option<PathBuf> = None;
    let mut vmm = root
        .join("target/release/vmm")
        .to_string_lossy()
        .to_string();
    let mut qemu = "qemu-system-x86_64".to_string();
    let mut virtiofsd = "/usr/lib/qemu/virtiofsd".to_string();
    let mut share_base = PathBuf::from("/tmp");
    let mut report_only = false;
    let mut only: Option<String> = None;
    let mut readahead_kb = 1024u32;
    let (mut qemu_args, mut virtiofsd_args) = (Vec::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => runs = val()?.parse().context("--runs N")?,
            "--timeout" => timeout = val()?.parse().context("--timeout SECS")?,
            "--mib" => mib = val()?.parse().context("--mib N")?,
            "--files" => files = val()?.parse().context("--files N")?,
            "--kernel" => kernel = Some(val()?),
            "--out" => out = Some(val()?.into()),
            "--vmm" => vmm = val()?,
            "--qemu" => qemu = val()?,
            "--virtiofsd" => virtiofsd = val()?,
            "--share-base" => share_base = val()?.into(),
            "--report-only" => report_only = true,
            "--variants" => only = Some(val()?),
            "--readahead-kb" => readahead_kb = val()?.parse().context("--readahead-kb N")?,
            "--qemu-arg" => qemu_args.push(val()?),
            "--virtiofsd-arg" => virtiofsd_args.push(val()?),
            x if x.starts_with("--qemu-arg=") => qemu_args.push(x["--qemu-arg=".len()..].into()),
            x if x.starts_with("--virtiofsd-arg=") => {
                virtiofsd_args.push(x["--virtiofsd-arg=".len()..].into())
            }
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    let out = out.context(usage())?;
    if report_only {
        let table = report_from_logs(&out, runs, mib, files)?;
        print!("{table}");
        return Ok(());
    }
    let kernel = kernel.context(usage())?;
    if runs == 0 || mib == 0 || files == 0 {
        bail!("--runs, --mib and --files must be > 0");
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        bail!(
            "/dev/kvm is PVM here: Linux guests do not run on it; run fsbench inside tools/kvm-vm"
        );
    }
    for (what, p) in [
        ("vmm", &vmm),
        ("kernel", &kernel),
        ("virtiofsd", &virtiofsd),
    ] {
        if !Path::new(p).exists() {
            bail!("{what} {p} does not exist");
        }
    }
    let out = std::fs::canonicalize(&out)
        .or_else(|_| std::fs::create_dir_all(&out).and_then(|_| std::fs::canonicalize(&out)))
        .with_context(|| format!("--out {}", out.display()))?;
    // virtiofsd writes its pid file under /run/virtiofsd.
    let _ = std::fs::create_dir_all("/run/virtiofsd");
    eprintln!(
        "fsbench: building the workload and the initramfs in {}",
        out.display()
    );
    let (workload, initrd) = build_inputs(&root, &out, mib, files, readahead_kb)?;
    let cfg = Config {
        out: out.clone(),
        kernel,
        initrd,
        workload,
        vmm,
        qemu,
        virtiofsd,
        share_base,
        timeout: Duration::from_secs(timeout),
        mib,
        files,
        qemu_args,
        virtiofsd_args,
    };
    let variants = &VARIANTS;
    let kind_name = |k: Kind| match k {
        Kind::Host => "host",
        Kind::Skiff => "skiff",
        Kind::Qemu => "qemu",
    };
    let wanted: Vec<bool> = match &only {
        None => variants.iter().map(|_| true).collect(),
        Some(list) => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            for n in &names {
                if !variants.iter().any(|v| kind_name(v.kind) == *n) {
                    bail!("--variants: unknown variant {n:?} (host, skiff, qemu)");
                }
            }
            variants
                .iter()
                .map(|v| names.contains(&kind_name(v.kind)))
                .collect()
        }
    };
    let mut results: Vec<Vec<Figures>> = variants.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<Vec<String>> = variants.iter().map(|_| Vec::new()).collect();
    let total = Instant::now();
    for run in 0..runs {
        for (i, v) in variants.iter().enumerate() {
            if !wanted[i] {
                continue;
            }
            eprintln!(
                "fsbench: run {}/{runs}: {} ... ({:.0} s elapsed)",
                run + 1,
                v.name,
                total.elapsed().as_secs_f64()
            );
            let t = Instant::now();
            match run_once(&cfg, v, run) {
                Ok(f) => {
                    eprintln!(
                        "fsbench:   {:.1} s: write {:.1} MB/s, read {:.1} MB/s, cached re-read {:.1} MB/s, metadata {:.2} s ({:.0} ops/s)",
                        t.elapsed().as_secs_f64(),
                        f.get("seqwrite_MBps").copied().unwrap_or(f64::NAN),
                        f.get("seqread_MBps").copied().unwrap_or(f64::NAN),
                        f.get("reread_MBps").copied().unwrap_or(f64::NAN),
                        f.get("meta_s").copied().unwrap_or(f64::NAN),
                        f.get("meta_ops").copied().unwrap_or(f64::NAN),
                    );
                    results[i].push(f);
                }
                Err(e) => {
                    eprintln!("fsbench:   run failed: {e:#}");
                    failures[i].push(format!("run {}: {e:#}", run + 1));
                }
            }
        }
        // After every round, so that an outer timeout still leaves the figures so far.
        let partial = report(&VARIANTS, &results, &failures, run + 1, mib, files);
        std::fs::write(out.join("results.txt"), partial)?;
    }
    let table = report(variants, &results, &failures, runs, mib, files);
    print!("{table}");
    std::fs::write(out.join("results.txt"), &table)?;
    Ok(())
}

fn report(
    variants: &[Variant],
    results: &[Vec<Figures>],
    failures: &[Vec<String>],
    runs: usize,
    mib: u64,
    files: u64,
) -> String {
    let mut o = String::new();
    let med = |i: usize, k: &str| {
        median(
            results[i]
                .iter()
                .filter_map(|f| f.get(k).copied())
                .collect(),
        )
    };
    let _ = writeln!(
        o,
        "fsbench: {mib} MiB sequential write+fsync / read (1 MiB I/Os), {files} files create+stat+unlink; \
         median (min..max) of {runs} interleaved runs; MB = 10^6 bytes; guest clock"
    );
    let _ = writeln!(
        o,
        "{:<18} {:>22} {:>22} {:>22} {:>20} {:>22} {:>9} {:>9} {:>9} {:>6} {:>5}",
        "variant",
        "seqwrite MB/s",
        "seqread MB/s",
        "cached re-read MB/s",
        "metadata s",
        "metadata ops/s",
        "create/s",
        "stat/s",
        "unlink/s",
        "dropc",
        "ok"
    );
    let r = |t: (f64, f64, f64), p: usize| format!("{:.p$} ({:.p$}..{:.p$})", t.1, t.0, t.2);
    for (i, v) in variants.iter().enumerate() {
        let dc = med(i, "drop_caches").1;
        let _ = writeln!(
            o,
            "{:<18} {:>22} {:>22} {:>22} {:>20} {:>22} {:>9.0} {:>9.0} {:>9.0} {:>6} {:>5}",
            v.name,
            r(med(i, "seqwrite_MBps"), 1),
            r(med(i, "seqread_MBps"), 1),
            r(med(i, "reread_MBps"), 1),
            r(med(i, "meta_s"), 2),
            r(med(i, "meta_ops"), 0),
            med(i, "create_ops").1,
            med(i, "stat_ops").1,
            med(i, "unlink_ops").1,
            if dc.is_nan() {
                "-"
            } else if dc >= 1.0 {
                "yes"
            } else {
                "no"
            },
            format!("{}/{runs}", results[i].len())
        );
    }
    let _ = writeln!(
        o,
        "cross-check, L1 clock (arrival of the workload's phase lines on stdout/serial), medians:"
    );
    for (i, v) in variants.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {:<18} seqwrite {:.1} MB/s, seqread {:.1} MB/s, metadata {:.2} s ({:.0} ops/s)",
            v.name,
            med(i, "l1_seqwrite_MBps").1,
            med(i, "l1_seqread_MBps").1,
            med(i, "l1_meta_s").1,
            med(i, "l1_meta_ops").1
        );
    }
    let (h, s, q) = (0, 1, 2);
    let ratio = |a: usize, b: usize, k: &str| med(a, k).1 / med(b, k).1;
    let _ = writeln!(o, "ratios (medians):");
    let _ = writeln!(
        o,
        "  skiff seqread / host seqread        {:.2}  (goal >= 0.50)",
        ratio(s, h, "seqread_MBps")
    );
    let _ = writeln!(
        o,
        "  cached re-read / host seqread: skiff guest {:.2}, C virtiofsd guest {:.2} (the guest's \
         own copy-out ceiling, no file-system round trip)",
        med(s, "reread_MBps").1 / med(h, "seqread_MBps").1,
        med(q, "reread_MBps").1 / med(h, "seqread_MBps").1
    );
    let _ = writeln!(
        o,
        "  skiff seqread / skiff cached re-read {:.2}  (the share of the guest's ceiling virtio-fs reaches)",
        med(s, "seqread_MBps").1 / med(s, "reread_MBps").1
    );
    let _ = writeln!(
        o,
        "  skiff metadata ops/s / C virtiofsd  {:.2}x (goal >= 1.0x)",
        ratio(s, q, "meta_ops")
    );
    let _ = writeln!(
        o,
        "  skiff / C virtiofsd: seqwrite {:.2}x, seqread {:.2}x, create {:.2}x, stat {:.2}x, unlink {:.2}x",
        ratio(s, q, "seqwrite_MBps"),
        ratio(s, q, "seqread_MBps"),
        ratio(s, q, "create_ops"),
        ratio(s, q, "stat_ops"),
        ratio(s, q, "unlink_ops")
    );
    let _ = writeln!(
        o,
        "  C virtiofsd seqread / host seqread  {:.2}",
        ratio(q, h, "seqread_MBps")
    );
    for (v, f) in variants.iter().zip(failures) {
        for e in f {
            let _ = writeln!(o, "FAILED {}: {e}", v.name);
        }
    }
    o
}
