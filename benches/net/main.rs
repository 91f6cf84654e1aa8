//! `netbench`: TCP throughput and request/response rate of Skiff's virtio-net against QEMU
//! `-M microvm`'s, same kernel, same initramfs, same run, over two back ends (issue 12).
//! Figures and ratios, never assertions.
//!
//! The guest workload (`workload.c`, built here with `gcc -O2 -static`) runs from a busybox
//! initramfs built here; it connects to three servers that this process runs (Rust threads):
//!
//! * tx (guest -> host): announces and sends `--mib` MiB to a sink, which answers with the
//!   count it received; timed until that count arrives, so every byte has reached the host
//!   (no half-close: bookworm's passt forwards nothing to the guest after the guest's FIN);
//! * rx (host -> guest): a source sends `--mib` MiB and closes; timed until EOF;
//! * rr: 1-byte ping-pong with an echo server (TCP_NODELAY both ends) for `--rr-secs` seconds.
//!
//! Four variants, interleaved `--runs` times (1 vCPU, 512 MiB each, no vhost anywhere):
//!
//! * `skiff-passt`: `passt -f -q -1 -s SOCK -a 10.0.2.15 -n 24 -g 10.0.2.2` + `vmm --net
//!   stream:SOCK`. SOCK's directory is mode 1777: passt (run as root) drops to `nobody`
//!   before it binds, and Debian bookworm's passt (2023-03-09) then ignores a failed bind,
//!   listens on an unnamed socket nobody can reach and, with `-1`, exits 0 about 1 s later.
//!   The servers listen on 127.0.0.1, which passt maps to the gateway 10.0.2.2; the guest is
//!   10.0.2.15/24 with MTU 65520 (what `vmm run` gives a container);
//! * `qemu-passt`: the same passt + QEMU `-netdev stream` (unix socket) + `virtio-net-device`;
//! * `skiff-tap`, `qemu-tap`: a network namespace made here (`ip netns add`) holding a tap with
//!   vnet_hdr, 10.9.0.1/24; the VMM (`--net tap:T`, or QEMU `-netdev tap,...,vhost=off`) runs
//!   inside it (`ip netns exec`), and so do the servers (a thread that `setns`es into it binds
//!   them); the guest is 10.9.0.2/24 with the tap's MTU (1500). The namespace is deleted at the
//!   end, also on error and on SIGINT/SIGTERM.
//!
//! Figures are the guest's own CLOCK_MONOTONIC (`tx_mbps`, `rx_mbps`, `rr_per_s` on the serial
//! console); the servers' own timings are a cross-check (sink: first to last byte; source:
//! accept to the guest's close; echo: round trips / first byte to EOF). A phase that makes no
//! progress for `--stall-secs` (guest socket timeouts) is reported as failed and the workload
//! goes on, so a stalled direction still leaves the other figures; a run that does not end in
//! `--timeout` seconds is killed and counted as failed. Medians (min..max) of the successful
//! figures. Serial logs, the servers' figures, VMM/QEMU/passt stderr, the initramfs and
//! `results.txt` (the table, rewritten after every round) are kept in `--out`; `--report-only`
//! rebuilds the table from those logs. Nothing is sent anywhere but 127.0.0.1 and the
//! namespace made here.
//!
//! passt needs a default route to start. Where the host has none (inside tools/kvm-vm's L1),
//! netbench adds a veth pair `nbveth0`/`nbveth1` with 192.0.2.1/24 and a default route via
//! 192.0.2.254 (as tests/scripts/network.sh does; nothing answers there, and the guest only
//! talks to the gateway mapping), says so on stderr, and deletes it at the end.
//!
//! Needs real KVM and root: on a PVM host run it inside tools/kvm-vm, e.g.
//!   cargo build --release -p skiff-vmm -p skiff-benches
//!   K=$(kernel/build.sh --print-path)/vmlinux
//!   mkdir -p /work/rw/netbench
//!   tools/kvm-vm --rw /work/rw/netbench --timeout 3000 -- \
//!       target/release/netbench --kernel "$K" --out /work/rw/netbench --runs 3
//! Each phase's `@marker` is printed on stderr as it arrives (where a stalled run stopped).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[path = "../common/capture.rs"]
mod capture;
use capture::run_capture;

const WORKLOAD_C: &str = include_str!("workload.c");
const GUEST_MEM_MIB: u32 = 512;
const SKIFF_CMDLINE: &str = "console=ttyS0 quiet reboot=k,panic_warm panic=-1 pci=off nomodules";
/// passt's guest address, prefix and gateway (the gateway is passt's mapping of 127.0.0.1).
const PASST_GUEST: &str = "10.0.2.15";
const PASST_GW: &str = "10.0.2.2";
/// passt's default MTU; `vmm run` gives the container's eth0 the same.
const PASST_MTU: u32 = 65520;
/// The tap's address in the namespace, and the guest's.
const TAP_HOST: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const TAP_GUEST: &str = "10.9.0.2";
const TAP_NAME: &str = "nbtap0";
/// The veth made in a host without a default route (passt needs one).
const VETH: &str = "nbveth0";
const VETH_PEER: &str = "nbveth1";

