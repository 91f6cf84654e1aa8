#![allow(clippy::unwrap_used)]

use super::*;
use std::io::Cursor;
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn spec() -> OciSpec {
    OciSpec::default()
}

fn network() -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![NetInterface {
            mac: Some("52:54:00:12:34:56".into()),
            name: Some("eth0".into()),
            addresses: vec!["10.0.2.15/24".into(), "fd00::2/64".into()],
            mtu: Some(65520),
            set_mac: Some("52:54:00:12:34:57".into()),
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
        ],
        dns: vec!["10.0.2.3".into()],
        search: vec!["example.org".into()],
        hostname: Some("box".into()),
        hosts: vec![HostEntry {
            ip: "10.0.2.2".into(),
            names: vec!["host.skiff.internal".into()],
        }],
    }
}

fn all_messages() -> Vec<Message> {
    let req = |request| Message::Request { id: 7, request };
    vec![
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            boot_stamps: vec![("agent_start".into(), 123_456)],
        }),
        req(Request::CreateContainer {
            id: "c1".into(),
            spec: Box::new(spec()),
            rootfs: "/run/c1/rootfs".into(),
            terminal: false,
            stdio: Stdio { stdin: true },
            check_entrypoint: true,
        }),
        req(Request::Start {
            id: "c1".into(),
            exec_id: None,
        }),
        req(Request::Exec {
            container: "c1".into(),
            exec_id: "e1".into(),
            process: Box::new(OciProcess::default()),
            stdio: Stdio::default(),
        }),
        req(Request::Signal {
            id: "c1".into(),
            exec_id: Some("e1".into()),
            signal: 9,
            all: true,
        }),
        req(Request::ResizePty {
            id: "c1".into(),
            exec_id: None,
            rows: 40,
            cols: 120,
        }),
        req(Request::CloseStdin {
            id: "c1".into(),
            exec_id: None,
        }),
        req(Request::Wait {
            id: "c1".into(),
            exec_id: None,
        }),
        req(Request::Delete {
            id: "c1".into(),
            exec_id: None,
        }),
        req(Request::Pids { id: "c1".into() }),
        req(Request::Stats { id: "c1".into() }),
        req(Request::ConfigureNetwork(network())),
        req(Request::ConfigureNetwork(NetworkConfig::default())),
        req(Request::Shutdown),
        Message::Response {
            id: 7,
            result: Ok(Response::Exited { status: 137 }),
        },
        Message::Response {
            id: 8,
            result: Ok(Response::Stats(Stats {
                memory_current: Some(1),
                ..Stats::default()
            })),
        },
        Message::Response {
            id: 9,
            result: Ok(Response::Pids { pids: vec![1, 2] }),
        },
        Message::Response {
            id: 10,
            result: Err(ErrorReply::new(2, "no such container")),
        },
        Message::Event(Event::Exit {
            id: "c1".into(),
            exec_id: None,
            pid: 4,
            status: 0,
        }),
    ]
}

#[test]
fn round_trip_every_message() {
    for m in all_messages() {
        let buf = encode(&m).unwrap();
        let (back, used) = decode(&buf).unwrap();
        assert_eq!(back, m);
        assert_eq!(used, buf.len());
        let back2 = read_message(&mut Cursor::new(&buf)).unwrap();
        assert_eq!(back2, m);
    }
}

#[test]
fn truncated_frames_are_errors() {
    for m in all_messages() {
        let buf = encode(&m).unwrap();
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut]).is_err(), "cut {cut}");
            let r = read_message(&mut Cursor::new(&buf[..cut]));
            match (cut, r) {
                (0, Err(FrameError::Eof)) => {}
                (0, other) => panic!("empty input: {other:?}"),
                (_, Err(FrameError::Malformed(_))) => {}
                (_, other) => panic!("cut {cut}: {other:?}"),
            }
        }
    }
}

