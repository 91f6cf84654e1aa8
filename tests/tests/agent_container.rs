//! The agent's container runtime, run directly on this host (as root): fresh namespaces, a
//! busybox rootfs, driven through the `skiff-protocol` Client over Unix sockets laid out like
//! Firecracker's hybrid vsock (`v.sock_1024` control, `v.sock_1025` streams).
//!
//! Needs root and Debian's static busybox (`busybox-static`; installed with apt-get when
//! missing; the test fails loudly when it cannot be).
#![allow(clippy::unwrap_used)]

use skiff_protocol::stream::StreamHub;
use skiff_protocol::{Client, ClientError, Event, OciSpec, Stdio, StreamKind};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn busybox() -> PathBuf {
    let p = PathBuf::from("/bin/busybox");
    let is_static = |p: &Path| {
        Command::new("file")
            .arg(p)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
            .unwrap_or(p.exists())
    };
    if !p.exists() || !is_static(&p) {
        eprintln!("agent_container: /bin/busybox (static) missing: installing busybox-static");
        let ok = Command::new("sh")
            .args([
                "-c",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y busybox-static \
                 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y busybox-static)",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok && p.exists() && is_static(&p),
            "\n\n*** agent_container: CANNOT INSTALL busybox-static (apt-get failed); these tests \
             need Debian's static /bin/busybox. Install it: apt-get install busybox-static ***\n"
        );
    }
    p
}

/// A busybox rootfs shared by all tests (read-only use; each container gets tmpfs /tmp).
fn rootfs() -> &'static Path {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        assert_eq!(
            euid(),
            0,
            "agent_container tests must run as root (namespaces, mounts, setuid)"
        );
        let bb = busybox();
        let root = skiff_tests::temp_dir("busybox-rootfs");
        for d in [
            "bin",
            "proc",
            "sys",
            "dev",
            "tmp",
            "etc",
            "root",
            "home/user",
            "work dir",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(&bb, root.join("bin/busybox")).unwrap();
        let list = Command::new(&bb).arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
            }
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
        std::fs::write(root.join("notexec"), "#!/bin/sh\necho should not run\n").unwrap();
        std::fs::set_permissions(root.join("notexec"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        root
    })
}

fn euid() -> u32 {
    // /proc/self/status "Uid:" line: real, effective, ...
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// One agent (serving on its own thread) and the host side talking to it.
struct Harness {
    client: Client<UnixStream>,
    hub: StreamHub<UnixStream>,
}

fn harness() -> Harness {
    harness_with(|| {})
}

/// A harness whose agent serves from a thread that first runs `setup` (e.g. entering a
/// network namespace of its own: every thread and process the agent starts inherits it).
fn harness_with(setup: impl FnOnce() + Send + 'static) -> Harness {
    let _ = rootfs();
    let dir = skiff_tests::temp_dir("agent");
    let control = UnixListener::bind(dir.join("v.sock_1024")).unwrap();
    let streams = UnixListener::bind(dir.join("v.sock_1025")).unwrap();
    let hub = StreamHub::new();
    hub.accept_loop(move || streams.accept().map(|(s, _)| s));
    let d2 = dir.clone();
    std::thread::spawn(move || {
        setup();
        let net_dir = d2.join("net");
        let conn = UnixStream::connect(d2.join("v.sock_1024")).unwrap();
        let dialer =
            Box::new(move |port: u32| UnixStream::connect(d2.join(format!("v.sock_{port}"))));
        let config = skiff_agent::Config {
            cgroup_root: None,
            reap_all: false,
            net_dir,
        };
        skiff_agent::serve_connection(conn, dialer, config, vec![("test".into(), 1)])
    });
    let (conn, _) = control.accept().unwrap();
    let (client, hello) = Client::from_stream(conn).unwrap();
    assert_eq!(hello.protocol_version, skiff_protocol::PROTOCOL_VERSION);
    assert_eq!(hello.boot_stamps, vec![("test".to_string(), 1)]);
    Harness { client, hub }
}

fn new_id() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "c{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A runc-like default spec (namespaces, mounts, default capabilities) running `args`.
fn spec(args: &[&str], tweak: impl FnOnce(&mut serde_json::Value)) -> OciSpec {
    let caps = serde_json::json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    let mut v = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "skiffbox",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "cwd": "/",
            "noNewPrivileges": true,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys"]
        }
    });
    tweak(&mut v);
    serde_json::from_value(v).unwrap()
}

