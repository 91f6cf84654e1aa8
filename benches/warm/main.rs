//! `warmbench`: `vmm run -- true` booted cold (`--cold`, the anchor) against restored from a
//! template (warm start), in the same process on the same guest; then the memory of N idle
//! containers each way. Figures and ratios, never assertions.
//!
//! 1. `vmm template create` (the template every warm run restores), one discarded run each way.
//! 2. `--runs` interleaved rounds (cold, warm) of `vmm run --timings -- true`: the wall time and
//!    the phases `vmm run --timings` reports (ms since the VMM started).
//! 3. `--idle` containers at once (`vmm run -- sh -c 'echo up; sleep 600'`), cold, then warm:
//!    once each printed `up`, the summed PSS of the VMM processes (`/proc/PID/smaps_rollup`:
//!    a page shared by k processes counts 1/k in each, so restored VMs sharing the template's
//!    page cache show it), then they are stopped (three SIGTERMs: the first is forwarded to
//!    the container, whose PID 1 ignores it; the third ends `vmm run`).
//!
//! Medians (min–max) go to stdout and `--out DIR`/results.txt.
//!
//! usage: warmbench --kernel VMLINUX --initrd CPIO --out DIR [--vmm PATH] [--runs N]
//!                  [--idle N] [--memory-mib N]
//!
//! Needs real KVM: on a PVM host run it inside tools/kvm-vm (templates go to L1's /tmp):
//!   SKIFF_TEMPLATES=/tmp/skiff-templates tools/kvm-vm --mem 8192 --rw /work/rw/warm \
//!     --timeout 1800 -- target/release/warmbench --kernel "$(kernel/build.sh --print-path)/vmlinux" \
//!     --initrd "$(kernel/build-initramfs.sh --print-path)" --out /work/rw/warm

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Phases of `vmm run --timings` shown in the table, in order.
const PHASES: &[&str] = &[
    "kernel loaded",
    "snapshot restored",
    "first vCPU entry",
    "agent ready",
    "guest prepared",
    "container created",
    "stdio streams attached",
    "container started",
    "container exited",
    "exit",
];

fn usage() -> &'static str {
    "usage: warmbench --kernel VMLINUX --initrd CPIO --out DIR [--vmm PATH] [--runs N] [--idle N] [--memory-mib N]\n\
     Needs real KVM (inside tools/kvm-vm on a PVM host). See the module doc in benches/warm/main.rs."
}

struct Opts {
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    out: PathBuf,
    runs: usize,
    idle: usize,
    memory_mib: u64,
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        vmm: std::env::current_exe()?
            .parent()
            .map(|d| d.join("vmm"))
            .unwrap_or_else(|| PathBuf::from("vmm")),
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
        out: PathBuf::new(),
        runs: 10,
        idle: 10,
        memory_mib: 256,
    };
    let mut a = std::env::args().skip(1);
    while let Some(k) = a.next() {
        if k == "-h" || k == "--help" {
            println!("{}", usage());
            std::process::exit(0);
        }
        let v = a
            .next()
            .with_context(|| format!("{k} needs a value\n{}", usage()))?;
        match k.as_str() {
            "--vmm" => o.vmm = v.into(),
            "--kernel" => o.kernel = v.into(),
            "--initrd" => o.initrd = v.into(),
            "--out" => o.out = v.into(),
            "--runs" => o.runs = v.parse().context("--runs")?,
            "--idle" => o.idle = v.parse().context("--idle")?,
            "--memory-mib" => o.memory_mib = v.parse().context("--memory-mib")?,
            _ => bail!("unknown option {k}\n{}", usage()),
        }
    }
    if o.kernel.as_os_str().is_empty()
        || o.initrd.as_os_str().is_empty()
        || o.out.as_os_str().is_empty()
    {
        bail!("{}", usage());
    }
    Ok(o)
}

fn vmm_run(o: &Opts, cold: bool) -> Command {
    let mut c = Command::new(&o.vmm);
    c.arg("run")
        .arg("--kernel")
        .arg(&o.kernel)
        .arg("--initrd")
        .arg(&o.initrd)
        .arg("--memory")
        .arg(o.memory_mib.to_string())
        .arg("--net")
        .arg("none");
    if cold {
        c.arg("--cold");
    }
    c
}