#[test]
fn oversized_frames_are_refused_before_allocation() {
    let mut buf = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    buf.extend_from_slice(b"{}");
    assert!(matches!(decode(&buf), Err(FrameError::TooLarge(_))));
    assert!(matches!(
        read_message(&mut Cursor::new(&buf)),
        Err(FrameError::TooLarge(_))
    ));
    let buf = u32::MAX.to_be_bytes();
    assert!(matches!(
        read_message(&mut Cursor::new(&buf)),
        Err(FrameError::TooLarge(_))
    ));
    // A huge message cannot be encoded either.
    let big = Message::Response {
        id: 1,
        result: Err(ErrorReply::new(1, "x".repeat(MAX_FRAME))),
    };
    assert!(matches!(encode(&big), Err(FrameError::TooLarge(_))));
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let bodies: &[&[u8]] = &[
        b"",
        b"{",
        b"null",
        b"[]",
        b"\"hello\"",
        b"{\"hello\":1}",
        b"{\"request\":{\"id\":-1,\"request\":\"shutdown\"}}",
        b"{\"request\":{\"id\":1,\"request\":{\"pids\":{\"id\":\"../etc\"}}}}",
        b"{\"request\":{\"id\":1,\"request\":{\"wait\":{\"id\":\"c\",\"exec_id\":\"a/b\"}}}}",
        b"\xff\xfe\x00",
        &[b'['; 10_000],
    ];
    for b in bodies {
        let mut f = (b.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(b);
        assert!(decode(&f).is_err(), "{:?}", String::from_utf8_lossy(b));
    }
    // Pseudo-random bytes.
    let mut x: u64 = 0x1234_5678_9abc_def0;
    for _ in 0..2000 {
        let len = (x % 300) as usize;
        let mut v = Vec::with_capacity(len + 4);
        v.extend_from_slice(&(len as u32).to_be_bytes());
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        let _ = decode(&v);
        let _ = read_message(&mut Cursor::new(&v));
    }
}

#[test]
fn ids_are_validated() {
    assert!(valid_id("abc-1.2_3"));
    for bad in ["", ".", "..", "a/b", "a b", "a\n", &"x".repeat(65)] {
        assert!(!valid_id(bad), "{bad:?}");
    }
    assert!(valid_exec_id(""));
}

#[test]
fn network_config_counts_and_lengths_are_bounded() {
    let frame = |n: NetworkConfig| {
        let m = Message::Request {
            id: 1,
            request: Request::ConfigureNetwork(n),
        };
        decode(&encode(&m).unwrap()).map(|(m, _)| m)
    };
    assert!(frame(network()).is_ok());
    let mut n = network();
    n.interfaces[0].addresses = vec!["10.0.0.1/8".into(); MAX_NET_ADDRESSES + 1];
    assert!(matches!(frame(n), Err(FrameError::Malformed(_))));
    let mut n = network();
    n.interfaces = vec![NetInterface::default(); MAX_NET_INTERFACES + 1];
    assert!(frame(n).is_err());
    let mut n = network();
    n.routes = vec![NetRoute::default(); MAX_NET_ROUTES + 1];
    assert!(frame(n).is_err());
    let mut n = network();
    n.dns = vec!["1.1.1.1".into(); MAX_NET_DNS + 1];
    assert!(frame(n).is_err());
    let mut n = network();
    n.search = vec!["a".into(); MAX_NET_SEARCH + 1];
    assert!(frame(n).is_err());
    let mut n = network();
    n.hosts = vec![HostEntry::default(); MAX_NET_HOSTS + 1];
    assert!(frame(n).is_err());
    let mut n = network();
    n.hosts[0].names = vec!["a".into(); MAX_NET_HOST_NAMES + 1];
    assert!(frame(n).is_err());
    let mut n = network();
    n.hostname = Some("h".repeat(MAX_NET_STRING + 1));
    assert!(frame(n).is_err());
    let mut n = network();
    n.routes[0].gateway = Some("g".repeat(MAX_NET_STRING + 1));
    assert!(frame(n).is_err());
    // Missing optional fields decode to their defaults.
    let body = br#"{"request":{"id":3,"request":{"configure_network":{}}}}"#;
    assert_eq!(
        decode_body(body).unwrap(),
        Message::Request {
            id: 3,
            request: Request::ConfigureNetwork(NetworkConfig::default())
        }
    );
}

#[test]
fn exit_status_conventions() {
    assert_eq!(exit_status_from_wait(0), 0);
    assert_eq!(exit_status_from_wait(42 << 8), 42);
    assert_eq!(exit_status_from_wait(9), 137);
    assert_eq!(exit_status_from_wait(15 | 0x80), 143); // core dumped flag
}

#[test]
fn stream_headers() {
    let h = StreamHeader::new("c1", "", StreamKind::Stdout);
    let mut v = Vec::new();
    h.write_to(&mut v).unwrap();
    v.extend_from_slice(b"payload");
    assert_eq!(&v[..18], b"STREAM c1/ stdout\n");
    let mut c = Cursor::new(v);
    assert_eq!(StreamHeader::read_from(&mut c).unwrap(), h);
    let mut rest = String::new();
    c.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "payload");
    for bad in [
        &b"STREAM c1/ stdout"[..],
        b"STREAM c1 stdout\n",
        b"STREAM ../x/ stdout\n",
        b"STREAM c1/e1 stdfoo\n",
        b"GET / HTTP/1.1\n",
        &[b'A'; 1000],
    ] {
        assert!(StreamHeader::read_from(&mut Cursor::new(bad)).is_err());
    }
    assert_eq!(
        StreamHeader::parse("STREAM c/e pty").unwrap().kind,
        StreamKind::Pty
    );
}