struct Run {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: i32,
}

fn reader(mut s: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    })
}

impl Harness {
    /// Creates, starts and waits for a container; `stdin` is written then half-closed.
    fn run(&self, spec: OciSpec, stdin: Option<&[u8]>) -> Run {
        let id = new_id();
        self.client
            .create_container(
                &id,
                spec,
                rootfs().to_str().unwrap(),
                false,
                Stdio {
                    stdin: stdin.is_some(),
                },
            )
            .unwrap();
        let out = reader(self.hub.take(&id, "", StreamKind::Stdout, T).unwrap());
        let err = reader(self.hub.take(&id, "", StreamKind::Stderr, T).unwrap());
        let feeder = stdin.map(|data| {
            let mut s = self.hub.take(&id, "", StreamKind::Stdin, T).unwrap();
            let data = data.to_vec();
            std::thread::spawn(move || {
                s.write_all(&data).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            })
        });
        self.client.start(&id, None).unwrap();
        let status = self.client.wait(&id, None).unwrap();
        // Wait answers only after the output streams are drained and shut down: the readers
        // have hit EOF already (join would hang otherwise).
        let run = Run {
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
            status,
        };
        if let Some(f) = feeder {
            f.join().unwrap();
        }
        self.client.delete(&id, None).unwrap();
        run
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn echo_hi_byte_exact() {
    let h = harness();
    let r = h.run(spec(&["echo", "hi"], |_| {}), None);
    assert_eq!(r.stdout, b"hi\n", "stderr: {}", text(&r.stderr));
    assert_eq!(r.stderr, b"");
    assert_eq!(r.status, 0);
}

#[test]
fn stdout_and_stderr_are_separate() {
    let h = harness();
    let r = h.run(
        spec(&["sh", "-c", "echo out; echo err >&2; echo out2"], |_| {}),
        None,
    );
    assert_eq!(text(&r.stdout), "out\nout2\n");
    assert_eq!(text(&r.stderr), "err\n");
}

#[test]
fn exit_codes() {
    let h = harness();
    assert_eq!(h.run(spec(&["true"], |_| {}), None).status, 0);
    assert_eq!(h.run(spec(&["false"], |_| {}), None).status, 1);
    assert_eq!(
        h.run(spec(&["sh", "-c", "exit 42"], |_| {}), None).status,
        42
    );
}

#[test]
fn killed_by_signal_is_128_plus_signal() {
    let h = harness();
    // The container's PID 1 ignores signals without handlers from inside its namespace, so
    // signal a child shell from itself: sh's child is not PID 1.
    let r = h.run(
        spec(&["sh", "-c", "sh -c 'kill -9 $$'; exit $?"], |_| {}),
        None,
    );
    assert_eq!(r.status, 137);
    // SIGKILL from the host (Signal request) to a sleeping init.
    let id = new_id();
    h.client
        .create_container(
            &id,
            spec(&["sleep", "100"], |_| {}),
            rootfs().to_str().unwrap(),
            false,
            Stdio::default(),
        )
        .unwrap();
    let out = reader(h.hub.take(&id, "", StreamKind::Stdout, T).unwrap());
    let pid = h.client.start(&id, None).unwrap();
    assert!(h.client.pids(&id).unwrap().contains(&pid));
    let events = h.client.take_events().unwrap();
    h.client.signal(&id, None, 9, false).unwrap();
    assert_eq!(h.client.wait(&id, None).unwrap(), 137);
    // Earlier containers of this agent sent their Exit events too: find ours.
    loop {
        let Event::Exit {
            id: eid, status, ..
        } = events.recv_timeout(T).unwrap()
        else {
            continue;
        };
        if eid == id {
            assert_eq!(status, 137);
            break;
        }
    }
    assert_eq!(out.join().unwrap(), b"");
    h.client.delete(&id, None).unwrap();
    assert!(matches!(h.client.wait(&id, None), Err(ClientError::Agent(e)) if e.code == 2));
}

#[test]
fn env_cwd_hostname_rlimits_capabilities() {
    let h = harness();
    let r = h.run(
        spec(
            &["sh", "-c", "echo $FOO; pwd; hostname; ulimit -n; grep -E '^Cap(Bnd|Eff)' /proc/self/status; grep NoNewPrivs /proc/self/status"],
            |v| {
                v["process"]["env"].as_array_mut().unwrap().push("FOO=bar baz".into());
                v["process"]["cwd"] = "/work dir".into();
            },
        ),
        None,
    );
    assert_eq!(r.status, 0, "stderr: {}", text(&r.stderr));
    assert_eq!(
        text(&r.stdout),
        "bar baz\n/work dir\nskiffbox\n1024\nCapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\nNoNewPrivs:\t1\n"
    );
}

#[test]
fn uid_gid_and_groups() {
    let h = harness();
    let r = h.run(
        spec(
            &[
                "sh",
                "-c",
                "id -u; id -g; id -G; grep CapEff /proc/self/status",
            ],
            |v| {
                v["process"]["user"] =
                    serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [1000, 2000]});
            },
        ),
        None,
    );
    assert_eq!(r.status, 0, "stderr: {}", text(&r.stderr));
    // A non-root user keeps no effective capabilities across exec (no ambient set).
    assert_eq!(
        text(&r.stdout),
        "1000\n1000\n1000 2000\nCapEff:\t0000000000000000\n"
    );
}

