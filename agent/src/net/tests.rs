#![allow(clippy::unwrap_used)]

use super::*;
use skiff_protocol::{HostEntry, NetInterface, NetRoute};

fn cfg() -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![NetInterface {
            mac: Some("52:54:00:AA:bb:cc".into()),
            name: Some("eth0".into()),
            addresses: vec!["10.0.2.15/24".into(), "fd00::2/64".into()],
            mtu: Some(1400),
            set_mac: None,
        }],
        routes: vec![
            NetRoute {
                destination: "0.0.0.0/0".into(),
                gateway: Some("10.0.2.2".into()),
            },
            NetRoute {
                destination: "::/0".into(),
                gateway: Some("fd00::1".into()),
            },
            // Outside every subnet of the only interface: on-link.
            NetRoute {
                destination: "172.16.0.0/16".into(),
                gateway: Some("10.9.9.9".into()),
            },
        ],
        dns: vec!["10.0.2.3".into(), "fd00::3".into()],
        search: vec!["example.org".into(), "corp.example".into()],
        hostname: Some("netbox".into()),
        hosts: vec![HostEntry {
            ip: "10.0.2.2".into(),
            names: vec!["host.skiff.internal".into(), "gw".into()],
        }],
    }
}

#[test]
fn cidrs() {
    let c = Cidr::parse("10.0.2.15/24").unwrap();
    assert_eq!(c.prefix, 24);
    assert!(c.contains("10.0.2.2".parse().unwrap()));
    assert!(!c.contains("10.0.3.2".parse().unwrap()));
    assert!(!c.contains("fd00::1".parse().unwrap()));
    assert!(!c.is_network());
    assert_eq!(c.broadcast(), Some(Ipv4Addr::new(10, 0, 2, 255)));
    assert!(Cidr::parse("0.0.0.0/0").unwrap().is_network());
    assert!(Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains("1.2.3.4".parse().unwrap()));
    assert!(Cidr::parse("10.0.0.1/32")
        .unwrap()
        .contains("10.0.0.1".parse().unwrap()));
    assert!(!Cidr::parse("10.0.0.1/32")
        .unwrap()
        .contains("10.0.0.2".parse().unwrap()));
    assert_eq!(Cidr::parse("10.0.0.1/31").unwrap().broadcast(), None);
    let v6 = Cidr::parse("fd00::2/64").unwrap();
    assert!(v6.contains("fd00::1".parse().unwrap()));
    assert!(!v6.contains("fd01::1".parse().unwrap()));
    assert!(Cidr::parse("::/0").unwrap().is_network());
    assert!(Cidr::parse("fd00::/128")
        .unwrap()
        .contains("fd00::".parse().unwrap()));
    assert_eq!(v6.broadcast(), None);
    for bad in [
        "10.0.2.15",
        "10.0.2.15/",
        "10.0.2.15/33",
        "10.0.2.15/+8",
        "10.0.2.15/-1",
        "10.0.2.15/0008",
        "fd00::/129",
        "10.0.2/24",
        "x/1",
        "/8",
        "10.0.2.15/24/1",
        "",
    ] {
        assert!(Cidr::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn macs_and_names() {
    assert_eq!(
        parse_mac("52:54:00:AA:bb:cc").unwrap(),
        [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]
    );
    for bad in [
        "",
        "52:54:00:aa:bb",
        "52:54:00:aa:bb:cc:dd",
        "52-54-00-aa-bb-cc",
        "5:54:00:aa:bb:cc",
        "52:54:00:aa:bb:cg",
        "52:54:00:aa:bb:+c",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad:?}");
    }
    assert!(valid_ifname("eth0") && valid_ifname("veth-1.2_x"));
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a b",
        "eth0:1",
        "abcdefghijklmnop",
        "é",
    ] {
        assert!(!valid_ifname(bad), "{bad:?}");
    }
    assert!(valid_hostname("box") && valid_hostname("a-b.example.org"));
    assert!(valid_hostname(&["a"; 32].join(".")[..63]));
    for bad in [
        "",
        "-a",
        "a-",
        "a..b",
        ".a",
        "a b",
        "a\nb",
        "a_b",
        &"a".repeat(65),
    ] {
        assert!(!valid_hostname(bad), "{bad:?}");
    }
    assert!(valid_domain("host.skiff.internal") && valid_domain("_srv.example"));
    for bad in [
        "",
        "-a",
        ".a",
        "a b",
        "a\tb",
        "a\nnameserver 1.2.3.4",
        "a#b",
        &"a".repeat(254),
    ] {
        assert!(!valid_domain(bad), "{bad:?}");
    }
}

#[test]
fn plan_parses_and_picks_interfaces() {
    let p = plan(&cfg()).unwrap();
    assert_eq!(p.interfaces[0].mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
    assert_eq!(p.interfaces[0].addresses.len(), 2);
    assert_eq!(p.routes[0].interface, 0);
    assert!(!p.routes[0].onlink);
    assert!(!p.routes[1].onlink);
    assert!(p.routes[2].onlink);
    // A link-local IPv6 gateway is reachable without the on-link flag.
    let mut c = cfg();
    c.routes = vec![NetRoute {
        destination: "::/0".into(),
        gateway: Some("fe80::1".into()),
    }];
    assert!(!plan(&c).unwrap().routes[0].onlink);
    // With two interfaces, a gateway outside both subnets is ambiguous.
    let mut c = cfg();
    c.interfaces.push(NetInterface {
        mac: Some("52:54:00:00:00:02".into()),
        name: None,
        addresses: vec!["192.168.1.2/24".into()],
        mtu: None,
        set_mac: None,
    });
    assert!(matches!(plan(&c), Err(Error::Invalid(_))));
    c.routes.truncate(2);
    let p = plan(&c).unwrap();
    assert_eq!(p.routes[0].interface, 0);
    c.routes.push(NetRoute {
        destination: "192.168.7.0/24".into(),
        gateway: Some("192.168.1.1".into()),
    });
    c.routes.push(NetRoute {
        destination: "192.168.1.0/24".into(),
        gateway: None,
    });
    let p = plan(&c).unwrap();
    assert_eq!(p.routes[2].interface, 1);
    assert_eq!(p.routes[3].interface, 1);
}

#[test]
fn plan_refuses_bad_input() {
    type Edit = Box<dyn Fn(&mut NetworkConfig)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("mac", Box::new(|c| c.interfaces[0].mac = Some("zz".into()))),
        (
            "name",
            Box::new(|c| c.interfaces[0].name = Some("a/b".into())),
        ),
        (
            "no mac nor name",
            Box::new(|c| {
                c.interfaces[0].mac = None;
                c.interfaces[0].name = None;
            }),
        ),
        (
            "address",
            Box::new(|c| c.interfaces[0].addresses[0] = "10.0.2.15".into()),
        ),
        ("mtu low", Box::new(|c| c.interfaces[0].mtu = Some(67))),
        ("mtu high", Box::new(|c| c.interfaces[0].mtu = Some(65536))),
        (
            "route dst",
            Box::new(|c| c.routes[0].destination = "default".into()),
        ),
        (
            "route host bits",
            Box::new(|c| c.routes[0].destination = "10.0.0.1/8".into()),
        ),
        (
            "gateway",
            Box::new(|c| c.routes[0].gateway = Some("10.0.2".into())),
        ),
        (
            "gateway family",
            Box::new(|c| c.routes[0].gateway = Some("fd00::1".into())),
        ),
        (
            "dns",
            Box::new(|c| c.dns[0] = "10.0.2.3\nnameserver 6.6.6.6".into()),
        ),
        ("search", Box::new(|c| c.search[0] = "a b".into())),
        ("hostname", Box::new(|c| c.hostname = Some("a\nb".into()))),
        ("hosts ip", Box::new(|c| c.hosts[0].ip = "localhost".into())),
        (
            "hosts name",
            Box::new(|c| c.hosts[0].names[0] = "a\tb".into()),
        ),
        ("hosts no names", Box::new(|c| c.hosts[0].names.clear())),
        (
            "duplicate mac",
            Box::new(|c| {
                let i = c.interfaces[0].clone();
                c.interfaces.push(NetInterface { name: None, ..i });
            }),
        ),
        (
            "too many addresses",
            Box::new(|c| {
                c.interfaces[0].addresses =
                    vec!["10.0.0.1/8".into(); skiff_protocol::MAX_NET_ADDRESSES + 1]
            }),
        ),
        (
            "too many interfaces",
            Box::new(|c| {
                c.interfaces = (0..=skiff_protocol::MAX_NET_INTERFACES)
                    .map(|n| NetInterface {
                        name: Some(format!("e{n}")),
                        ..NetInterface::default()
                    })
                    .collect();
                c.routes.clear();
            }),
        ),
    ];
    for (what, f) in cases {
        let mut c = cfg();
        f(&mut c);
        match plan(&c) {
            Err(Error::Invalid(m)) => assert!(!m.is_empty(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    assert!(plan(&NetworkConfig::default()).is_ok());
}

#[test]
fn generated_files() {
    let p = plan(&cfg()).unwrap();
    let f = Files::new(&p, Some("web"));
    assert_eq!(
        f.resolv_conf,
        "# Generated by skiff-agent from the host's settings.\n\
         nameserver 10.0.2.3\nnameserver fd00::3\nsearch example.org corp.example\n"
    );
    assert!(f
        .hosts
        .starts_with("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"));
    assert!(
        f.hosts.contains("\n10.0.2.15\tweb\nfd00::2\tweb\n"),
        "{}",
        f.hosts
    );
    assert!(f.hosts.ends_with("10.0.2.2\thost.skiff.internal gw\n"));
    assert_eq!(f.hostname.as_deref(), Some("web\n"));
    let none = Files::new(&p, None);
    assert!(!none.hosts.contains("web") && none.hostname.is_none());

    let dir = std::env::temp_dir().join(format!("skiff-net-files-{}", std::process::id()));
    let written = f.write(&dir).unwrap();
    assert_eq!(written.len(), 3);
    assert_eq!(
        std::fs::read_to_string(dir.join("hostname")).unwrap(),
        "web\n"
    );
    assert_eq!(written[0], (dir.join("resolv.conf"), "/etc/resolv.conf"));
    // Without a host name the stale hostname file goes away.
    assert_eq!(none.write(&dir).unwrap().len(), 2);
    assert!(!dir.join("hostname").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kernel_replies_are_walked_safely() {
    // Truncated, zero-length and overlong messages end the walk with an error, never a panic.
    let mut m = Msg::new(NLMSG_ERROR, 0, 7, &0i32.to_ne_bytes()).finish();
    assert_eq!(messages(&m).count(), 1);
    m[0] = 200;
    assert!(messages(&m).any(|r| r.is_err()));
    m[..4].copy_from_slice(&3u32.to_ne_bytes());
    assert!(messages(&m).any(|r| r.is_err()));
    for cut in 0..m.len() {
        let _ = messages(&m[..cut]).count();
    }
    let a = Msg::new(RTM_NEWLINK, 0, 1, &[])
        .attr(IFLA_IFNAME, b"eth0\0")
        .finish();
    let got: Vec<_> = attrs(&a[NLMSG_HDRLEN..]).collect();
    assert_eq!(got, vec![(IFLA_IFNAME, &b"eth0\0"[..])]);
    for cut in 0..a.len() {
        let _ = attrs(&a[NLMSG_HDRLEN..cut.max(NLMSG_HDRLEN)]).count();
    }
    assert_eq!(attrs(&[0, 0, 1, 0]).count(), 0);
}

/// Runs `f` on a thread of its own in a fresh network namespace (never the machine's own).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "the netlink tests must run as root (they create a network namespace)"
    );
    std::thread::spawn(move || {
        sys::unshare(libc::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .unwrap()
}

fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn configures_a_veth_in_a_private_namespace() {
    in_new_netns(|| {
        // The namespace is new: only lo, down.
        assert!(!ip(&["-o", "link", "show", "lo"]).contains(",UP"));
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["link", "set", "v0", "address", "52:54:00:aa:bb:cc"]);
        ip(&["link", "set", "v1", "up"]);
        let p = plan(&cfg()).unwrap();
        let idx = apply(&p).unwrap();
        assert_eq!(idx.len(), 1);
        let link = ip(&["-o", "link", "show", "eth0"]);
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(link.contains("52:54:00:aa:bb:cc"), "{link}");
        assert!(link.starts_with(&format!("{}: eth0", idx[0])), "{link}");
        assert!(ip(&["-o", "link", "show", "lo"]).contains(",UP"));
        let addrs = ip(&["-o", "addr", "show", "dev", "eth0"]);
        assert!(
            addrs.contains("inet 10.0.2.15/24 brd 10.0.2.255"),
            "{addrs}"
        );
        assert!(addrs.contains("inet6 fd00::2/64"), "{addrs}");
        // No duplicate address detection on the configured address: usable at once.
        let v6line = addrs.lines().find(|l| l.contains("fd00::2/64")).unwrap();
        assert!(!v6line.contains("tentative"), "{v6line}");
        let v4 = ip(&["route", "show"]);
        assert!(v4.contains("default via 10.0.2.2 dev eth0"), "{v4}");
        assert!(
            v4.contains("172.16.0.0/16 via 10.9.9.9 dev eth0 onlink"),
            "{v4}"
        );
        let v6 = ip(&["-6", "route", "show"]);
        assert!(v6.contains("default via fd00::1 dev eth0"), "{v6}");
        // Applying the same plan again replaces rather than failing with EEXIST.
        assert_eq!(apply(&p).unwrap(), idx);
        let links = links().unwrap();
        assert!(links
            .iter()
            .any(|l| l.name == "eth0" && l.mac == p.interfaces[0].mac));
        // Both addresses take a connection at once (no DAD wait; traffic stays inside this
        // namespace, over lo).
        for addr in ["10.0.2.15:0", "[fd00::2]:0"] {
            let l = std::net::TcpListener::bind(addr).unwrap();
            let to = l.local_addr().unwrap();
            let _c = std::net::TcpStream::connect(to).unwrap();
            l.accept().unwrap();
        }
    });
}

#[test]
fn a_restored_card_gets_the_runs_mac_before_it_comes_up() {
    in_new_netns(|| {
        // The card of a VM restored from a template still has the template's MAC.
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["link", "set", "v0", "address", "52:54:00:00:00:01"]);
        let mut c = cfg();
        c.interfaces[0].mac = Some("52:54:00:00:00:01".into());
        c.interfaces[0].set_mac = Some("52:54:00:ab:cd:ef".into());
        let idx = apply(&plan(&c).unwrap()).unwrap();
        let link = ip(&["-o", "link", "show", "eth0"]);
        assert!(link.contains("link/ether 52:54:00:ab:cd:ef"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(link.starts_with(&format!("{}: eth0", idx[0])), "{link}");
        // A multicast address is refused before anything is changed.
        c.interfaces[0].set_mac = Some("53:54:00:ab:cd:ef".into());
        assert!(matches!(plan(&c), Err(Error::Invalid(_))));
    });
}

#[test]
fn netlink_failures_name_what_failed() {
    in_new_netns(|| {
        let mut c = cfg();
        c.interfaces[0].mac = Some("52:54:00:00:00:99".into());
        match apply(&plan(&c).unwrap()) {
            Err(e @ Error::NoInterface(_)) => {
                let m = e.to_string();
                assert!(m.contains("52:54:00:00:00:99") && m.contains("lo"), "{m}");
                assert_eq!(e.errno(), libc::ENODEV);
            }
            other => panic!("{other:?}"),
        }
        // A route whose gateway the kernel cannot reach: the error names the route.
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        let c = NetworkConfig {
            interfaces: vec![NetInterface {
                name: Some("v0".into()),
                addresses: vec!["10.1.0.2/24".into()],
                ..NetInterface::default()
            }],
            routes: vec![NetRoute {
                destination: "10.2.0.0/16".into(),
                gateway: Some("10.1.0.1".into()),
            }],
            ..NetworkConfig::default()
        };
        let mut p = plan(&c).unwrap();
        // Point the route at 10.3.0.1 without the on-link flag: ENETUNREACH from the kernel.
        p.routes[0].gateway = Some("10.3.0.1".parse().unwrap());
        match apply(&p) {
            Err(e @ Error::Netlink { .. }) => {
                let m = e.to_string();
                assert!(m.contains("adding route 10.2.0.0/16 via 10.3.0.1"), "{m}");
                assert_ne!(e.errno(), libc::EIO);
            }
            other => panic!("{other:?}"),
        }
        // Found by name, configured.
        assert!(ip(&["-o", "addr", "show", "dev", "v0"]).contains("10.1.0.2/24"));
    });
}