struct Echo;

impl Handler for Echo {
    fn handle(&self, request: Request, reply: Replier) {
        match request {
            Request::Wait { .. } => {
                // Answer later from another thread, after an event.
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    reply.outbox().event(Event::Exit {
                        id: "c1".into(),
                        exec_id: None,
                        pid: 5,
                        status: 3,
                    });
                    reply.send(Ok(Response::Exited { status: 3 }));
                });
            }
            Request::Pids { .. } => reply.send(Ok(Response::Pids { pids: vec![5] })),
            Request::ConfigureNetwork(n) if n == network() => reply.send(Ok(Response::Ok)),
            _ => reply.send(Err(ErrorReply::new(38, "not implemented"))),
        }
    }
}

#[test]
fn client_and_serve_over_a_socketpair() {
    let (host, agent) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let w = agent.try_clone().unwrap();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "t".into(),
            boot_stamps: vec![],
        };
        serve(agent, w, hello, &Echo).unwrap()
    });
    let (client, hello) = Client::from_stream(host.try_clone().unwrap()).unwrap();
    assert_eq!(hello.agent_version, "t");
    let events = client.take_events().unwrap();
    let client = std::sync::Arc::new(client);
    let c2 = client.clone();
    let waiter = std::thread::spawn(move || c2.wait("c1", None).unwrap());
    // Other requests go through while Wait is pending.
    assert_eq!(client.pids("c1").unwrap(), vec![5]);
    match client.start("c1", None) {
        Err(ClientError::Agent(e)) => assert_eq!(e.code, 38),
        other => panic!("{other:?}"),
    }
    assert_eq!(waiter.join().unwrap(), 3);
    client.configure_network(&network()).unwrap();
    assert!(matches!(
        events.recv().unwrap(),
        Event::Exit { status: 3, .. }
    ));
    // Undecodable request with a recoverable id gets an error reply.
    let body = br#"{"request":{"id":99,"request":{"pids":{"id":"a/b"}}}}"#;
    let mut raw = host.try_clone().unwrap();
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    std::io::Write::write_all(&mut raw, &f).unwrap();
    client.shutdown().unwrap();
    assert_eq!(server.join().unwrap(), ServeEnd::Shutdown);
    // The agent is gone: calls fail instead of hanging.
    drop(raw);
    drop(host);
    assert!(client.pids("c1").is_err());
}