#[test]
fn stdin_to_cat_with_eof() {
    let h = harness();
    let input = b"line one\nline two\n\x00binary\xff\n".repeat(1000);
    let r = h.run(spec(&["cat"], |_| {}), Some(&input));
    assert_eq!(r.status, 0);
    assert_eq!(r.stdout, input);
}

#[test]
fn ten_mib_then_immediate_exit_loses_nothing() {
    let h = harness();
    // Random data, its checksum on stderr, then the data on stdout and exit at once.
    let r = h.run(
        spec(
            &[
                "sh",
                "-c",
                "head -c 10485760 /dev/urandom > /tmp/d; sha256sum /tmp/d >&2; cat /tmp/d",
            ],
            |_| {},
        ),
        None,
    );
    assert_eq!(r.status, 0, "stderr: {}", text(&r.stderr));
    assert_eq!(r.stdout.len(), 10 << 20);
    let f = skiff_tests::temp_dir("10mib").join("d");
    std::fs::write(&f, &r.stdout).unwrap();
    let ours = Command::new("sha256sum").arg(&f).output().unwrap();
    let ours = text(&ours.stdout);
    let theirs = text(&r.stderr);
    assert_eq!(
        ours.split_whitespace().next(),
        theirs.split_whitespace().next(),
        "checksum mismatch"
    );
}

#[test]
fn missing_binary_is_127_and_not_executable_is_126() {
    let h = harness();
    let r = h.run(spec(&["no-such-program"], |_| {}), None);
    assert_eq!(r.status, 127);
    assert!(
        text(&r.stderr).contains("executable file not found in $PATH"),
        "{}",
        text(&r.stderr)
    );
    let r = h.run(spec(&["/no/such/path"], |_| {}), None);
    assert_eq!(r.status, 127);
    let r = h.run(spec(&["/notexec"], |_| {}), None);
    assert_eq!(r.status, 126);
    assert!(
        text(&r.stderr).contains("ermission denied"),
        "{}",
        text(&r.stderr)
    );
}