/// One `vmm run --timings -- true`: wall ms and the reported phases.
fn one(o: &Opts, cold: bool) -> Result<(f64, Vec<Option<f64>>)> {
    let t0 = Instant::now();
    let out = vmm_run(o, cold)
        .args(["--timings", "--", "true"])
        .stdin(Stdio::null())
        .output()?;
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("vmm run (cold={cold}) failed: {:?}\n{err}", out.status);
    }
    if !cold && !err.contains("snapshot restored") {
        bail!("a warm run was not restored from the template:\n{err}");
    }
    let phases = PHASES
        .iter()
        .map(|p| {
            err.lines()
                .find(|l| l.trim_start().starts_with(p))
                .and_then(|l| l.trim_start()[p.len()..].split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .collect();
    Ok((wall, phases))
}

fn stats(v: &mut [f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

fn pss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Starts `n` idle containers, waits until each printed `up`, sums their VMMs' PSS (KiB),
/// stops them.
fn idle_pss(o: &Opts, n: usize, cold: bool) -> Result<u64> {
    let mut kids: Vec<Child> = Vec::new();
    let mut total = 0;
    let r = (|| -> Result<u64> {
        for _ in 0..n {
            kids.push(
                vmm_run(o, cold)
                    .args(["--", "sh", "-c", "echo up; exec sleep 600"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
        }
        for k in kids.iter_mut() {
            let out = k.stdout.take().context("stdout")?;
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line)?;
            if line.trim() != "up" {
                bail!("an idle container (cold={cold}) did not come up: {line:?}");
            }
        }
        // Let the guests settle (the agent's and the kernel's first writes after start).
        std::thread::sleep(Duration::from_secs(3));
        for k in &kids {
            total += pss_kib(k.id()).context("reading smaps_rollup")?;
        }
        Ok(total)
    })();
    // The container's `sleep` is its PID 1, which ignores a forwarded SIGTERM (as under runc):
    // the third terminating signal makes `vmm run` end anyway; SIGKILL if even that fails.
    for _ in 0..3 {
        for k in kids.iter_mut() {
            let _ = Command::new("kill").arg(k.id().to_string()).status();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for k in kids.iter_mut() {
        while matches!(k.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(k.try_wait(), Ok(None)) {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
    r
}

fn main() -> Result<()> {
    let o = parse()?;
    std::fs::create_dir_all(&o.out)?;
    eprintln!("warmbench: making the template (vmm template create)");
    let made = Command::new(&o.vmm)
        .args(["template", "create", "--memory", &o.memory_mib.to_string()])
        .arg("--kernel")
        .arg(&o.kernel)
        .arg("--initrd")
        .arg(&o.initrd)
        .output()?;
    if !made.status.success() {
        bail!(
            "vmm template create failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    eprintln!("warmbench: warm-up (one discarded run each way)");
    one(&o, true)?;
    one(&o, false)?;
    let mut walls = [Vec::new(), Vec::new()];
    let mut phases: [Vec<Vec<f64>>; 2] = [
        vec![Vec::new(); PHASES.len()],
        vec![Vec::new(); PHASES.len()],
    ];
    for r in 0..o.runs {
        for (i, cold) in [true, false].into_iter().enumerate() {
            let (w, p) = one(&o, cold)?;
            eprintln!(
                "warmbench: round {}/{} {}: {w:.0} ms",
                r + 1,
                o.runs,
                if cold { "cold" } else { "warm" }
            );
            walls[i].push(w);
            for (j, v) in p.into_iter().enumerate() {
                if let Some(v) = v {
                    phases[i][j].push(v);
                }
            }
        }
    }
    let mut t = String::new();
    writeln!(
        t,
        "vmm run -- true, {} runs each, median (min-max) in ms",
        o.runs
    )?;
    writeln!(
        t,
        "{:<28} {:>24} {:>24}",
        "", "cold (--cold)", "warm (restored)"
    )?;
    let cell = |v: &mut Vec<f64>| match stats(v) {
        Some((m, lo, hi)) => format!("{m:.0} ({lo:.0}-{hi:.0})"),
        None => "-".into(),
    };
    for (j, p) in PHASES.iter().enumerate() {
        let c = cell(&mut phases[0][j]);
        let w = cell(&mut phases[1][j]);
        writeln!(t, "{p:<28} {c:>24} {w:>24}")?;
    }
    let (cw, ww) = (cell(&mut walls[0]), cell(&mut walls[1]));
    writeln!(t, "{:<28} {cw:>24} {ww:>24}", "wall clock")?;
    if let (Some((c, _, _)), Some((w, _, _))) = (stats(&mut walls[0]), stats(&mut walls[1])) {
        writeln!(
            t,
            "warm / cold (wall, medians): {:.2}x  (goal <= 0.2x)",
            w / c
        )?;
    }
    print!("{t}");
    if o.idle > 0 {
        eprintln!("warmbench: {} idle containers, cold", o.idle);
        let c = idle_pss(&o, o.idle, true)?;
        eprintln!("warmbench: {} idle containers, warm", o.idle);
        let w = idle_pss(&o, o.idle, false)?;
        let line = format!(
            "PSS of {n} idle containers (VMM processes): cold {:.1} MiB, warm {:.1} MiB, warm / cold {:.2}x  (goal <= 0.5x)\n",
            c as f64 / 1024.0,
            w as f64 / 1024.0,
            w as f64 / c.max(1) as f64,
            n = o.idle
        );
        print!("{line}");
        t.push_str(&line);
    }
    std::fs::write(o.out.join("results.txt"), &t)?;
    Ok(())
}
