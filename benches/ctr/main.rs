//! `ctrbench`: `ctr run --rm IMG ID true` under Skiff (`io.containerd.skiff.v2`) against runc
//! (`io.containerd.runc.v2`, the anchor) with the same containerd, image and run. Figures and
//! ratios, never assertions.
//!
//! It starts its own containerd (config, root, state and socket in a fresh directory under
//! /tmp) with the Skiff shim on its PATH, imports a locally built busybox image
//! (`tools/mkoci.py`, no registry), does one discarded warm-up run per runtime, then
//! `--runs` interleaved rounds (Skiff, runc). Per run: the wall time of `ctr run --rm`, and for
//! Skiff the VM phases the shim logged (into containerd's log, at info): first vCPU entry,
//! first serial byte (kernel running), boot-timer stamp (guest userspace), agent ready,
//! process started, process exited + output drained — all in ms since the shim started the
//! VMM. Medians (and min/max) go to stdout and `--out`/results.txt.
//!
//! usage: ctrbench --kernel VMLINUX --initrd CPIO --out DIR [--runs N] [--shim-dir DIR]
//!                 [--memory-mib N] [--cni] [--tcp MIB]
//!
//! `--cni` runs `ctr run --cni --rm` instead: each container gets a CNI network from the
//! config in `/etc/cni/net.d` (ctr has no other place for it), with the plugins in
//! `/opt/cni/bin`; Skiff joins it to the VM's card (tc redirect), runc uses the veth as is.
//!
//! `--tcp MIB` (with `--cni`) also measures TCP throughput through the CNI path, per runtime:
//! host → container (the host sends MIB MiB to busybox `nc -l` at the container's CNI
//! address; timed at the sender, the container counts the bytes) and container → host (the
//! container's `nc` sends to the bridge gateway, where ctrbench listens and times the bytes).
//! Skiff: tap + tc redirect + virtio-net; runc: the veth.
//!
//! Needs real KVM: on a PVM host run it inside tools/kvm-vm, e.g.
//!   tools/kvm-vm --rw /work/rw/ctrbench --timeout 1200 -- target/release/ctrbench \
//!     --kernel "$(kernel/build.sh --print-path)/vmlinux" \
//!     --initrd "$(kernel/build-initramfs.sh --print-path)" --out /work/rw/ctrbench
//!
//! With `--cni` in the nested VM, give it a CNI config of its own first (tmpfs over the host's
//! directories, the qdisc modules L1 does not autoload), e.g.
//!   tools/kvm-vm --rw /work/rw/ctrbench --timeout 1800 -- sh -c 'mount -t tmpfs c /etc/cni/net.d; \
//!     mount -t tmpfs c /var/lib/cni; for m in sch_ingress cls_u32 act_mirred; do \
//!     modprobe -d $(cat /run/kvm-vm/modroot) $m; done; benches/ctr/cni.conflist.sh; \
//!     exec target/release/ctrbench --cni --kernel ... --initrd ... --out /work/rw/ctrbench'

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const PHASES: &[(&str, &str)] = &[
    ("phase=FirstVcpuEntry", "first vCPU entry"),
    ("phase=FirstSerialByte", "kernel (first serial byte)"),
    ("phase=BootStamp(123)", "guest userspace (boot stamp)"),
    ("agent ready", "agent ready + shares mounted"),
    ("process started", "container started"),
    ("process exited", "exited, output drained"),
];

fn usage() -> &'static str {
    "usage: ctrbench --kernel VMLINUX --initrd CPIO --out DIR [--runs N] [--shim-dir DIR] [--memory-mib N] [--cni [--tcp MIB]]\n\
     --tcp MIB: also TCP throughput host<->container through the CNI path (MIB MiB each way).\n\
     Needs real KVM (inside tools/kvm-vm on a PVM host) and containerd + ctr + runc\n\
     (tools/setup installs them). See the module doc in benches/ctr/main.rs."
}