#[test]
fn exec_pty_resize_and_errors() {
    let h = harness();
    let id = new_id();
    h.client
        .create_container(
            &id,
            spec(&["sleep", "100"], |_| {}),
            rootfs().to_str().unwrap(),
            false,
            Stdio::default(),
        )
        .unwrap();
    let _out = reader(h.hub.take(&id, "", StreamKind::Stdout, T).unwrap());
    let _err = reader(h.hub.take(&id, "", StreamKind::Stderr, T).unwrap());
    h.client.start(&id, None).unwrap();
    // An exec in the container's namespaces sees its hostname and PID 1.
    let mut p = spec(
        &[
            "sh",
            "-c",
            "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo",
        ],
        |_| {},
    )
    .process()
    .clone()
    .unwrap();
    h.client
        .exec(&id, "e1", p.clone(), Stdio::default())
        .unwrap();
    let out = reader(h.hub.take(&id, "e1", StreamKind::Stdout, T).unwrap());
    let err = reader(h.hub.take(&id, "e1", StreamKind::Stderr, T).unwrap());
    h.client.start(&id, Some("e1")).unwrap();
    assert_eq!(h.client.wait(&id, Some("e1")).unwrap(), 0);
    assert_eq!(
        text(&out.join().unwrap()),
        "skiffbox\nsleep 100 \n",
        "{}",
        text(&err.join().unwrap())
    );
    h.client.delete(&id, Some("e1")).unwrap();
    // A terminal exec: resize before start, the process sees the size.
    p.set_terminal(Some(true));
    p.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "stty size; exit 7".into(),
    ]));
    h.client.exec(&id, "t1", p, Stdio { stdin: true }).unwrap();
    let pty = reader(h.hub.take(&id, "t1", StreamKind::Pty, T).unwrap());
    let _stdin = h.hub.take(&id, "t1", StreamKind::Stdin, T).unwrap();
    h.client.resize_pty(&id, Some("t1"), 30, 100).unwrap();
    h.client.start(&id, Some("t1")).unwrap();
    assert_eq!(h.client.wait(&id, Some("t1")).unwrap(), 7);
    assert_eq!(text(&pty.join().unwrap()), "30 100\r\n");
    // Errors: duplicate id, deleting a running container, unknown container.
    let dup = h.client.create_container(
        &id,
        spec(&["true"], |_| {}),
        rootfs().to_str().unwrap(),
        false,
        Stdio::default(),
    );
    assert!(matches!(dup, Err(ClientError::Agent(e)) if e.code == 17));
    assert!(matches!(h.client.delete(&id, None), Err(ClientError::Agent(e)) if e.code == 16));
    assert!(matches!(h.client.pids("nope"), Err(ClientError::Agent(e)) if e.code == 2));
    let stats = h.client.stats(&id).unwrap(); // no cgroup v2 here: empty figures
    assert_eq!(stats, skiff_protocol::Stats::default());
    h.client.signal(&id, None, 9, true).unwrap();
    assert_eq!(h.client.wait(&id, None).unwrap(), 137);
    h.client.delete(&id, None).unwrap();
    // A bad rootfs is a Create error, not a hang.
    let bad = h.client.create_container(
        &new_id(),
        spec(&["true"], |_| {}),
        "/nonexistent-rootfs",
        false,
        Stdio::default(),
    );
    assert!(matches!(bad, Err(ClientError::Agent(e)) if e.code == 2));
    // A setup failure in the child (bind source missing) is reported with its message.
    let bad = h.client.create_container(
        &new_id(),
        spec(&["true"], |v| {
            v["mounts"].as_array_mut().unwrap().push(serde_json::json!(
                {"destination": "/data", "type": "bind", "source": "/nonexistent-src", "options": ["rbind", "ro"]}));
        }),
        rootfs().to_str().unwrap(),
        false,
        Stdio::default(),
    );
    match bad {
        Err(ClientError::Agent(e)) => assert!(e.message.contains("nonexistent-src"), "{e}"),
        other => panic!("{other:?}"),
    }
    h.client.shutdown().unwrap();
}

