//! User-mode networking with passt: published ports (`-p`), the guest's addressing, and the
//! passt child process.
//!
//! The VMM starts `passt` itself on a pre-connected socketpair (`--fd 3`, so there is no socket
//! path to poll or race for), in the foreground (`-f`, so it stays our child) and one-off
//! (`-1`: it quits when its one client goes away). When the VM ends normally the [`Passt`]
//! handle kills and reaps it; when the VMM is killed (SIGKILL included) the kernel closes the
//! VMM's end of the socketpair and passt, seeing its only client gone, exits by itself.
//!
//! Addressing is fixed and private to each VM, as Docker's and podman's user-mode networks do:
//! the guest is 10.0.2.15/24, the gateway 10.0.2.2 is passt's mapping of the host's loopback
//! (a server on the host's 127.0.0.1 is reachable from the container at 10.0.2.2), and DNS
//! queries to 10.0.2.3 are forwarded by passt to the host's resolver. The agent configures the
//! guest's `eth0` from these values over netlink; no DHCP runs on the boot path.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The guest's address under passt.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Its prefix length.
pub const GUEST_PREFIX: u8 = 24;
/// The gateway: passt maps it to the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS address passt forwards to the host's resolver.
pub const DNS_FORWARD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// passt's own default MTU (the largest 802.3 frame, rounded): few, large frames.
pub const MTU: u16 = 65520;

/// Errors of networking setup (all but `Spawn` are the user's: one line, before boot).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `-p` value does not parse.
    #[error("-p {0:?}: expected [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp] with ports 1-65535")]
    Port(String),
    /// A published host port is taken.
    #[error("-p {spec}: host port {addr} is not free: {source}")]
    PortTaken {
        /// The `-p` value.
        spec: String,
        /// The address tried.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// passt is not installed.
    #[error("passt is not installed (apt-get install passt, or tools/setup); use --net none for no network")]
    Missing,
    /// The host has no default route, so passt has no external interface to use.
    #[error("passt: the host has no default route (passt needs one to reach the outside); use --net none, or add a route")]
    NoRoute,
    /// passt could not be started or ended at once.
    #[error("passt: {0}")]
    Spawn(String),
}

/// Transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A published port, `docker run -p` style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMap {
    /// The `-p` value as given (for messages).
    pub spec: String,
    /// Host address to listen on (default: every address).
    pub host_ip: Option<IpAddr>,
    /// Host port.
    pub host_port: u16,
    /// Port in the container.
    pub container_port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

/// Parses `[HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]` (an IPv6 host address in brackets).
pub fn parse_port(s: &str) -> Result<PortMap, Error> {
    let bad = || Error::Port(s.to_string());
    let (rest, proto) = match s.rsplit_once('/') {
        Some((r, "tcp")) => (r, Proto::Tcp),
        Some((r, "udp")) => (r, Proto::Udp),
        Some(_) => return Err(bad()),
        None => (s, Proto::Tcp),
    };
    let (host, container) = rest.rsplit_once(':').ok_or_else(bad)?;
    let (host_ip, host_port) = match host.rsplit_once(':') {
        Some((ip, port)) => {
            let ip = ip
                .strip_prefix('[')
                .and_then(|i| i.strip_suffix(']'))
                .unwrap_or(ip);
            (Some(ip.parse::<IpAddr>().map_err(|_| bad())?), port)
        }
        None => (None, host),
    };
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0 && !p.to_string().is_empty())
            .ok_or_else(bad)
    };
    Ok(PortMap {
        spec: s.to_string(),
        host_ip,
        host_port: port(host_port)?,
        container_port: port(container)?,
        proto,
    })
}