struct Containerd {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SIGTERM, then reap.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_containerd(out: &Path, shim_dir: &Path, env: &[(&str, String)]) -> Result<Containerd> {
    let dir = PathBuf::from(format!("/tmp/ctrbench.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
            d = dir.display()
        ),
    )?;
    let log = out.join("containerd.log");
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .env("PATH", path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting containerd (tools/setup installs it)")?;
    let c = Containerd { child, dir, log };
    let sock = c.dir.join("containerd.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("containerd did not create {} within 30 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(c)
}

fn ctr(c: &Containerd, args: &[&str]) -> Result<(bool, String)> {
    let o = Command::new("ctr")
        .arg("-a")
        .arg(c.dir.join("containerd.sock"))
        .args(args)
        .output()
        .context("running ctr")?;
    let mut text = String::from_utf8_lossy(&o.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&o.stderr));
    Ok((o.status.success(), text))
}

fn build_image(out: &Path) -> Result<PathBuf> {
    let root = out.join("image-root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin"))?;
    for d in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("/bin/busybox (busybox-static) is needed for the image")?;
    for a in ["sh", "true", "ip", "nc", "wc", "dd", "seq", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    let tar = out.join("image.tar");
    let mkoci = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/mkoci.py");
    let st = Command::new(mkoci)
        .arg(&root)
        .arg(&tar)
        .arg("docker.io/skiff/bench:latest")
        .status()?;
    if !st.success() {
        bail!("tools/mkoci.py failed");
    }
    Ok(tar)
}

/// Milliseconds logged for each phase in `log` (the part of containerd's log one run wrote).
fn phases(log: &str) -> Vec<Option<f64>> {
    PHASES
        .iter()
        .map(|(key, _)| {
            log.lines()
                .find(|l| l.contains("boot phase") && l.contains(key))
                .and_then(|l| {
                    let i = l.find("ms=")? + 3;
                    let v: String = l[i..]
                        .trim_start_matches(['"', '\\'])
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.')
                        .collect();
                    v.parse().ok()
                })
        })
        .collect()
}

fn stats(v: &mut [f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[0], v[v.len() / 2], v[v.len() - 1]))
}

fn main() -> Result<()> {
    let (mut kernel, mut initrd, mut out) = (None, None, None);
    let mut runs = 10usize;
    let mut memory = 256u64;
    let mut cni = false;
    let mut tcp_mib: Option<u64> = None;
    let mut shim_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--kernel" => kernel = Some(val()?),
            "--initrd" => initrd = Some(val()?),
            "--out" => out = Some(PathBuf::from(val()?)),
            "--runs" => runs = val()?.parse().context("--runs N")?,
            "--memory-mib" => memory = val()?.parse().context("--memory-mib N")?,
            "--shim-dir" => shim_dir = val()?.into(),
            "--cni" => cni = true,
            "--tcp" => tcp_mib = Some(val()?.parse::<u64>().context("--tcp MIB")?),
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    let (kernel, initrd, out) = (
        kernel.context(usage())?,
        initrd.context(usage())?,
        out.context(usage())?,
    );
    if runs == 0 {
        bail!("--runs must be > 0");
    }
    if tcp_mib.is_some() && !cni {
        bail!("--tcp measures the CNI path: it needs --cni");
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        bail!(
            "/dev/kvm is PVM here: Linux guests do not run on it; run ctrbench inside tools/kvm-vm"
        );
    }
    if !shim_dir.join("containerd-shim-skiff-v2").exists() {
        bail!(
            "no containerd-shim-skiff-v2 in {} (cargo build --release -p skiff-shim, or --shim-dir)",
            shim_dir.display()
        );
    }
    if cni
        && !std::fs::read_dir("/etc/cni/net.d")
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".conflist"))
            })
            .unwrap_or(false)
    {
        bail!("--cni: no .conflist in /etc/cni/net.d (see benches/ctr/cni.conflist.sh)");
    }
    std::fs::create_dir_all(&out)?;
    eprintln!("ctrbench: building the image");
    let tar = build_image(&out)?;
    let c = start_containerd(
        &out,
        &shim_dir,
        &[
            ("SKIFF_KERNEL", kernel.clone()),
            ("SKIFF_INITRD", initrd.clone()),
            ("SKIFF_MEMORY_MIB", memory.to_string()),
        ],
    )?;
    let (ok, text) = ctr(&c, &["images", "import", tar.to_str().unwrap_or_default()])?;
    if !ok {
        bail!("ctr images import failed: {text}");
    }
    let img = "docker.io/skiff/bench:latest";
    let mut skiff_wall = Vec::new();
    let mut runc_wall = Vec::new();
    let mut skiff_phases: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len()];
    let mut failures = 0usize;
    for round in 0..=runs {
        for (rt, id) in [
            ("io.containerd.skiff.v2", format!("bench-s{round}")),
            ("io.containerd.runc.v2", format!("bench-r{round}")),
        ] {
            let before = std::fs::metadata(&c.log).map(|m| m.len()).unwrap_or(0);
            let t0 = Instant::now();
            let mut args = vec!["run", "--rm", "--runtime", rt, img, &id, "true"];
            if cni {
                args.insert(1, "--cni");
            }
            let (ok, text) = ctr(&c, &args)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if !ok {
                eprintln!("ctrbench: {rt} run {id} failed: {}", text.trim());
                failures += 1;
                continue;
            }
            if round == 0 {
                eprintln!("ctrbench: warm-up {rt}: {ms:.0} ms (discarded)");
                continue;
            }
            eprintln!("ctrbench: round {round}/{runs} {rt}: {ms:.0} ms");
            if rt.contains("skiff") {
                skiff_wall.push(ms);
                // The shim's log lines reach containerd's log shortly after the run.
                std::thread::sleep(Duration::from_millis(300));
                let log = std::fs::read(&c.log).unwrap_or_default();
                let part = String::from_utf8_lossy(&log[(before as usize).min(log.len())..]);
                for (i, p) in phases(&part).into_iter().enumerate() {
                    if let Some(v) = p {
                        skiff_phases[i].push(v);
                    }
                }
            } else {
                runc_wall.push(ms);
            }
        }
    }
    let mut r = String::new();
    let _ = writeln!(
        r,
        "ctr run{} --rm IMG ID true: {runs} interleaved rounds after a warm-up, {failures} failed runs\n\
         (Skiff VM: 1 vCPU, {memory} MiB; kernel {kernel})\n",
        if cni { " --cni" } else { "" }
    );
    let _ = writeln!(r, "{:<44} {:>9} {:>9} {:>9}", "ms", "min", "median", "max");
    let sw = stats(&mut skiff_wall);
    let rw = stats(&mut runc_wall);
    for (name, s) in [
        ("runc: ctr run wall time", rw),
        ("skiff: ctr run wall time", sw),
    ] {
        if let Some((a, m, b)) = s {
            let _ = writeln!(r, "{name:<44} {a:>9.1} {m:>9.1} {b:>9.1}");
        }
    }
    for (i, (_, label)) in PHASES.iter().enumerate() {
        if let Some((a, m, b)) = stats(&mut skiff_phases[i]) {
            let _ = writeln!(
                r,
                "{:<44} {a:>9.1} {m:>9.1} {b:>9.1}",
                format!("skiff VM: {label}")
            );
        }
    }
    if let (Some((_, s, _)), Some((_, rn, _))) = (sw, rw) {
        let _ = writeln!(
            r,
            "\nmedian ratio skiff / runc: {:.2}x ({:+.0} ms per container)",
            s / rn,
            s - rn
        );
    }
    if let Some(mib) = tcp_mib {
        let _ = writeln!(
            r,
            "\nTCP through the CNI path ({mib} MiB each way, MiB/s; Skiff: tap + tc redirect + virtio-net, runc: veth)"
        );
        let _ = writeln!(
            r,
            "{:<10} {:>16} {:>16}",
            "", "host->container", "container->host"
        );
        for rt in ["io.containerd.runc.v2", "io.containerd.skiff.v2"] {
            let name = if rt.contains("skiff") {
                "skiff"
            } else {
                "runc"
            };
            let fmt = |x: Result<f64>| match x {
                Ok(v) => format!("{v:.1}"),
                Err(e) => {
                    eprintln!("ctrbench: {name} tcp: {e:#}");
                    "failed".into()
                }
            };
            let (down, gw) = match tcp_in(&c, rt, img, mib) {
                Ok((v, gw)) => (Ok(v), gw),
                Err(e) => (Err(e), None),
            };
            let up = match gw {
                Some(gw) => tcp_out(&c, rt, img, mib, gw),
                None => Err(anyhow::anyhow!(
                    "no gateway known (host -> container failed)"
                )),
            };
            let _ = writeln!(r, "{name:<10} {:>16} {:>16}", fmt(down), fmt(up));
        }
    }
    print!("{r}");
    std::fs::write(out.join("results.txt"), &r)?;
    Ok(())
}