#[test]
fn read_only_bind_mount() {
    let h = harness();
    let src = skiff_tests::temp_dir("bind");
    std::fs::write(src.join("f"), "from host\n").unwrap();
    let r = h.run(
        spec(&["sh", "-c", "cat /data/f; touch /data/g && echo writable"], |v| {
            v["mounts"].as_array_mut().unwrap().push(serde_json::json!(
                {"destination": "/data", "type": "bind", "source": src, "options": ["rbind", "ro"]}));
        }),
        None,
    );
    assert_eq!(text(&r.stdout), "from host\n");
    assert!(text(&r.stderr).contains("Read-only"), "{}", text(&r.stderr));
    assert_eq!(r.status, 1);
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// ConfigureNetwork, then containers: the interface found by MAC is configured in the
/// agent's (here: a private) network namespace, which a container shares even when its spec
/// asks for a new one; `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` are the agent's,
/// bind-mounted, except where the spec mounts its own.
#[test]
fn configured_network_and_its_files_reach_the_container() {
    let h = harness_with(|| {
        skiff_agent::sys::unshare(libc::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["link", "set", "v0", "address", "52:54:00:12:34:56"]);
        ip(&["link", "set", "v1", "up"]);
    });
    let cfg: skiff_protocol::NetworkConfig = serde_json::from_value(serde_json::json!({
        "interfaces": [{"mac": "52:54:00:12:34:56", "name": "eth0",
                        "addresses": ["10.0.2.15/24"], "mtu": 1500}],
        "routes": [{"destination": "0.0.0.0/0", "gateway": "10.0.2.2"}],
        "dns": ["10.0.2.3"],
        "search": ["example.org"],
        "hostname": "vmhost",
        "hosts": [{"ip": "10.0.2.2", "names": ["host.skiff.internal"]}]
    }))
    .unwrap();
    // Bad input is refused whole, before anything is applied.
    let mut bad = cfg.clone();
    bad.interfaces[0].addresses[0] = "10.0.2.15".into();
    assert!(matches!(h.client.configure_network(&bad),
        Err(ClientError::Agent(e)) if e.code == libc::EINVAL && e.message.contains("10.0.2.15")));
    let mut absent = cfg.clone();
    absent.interfaces[0].mac = Some("52:54:00:00:00:01".into());
    assert!(matches!(h.client.configure_network(&absent),
        Err(ClientError::Agent(e)) if e.code == libc::ENODEV));
    h.client.configure_network(&cfg).unwrap();

    let script = "cat /etc/resolv.conf; echo --; cat /etc/hostname; echo --; \
                  grep -v ip6 /etc/hosts; echo --; hostname; ip -o -4 addr show dev eth0; \
                  ip route";
    let r = h.run(
        spec(&["sh", "-c", script], |v| {
            // Asked for a new network namespace: it shares the configured one instead.
            v["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"type": "network"}));
        }),
        None,
    );
    assert_eq!(r.status, 0, "stderr: {}", text(&r.stderr));
    let out = text(&r.stdout);
    let mut parts = out.split("--\n");
    assert_eq!(
        parts.next().unwrap(),
        "# Generated by skiff-agent from the host's settings.\nnameserver 10.0.2.3\nsearch example.org\n"
    );
    // The spec's host name wins over the configuration's.
    assert_eq!(parts.next().unwrap(), "skiffbox\n");
    assert_eq!(
        parts.next().unwrap(),
        "127.0.0.1\tlocalhost\n10.0.2.15\tskiffbox\n10.0.2.2\thost.skiff.internal\n"
    );
    let rest = parts.next().unwrap();
    assert!(rest.starts_with("skiffbox\n"), "{rest}");
    assert!(rest.contains("inet 10.0.2.15/24"), "{rest}");
    assert!(rest.contains("default via 10.0.2.2 dev eth0"), "{rest}");

    // A spec without a host name gets the configuration's; a spec mount at /etc/hosts stays.
    let own_hosts = rootfs().join("etc/group");
    let r = h.run(
        spec(
            &["sh", "-c", "hostname; cat /etc/hostname /etc/hosts"],
            |v| {
                v.as_object_mut().unwrap().remove("hostname");
                v["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                    "destination": "/etc/hosts", "type": "bind",
                    "source": own_hosts, "options": ["rbind", "ro"]
                }));
            },
        ),
        None,
    );
    assert_eq!(r.status, 0, "stderr: {}", text(&r.stderr));
    assert_eq!(
        text(&r.stdout),
        format!(
            "vmhost\nvmhost\n{}",
            std::fs::read_to_string(&own_hosts).unwrap()
        )
    );
}
