//! The container's network on the host: its network namespace, the tap that joins that
//! namespace to the VM, and the spec's OCI hooks that run on the host.
//!
//! containerd's callers put a CNI network into the container's namespace in three ways:
//! CRI names a namespace path in the spec (made before the sandbox starts); `ctr run --cni`
//! runs the plugins in `/proc/<task pid>/ns/net` between Create and Start; nerdctl runs them
//! from a `createRuntime` hook that gets the same pid in its state. So:
//! - a spec that asks for a new network namespace gets a **holder**: a small host process
//!   (this binary, [`HOLDER_ARG`]) in a namespace of its own, whose pid the shim reports as the
//!   task's pid; it lives until the task is deleted (or the shim dies: its stdin is a pipe
//!   from the shim, and it exits at EOF);
//! - a namespace path is used as it is;
//! - no network namespace in the spec (`--net-host`) gives the VM no network card: a VM
//!   cannot share the host's interfaces, so the container has loopback only.
//!
//! At Create the shim makes the tap [`TAP`] inside the namespace and boots the VM with a card
//! on it. At Start ([`wire`]) it finds the namespace's interface (the CNI veth), joins it to
//! the tap with an ingress qdisc and a mirred redirect in each direction (no bridge, no
//! address on the tap: Kata's "tcfilter" model), and returns the interface's MAC, addresses,
//! routes and MTU for the agent, which gives the VM's `eth0` the same. With no interface
//! there, the container has loopback only, as under runc. [`unwire`] takes the tap and the
//! qdisc away again (a holder's namespace goes away with the holder anyway).
//!
//! The namespace is entered with `nsenter --net=PATH` (util-linux) to run iproute2's `ip` and
//! `tc`, with a deadline on each command.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use oci_spec::runtime::{Hook, LinuxNamespaceType, Spec};
use serde_json::Value;
use std::os::unix::process::ExitStatusExt;

/// argv\[1\] of a holder process.
pub const HOLDER_ARG: &str = "__skiff-netns-holder";

/// The tap's name inside the container's network namespace.
pub const TAP: &str = "skiff0";

/// The MTU the VM's card offers (the interface gets the CNI interface's MTU at Start).
pub const CARD_MTU: u16 = 1500;

/// How long one `ip`/`tc` command may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// How long a holder may take to start.
const HOLDER_START: Duration = Duration::from_secs(60);

/// A hook's deadline when the spec gives none.
const HOOK_DEADLINE: Duration = Duration::from_secs(60);

/// Errors of the network namespace handling and of hooks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A command (`ip`, `tc`, a hook) failed or timed out.
    #[error("{0}")]
    Command(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Which network namespace the spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No network namespace entry: the host's (`--net-host`).
    Host,
    /// A new namespace (a holder makes it).
    New,
    /// An existing namespace (CRI's `/var/run/netns/cni-...`).
    Path(PathBuf),
}

/// The spec's network namespace request.
pub fn plan(spec: &Spec) -> Plan {
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|v| v.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    match ns {
        None => Plan::Host,
        Some(n) => match n.path() {
            Some(p) => Plan::Path(p.clone()),
            None => Plan::New,
        },
    }
}