/// A handler whose `before_shutdown` takes a while and records when it ended.
struct SlowFlush(std::sync::Mutex<Option<std::time::Instant>>);

impl Handler for SlowFlush {
    fn handle(&self, _request: Request, reply: Replier) {
        reply.send(Err(ErrorReply::new(38, "not implemented")));
    }

    fn before_shutdown(&self) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        *self.0.lock().unwrap() = Some(std::time::Instant::now());
    }
}

#[test]
fn shutdown_is_answered_after_before_shutdown_ran() {
    let (host, agent) = UnixStream::pair().unwrap();
    let flushed = std::sync::Arc::new(SlowFlush(std::sync::Mutex::new(None)));
    let h = flushed.clone();
    let server = std::thread::spawn(move || {
        let w = agent.try_clone().unwrap();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "t".into(),
            boot_stamps: vec![],
        };
        serve(agent, w, hello, &*h).unwrap()
    });
    let (client, _) = Client::from_stream(host).unwrap();
    client.shutdown().unwrap();
    let answered = std::time::Instant::now();
    let done = flushed
        .0
        .lock()
        .unwrap()
        .expect("before_shutdown ran before the answer");
    assert!(done <= answered);
    assert_eq!(server.join().unwrap(), ServeEnd::Shutdown);
}

fn hello_frame() -> Vec<u8> {
    encode(&Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "silent".into(),
        boot_stamps: vec![],
    }))
    .unwrap()
}