/// Waits for `child` up to `limit` (killed after), returning its stdout.
fn wait_output(mut child: Child, limit: Duration) -> Result<String> {
    let t0 = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ctr run did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut s = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut s);
    }
    Ok(s)
}

fn ctr_run_bg(c: &Containerd, rt: &str, img: &str, id: &str, script: &str) -> Result<Child> {
    Command::new("ctr")
        .arg("-a")
        .arg(c.dir.join("containerd.sock"))
        .args([
            "run",
            "--cni",
            "--rm",
            "--runtime",
            rt,
            img,
            id,
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running ctr")
}

/// The container's CNI address (`eth0`), polled with `ctr task exec` (bounded).
fn container_ip(c: &Containerd, id: &str) -> Result<std::net::Ipv4Addr> {
    let t0 = Instant::now();
    for n in 0.. {
        if t0.elapsed() > Duration::from_secs(120) {
            break;
        }
        let exec = format!("ip{n}");
        if let Ok((true, text)) = ctr(
            c,
            &[
                "task",
                "exec",
                "--exec-id",
                &exec,
                id,
                "ip",
                "-4",
                "-o",
                "addr",
                "show",
                "eth0",
            ],
        ) {
            if let Some(a) = text
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
            {
                return Ok(a);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("no eth0 address in {id} within 120 s")
}

/// Host -> container: MiB/s at the sender, and the gateway (the address's .1).
fn tcp_in(
    c: &Containerd,
    rt: &str,
    img: &str,
    mib: u64,
) -> Result<(f64, Option<std::net::Ipv4Addr>)> {
    use std::io::Write;
    let id = format!("tcp-in-{}", if rt.contains("skiff") { "s" } else { "r" });
    let child = ctr_run_bg(c, rt, img, &id, "nc -l -p 5001 | wc -c")?;
    let ip = match container_ip(c, &id) {
        Ok(ip) => ip,
        Err(e) => {
            let _ = wait_output(child, Duration::from_secs(1));
            return Err(e);
        }
    };
    let addr = std::net::SocketAddr::from((ip, 5001));
    let t0 = Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(60) => {
                let _ = wait_output(child, Duration::from_secs(1));
                bail!("connecting to {addr}: {e}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let secs = t.elapsed().as_secs_f64();
    let got = wait_output(child, Duration::from_secs(120))?;
    let n: u64 = got.trim().parse().unwrap_or(0);
    if n != mib << 20 {
        bail!("the container counted {n} bytes of {}", mib << 20);
    }
    let o = ip.octets();
    Ok((
        mib as f64 / secs,
        Some(std::net::Ipv4Addr::new(o[0], o[1], o[2], 1)),
    ))
}

/// Container -> host: MiB/s at the receiver (on the bridge gateway).
fn tcp_out(c: &Containerd, rt: &str, img: &str, mib: u64, gw: std::net::Ipv4Addr) -> Result<f64> {
    use std::io::Read;
    let l = std::net::TcpListener::bind((gw, 5002))
        .with_context(|| format!("listening on {gw}:5002"))?;
    l.set_nonblocking(true)?;
    let id = format!("tcp-out-{}", if rt.contains("skiff") { "s" } else { "r" });
    let script = format!(
        "for i in $(seq 100); do dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null | nc {gw} 5002 && exit 0; sleep 0.3; done; exit 1"
    );
    let child = ctr_run_bg(c, rt, img, &id, &script)?;
    let t0 = Instant::now();
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(120) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                let _ = wait_output(child, Duration::from_secs(1));
                bail!("no connection from {id} within 120 s: {e}");
            }
        }
    };
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0u8; 1 << 20];
    let want = mib << 20;
    let mut n = 0u64;
    let t = Instant::now();
    while n < want {
        match s.read(&mut buf)? {
            0 => break,
            k => n += k as u64,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    drop(s);
    let _ = wait_output(child, Duration::from_secs(60));
    if n != want {
        bail!("received {n} bytes of {want}");
    }
    Ok(mib as f64 / secs)
}