/// The guest's PID 1: configure eth0 from the `nb_*=` words of the kernel command line, run
/// the workload, reboot (which ends both VMMs).
const INIT: &str = "#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
for w in $(cat /proc/cmdline); do
  case \"$w\" in
    nb_*=*) k=${w%%=*}; v=${w#*=}; eval \"$k=\\$v\";;
  esac
done
ip link set lo up
[ -n \"$nb_mtu\" ] && ip link set eth0 mtu \"$nb_mtu\"
if ip link set eth0 up && ip addr add \"$nb_addr\" dev eth0 && ip route add default via \"$nb_gw\"; then
  echo \"netbench_note eth0 mtu $(cat /sys/class/net/eth0/mtu) features $(cat /sys/class/net/eth0/device/features)\"
  /workload \"$nb_srv\" \"$nb_sink\" \"$nb_source\" \"$nb_echo\" \"$nb_mib\" \"$nb_rr\" \"$nb_stall\"
  echo \"netbench_rc $?\"
else
  echo 'netbench_error configuring eth0 failed'
  ip link
fi
echo NETBENCH-END
reboot -f
";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Vmm {
    Skiff,
    Qemu,
    /// No VM: the workload runs directly on the host.
    Host,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Net {
    Passt,
    Tap,
    Loopback,
}

#[derive(Debug)]
struct Variant {
    key: &'static str,
    vmm: Vmm,
    net: Net,
}

const VARIANTS: [Variant; 5] = [
    Variant {
        key: "skiff-passt",
        vmm: Vmm::Skiff,
        net: Net::Passt,
    },
    Variant {
        key: "qemu-passt",
        vmm: Vmm::Qemu,
        net: Net::Passt,
    },
    Variant {
        key: "skiff-tap",
        vmm: Vmm::Skiff,
        net: Net::Tap,
    },
    Variant {
        key: "qemu-tap",
        vmm: Vmm::Qemu,
        net: Net::Tap,
    },
    // Not run unless named in --variants: the host's own TCP over 127.0.0.1, no VM (the
    // ceiling of this machine; also a check of the workload and servers without KVM).
    Variant {
        key: "loopback",
        vmm: Vmm::Host,
        net: Net::Loopback,
    },
];

/// The variants run when --variants is not given.
const DEFAULT_VARIANTS: [&str; 4] = ["skiff-passt", "qemu-passt", "skiff-tap", "qemu-tap"];

/// Set by SIGINT/SIGTERM/SIGHUP: the running child is killed, no further run starts, and the
/// guards (namespace, veth, sockets) clean up on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Runs a setup command; Err with its stderr when it fails.
fn sh(argv: &[&str]) -> Result<()> {
    let o = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", argv.join(" ")))?;
    if !o.status.success() {
        bail!(
            "{} failed ({}): {}",
            argv.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// The network namespace with the tap; deleted (with the tap) when dropped.
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Netns> {
        let name = format!("netbench{}", std::process::id());
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        let n = ns.name.as_str();
        let addr = format!("{TAP_HOST}/24");
        sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        sh(&[
            "ip", "-n", n, "tuntap", "add", TAP_NAME, "mode", "tap", "vnet_hdr",
        ])?;
        sh(&["ip", "-n", n, "addr", "add", &addr, "dev", TAP_NAME])?;
        sh(&["ip", "-n", n, "link", "set", TAP_NAME, "up"])?;
        eprintln!("netbench: made network namespace {n} with tap {TAP_NAME} ({addr}, vnet_hdr)");
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match sh(&["ip", "netns", "del", &self.name]) {
            Ok(()) => eprintln!("netbench: deleted network namespace {}", self.name),
            Err(e) => eprintln!("netbench: {e:#}"),
        }
    }
}

/// The veth + default route made where the host had no default route; removed when dropped.
#[derive(Debug)]
struct FakeRoute;

impl FakeRoute {
    /// `Some` when it had to make one (the host had no default route).
    fn ensure() -> Result<Option<FakeRoute>> {
        let o = Command::new("ip")
            .args(["route", "show", "default"])
            .stdin(Stdio::null())
            .output()
            .context("running ip route show default")?;
        if !o.status.success() {
            bail!("ip route show default failed ({})", o.status);
        }
        if !String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            return Ok(None);
        }
        eprintln!(
            "netbench: this host has no default route and passt needs one: adding veth \
             {VETH}/{VETH_PEER} with 192.0.2.1/24 and a default route via 192.0.2.254 \
             (removed at the end; the guests only talk to passt's gateway mapping)"
        );
        sh(&[
            "ip", "link", "add", VETH, "type", "veth", "peer", "name", VETH_PEER,
        ])?;
        let made = FakeRoute;
        sh(&["ip", "addr", "add", "192.0.2.1/24", "dev", VETH])?;
        sh(&["ip", "link", "set", VETH, "up"])?;
        sh(&["ip", "link", "set", VETH_PEER, "up"])?;
        sh(&["ip", "route", "add", "default", "via", "192.0.2.254"])?;
        Ok(Some(made))
    }
}

impl Drop for FakeRoute {
    fn drop(&mut self) {
        match sh(&["ip", "link", "del", VETH]) {
            Ok(()) => eprintln!("netbench: removed {VETH}/{VETH_PEER} and its default route"),
            Err(e) => eprintln!("netbench: {e:#}"),
        }
    }
}

/// The directory for passt's sockets (mode 1777, like /tmp: passt binds as `nobody`);
/// removed when dropped.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn create(p: PathBuf) -> Result<TempDir> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        let d = TempDir(p);
        std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o1777))
            .with_context(|| format!("chmod 1777 {}", d.0.display()))?;
        Ok(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// passt maps the gateway to the host's loopback: it must be up (it is not in a fresh L1).
fn ensure_loopback_up() -> Result<()> {
    let flags = std::fs::read_to_string("/sys/class/net/lo/flags").unwrap_or_default();
    let up =
        u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).is_ok_and(|f| f & 1 != 0);
    if !up {
        eprintln!("netbench: the loopback interface is down: ip link set lo up");
        sh(&["ip", "link", "set", "lo", "up"])?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Host-side servers.

/// Figures (`host_*`) and errors of one run's servers.
#[derive(Debug, Default)]
struct HostSide {
    figures: Vec<(String, f64)>,
    errors: Vec<String>,
}

type ServerResult = std::result::Result<Vec<(String, f64)>, String>;

#[derive(Debug)]
struct Servers {
    ports: [u16; 3],
    stop: Arc<AtomicBool>,
    handles: Vec<(&'static str, JoinHandle<ServerResult>)>,
}

/// Binds three listeners on `ip` (port 0), inside network namespace `netns` when given: a
/// thread enters it with setns(2) and binds them there (a socket stays in the namespace it
/// was made in).
fn bind_listeners(ip: Ipv4Addr, netns: Option<&str>) -> Result<Vec<TcpListener>> {
    let bind = move || -> Result<Vec<TcpListener>> {
        (0..3)
            .map(|_| {
                let l = TcpListener::bind(SocketAddr::from((ip, 0)))
                    .with_context(|| format!("binding {ip}:0"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect()
    };
    let Some(ns) = netns else {
        return bind();
    };
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<Vec<TcpListener>> {
        let f = File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a valid namespace fd; it changes only this (short-lived) thread's
        // network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        bind()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("setns thread panicked"))?
}

/// Blocks (in short timeouts) until `stop`, the deadline or the interrupt flag says to give up.
fn should_give_up(stop: &AtomicBool, deadline: Instant) -> Option<&'static str> {
    if stop.load(Ordering::SeqCst) {
        Some("the VM ended")
    } else if interrupted() {
        Some("interrupted")
    } else if Instant::now() >= deadline {
        Some("run timeout")
    } else {
        None
    }
}

fn accept(
    l: &TcpListener,
    stop: &AtomicBool,
    deadline: Instant,
) -> std::result::Result<TcpStream, String> {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                let t = Some(Duration::from_millis(200));
                s.set_read_timeout(t).map_err(|e| e.to_string())?;
                s.set_write_timeout(t).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Some(why) = should_give_up(stop, deadline) {
                    return Err(format!("no connection ({why})"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Reads until EOF or `limit` bytes (Ok(bytes, first byte, end)), echoing what it reads when
/// `echo`.
fn drain(
    s: &mut TcpStream,
    echo: bool,
    limit: u64,
    stop: &AtomicBool,
    deadline: Instant,
) -> std::result::Result<(u64, Option<Instant>, Instant), String> {
    let mut buf = vec![0u8; 256 << 10];
    let (mut n, mut first) = (0u64, None);
    while n < limit {
        let want = (limit - n).min(buf.len() as u64) as usize;
        match s.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(k) => {
                first.get_or_insert_with(Instant::now);
                n += k as u64;
                if echo {
                    write_all(s, &buf[..k], stop, deadline)?;
                }
            }
            Err(e) if timed_out(&e) => {
                if let Some(why) = should_give_up(stop, deadline) {
                    return Err(format!("after {n} bytes: {why}"));
                }
            }
            Err(e) => return Err(format!("read after {n} bytes: {e}")),
        }
    }
    Ok((n, first, Instant::now()))
}

/// Fills `buf` (or fails).
fn read_full(
    s: &mut TcpStream,
    buf: &mut [u8],
    stop: &AtomicBool,
    deadline: Instant,
) -> std::result::Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(format!("EOF after {got} of {} bytes", buf.len())),
            Ok(k) => got += k,
            Err(e) if timed_out(&e) => {
                if let Some(why) = should_give_up(stop, deadline) {
                    return Err(format!("after {got} of {} bytes: {why}", buf.len()));
                }
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(())
}

fn write_all(
    s: &mut TcpStream,
    mut b: &[u8],
    stop: &AtomicBool,
    deadline: Instant,
) -> std::result::Result<(), String> {
    while !b.is_empty() {
        match s.write(b) {
            Ok(0) => return Err("write returned 0".into()),
            Ok(k) => b = &b[k..],
            Err(e) if timed_out(&e) => {
                if let Some(why) = should_give_up(stop, deadline) {
                    return Err(format!("write: {why}"));
                }
            }
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// Sink: reads an 8-byte length (LE), then that many bytes (or to EOF), answers with the
/// count (8 bytes LE) and waits for the guest's close. No half-close: see workload.c.
fn sink(l: TcpListener, stop: Arc<AtomicBool>, deadline: Instant) -> ServerResult {
    let mut s = accept(&l, &stop, deadline)?;
    let mut hdr = [0u8; 8];
    read_full(&mut s, &mut hdr, &stop, deadline).map_err(|e| format!("length: {e}"))?;
    let want = u64::from_le_bytes(hdr);
    let (n, first, end) = drain(&mut s, false, want, &stop, deadline)?;
    write_all(&mut s, &n.to_le_bytes(), &stop, deadline)?;
    let (extra, _, _) = drain(&mut s, false, u64::MAX, &stop, deadline)?;
    if n != want || extra != 0 {
        return Err(format!(
            "received {n} of {want} announced bytes, then {extra} more"
        ));
    }
    let d = first.map(|f| end - f).unwrap_or_default();
    Ok(vec![
        ("host_tx_bytes".into(), n as f64),
        ("host_tx_mbps".into(), mbps(n, d)),
    ])
}

/// Source: sends `bytes`, closes its side, waits for the guest's close.
fn source(l: TcpListener, bytes: u64, stop: Arc<AtomicBool>, deadline: Instant) -> ServerResult {
    let mut s = accept(&l, &stop, deadline)?;
    let t0 = Instant::now();
    let mut buf = vec![0u8; 128 << 10];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 + (i >> 9)) as u8;
    }
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        write_all(&mut s, &buf[..k], &stop, deadline)
            .map_err(|e| format!("after {} bytes: {e}", bytes - left))?;
        left -= k as u64;
    }
    let _ = s.shutdown(Shutdown::Write);
    let (extra, _, eof) = drain(&mut s, false, u64::MAX, &stop, deadline)?;
    if extra != 0 {
        return Err(format!("the guest sent {extra} bytes to the source"));
    }
    Ok(vec![("host_rx_mbps".into(), mbps(bytes, eof - t0))])
}

/// Echo: sends back what it reads until EOF.
fn echo(l: TcpListener, stop: Arc<AtomicBool>, deadline: Instant) -> ServerResult {
    let mut s = accept(&l, &stop, deadline)?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let (n, first, eof) = drain(&mut s, true, u64::MAX, &stop, deadline)?;
    let d = first.map(|f| eof - f).unwrap_or_default();
    Ok(vec![
        ("host_rr_count".into(), n as f64),
        ("host_rr_per_s".into(), n as f64 / d.as_secs_f64().max(1e-9)),
    ])
}

impl Servers {
    fn start(ip: Ipv4Addr, netns: Option<&str>, bytes: u64, deadline: Instant) -> Result<Servers> {
        let mut ls = bind_listeners(ip, netns)?;
        let ports = [
            ls[0].local_addr()?.port(),
            ls[1].local_addr()?.port(),
            ls[2].local_addr()?.port(),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let (l2, l1, l0) = (
            ls.pop().context("listener")?,
            ls.pop().context("listener")?,
            ls.pop().context("listener")?,
        );
        let (s0, s1, s2) = (stop.clone(), stop.clone(), stop.clone());
        let handles = vec![
            ("sink", std::thread::spawn(move || sink(l0, s0, deadline))),
            (
                "source",
                std::thread::spawn(move || source(l1, bytes, s1, deadline)),
            ),
            ("echo", std::thread::spawn(move || echo(l2, s2, deadline))),
        ];
        Ok(Servers {
            ports,
            stop,
            handles,
        })
    }

    /// Stops and joins the threads (each notices within ~200 ms).
    fn finish(self) -> HostSide {
        self.stop.store(true, Ordering::SeqCst);
        let mut h = HostSide::default();
        for (what, t) in self.handles {
            match t.join() {
                Ok(Ok(f)) => h.figures.extend(f),
                Ok(Err(e)) => h.errors.push(format!("{what}: {e}")),
                Err(_) => h.errors.push(format!("{what}: thread panicked")),
            }
        }
        h
    }
}

// ---------------------------------------------------------------------------------------
// Running a VM.

struct Config {
    out: PathBuf,
    /// Where passt's sockets go (not --out: a unix socket cannot be bound on 9p).
    sock_dir: PathBuf,
    kernel: String,
    initrd: String,
    workload: String,
    vmm: String,
    qemu: String,
    passt: String,
    timeout: Duration,
    mib: u64,
    rr_secs: u64,
    stall_secs: u64,
    netns: Option<String>,
}

/// Whether a unix socket is listening at `path` (per /proc/net/unix: flags 00010000).
fn unix_listening(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8 && f[3] == "00010000" && f[7] == p
        })
}

/// passt's stderr in one line, without its "Failed to send N bytes to syslog" noise.
fn passt_said(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Failed to send"))
        .collect();
    lines.join(" | ")
}

/// A running passt; killed and reaped when dropped.
struct Passt {
    child: Child,
}

impl Passt {
    fn start(cfg: &Config, sock: &Path, log: &Path) -> Result<Passt> {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(&cfg.passt)
            .args(["-f", "-q", "-1", "-s"])
            .arg(sock)
            .args(["-a", PASST_GUEST, "-n", "24", "-g", PASST_GW])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(log)?))
            .spawn()
            .with_context(|| format!("starting {}", cfg.passt))?;
        let mut p = Passt { child };
        // Bounded wait for the socket to be listening (a connect before listen(2) would be
        // refused). passt may list it in another namespace's /proc/net/unix: then the socket
        // file having existed for 3 s does (1 s was once too short for trixie's passt in a
        // loaded L1: the VMM's connect was refused).
        let end = Instant::now() + Duration::from_secs(20);
        let mut seen: Option<Instant> = None;
        loop {
            if let Some(st) = p.child.try_wait()? {
                bail!("passt exited early ({st}): {}", passt_said(log));
            }
            if sock.exists() {
                let since = *seen.get_or_insert_with(Instant::now);
                if unix_listening(sock) || since.elapsed() >= Duration::from_secs(3) {
                    return Ok(p);
                }
            }
            if Instant::now() >= end || interrupted() {
                bail!("passt did not listen on {} within 20 s", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// passt -1 exits when its client goes; give it a moment, then kill and reap it (Drop).
    fn finish(mut self) {
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Figures of one run: the workload's `key value` lines and the servers' `host_*` ones.
type Figures = HashMap<String, f64>;

/// One run's figures and its errors (a run is complete when `netbench_done` is present).
#[derive(Default)]
struct RunResult {
    figures: Figures,
    errors: Vec<String>,
}

fn parse_console(text: &str, r: &mut RunResult) {
    for l in text.lines() {
        // Lines are "<seconds since launch> <line>" in the logs.
        let l = match l.split_once(' ') {
            Some((t, rest)) if t.contains('.') && t.parse::<f64>().is_ok() => rest,
            _ => l,
        };
        let mut it = l.split_whitespace();
        let Some(k) = it.next() else { continue };
        if k.ends_with("_error") {
            r.errors.push(l.to_string());
            continue;
        }
        if let Some(v) = it.next().and_then(|v| v.parse::<f64>().ok()) {
            r.figures.entry(k.to_string()).or_insert(v);
        }
    }
}

fn parse_host(text: &str, r: &mut RunResult) {
    for l in text.lines() {
        if let Some(e) = l.strip_prefix("host_error ") {
            r.errors.push(format!("host {e}"));
        } else if let Some((k, v)) = l.split_once(' ') {
            if let Ok(v) = v.trim().parse::<f64>() {
                r.figures.insert(k.to_string(), v);
            }
        }
    }
}

fn qemu_argv(cfg: &Config, cmdline: &str, netdev: &str) -> Vec<String> {
    let mem = GUEST_MEM_MIB.to_string();
    // QEMU microvm has no i8042 to reboot through: a triple fault ends it (-no-reboot).
    // acpi=off: with ACPI QEMU describes virtio-mmio only in the DSDT and adds no
    // `virtio_mmio.device=` to the command line (as in fsbench).
    let cmdline = cmdline.replace("reboot=k", "reboot=t");
    [
        &cfg.qemu,
        "-M",
        "microvm,rtc=on,acpi=off",
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
        "-netdev",
        netdev,
        "-device",
        "virtio-net-device,netdev=n0",
        "-kernel",
        &cfg.kernel,
        "-initrd",
        &cfg.initrd,
        "-append",
        &cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn slug(v: &Variant, run: usize) -> String {
    format!("{}-{run}", v.key)
}

/// One run of one variant: Err = the run could not be set up or did not finish.
fn run_once(cfg: &Config, v: &Variant, run: usize) -> Result<RunResult> {
    let slug = slug(v, run);
    let log = |what: &str| cfg.out.join(format!("logs/{slug}.{what}"));
    let deadline = Instant::now() + cfg.timeout + Duration::from_secs(5);
    let bytes = cfg.mib << 20;
    let (server_ip, guest_addr, gw, mtu, netns) = match v.net {
        Net::Passt => (
            Ipv4Addr::LOCALHOST,
            format!("{PASST_GUEST}/24"),
            PASST_GW.to_string(),
            Some(PASST_MTU),
            None,
        ),
        Net::Tap => (
            TAP_HOST,
            format!("{TAP_GUEST}/24"),
            TAP_HOST.to_string(),
            None,
            Some(cfg.netns.as_deref().context("no network namespace")?),
        ),
        Net::Loopback => (
            Ipv4Addr::LOCALHOST,
            String::new(),
            Ipv4Addr::LOCALHOST.to_string(),
            None,
            None,
        ),
    };
    let servers = Servers::start(server_ip, netns, bytes, deadline)?;
    let [sink_p, source_p, echo_p] = servers.ports;
    let mut cmdline = format!(
        "{SKIFF_CMDLINE} nb_addr={guest_addr} nb_gw={gw} nb_srv={gw} nb_sink={sink_p} \
         nb_source={source_p} nb_echo={echo_p} nb_mib={} nb_rr={} nb_stall={}",
        cfg.mib, cfg.rr_secs, cfg.stall_secs
    );
    if let Some(m) = mtu {
        let _ = write!(cmdline, " nb_mtu={m}");
    }
    let sock = cfg.sock_dir.join(format!("passt-{slug}.sock"));
    let passt = match v.net {
        Net::Passt => match Passt::start(cfg, &sock, &log("passt")) {
            Ok(p) => Some(p),
            Err(e) => {
                servers.finish();
                return Err(e);
            }
        },
        Net::Tap | Net::Loopback => None,
    };
    let mem = GUEST_MEM_MIB.to_string();
    let mut argv: Vec<String> = Vec::new();
    if let Some(ns) = netns {
        argv.extend(["ip", "netns", "exec", ns].map(String::from));
    }
    match v.vmm {
        Vmm::Skiff => {
            let net = match v.net {
                Net::Passt => format!("stream:{}", sock.display()),
                Net::Tap | Net::Loopback => format!("tap:{TAP_NAME}"),
            };
            argv.extend(
                [
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
                    &cmdline,
                    "--net",
                    &net,
                ]
                .map(String::from),
            );
            // The card tells the guest its MTU (VIRTIO_NET_F_MTU caps eth0's): the same as
            // the guest is asked to use, as `vmm run` does over passt.
            if let Some(m) = mtu {
                argv.extend(["--mtu".to_string(), m.to_string()]);
            }
        }
        Vmm::Qemu => {
            let netdev = match v.net {
                Net::Passt => format!(
                    "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                    sock.display()
                ),
                Net::Tap | Net::Loopback => {
                    format!("tap,id=n0,ifname={TAP_NAME},script=no,downscript=no,vhost=off")
                }
            };
            argv.extend(qemu_argv(cfg, &cmdline, &netdev));
        }
        Vmm::Host => {
            let mut a = vec![cfg.workload.clone(), gw.clone()];
            a.extend([sink_p, source_p, echo_p].map(|p| p.to_string()));
            a.extend([cfg.mib, cfg.rr_secs, cfg.stall_secs].map(|n| n.to_string()));
            argv.extend(a);
        }
    }
    std::fs::write(log("argv"), argv.join("\n") + "\n")?;
    let res = run_capture(&argv, cfg.timeout, &log("stderr"), "netbench", interrupted);
    let host = servers.finish();
    if let Some(p) = passt {
        p.finish();
    }
    let _ = std::fs::remove_file(&sock);
    let c = res?;
    // "<seconds since launch, L1 clock> <line>": --report-only re-reads these.
    let console: String = c
        .lines
        .iter()
        .map(|(t, l)| format!("{:.3} {l}\n", t.as_secs_f64()))
        .collect();
    std::fs::write(log("console"), &console)?;
    let mut host_txt = String::new();
    for (k, v) in &host.figures {
        let _ = writeln!(host_txt, "{k} {v}");
    }
    for e in &host.errors {
        let _ = writeln!(host_txt, "host_error {e}");
    }
    std::fs::write(log("host"), &host_txt)?;
    let mut r = RunResult::default();
    parse_console(&console, &mut r);
    parse_host(&host_txt, &mut r);
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
            "{} within {:?}; killed; {}",
            if interrupted() {
                "interrupted"
            } else {
                "no exit"
            },
            cfg.timeout,
            tail()
        );
    }
    if !r.figures.contains_key("netbench_done") {
        bail!(
            "workload did not finish (status {:?}); {}",
            c.status,
            tail()
        );
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Inputs, report, main.

/// Builds the workload and the initramfs; returns their paths.
fn build_inputs(root: &Path, out: &Path) -> Result<(String, String)> {
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
        format!("file:bin/busybox:{}:755", p(busybox)),
        format!("file:init:{}:755", p(&init)),
        format!("file:workload:{}:755", p(&wl)),
    ];
    for a in ["sh", "mount", "cat", "ip", "reboot"] {
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

fn median(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Some((v[0], med, v[v.len() - 1]))
}

/// Per variant: its attempted runs (Ok = finished, maybe with failed phases; Err = why not).
type Outcomes = Vec<Vec<std::result::Result<RunResult, String>>>;

fn report(outcomes: &Outcomes, mib: u64, rr_secs: u64) -> String {
    let mut o = String::new();
    let runs = outcomes.iter().map(Vec::len).max().unwrap_or(0);
    let vals = |i: usize, k: &str| -> Vec<f64> {
        outcomes[i]
            .iter()
            .filter_map(|r| r.as_ref().ok().and_then(|r| r.figures.get(k).copied()))
            .collect()
    };
    let med = |i: usize, k: &str| median(vals(i, k)).map(|m| m.1).unwrap_or(f64::NAN);
    let cell = |i: usize, k: &str, p: usize| {
        let n = outcomes[i].len();
        if n == 0 {
            return "-".to_string();
        }
        let v = vals(i, k);
        let k_ok = v.len();
        match median(v) {
            Some((lo, m, hi)) => format!("{m:.p$} ({lo:.p$}..{hi:.p$}) {k_ok}/{n}"),
            None => format!("FAILED 0/{n}"),
        }
    };
    let _ = writeln!(
        o,
        "netbench: TCP {mib} MiB guest->host (tx) and host->guest (rx), 1-byte request/response \
         for {rr_secs} s (rr); median (min..max) ok/runs of {runs} interleaved runs; \
         Mbit/s = 10^6 bit/s; guest clock; 1 vCPU, 512 MiB, no vhost"
    );
    let _ = writeln!(
        o,
        "{:<12} {:>32} {:>32} {:>28} {:>12}",
        "variant",
        "tx Mbit/s (guest->host)",
        "rx Mbit/s (host->guest)",
        "rr round trips/s",
        "rr mean us"
    );
    for (i, v) in VARIANTS.iter().enumerate() {
        if outcomes[i].is_empty() {
            continue;
        }
        let _ = writeln!(
            o,
            "{:<12} {:>32} {:>32} {:>28} {:>12.1}",
            v.key,
            cell(i, "tx_mbps", 1),
            cell(i, "rx_mbps", 1),
            cell(i, "rr_per_s", 0),
            med(i, "rr_us"),
        );
    }
    let _ = writeln!(
        o,
        "cross-check, host side (the bench's servers: sink first..last byte, source accept..guest \
         close, echo round trips / first byte..EOF), medians:"
    );
    for (i, v) in VARIANTS.iter().enumerate() {
        if outcomes[i].is_empty() {
            continue;
        }
        let _ = writeln!(
            o,
            "  {:<12} tx {:.1} Mbit/s, rx {:.1} Mbit/s, rr {:.0}/s",
            v.key,
            med(i, "host_tx_mbps"),
            med(i, "host_rx_mbps"),
            med(i, "host_rr_per_s"),
        );
    }
    let idx = |key: &str| VARIANTS.iter().position(|v| v.key == key).unwrap_or(0);
    let pairs = [
        ("skiff / qemu over passt", "skiff-passt", "qemu-passt"),
        ("skiff / qemu over tap  ", "skiff-tap", "qemu-tap"),
        ("skiff: passt / tap     ", "skiff-passt", "skiff-tap"),
        ("qemu:  passt / tap     ", "qemu-passt", "qemu-tap"),
    ];
    let _ = writeln!(o, "ratios (medians):");
    for (what, a, b) in pairs {
        let (a, b) = (idx(a), idx(b));
        if outcomes[a].is_empty() || outcomes[b].is_empty() {
            continue;
        }
        let r = |k: &str| med(a, k) / med(b, k);
        let _ = writeln!(
            o,
            "  {what}  tx {:.2}x, rx {:.2}x, rr {:.2}x",
            r("tx_mbps"),
            r("rx_mbps"),
            r("rr_per_s")
        );
    }
    for (i, v) in VARIANTS.iter().enumerate() {
        for (run, r) in outcomes[i].iter().enumerate() {
            match r {
                Ok(r) => {
                    for e in &r.errors {
                        let _ = writeln!(o, "FAILED {} run {}: {e}", v.key, run + 1);
                    }
                }
                Err(e) => {
                    let _ = writeln!(o, "FAILED {} run {}: {e}", v.key, run + 1);
                }
            }
        }
    }
    o
}

/// Rebuilds the table from `OUT/logs/<variant>-<run>.{console,host}` of an earlier invocation
/// (runs 0..runs; a variant without logs is left out).
fn report_from_logs(out: &Path, runs: usize, mib: u64, rr_secs: u64) -> String {
    let mut outcomes: Outcomes = VARIANTS.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (i, v) in VARIANTS.iter().enumerate() {
            let base = out.join(format!("logs/{}", slug(v, run)));
            let Ok(text) = std::fs::read_to_string(base.with_extension("console")) else {
                if base.with_extension("stderr").exists() {
                    outcomes[i].push(Err("no console log".into()));
                }
                continue;
            };
            let mut r = RunResult::default();
            parse_console(&text, &mut r);
            parse_host(
                &std::fs::read_to_string(base.with_extension("host")).unwrap_or_default(),
                &mut r,
            );
            if r.figures.contains_key("netbench_done") {
                outcomes[i].push(Ok(r));
            } else {
                let last = text.lines().last().unwrap_or("").to_string();
                outcomes[i].push(Err(format!("workload did not finish (last line {last:?})")));
            }
        }
    }
    report(&outcomes, mib, rr_secs)
}

fn usage() -> String {
    let keys: Vec<&str> = VARIANTS.iter().map(|v| v.key).collect();
    format!(
        "usage: netbench --kernel VMLINUX --out DIR [--runs N] [--timeout SECS] [--mib N]\n\
         \x20               [--rr-secs N] [--stall-secs N] [--vmm PATH] [--qemu PATH] [--passt PATH]\n\
         \x20               [--variants {}]\n\
         \x20      netbench --report-only --out DIR [--runs N] [--mib N] [--rr-secs N]\n\
         \n\
         TCP throughput guest->host (tx) and host->guest (rx) and 1-byte request/response rate\n\
         (rr) of Skiff's virtio-net against QEMU -M microvm's, each over passt (unix stream socket)\n\
         and over a tap (in a network namespace made here); same kernel and initramfs, runs\n\
         interleaved, medians. The guest's own clock gives the figures; the bench's servers\n\
         (127.0.0.1, or inside the namespace) give a host-side cross-check.\n\
         \n\
         \x20 --kernel VMLINUX   guest kernel (e.g. $(kernel/build.sh --print-path)/vmlinux)\n\
         \x20 --out DIR          workload, initramfs, logs/ and results.txt (rewritten every round)\n\
         \x20 --runs N           interleaved rounds (default 3)\n\
         \x20 --timeout SECS     per run; a run still going is killed, counted failed (default 600)\n\
         \x20 --mib N            MiB each way (default 256)\n\
         \x20 --rr-secs N        seconds of ping-pong (default 5)\n\
         \x20 --stall-secs N     a guest phase without progress for N s fails, the rest go on (default 30)\n\
         \x20 --vmm PATH         Skiff's vmm (default target/release/vmm of this checkout)\n\
         \x20 --qemu PATH        default qemu-system-x86_64    --passt PATH   default passt\n\
         \x20 --variants LIST    comma-separated subset (default the four VM variants; `loopback`\n\
         \x20                    runs the workload on the host against 127.0.0.1, no VM: the\n\
         \x20                    ceiling of this machine's TCP; needs no KVM, root or kernel)\n\
         \x20 --report-only      only rebuild the table from DIR/logs\n\
         \n\
         Needs root (ip netns, tap) and real KVM: on a PVM host run it inside tools/kvm-vm, e.g.\n\
         \x20 tools/kvm-vm --rw /work/rw/netbench --timeout 3000 -- \\\n\
         \x20     target/release/netbench --kernel \"$K\" --out /work/rw/netbench --runs 3\n\
         Where the host has no default route (passt needs one), a veth with 192.0.2.1/24 and a\n\
         default route via 192.0.2.254 is added for the run and removed at the end.\n\
         See the module doc in benches/net/main.rs.",
        keys.join(",")
    )
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let (mut runs, mut timeout, mut mib, mut rr_secs, mut stall_secs) =
        (3usize, 600u64, 256u64, 5u64, 30u64);
    let mut kernel: Option<String> = None;
    let mut out: Option<PathBuf> = None;
    let mut vmm = root
        .join("target/release/vmm")
        .to_string_lossy()
        .to_string();
    let mut qemu = "qemu-system-x86_64".to_string();
    let mut passt = "passt".to_string();
    let mut report_only = false;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => runs = val()?.parse().context("--runs N")?,
            "--timeout" => timeout = val()?.parse().context("--timeout SECS")?,
            "--mib" => mib = val()?.parse().context("--mib N")?,
            "--rr-secs" => rr_secs = val()?.parse().context("--rr-secs N")?,
            "--stall-secs" => stall_secs = val()?.parse().context("--stall-secs N")?,
            "--kernel" => kernel = Some(val()?),
            "--out" => out = Some(val()?.into()),
            "--vmm" => vmm = val()?,
            "--qemu" => qemu = val()?,
            "--passt" => passt = val()?,
            "--variants" => only = Some(val()?),
            "--report-only" => report_only = true,
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    let out = out.with_context(usage)?;
    if report_only {
        print!("{}", report_from_logs(&out, runs, mib, rr_secs));
        return Ok(());
    }
    if runs == 0 || mib == 0 || rr_secs == 0 || stall_secs == 0 || timeout == 0 {
        bail!("--runs, --mib, --rr-secs, --stall-secs and --timeout must be > 0");
    }
    let wanted: Vec<bool> = match &only {
        None => VARIANTS
            .iter()
            .map(|v| DEFAULT_VARIANTS.contains(&v.key))
            .collect(),
        Some(list) => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            for n in &names {
                if !VARIANTS.iter().any(|v| v.key == *n) {
                    bail!("--variants: unknown variant {n:?}\n{}", usage());
                }
            }
            VARIANTS.iter().map(|v| names.contains(&v.key)).collect()
        }
    };
    let want = |f: &dyn Fn(&Variant) -> bool| VARIANTS.iter().zip(&wanted).any(|(v, w)| *w && f(v));
    let any_vm = want(&|v| v.vmm != Vmm::Host);
    // Only the loopback row runs without a kernel, KVM or root.
    let kernel = match kernel {
        Some(k) => k,
        None if !any_vm => String::new(),
        None => bail!("--kernel is needed\n{}", usage()),
    };
    if any_vm && Path::new("/sys/module/kvm_pvm").exists() {
        bail!(
            "/dev/kvm is PVM here: Linux guests do not run on it; run netbench inside tools/kvm-vm"
        );
    }
    // SAFETY: geteuid has no preconditions.
    if any_vm && unsafe { libc::geteuid() } != 0 {
        bail!("netbench needs root (ip netns, taps, a veth where there is no default route)");
    }
    let mut tools = Vec::new();
    if any_vm {
        tools.push(("kernel", kernel.as_str()));
    }
    if want(&|v| v.vmm == Vmm::Skiff) {
        tools.push(("vmm", vmm.as_str()));
    }
    for (what, p) in tools {
        if !Path::new(p).exists() {
            bail!("{what} {p} does not exist");
        }
    }
    let out = std::fs::canonicalize(&out)
        .or_else(|_| std::fs::create_dir_all(&out).and_then(|_| std::fs::canonicalize(&out)))
        .with_context(|| format!("--out {}", out.display()))?;
    install_signal_handlers();
    eprintln!(
        "netbench: building the workload and the initramfs in {}",
        out.display()
    );
    let (workload, initrd) = build_inputs(&root, &out)?;
    let sock_dir =
        TempDir::create(std::env::temp_dir().join(format!("netbench-{}", std::process::id())))?;
    // Guards: dropped (namespace deleted, veth removed) on every way out of main below.
    let _route = if want(&|v| v.net == Net::Passt) {
        ensure_loopback_up()?;
        FakeRoute::ensure()?
    } else {
        None
    };
    let netns = if want(&|v| v.net == Net::Tap) {
        Some(Netns::create()?)
    } else {
        None
    };
    let cfg = Config {
        out: out.clone(),
        sock_dir: sock_dir.0.clone(),
        kernel,
        initrd,
        workload,
        vmm,
        qemu,
        passt,
        timeout: Duration::from_secs(timeout),
        mib,
        rr_secs,
        stall_secs,
        netns: netns.as_ref().map(|n| n.name.clone()),
    };
    let mut outcomes: Outcomes = VARIANTS.iter().map(|_| Vec::new()).collect();
    let total = Instant::now();
    'rounds: for run in 0..runs {
        for (i, v) in VARIANTS.iter().enumerate() {
            if !wanted[i] {
                continue;
            }
            if interrupted() {
                eprintln!("netbench: interrupted; stopping");
                break 'rounds;
            }
            eprintln!(
                "netbench: run {}/{runs}: {} ... ({:.0} s elapsed)",
                run + 1,
                v.key,
                total.elapsed().as_secs_f64()
            );
            let t = Instant::now();
            match run_once(&cfg, v, run) {
                Ok(r) => {
                    let g = |k: &str| r.figures.get(k).copied().unwrap_or(f64::NAN);
                    eprintln!(
                        "netbench:   {:.1} s: tx {:.1} Mbit/s, rx {:.1} Mbit/s, rr {:.0}/s \
                         (host side: tx {:.1}, rx {:.1}, rr {:.0}){}",
                        t.elapsed().as_secs_f64(),
                        g("tx_mbps"),
                        g("rx_mbps"),
                        g("rr_per_s"),
                        g("host_tx_mbps"),
                        g("host_rx_mbps"),
                        g("host_rr_per_s"),
                        if r.errors.is_empty() {
                            String::new()
                        } else {
                            format!("; errors: {}", r.errors.join("; "))
                        }
                    );
                    outcomes[i].push(Ok(r));
                }
                Err(e) => {
                    eprintln!("netbench:   run failed: {e:#}");
                    outcomes[i].push(Err(format!("{e:#}").replace('\n', " | ")));
                }
            }
        }
        // After every round, so that an outer timeout still leaves the figures so far.
        std::fs::write(out.join("results.txt"), report(&outcomes, mib, rr_secs))?;
    }
    let table = report(&outcomes, mib, rr_secs);
    print!("{table}");
    std::fs::write(out.join("results.txt"), &table)?;
    Ok(())
}