impl PortMap {
    /// The passt `-t`/`-u` spec: `[ADDR/]HOSTPORT:GUESTPORT`.
    fn passt_spec(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{ip}/{}:{}", self.host_port, self.container_port),
            None => format!("{}:{}", self.host_port, self.container_port),
        }
    }

    /// Fails with one clear line when the host port is already taken.
    pub fn check_free(&self) -> Result<(), Error> {
        let ip = self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let addr = std::net::SocketAddr::new(ip, self.host_port);
        let r = match self.proto {
            Proto::Tcp => std::net::TcpListener::bind(addr).map(drop),
            Proto::Udp => std::net::UdpSocket::bind(addr).map(drop),
        };
        r.map_err(|source| Error::PortTaken {
            spec: self.spec.clone(),
            addr: addr.to_string(),
            source,
        })
    }
}

/// The guest's network configuration (what the agent applies to `eth0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// Address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Ipv4Addr,
    /// DNS servers for the container's resolv.conf.
    pub dns: Vec<IpAddr>,
    /// Interface MTU.
    pub mtu: u16,
}

impl GuestNet {
    /// passt's addressing (see the module docs); `dns` overrides the forwarded resolver.
    pub fn passt(dns: &[IpAddr]) -> Self {
        GuestNet {
            address: GUEST_ADDR,
            prefix: GUEST_PREFIX,
            gateway: GATEWAY,
            dns: if dns.is_empty() {
                vec![IpAddr::V4(DNS_FORWARD)]
            } else {
                dns.to_vec()
            },
            mtu: MTU,
        }
    }
}

/// The passt binary, if installed (found on `$PATH`).
pub fn find() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("passt"))
        .find(|p| p.is_file())
}

/// Whether the host has a default route (IPv4 or IPv6) through a real interface, which passt
/// needs: with none it exits at start with "External interface not usable". Read from
/// `/proc/net/route` and `/proc/net/ipv6_route`; where those do not exist (not Linux) the
/// answer is yes and passt itself decides.
pub fn host_has_default_route() -> bool {
    let v4 = std::fs::read_to_string("/proc/net/route");
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route");
    if v4.is_err() && v6.is_err() {
        return true;
    }
    default_route_v4(v4.as_deref().unwrap_or("")) || default_route_v6(v6.as_deref().unwrap_or(""))
}

/// `/proc/net/route`: a default route is destination 00000000 with mask 00000000, up, not on lo.
fn default_route_v4(table: &str) -> bool {
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[0] != "lo"
            && f[1] == "00000000"
            && f[7] == "00000000"
            && u32::from_str_radix(f[3], 16).is_ok_and(|fl| fl & 0x1 != 0 && fl & 0x200 == 0)
    })
}

/// `/proc/net/ipv6_route`: destination ::/0, up (RTF_UP) and not a reject route, not on lo.
fn default_route_v6(table: &str) -> bool {
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 10
            && f[9] != "lo"
            && f[0].bytes().all(|b| b == b'0')
            && f[1] == "00"
            && u32::from_str_radix(f[8], 16).is_ok_and(|fl| fl & 0x1 != 0 && fl & 0x200 == 0)
    })
}

/// A running passt; killed and reaped when dropped.
#[derive(Debug)]
pub struct Passt {
    child: Child,
    log: Option<PathBuf>,
}