#[test]
fn an_agent_that_never_says_hello_times_out() {
    let (host, _agent) = UnixStream::pair().unwrap();
    let t0 = std::time::Instant::now();
    let r = Client::from_stream_timeout(host, Duration::from_millis(200));
    assert!(matches!(r, Err(ClientError::TimedOut)), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn every_request_but_wait_has_a_deadline() {
    let (host, mut agent) = UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut agent, &hello_frame()).unwrap();
    let (client, _) = Client::from_stream(host).unwrap();
    // The reader thread must not inherit the Hello's read bound: the agent may be quiet.
    std::thread::sleep(Duration::from_millis(300));
    client.set_call_timeout(Duration::from_millis(200));
    let t0 = std::time::Instant::now();
    assert!(matches!(client.pids("c1"), Err(ClientError::TimedOut)));
    assert!(matches!(
        client.start("c1", None),
        Err(ClientError::TimedOut)
    ));
    assert!(matches!(
        client.mount_share("t", "/mnt", false),
        Err(ClientError::TimedOut)
    ));
    assert!(matches!(client.shutdown(), Err(ClientError::TimedOut)));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // A late answer to a timed-out call is dropped; the connection still works.
    let mut r = agent.try_clone().unwrap();
    let answer = std::thread::spawn(move || {
        // Skip the four requests above, answer the fifth (Pids).
        for _ in 0..4 {
            read_message(&mut r).unwrap();
        }
        match read_message(&mut r).unwrap() {
            Message::Request { id, .. } => {
                write_message(
                    &mut agent,
                    &Message::Response {
                        id,
                        result: Ok(Response::Pids { pids: vec![9] }),
                    },
                )
                .unwrap();
            }
            other => panic!("{other:?}"),
        }
        agent
    });
    client.set_call_timeout(Duration::from_secs(10));
    assert_eq!(client.pids("c1").unwrap(), vec![9]);
    drop(answer.join().unwrap());
}

#[test]
fn a_guest_that_stops_reading_cannot_hold_the_writer() {
    let (host, mut agent) = UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut agent, &hello_frame()).unwrap();
    let (client, _) = Client::from_stream(host.try_clone().unwrap()).unwrap();
    // Shorter than WRITE_TIMEOUT for the test (the bound is the socket's, shared by clones).
    host.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    client.set_call_timeout(Duration::from_millis(100));
    // The agent never reads: requests of ~512 KiB fill the socket buffer.
    let mut process = OciProcess::default();
    process.set_env(Some(vec!["X".repeat(512 * 1024)]));
    let client = std::sync::Arc::new(client);
    let t0 = std::time::Instant::now();
    let mut errors = Vec::new();
    for i in 0..64 {
        let r = client.exec("c1", &format!("e{i}"), process.clone(), Stdio::default());
        match r {
            Err(ClientError::Frame(_)) | Err(ClientError::Disconnected) => {
                errors.push(r);
                break;
            }
            Err(ClientError::TimedOut) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(!errors.is_empty(), "writes never blocked");
    // The connection is now treated as closed: other callers fail at once, not after a
    // blocked writer.
    let t1 = std::time::Instant::now();
    assert!(matches!(client.pids("c1"), Err(ClientError::Disconnected)));
    assert!(t1.elapsed() < Duration::from_millis(100));
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    drop(agent);
}

#[test]
fn the_stream_accept_loop_survives_running_out_of_descriptors() {
    use crate::stream::StreamHub;
    let hub: StreamHub<UnixStream> = StreamHub::new();
    let (a, mut b) = UnixStream::pair().unwrap();
    let mut script: Vec<std::io::Result<UnixStream>> = vec![
        Err(std::io::Error::from_raw_os_error(libc::EMFILE)),
        Err(std::io::Error::from_raw_os_error(libc::ENFILE)),
        Ok(a),
        Err(std::io::Error::from_raw_os_error(libc::EBADF)),
    ];
    script.reverse();
    let done = hub.accept_loop(move || script.pop().unwrap());
    StreamHeader::new("c", "", StreamKind::Stdout)
        .write_to(&mut b)
        .unwrap();
    let s = hub
        .take("c", "", StreamKind::Stdout, Duration::from_secs(5))
        .unwrap();
    // The header's read bound is gone once the stream is filed.
    assert_eq!(s.read_timeout().unwrap(), None);
    done.join().unwrap(); // EBADF ends the loop
}

#[test]
fn silent_stream_connections_are_bounded_and_timed_out() {
    use crate::stream::{StreamHub, HEADER_TIMEOUT, MAX_HEADER_READERS};
    let dir = std::env::temp_dir().join(format!("skiff-proto-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let hub: StreamHub<UnixStream> = StreamHub::new();
    hub.accept_loop(move || listener.accept().map(|(s, _)| s));
    // More silent connections than header readers: the extra ones are closed at once.
    let silent: Vec<UnixStream> = (0..MAX_HEADER_READERS + 4)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    let t0 = std::time::Instant::now();
    let mut closed_early = 0;
    for mut s in silent.iter().skip(MAX_HEADER_READERS) {
        s.set_read_timeout(Some(HEADER_TIMEOUT / 2)).unwrap();
        let mut b = [0u8; 1];
        if matches!(std::io::Read::read(&mut s, &mut b), Ok(0)) {
            closed_early += 1;
        }
    }
    assert_eq!(closed_early, 4);
    // The others are closed once their header time is up.
    for mut s in silent.iter().take(MAX_HEADER_READERS) {
        s.set_read_timeout(Some(HEADER_TIMEOUT * 2)).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut s, &mut b).unwrap(), 0);
    }
    assert!(t0.elapsed() < HEADER_TIMEOUT * 3, "{:?}", t0.elapsed());
    // And a well-behaved stream is still filed.
    let mut good = UnixStream::connect(&path).unwrap();
    StreamHeader::new("c", "e1", StreamKind::Stderr)
        .write_to(&mut good)
        .unwrap();
    hub.take("c", "e1", StreamKind::Stderr, Duration::from_secs(5))
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
