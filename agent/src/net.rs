//! Guest networking: the host's [`NetworkConfig`] parsed and checked ([`plan`]), applied over
//! rtnetlink ([`apply`]: interfaces found by MAC, renamed, MTU, `lo` and each interface up,
//! addresses, routes; every request acknowledged), and the `resolv.conf`, `hosts` and
//! `hostname` files containers get bind-mounted over theirs ([`Files`]).
//!
//! Nothing here panics on host input: every string is parsed before use, and replies from
//! the kernel are walked with bounds checks.

use crate::sys;
use skiff_protocol::NetworkConfig;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Network configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the configuration does not parse or is out of range.
    #[error("network config: {0}")]
    Invalid(String),
    /// No interface matches an interface's MAC or name.
    #[error("network: {0}")]
    NoInterface(String),
    /// An rtnetlink request failed (what was asked, and the kernel's answer).
    #[error("network: {what}: {source}")]
    Netlink { what: String, source: io::Error },
    /// Writing one of the generated files failed.
    #[error("network: {}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
}

impl Error {
    /// The errno for the protocol's error reply.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Invalid(_) => libc::EINVAL,
            Self::NoInterface(_) => libc::ENODEV,
            Self::Netlink { source, .. } | Self::File { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

// ---------------------------------------------------------------------------------------------
// Parsing and checking
// ---------------------------------------------------------------------------------------------

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.0.2.15/24` or `fd00::2/64` (the prefix is required).
    pub fn parse(s: &str) -> Result<Self, Error> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| invalid(format!("{s:?}: expected ADDRESS/PREFIX")))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| invalid(format!("{s:?}: bad address")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let digits = !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
        let prefix = p
            .parse::<u8>()
            .ok()
            .filter(|&p| digits && p <= max)
            .ok_or_else(|| invalid(format!("{s:?}: bad prefix length (0..={max})")))?;
        Ok(Self { addr, prefix })
    }

    fn bits(&self) -> (u128, u32) {
        match self.addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    }

    fn mask(prefix: u8, width: u32) -> u128 {
        let p = u32::from(prefix).min(width);
        if p == 0 {
            return 0;
        }
        let all = if width >= 128 {
            u128::MAX
        } else {
            (1u128 << width) - 1
        };
        let host = if p == width {
            0
        } else {
            (1u128 << (width - p)) - 1
        };
        all & !host
    }

    /// Whether `ip` lies in this subnet (same family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, width) = self.bits();
        let other = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(b)) => u128::from(u32::from(b)),
            (IpAddr::V6(_), IpAddr::V6(b)) => u128::from(b),
            _ => return false,
        };
        let m = Self::mask(self.prefix, width);
        net & m == other & m
    }

    /// Whether bits past the prefix are zero (a network, not a host in it).
    pub fn is_network(&self) -> bool {
        let (v, width) = self.bits();
        v & !Self::mask(self.prefix, width) == 0
    }

    /// The IPv4 broadcast address of this subnet (prefixes up to /30).
    fn broadcast(&self) -> Option<Ipv4Addr> {
        match self.addr {
            IpAddr::V4(a) if self.prefix <= 30 => {
                let m = Self::mask(self.prefix, 32) as u32;
                Some(Ipv4Addr::from(u32::from(a) | !m))
            }
            _ => None,
        }
    }
}

/// Parses `52:54:00:12:34:56` (hex, either case).
pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
    let bad = || {
        invalid(format!(
            "MAC {s:?}: expected six hex bytes separated by ':'"
        ))
    };
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An interface name the kernel accepts: 1..=15 bytes of `[A-Za-z0-9_.-]`, not `.`/`..`.
pub fn valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A host name for `sethostname` and `/etc/hostname`: dot-separated labels of
/// `[A-Za-z0-9-]` (1..=63 bytes, no leading or trailing `-`), 64 bytes in all at most.
pub fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A name for `/etc/hosts` or a `search` domain: 1..=253 bytes of `[A-Za-z0-9_.-]`, starting
/// with a letter, digit or `_` (nothing that could break the file's line format).
pub fn valid_domain(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// One interface, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfacePlan {
    pub mac: Option<[u8; 6]>,
    pub name: Option<String>,
    pub addresses: Vec<Cidr>,
    pub mtu: Option<u32>,
    /// The address the interface gets before it comes up.
    pub set_mac: Option<[u8; 6]>,
}

/// One route, checked, with the interface (index into [`Plan::interfaces`]) it goes out of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    pub destination: Cidr,
    pub gateway: Option<IpAddr>,
    pub interface: usize,
    /// The gateway is in none of the interface's subnets: the route is marked on-link.
    pub onlink: bool,
}

/// A [`NetworkConfig`] with every string parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<IfacePlan>,
    pub routes: Vec<RoutePlan>,
    pub dns: Vec<IpAddr>,
    pub search: Vec<String>,
    pub hostname: Option<String>,
    pub hosts: Vec<(IpAddr, Vec<String>)>,
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr, Error> {
    s.parse()
        .map_err(|_| invalid(format!("{what} {s:?} is not an IP address")))
}

/// Parses and checks everything in `cfg` (counts are bounded by the protocol's validation;
/// they are checked again here so the agent never relies on the framing layer).
pub fn plan(cfg: &NetworkConfig) -> Result<Plan, Error> {
    use skiff_protocol::{
        MAX_NET_ADDRESSES, MAX_NET_DNS, MAX_NET_HOSTS, MAX_NET_HOST_NAMES, MAX_NET_INTERFACES,
        MAX_NET_ROUTES, MAX_NET_SEARCH,
    };
    let bound = |what: &str, n: usize, max: usize| {
        if n > max {
            Err(invalid(format!("{n} {what}, at most {max}")))
        } else {
            Ok(())
        }
    };
    bound("interfaces", cfg.interfaces.len(), MAX_NET_INTERFACES)?;
    bound("routes", cfg.routes.len(), MAX_NET_ROUTES)?;
    bound("DNS servers", cfg.dns.len(), MAX_NET_DNS)?;
    bound("search domains", cfg.search.len(), MAX_NET_SEARCH)?;
    bound("hosts entries", cfg.hosts.len(), MAX_NET_HOSTS)?;
    let mut interfaces = Vec::new();
    for (n, i) in cfg.interfaces.iter().enumerate() {
        bound(
            "addresses on one interface",
            i.addresses.len(),
            MAX_NET_ADDRESSES,
        )?;
        let mac = i.mac.as_deref().map(parse_mac).transpose()?;
        let set_mac = i.set_mac.as_deref().map(parse_mac).transpose()?;
        if let Some(m) = set_mac {
            if m[0] & 1 != 0 || m == [0; 6] {
                return Err(invalid(format!(
                    "MAC {} is not a unicast address",
                    fmt_mac(&m)
                )));
            }
        }
        if let Some(name) = &i.name {
            if !valid_ifname(name) {
                return Err(invalid(format!("interface name {name:?}")));
            }
        }
        if mac.is_none() && i.name.is_none() {
            return Err(invalid(format!(
                "interface {n} has neither a MAC nor a name"
            )));
        }
        let addresses = i
            .addresses
            .iter()
            .map(|a| Cidr::parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(mtu) = i.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(invalid(format!("MTU {mtu} (68..=65535)")));
            }
        }
        interfaces.push(IfacePlan {
            mac,
            name: i.name.clone(),
            addresses,
            mtu: i.mtu,
            set_mac,
        });
    }
    for (a, b) in interfaces
        .iter()
        .enumerate()
        .flat_map(|(n, a)| interfaces.iter().skip(n + 1).map(move |b| (a, b)))
    {
        if (a.mac.is_some() && a.mac == b.mac)
            || (a.name.is_some() && a.name == b.name)
            || (a.set_mac.is_some() && a.set_mac == b.set_mac)
        {
            return Err(invalid("two interfaces with the same MAC or name"));
        }
    }
    let mut routes = Vec::new();
    for r in &cfg.routes {
        let destination = Cidr::parse(&r.destination)?;
        if !destination.is_network() {
            return Err(invalid(format!(
                "route {:?}: host bits set past the prefix",
                r.destination
            )));
        }
        let gateway = r
            .gateway
            .as_deref()
            .map(|g| parse_ip("gateway", g))
            .transpose()?;
        if let Some(g) = gateway {
            if g.is_ipv4() != destination.addr.is_ipv4() {
                return Err(invalid(format!(
                    "route {:?}: gateway {g} is of another address family",
                    r.destination
                )));
            }
        }
        // The interface with a subnet holding the gateway (or the destination's network).
        let target = gateway.unwrap_or(destination.addr);
        let found = interfaces
            .iter()
            .position(|i| i.addresses.iter().any(|a| a.contains(target)));
        let link_local_v6 = matches!(gateway, Some(IpAddr::V6(g)) if is_link_local_v6(&g));
        let (interface, onlink) = match found {
            Some(n) => (n, false),
            None if interfaces.len() == 1 => (0, gateway.is_some() && !link_local_v6),
            None => {
                return Err(invalid(format!(
                    "route {:?}: no interface has a subnet holding {target}, cannot tell \
                     which one it goes out of",
                    r.destination
                )))
            }
        };
        routes.push(RoutePlan {
            destination,
            gateway,
            interface,
            onlink,
        });
    }
    let dns = cfg
        .dns
        .iter()
        .map(|d| parse_ip("DNS server", d))
        .collect::<Result<Vec<_>, _>>()?;
    for s in &cfg.search {
        if !valid_domain(s) {
            return Err(invalid(format!("search domain {s:?}")));
        }
    }
    if let Some(h) = &cfg.hostname {
        if !valid_hostname(h) {
            return Err(invalid(format!("hostname {h:?}")));
        }
    }
    let mut hosts = Vec::new();
    for h in &cfg.hosts {
        bound(
            "names on one hosts entry",
            h.names.len(),
            MAX_NET_HOST_NAMES,
        )?;
        let ip = parse_ip("hosts entry", &h.ip)?;
        if h.names.is_empty() {
            return Err(invalid(format!("hosts entry {ip} has no names")));
        }
        for n in &h.names {
            if !valid_domain(n) {
                return Err(invalid(format!("hosts entry {ip}: name {n:?}")));
            }
        }
        hosts.push((ip, h.names.clone()));
    }
    Ok(Plan {
        interfaces,
        routes,
        dns,
        search: cfg.search.clone(),
        hostname: cfg.hostname.clone(),
        hosts,
    })
}

fn is_link_local_v6(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// The contents of `resolv.conf`, `hosts` and `hostname` for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub resolv_conf: String,
    pub hosts: String,
    /// None when neither the spec nor the network configuration names the host.
    pub hostname: Option<String>,
}

/// Names of the generated files (in the agent's directory) and where they go in a container.
pub const FILE_TARGETS: [(&str, &str); 3] = [
    ("resolv.conf", "/etc/resolv.conf"),
    ("hosts", "/etc/hosts"),
    ("hostname", "/etc/hostname"),
];

impl Files {
    /// The files for a container whose host name is `hostname` (the spec's, else the
    /// configuration's). `hostname` must already be checked ([`valid_hostname`]).
    pub fn new(plan: &Plan, hostname: Option<&str>) -> Self {
        let mut resolv = String::from("# Generated by skiff-agent from the host's settings.\n");
        for d in &plan.dns {
            let _ = writeln!(resolv, "nameserver {d}");
        }
        if !plan.search.is_empty() {
            let _ = writeln!(resolv, "search {}", plan.search.join(" "));
        }
        let mut hosts = String::from(
            "127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n\
             ff00::0\tip6-mcastprefix\n\
             ff02::1\tip6-allnodes\n\
             ff02::2\tip6-allrouters\n",
        );
        if let Some(h) = hostname {
            // The container's own addresses: the first IPv4 and the first IPv6 one.
            let addrs = plan.interfaces.iter().flat_map(|i| &i.addresses);
            let v4 = addrs.clone().find(|a| a.addr.is_ipv4());
            let v6 = addrs.clone().find(|a| a.addr.is_ipv6());
            for a in v4.iter().chain(v6.iter()) {
                let _ = writeln!(hosts, "{}\t{h}", a.addr);
            }
        }
        for (ip, names) in &plan.hosts {
            let _ = writeln!(hosts, "{ip}\t{}", names.join(" "));
        }
        Self {
            resolv_conf: resolv,
            hosts,
            hostname: hostname.map(|h| format!("{h}\n")),
        }
    }

    /// Writes the files into `dir` (created, mode 0755; files 0644), each through a
    /// temporary name and a rename. Returns the (source, container target) pairs written.
    pub fn write(&self, dir: &Path) -> Result<Vec<(PathBuf, &'static str)>, Error> {
        let ferr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::File { path, source }
        };
        std::fs::create_dir_all(dir).map_err(ferr(dir))?;
        let mut out = Vec::new();
        for (name, target) in FILE_TARGETS {
            let body = match name {
                "resolv.conf" => Some(&self.resolv_conf),
                "hosts" => Some(&self.hosts),
                _ => self.hostname.as_ref(),
            };
            let path = dir.join(name);
            let Some(body) = body else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, body).map_err(ferr(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(ferr(&path))?;
            out.push((path, target));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// rtnetlink
// ---------------------------------------------------------------------------------------------

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_F_NODAD: u8 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;
const IFF_UP: u32 = 0x1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink request being built: header, family header, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, family_header: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(family_header);
        buf.resize(align4(buf.len()), 0);
        Self { buf }
    }

    fn attr(mut self, ty: u16, data: &[u8]) -> Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    // family AF_UNSPEC, pad, type 0
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Walks the netlink messages of one datagram: (type, flags, seq, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = Result<(u16, u16, u32, &[u8]), io::Error>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + NLMSG_HDRLEN > buf.len() {
            return None;
        }
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink reply");
        let len = u32_at(buf, off)? as usize;
        let (Some(ty), Some(flags), Some(seq)) = (
            u16_at(buf, off + 4),
            u16_at(buf, off + 6),
            u32_at(buf, off + 8),
        ) else {
            return Some(Err(bad()));
        };
        let Some(payload) = buf.get(off + NLMSG_HDRLEN..off.saturating_add(len)) else {
            off = buf.len();
            return Some(Err(bad()));
        };
        if len < NLMSG_HDRLEN {
            off = buf.len();
            return Some(Err(bad()));
        }
        off += align4(len);
        Some(Ok((ty, flags, seq, payload)))
    })
}

/// Attributes after a family header: (type without flag bits, data).
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, off)?);
        let ty = u16_at(b, off + 2)? & 0x3fff;
        let data = b.get(off + 4..off.checked_add(len)?)?;
        if len < 4 {
            return None;
        }
        off += align4(len);
        Some((ty, data))
    })
}

/// A link as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
}

/// An rtnetlink connection (in the calling thread's network namespace).
struct Rtnl {
    sock: sys::Netlink,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> Result<Self, Error> {
        Ok(Self {
            sock: sys::Netlink::route().map_err(|source| Error::Netlink {
                what: "opening an rtnetlink socket".into(),
                source,
            })?,
            seq: 0,
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends a request built by `build(seq)` with NLM_F_ACK and waits for its answer.
    fn request(&mut self, what: &str, build: impl FnOnce(u32) -> Vec<u8>) -> Result<(), Error> {
        let seq = self.next_seq();
        let e = |source| Error::Netlink {
            what: what.to_string(),
            source,
        };
        self.sock.send(&build(seq)).map_err(e)?;
        loop {
            let n = self.sock.recv(&mut self.buf).map_err(e)?;
            let got = self.buf.get(..n).unwrap_or_default();
            for m in messages(got) {
                let (ty, _, s, payload) = m.map_err(e)?;
                if s != seq || ty != NLMSG_ERROR {
                    continue;
                }
                let code = u32_at(payload, 0).map(|c| c as i32).ok_or_else(|| {
                    e(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink error message",
                    ))
                })?;
                return if code == 0 {
                    Ok(())
                } else {
                    Err(e(io::Error::from_raw_os_error(code.saturating_neg())))
                };
            }
        }
    }

    /// Every link of the namespace (RTM_GETLINK dump).
    fn links(&mut self) -> Result<Vec<Link>, Error> {
        let seq = self.next_seq();
        let e = |source| Error::Netlink {
            what: "listing interfaces".into(),
            source,
        };
        let req = Msg::new(
            RTM_GETLINK,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &ifinfomsg(0, 0, 0),
        )
        .finish();
        self.sock.send(&req).map_err(e)?;
        let mut links = Vec::new();
        // Bounded: a namespace with more links than this is not one the agent set up.
        for _ in 0..4096 {
            let n = self.sock.recv(&mut self.buf).map_err(e)?;
            let got = self.buf.get(..n).unwrap_or_default();
            for m in messages(got) {
                let (ty, _flags, s, payload) = m.map_err(e)?;
                if s != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(links),
                    NLMSG_ERROR => {
                        let code = u32_at(payload, 0).map(|c| c as i32).unwrap_or(-libc::EIO);
                        return Err(e(io::Error::from_raw_os_error(code.saturating_neg())));
                    }
                    RTM_NEWLINK => {
                        let Some(index) = u32_at(payload, 4) else {
                            continue;
                        };
                        let mut link = Link {
                            index,
                            name: String::new(),
                            mac: None,
                        };
                        for (t, d) in attrs(payload.get(16..).unwrap_or_default()) {
                            match t {
                                IFLA_IFNAME => {
                                    let d = d.split(|&b| b == 0).next().unwrap_or_default();
                                    link.name = String::from_utf8_lossy(d).into_owned();
                                }
                                IFLA_ADDRESS => link.mac = d.try_into().ok(),
                                _ => {}
                            }
                        }
                        links.push(link);
                    }
                    _ => {}
                }
            }
        }
        Err(e(io::Error::new(
            io::ErrorKind::InvalidData,
            "the link dump did not end",
        )))
    }

    fn set_link(
        &mut self,
        what: &str,
        index: u32,
        up: bool,
        mtu: Option<u32>,
        name: Option<&str>,
        address: Option<&[u8; 6]>,
    ) -> Result<(), Error> {
        self.request(what, |seq| {
            let flags = if up { IFF_UP } else { 0 };
            let mut m = Msg::new(
                RTM_NEWLINK,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                &ifinfomsg(index, flags, flags),
            );
            if let Some(mtu) = mtu {
                m = m.attr(IFLA_MTU, &mtu.to_ne_bytes());
            }
            if let Some(a) = address {
                m = m.attr(IFLA_ADDRESS, a);
            }
            if let Some(name) = name {
                let mut z = name.as_bytes().to_vec();
                z.push(0);
                m = m.attr(IFLA_IFNAME, &z);
            }
            m.finish()
        })
    }

    fn add_address(&mut self, index: u32, a: &Cidr) -> Result<(), Error> {
        let what = format!("adding address {}/{}", a.addr, a.prefix);
        self.request(&what, |seq| {
            let hdr = [family(&a.addr), a.prefix, IFA_F_NODAD, RT_SCOPE_UNIVERSE];
            let mut h = hdr.to_vec();
            h.extend_from_slice(&index.to_ne_bytes());
            let o = octets(&a.addr);
            let mut m = Msg::new(
                RTM_NEWADDR,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                seq,
                &h,
            )
            .attr(IFA_LOCAL, &o)
            .attr(IFA_ADDRESS, &o);
            if let Some(b) = a.broadcast() {
                m = m.attr(IFA_BROADCAST, &b.octets());
            }
            m.finish()
        })
    }

    fn add_route(&mut self, index: u32, r: &RoutePlan) -> Result<(), Error> {
        let what = match r.gateway {
            Some(g) => format!(
                "adding route {}/{} via {g}",
                r.destination.addr, r.destination.prefix
            ),
            None => format!(
                "adding route {}/{}",
                r.destination.addr, r.destination.prefix
            ),
        };
        self.request(&what, |seq| {
            let scope = if r.gateway.is_some() {
                RT_SCOPE_UNIVERSE
            } else {
                RT_SCOPE_LINK
            };
            let mut h = vec![
                family(&r.destination.addr),
                r.destination.prefix,
                0, // src_len
                0, // tos
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                scope,
                RTN_UNICAST,
            ];
            let flags = if r.onlink { RTNH_F_ONLINK } else { 0 };
            h.extend_from_slice(&flags.to_ne_bytes());
            let mut m = Msg::new(
                RTM_NEWROUTE,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                seq,
                &h,
            );
            if r.destination.prefix > 0 {
                m = m.attr(RTA_DST, &octets(&r.destination.addr));
            }
            if let Some(g) = &r.gateway {
                m = m.attr(RTA_GATEWAY, &octets(g));
            }
            m.attr(RTA_OIF, &index.to_ne_bytes()).finish()
        })
    }
}

/// Every link of the calling thread's network namespace.
pub fn links() -> Result<Vec<Link>, Error> {
    Rtnl::open()?.links()
}

/// Applies `plan` in the calling thread's network namespace: finds each interface (by MAC,
/// else by name), renames it when both are given, sets its MTU, brings `lo` and it up, adds
/// its addresses, then the routes. Returns the interface indexes, in plan order.
pub fn apply(plan: &Plan) -> Result<Vec<u32>, Error> {
    let mut nl = Rtnl::open()?;
    let links = nl.links()?;
    let have = || {
        links
            .iter()
            .map(|l| match &l.mac {
                Some(m) => format!("{} {}", l.name, fmt_mac(m)),
                None => l.name.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut indexes = Vec::new();
    let mut current_names = Vec::new();
    for i in &plan.interfaces {
        let link = match (&i.mac, &i.name) {
            (Some(mac), _) => links
                .iter()
                .find(|l| l.mac.as_ref() == Some(mac))
                .ok_or_else(|| {
                    Error::NoInterface(format!(
                        "no interface with MAC {} (have: {})",
                        fmt_mac(mac),
                        have()
                    ))
                })?,
            (None, Some(name)) => links.iter().find(|l| &l.name == name).ok_or_else(|| {
                Error::NoInterface(format!("no interface named {name} (have: {})", have()))
            })?,
            (None, None) => return Err(invalid("an interface has neither a MAC nor a name")),
        };
        indexes.push(link.index);
        current_names.push(link.name.clone());
    }
    if let Some(lo) = links.iter().find(|l| l.name == "lo") {
        nl.set_link("bringing lo up", lo.index, true, None, None, None)?;
    }
    for ((i, &index), cur) in plan.interfaces.iter().zip(&indexes).zip(&current_names) {
        let mut name = cur.clone();
        if let Some(new) = i.name.as_deref().filter(|n| *n != cur) {
            nl.set_link(
                &format!("renaming {cur} to {new}"),
                index,
                false,
                None,
                Some(new),
                None,
            )?;
            name = new.to_string();
        }
        if let Some(mtu) = i.mtu {
            nl.set_link(
                &format!("setting the MTU of {name} to {mtu}"),
                index,
                false,
                Some(mtu),
                None,
                None,
            )?;
        }
        if let Some(mac) = &i.set_mac {
            nl.set_link(
                &format!("setting the MAC address of {name} to {}", fmt_mac(mac)),
                index,
                false,
                None,
                None,
                Some(mac),
            )?;
        }
        nl.set_link(
            &format!("bringing {name} up"),
            index,
            true,
            None,
            None,
            None,
        )?;
        for a in &i.addresses {
            nl.add_address(index, a).map_err(|e| match e {
                Error::Netlink { what, source } => Error::Netlink {
                    what: format!("{what} to {name}"),
                    source,
                },
                e => e,
            })?;
        }
    }
    for r in &plan.routes {
        let Some(&index) = indexes.get(r.interface) else {
            return Err(invalid("a route names an interface that does not exist"));
        };
        nl.add_route(index, r)?;
    }
    Ok(indexes)
}

#[cfg(test)]
mod tests;