impl Passt {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` with passt's last words if it has exited.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => {
                let said = self
                    .log
                    .as_ref()
                    .and_then(|l| std::fs::read_to_string(l).ok())
                    .unwrap_or_default();
                let last = said
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no message");
                Err(Error::Spawn(format!("exited ({st}): {last}")))
            }
            Err(e) => Err(Error::Spawn(e.to_string())),
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts passt for `guest` with `ports` published; its messages go to `log`. Returns the
/// handle and the VMM's end of the socketpair (for the virtio-net stream backend). Port
/// conflicts are found here, before boot.
pub fn start(
    guest: &GuestNet,
    ports: &[PortMap],
    log: Option<&Path>,
) -> Result<(Passt, OwnedFd), Error> {
    let bin = find().ok_or(Error::Missing)?;
    for p in ports {
        p.check_free()?;
    }
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| Error::Spawn(format!("socketpair: {e}")))?;
    let mut cmd = Command::new(bin);
    cmd.args(["-f", "-q", "-1", "--fd", "3"])
        .args(["-a", &guest.address.to_string()])
        .args(["-n", &guest.prefix.to_string()])
        .args(["-g", &guest.gateway.to_string()])
        .args(["-m", &guest.mtu.to_string()])
        .args(["--dns-forward", &DNS_FORWARD.to_string()]);
    for p in ports {
        let flag = match p.proto {
            Proto::Tcp => "-t",
            Proto::Udp => "-u",
        };
        cmd.args([flag, &p.passt_spec()]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    match log.map(std::fs::File::create) {
        Some(Ok(f)) => {
            cmd.stderr(f);
        }
        _ => {
            cmd.stderr(Stdio::null());
        }
    }
    crate::sys::pass_fd_as_3(&mut cmd, theirs.as_raw_fd());
    let child = cmd
        .spawn()
        .map_err(|e| Error::Spawn(format!("starting it: {e}")))?;
    drop(theirs);
    tracing::debug!(pid = child.id(), "passt started");
    Ok((
        Passt {
            child,
            log: log.map(Path::to_path_buf),
        },
        OwnedFd::from(ours),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_routes_from_proc() {
        let hdr =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
        let dflt = "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        let net = "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert!(default_route_v4(&format!("{hdr}{dflt}{net}")));
        assert!(!default_route_v4(&format!("{hdr}{net}")));
        assert!(!default_route_v4(hdr));
        let v6_lo_reject = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        let v6_dflt = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0\n";
        let v6_link = "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0\n";
        assert!(!default_route_v6(&format!("{v6_link}{v6_lo_reject}")));
        assert!(default_route_v6(&format!("{v6_link}{v6_dflt}")));
    }

    #[test]
    fn port_specs() {
        let p = parse_port("127.0.0.1:18080:80").unwrap();
        assert_eq!(
            (p.host_ip, p.host_port, p.container_port, p.proto),
            (Some("127.0.0.1".parse().unwrap()), 18080, 80, Proto::Tcp)
        );
        assert_eq!(p.passt_spec(), "127.0.0.1/18080:80");
        let p = parse_port("5353:53/udp").unwrap();
        assert_eq!(
            (p.host_ip, p.proto, p.passt_spec()),
            (None, Proto::Udp, "5353:53".into())
        );
        let p = parse_port("[::1]:8080:80/tcp").unwrap();
        assert_eq!(p.host_ip, Some("::1".parse().unwrap()));
        for bad in [
            "80",
            "a:80",
            "80:b",
            "0:80",
            "80:0",
            "70000:80",
            "1.2.3:80:80",
            "80:80/sctp",
            ":80",
            "80:",
            "x.y:1:2",
        ] {
            let e = parse_port(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn a_taken_port_is_named() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p = parse_port(&format!("127.0.0.1:{port}:80")).unwrap();
        let e = p.check_free().unwrap_err().to_string();
        assert!(
            e.contains(&port.to_string()) && e.contains("not free"),
            "{e}"
        );
        drop(l);
        p.check_free().unwrap();
    }

    /// passt quits when the VMM's end of the socketpair closes (the VMM killed with SIGKILL
    /// closes it the same way), and the handle reaps it on drop.
    #[test]
    fn passt_dies_with_its_peer() {
        if find().is_none() {
            eprintln!("SKIPPED passt_dies_with_its_peer: passt is not installed (tools/setup installs it)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("skiff-passt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("passt.log");
        let (mut passt, fd) = start(&GuestNet::passt(&[]), &[], Some(&log)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        if let Err(e) = passt.check_alive() {
            // A host without any route: passt refuses to start; that must be one clear line.
            assert!(e.to_string().starts_with("passt: exited"), "{e}");
            eprintln!("passt could not run on this host (no route?): {e}");
            return;
        }
        drop(fd);
        let t0 = std::time::Instant::now();
        while passt.check_alive().is_ok() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "passt outlived its peer"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