/// Is `path` the shim's own network namespace (the host's)? A spec may name it (`ctr run
/// --with-ns network:/proc/1/ns/net`, or a CRI container joining a task whose pid is the
/// shim's): the VM's card must never be joined to the host's own interfaces.
pub fn is_own_namespace(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        std::fs::metadata("/proc/self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Removes the spec's network namespace entry: the container shares the VM's namespace, where
/// the card is (the host side of its namespace is the shim's).
pub fn strip_network_namespace(spec: &mut Spec) {
    if let Some(linux) = spec.linux_mut() {
        if let Some(ns) = linux.namespaces_mut() {
            ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
        }
    }
}

/// The holder's body (`containerd-shim-skiff-v2 __skiff-netns-holder`, started by
/// [`Holder::spawn`] under `unshare --net`): says it is ready, then waits for EOF on stdin
/// (the shim closes it, or dies) and exits.
pub fn holder_main() -> ! {
    // Named apart from the shim server in `ps` and /proc/<pid>/comm (one shim per pod).
    let _ = rustix::thread::set_name(c"skiff-netns");
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    std::process::exit(0)
}

/// A holder process: a host process in a new network namespace (see the module docs).
#[derive(Debug)]
pub struct Holder {
    child: Child,
    /// Held open: the holder exits when it is closed.
    _stdin: ChildStdin,
}

impl Holder {
    /// Starts a holder and waits (up to [`HOLDER_START`]) until it is in its own namespace.
    pub fn spawn() -> Result<Holder, Error> {
        Self::start(None)
    }

    /// Starts a holder inside the existing namespace at `netns` (CRI's, or `ctr run
    /// --with-ns`): the task's pid is then in the namespace the spec named, as under runc, so
    /// `/proc/<pid>/ns/net` (which CRI gives a pod's other containers) is that namespace.
    pub fn enter(netns: &Path) -> Result<Holder, Error> {
        Self::start(Some(netns))
    }

    fn start(netns: Option<&Path>) -> Result<Holder, Error> {
        let exe = std::env::current_exe().map_err(io_err("finding the shim binary"))?;
        let mut cmd = match netns {
            None => {
                let mut c = Command::new("unshare");
                c.arg("--net");
                c
            }
            Some(p) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", p.display()));
                c
            }
        };
        let mut child = cmd
            .arg("--")
            .arg(&exe)
            .arg(HOLDER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err(
                "starting `unshare --net` or `nsenter --net` (util-linux) for the network namespace",
            ))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| Error::Command("no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Command("no stdout".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // Generous: 20 shims starting at once on a loaded 2-CPU host took over 10 s.
        let ready = rx.recv_timeout(HOLDER_START).unwrap_or_default();
        let holder = Holder {
            child,
            _stdin: stdin,
        };
        if ready.trim() != "ready" {
            return Err(Error::Command(
                "the network namespace holder did not start (unshare/nsenter --net failed?)".into(),
            ));
        }
        Ok(holder)
    }

    /// Its pid (the task's pid as containerd sees it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its network namespace.
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.child.id()))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` (already set up) with a deadline; its stdout on success.
fn run(
    mut cmd: Command,
    what: &str,
    deadline: Duration,
    input: Option<&[u8]>,
) -> Result<String, Error> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // Subscribed before the spawn, so the exit cannot be missed.
    let exits = monitor_subscribe(Topic::Pid)
        .map_err(|e| Error::Command(format!("{what}: exit monitor: {e}")))?;
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Command(format!("{what}: cannot run it: {e}")))?;
    if let (Some(data), Some(mut w)) = (input, child.stdin.take()) {
        // A command that does not read its input must not block us: ignore EPIPE.
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    // Output is read on threads and collected for at most a second after the exit: a
    // hook that leaves a daemon holding its stdout must not hold the shim.
    let reader = |r: Option<Box<dyn Read + Send>>, cap: u64| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(r) = r {
                let _ = r.take(cap).read_to_end(&mut s);
            }
            let _ = tx.send(s);
        });
        rx
    };
    let out_rx = reader(
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        1 << 20,
    );
    let err_rx = reader(
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
        64 << 10,
    );
    let end = Instant::now() + deadline;
    let pid = i32::try_from(child.id()).unwrap_or(-1);
    let code = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
            Ok(None) | Err(_) if Instant::now() < end => {
                // The shim's reaper (containerd-shim's SIGCHLD handler) may have reaped it
                // (try_wait then fails with ECHILD): its exit comes through the monitor.
                if let Ok(ev) = exits.rx.recv_timeout(Duration::from_millis(5)) {
                    if matches!(ev.subject, Subject::Pid(p) if p == pid) {
                        break ev.exit_code;
                    }
                }
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Command(format!(
                    "{what}: no answer within {} s",
                    deadline.as_secs()
                )));
            }
        }
    };
    let out = out_rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let err = err_rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    if code != 0 {
        let msg = String::from_utf8_lossy(&err);
        return Err(Error::Command(format!(
            "{what}: exit status {code}: {}",
            msg.trim()
                .lines()
                .take(4)
                .collect::<Vec<_>>()
                .join("; ")
                .chars()
                .take(400)
                .collect::<String>()
        )));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `nsenter --net=NETNS PROG ARGS...` with a deadline.
fn in_netns(
    netns: &Path,
    prog: &str,
    args: &[&str],
    input: Option<&[u8]>,
) -> Result<String, Error> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(prog)
        .args(args);
    run(
        cmd,
        &format!("{prog} {}", args.join(" ")),
        COMMAND_DEADLINE,
        input,
    )
}

fn json(s: &str, what: &str) -> Result<Value, Error> {
    serde_json::from_str(s).map_err(|e| Error::Command(format!("{what}: unexpected output: {e}")))
}

/// The namespace's interface the VM takes over, as found at Start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name in the namespace (`eth0`).
    pub name: String,
    /// Its MAC address.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses with prefix length (link-local ones left out: the guest makes its own).
    pub addresses: Vec<String>,
    /// Routes through it: (destination CIDR, `0.0.0.0/0` for default; gateway).
    pub routes: Vec<(String, Option<String>)>,
}

/// The first Ethernet interface in `links` (`ip -j link show`) other than `lo` and the tap.
fn pick_interface(links: &Value, tap: &str) -> Option<(String, String, u32)> {
    let mut found: Vec<(String, String, u32)> = links
        .as_array()?
        .iter()
        .filter(|l| l["link_type"] == "ether")
        .filter_map(|l| {
            let name = l["ifname"].as_str()?;
            (name != tap && name != "lo").then(|| {
                (
                    name.to_owned(),
                    l["address"].as_str().unwrap_or_default().to_owned(),
                    l["mtu"]
                        .as_u64()
                        .and_then(|m| u32::try_from(m).ok())
                        .unwrap_or(1500),
                )
            })
        })
        .collect();
    // eth0 first (CNI's default name), then by name.
    found.sort_by_key(|(n, ..)| (n != "eth0", n.clone()));
    found.into_iter().next()
}

/// Addresses of interface `name` from `ip -j addr show` (global scope only).
fn parse_addresses(addrs: &Value, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for link in addrs.as_array().into_iter().flatten() {
        if link["ifname"] != name {
            continue;
        }
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] != "global" {
                continue;
            }
            if let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                out.push(format!("{local}/{len}"));
            }
        }
    }
    out
}

/// Routes from `ip -j route show dev IF` (one family): the kernel's own subnet routes
/// (protocol `kernel`) and link-local ones are left out (the guest's addresses make them).
fn parse_routes(routes: &Value, v6: bool) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        if r["protocol"] == "kernel" {
            continue;
        }
        let Some(dst) = r["dst"].as_str() else {
            continue;
        };
        if dst.starts_with("fe80") || dst.starts_with("ff") || dst.starts_with("multicast") {
            continue;
        }
        let dst = match dst {
            "default" if v6 => "::/0".to_owned(),
            "default" => "0.0.0.0/0".to_owned(),
            d if d.contains('/') => d.to_owned(),
            d if v6 => format!("{d}/128"),
            d => format!("{d}/32"),
        };
        out.push((dst, r["gateway"].as_str().map(str::to_owned)));
    }
    out
}

/// Joins the namespace's interface to the tap (see the module docs) and returns it; `None`
/// when the namespace has no interface besides `lo` and the tap.
pub fn wire(netns: &Path, tap: &str) -> Result<Option<Interface>, Error> {
    // Five commands in all: each `nsenter` is a process start, slow in a nested VM.
    let links = json(
        &in_netns(netns, "ip", &["-j", "addr", "show"], None)?,
        "ip addr",
    )?;
    let Some((name, mac, mtu)) = pick_interface(&links, tap) else {
        return Ok(None);
    };
    let mut routes = Vec::new();
    for (family, v6) in [("-4", false), ("-6", true)] {
        let r = in_netns(
            netns,
            "ip",
            &["-j", family, "route", "show", "dev", &name],
            None,
        )?;
        routes.extend(parse_routes(&json(&r, "ip route")?, v6));
    }
    let mtu_s = mtu.to_string();
    in_netns(
        netns,
        "ip",
        &["link", "set", "dev", tap, "mtu", &mtu_s, "up"],
        None,
    )?;
    let mut batch = String::new();
    for (from, to) in [(name.as_str(), tap), (tap, name.as_str())] {
        batch.push_str(&format!(
            "qdisc add dev {from} handle ffff: ingress\n\
             filter add dev {from} parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev {to}\n"
        ));
    }
    in_netns(netns, "tc", &["-batch", "-"], Some(batch.as_bytes()))?;
    Ok(Some(Interface {
        addresses: parse_addresses(&links, &name),
        name,
        mac,
        mtu,
        routes,
    }))
}

/// Takes away what [`wire`] and Create added: the interface's ingress qdisc (with its filter)
/// and the tap. Best effort: what is already gone is fine.
pub fn unwire(netns: &Path, tap: &str, iface: Option<&str>) {
    if let Some(i) = iface {
        let _ = in_netns(netns, "tc", &["qdisc", "del", "dev", i, "ingress"], None);
    }
    let _ = in_netns(netns, "ip", &["link", "del", "dev", tap], None);
}

/// What the agent is told: the VM's card (found by `find_mac`) gets the interface's name,
/// MAC, MTU, addresses and routes.
pub fn guest_config(iface: Option<&Interface>, find_mac: &str) -> skiff_protocol::NetworkConfig {
    skiff_protocol::NetworkConfig {
        interfaces: iface
            .map(|i| skiff_protocol::NetInterface {
                mac: Some(find_mac.to_owned()),
                name: Some(i.name.clone()),
                addresses: i.addresses.clone(),
                mtu: Some(i.mtu),
                set_mac: Some(i.mac.clone()),
            })
            .into_iter()
            .collect(),
        routes: iface
            .map(|i| {
                i.routes
                    .iter()
                    .map(|(d, g)| skiff_protocol::NetRoute {
                        destination: d.clone(),
                        gateway: g.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        dns: Vec::new(),
        search: Vec::new(),
        hostname: None,
        hosts: Vec::new(),
    }
}

/// The OCI state a hook reads on its stdin.
pub fn hook_state(spec: &Spec, id: &str, status: &str, pid: u32, bundle: &Path) -> Value {
    serde_json::json!({
        "ociVersion": spec.version(),
        "id": id,
        "status": status,
        "pid": pid,
        "bundle": bundle.display().to_string(),
        "annotations": spec.annotations().clone().unwrap_or_default(),
    })
}

/// Runs `hooks` (of kind `kind`, for messages) in order on the host with `state` on stdin,
/// each within its `timeout` (60 s when it has none); the first failure ends the run.
pub fn run_hooks(kind: &str, hooks: &[Hook], state: &Value) -> Result<(), Error> {
    let input = state.to_string();
    for h in hooks {
        let mut cmd = Command::new(h.path());
        let args = h.args().clone().unwrap_or_default();
        if let Some((first, rest)) = args.split_first() {
            std::os::unix::process::CommandExt::arg0(&mut cmd, first);
            cmd.args(rest);
        }
        cmd.env_clear();
        for kv in h.env().iter().flatten() {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        let deadline = h
            .timeout()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
            .map_or(HOOK_DEADLINE, Duration::from_secs);
        run(
            cmd,
            &format!("{kind} hook {}", h.path().display()),
            deadline,
            Some(input.as_bytes()),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shims_own_namespace_is_recognised() {
        assert!(is_own_namespace(Path::new("/proc/self/ns/net")));
        assert!(is_own_namespace(Path::new(&format!(
            "/proc/{}/ns/net",
            std::process::id()
        ))));
        // Another namespace (same nsfs device, other inode), and no namespace at all.
        assert!(!is_own_namespace(Path::new("/proc/self/ns/mnt")));
        assert!(!is_own_namespace(Path::new("/var/run/netns/skiff-missing")));
    }

    #[test]
    fn picks_the_cni_interface_and_its_config() {
        let links: Value = serde_json::from_str(
            r#"[{"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536},
                {"ifname":"skiff0","link_type":"ether","address":"aa:aa:aa:aa:aa:aa","mtu":1500},
                {"ifname":"eth0","link_type":"ether","address":"0a:58:0a:58:4d:05","mtu":1450}]"#,
        )
        .unwrap();
        assert_eq!(
            pick_interface(&links, TAP),
            Some(("eth0".into(), "0a:58:0a:58:4d:05".into(), 1450))
        );
        let only: Value = serde_json::from_str(
            r#"[{"ifname":"lo","link_type":"loopback"},{"ifname":"skiff0","link_type":"ether"}]"#,
        )
        .unwrap();
        assert_eq!(pick_interface(&only, TAP), None);
        let addrs: Value = serde_json::from_str(
            r#"[{"ifname":"eth0","addr_info":[{"family":"inet","local":"10.88.77.5","prefixlen":24,"scope":"global"},
               {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"},
               {"family":"inet6","local":"fd00::5","prefixlen":64,"scope":"global"}]}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_addresses(&addrs, "eth0"),
            ["10.88.77.5/24", "fd00::5/64"]
        );
        assert!(parse_addresses(&addrs, "eth1").is_empty());
        let routes: Value = serde_json::from_str(
            r#"[{"dst":"default","gateway":"10.88.77.1","protocol":"boot"},
                {"dst":"10.88.77.0/24","protocol":"kernel","scope":"link"},
                {"dst":"10.99.0.0/16","gateway":"10.88.77.254"},
                {"dst":"192.0.2.7","scope":"link"}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_routes(&routes, false),
            [
                ("0.0.0.0/0".to_owned(), Some("10.88.77.1".to_owned())),
                ("10.99.0.0/16".to_owned(), Some("10.88.77.254".to_owned())),
                ("192.0.2.7/32".to_owned(), None),
            ]
        );
        let v6: Value =
            serde_json::from_str(r#"[{"dst":"default","gateway":"fd00::1"},{"dst":"fe80::/64"}]"#)
                .unwrap();
        assert_eq!(
            parse_routes(&v6, true),
            [("::/0".to_owned(), Some("fd00::1".to_owned()))]
        );
    }

    #[test]
    fn plan_follows_the_spec() {
        let mut spec = Spec::default();
        // The default spec has a network namespace entry without a path.
        assert_eq!(plan(&spec), Plan::New);
        strip_network_namespace(&mut spec);
        assert_eq!(plan(&spec), Plan::Host);
    }

    #[test]
    fn hooks_get_the_state_and_a_deadline() {
        let dir = std::env::temp_dir().join(format!("skiff-hook-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("state.json");
        let hook: Hook = serde_json::from_value(serde_json::json!({
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("cat > {}; echo \"$X\" >> {}", out.display(), out.display())],
            "env": ["X=from-env"],
        }))
        .unwrap();
        let state = serde_json::json!({"id": "c1", "pid": 42});
        run_hooks("createRuntime", &[hook], &state).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert!(got.starts_with(r#"{"id":"c1","pid":42}"#), "{got}");
        assert!(got.ends_with("from-env\n"), "{got}");
        let slow: Hook = serde_json::from_value(serde_json::json!({
            "path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1,
        }))
        .unwrap();
        let t = Instant::now();
        let e = run_hooks("poststart", &[slow], &state)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("poststart hook /bin/sleep: no answer within 1 s"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        let bad: Hook = serde_json::from_value(serde_json::json!({"path": "/bin/false"})).unwrap();
        let e = run_hooks("createRuntime", &[bad], &state)
            .unwrap_err()
            .to_string();
        assert!(e.contains("createRuntime hook /bin/false"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
