//! The Task service against a fake agent: ordering of Wait, Start, exits and output.
#![allow(clippy::unwrap_used)]

use super::*;
use skiff_protocol::stream::{StreamHeader, StreamHub};
use skiff_protocol::{Client, ErrorReply, Handler, Hello, Replier, Request, Response};
use std::io::{Read, Write};
use std::path::Path;

type Flag = Arc<(Mutex<bool>, Condvar)>;

/// Answers like the agent: Exec files the exec's streams; Start writes "hello <exec>\n"
/// on the process's stdout, closes it, then the process "exits" (status 3 for init, 4 for
/// execs); Wait answers after that.
struct FakeAgent {
    hub: StreamHub<UnixStream>,
    stdout: Mutex<HashMap<String, UnixStream>>,
    exited: Mutex<HashMap<String, Flag>>,
}

impl FakeAgent {
    fn flag(&self, exec: &str) -> Flag {
        self.exited
            .lock()
            .unwrap()
            .entry(exec.to_string())
            .or_insert_with(|| Arc::new((Mutex::new(false), Condvar::new())))
            .clone()
    }

    fn add_streams(&self, exec: &str) {
        let out = stream(&self.hub, exec, StreamKind::Stdout);
        drop(stream(&self.hub, exec, StreamKind::Stderr)); // empty stderr
        self.stdout.lock().unwrap().insert(exec.to_string(), out);
    }
}

impl Handler for FakeAgent {
    fn handle(&self, request: Request, reply: Replier) {
        match request {
            Request::Exec { exec_id, .. } => {
                self.add_streams(&exec_id);
                reply.send(Ok(Response::Created {
                    pid: 9,
                    steps: vec![],
                }));
            }
            Request::Start { exec_id, .. } => {
                let key = exec_id.unwrap_or_default();
                let out = self.stdout.lock().unwrap().remove(&key);
                let exited = self.flag(&key);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50));
                    if let Some(mut o) = out {
                        o.write_all(format!("hello {key}\n").as_bytes()).unwrap();
                    }
                    *exited.0.lock().unwrap() = true;
                    exited.1.notify_all();
                });
                reply.send(Ok(Response::Started { pid: 7 }));
            }
            Request::Wait { exec_id, .. } => {
                let status = if exec_id.is_some() { 4 } else { 3 };
                let exited = self.flag(&exec_id.unwrap_or_default());
                std::thread::spawn(move || {
                    let mut g = exited.0.lock().unwrap();
                    while !*g {
                        g = exited.1.wait(g).unwrap();
                    }
                    reply.send(Ok(Response::Exited { status }));
                });
            }
            Request::Delete { .. } | Request::Signal { .. } => reply.send(Ok(Response::Ok)),
            _ => reply.send(Err(ErrorReply::new(libc::EINVAL, "unexpected"))),
        }
    }
}

fn stream(hub: &StreamHub<UnixStream>, exec: &str, kind: StreamKind) -> UnixStream {
    let (mut agent, host) = UnixStream::pair().unwrap();
    StreamHeader::new(CONTAINER, exec, kind)
        .write_to(&mut agent)
        .unwrap();
    hub.add(host).unwrap();
    agent
}

/// A FIFO at `path` and a reader thread that sends everything read until EOF.
fn fifo_reader(path: &Path) -> mpsc::Receiver<String> {
    let st = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let mut s = String::new();
        std::fs::File::open(path)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        tx.send(s).unwrap();
    });
    rx
}

type Events = mpsc::Receiver<(String, Box<dyn MessageDyn + Send>)>;

/// A task service whose container "c1" (created, init stdout into `<tmp>/stdout`) runs on
/// a fake agent.
fn created_task(tmp: &Path) -> (TaskService, Events, mpsc::Receiver<String>) {
    std::fs::create_dir_all(tmp).unwrap();
    let fifo = tmp.join("stdout");
    let got = fifo_reader(&fifo);
    let hub = StreamHub::new();
    let (host_ctl, agent_ctl) = UnixStream::pair().unwrap();
    let fake = FakeAgent {
        hub: hub.clone(),
        stdout: Mutex::new(HashMap::new()),
        exited: Mutex::new(HashMap::new()),
    };
    fake.add_streams("");
    std::thread::spawn(move || {
        let hello = Hello {
            protocol_version: skiff_protocol::PROTOCOL_VERSION,
            agent_version: "fake".into(),
            boot_stamps: Vec::new(),
        };
        let _ = skiff_protocol::serve(agent_ctl.try_clone().unwrap(), agent_ctl, hello, &fake);
    });
    let (client, hello) = Client::from_stream(host_ctl).unwrap();
    let sandbox = Arc::new(Sandbox::attach(client, hello, hub, tmp.join("run")));
    let (ev_tx, ev_rx) = mpsc::channel();
    let task = TaskService {
        inner: Arc::new(Inner {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            events: Mutex::new(ev_tx),
            exit: Arc::new(ExitSignal::default()),
        }),
    };
    let (stdin_stream, outputs) = task
        .inner
        .connect_stdio(
            &sandbox,
            CONTAINER,
            "",
            false,
            ["", fifo.to_str().unwrap(), ""],
        )
        .unwrap();
    task.inner.lock().containers.insert(
        "c1".into(),
        Container {
            guest: CONTAINER.into(),
            bundle: tmp.to_path_buf(),
            pid: std::process::id(),
            spec: Spec::default(),
            net: None,
            mounted_rootfs: None,
            sandbox,
            procs: HashMap::from([(
                String::new(),
                Proc {
                    guest_exec: None,
                    status: Status::CREATED,
                    exit: None,
                    stdin: String::new(),
                    stdout: fifo.display().to_string(),
                    stderr: String::new(),
                    terminal: false,
                    stdin_stream,
                    outputs,
                    watched: false,
                },
            )]),
            next_exec: 1,
            pod_binds: Vec::new(),
        },
    );
    (task, ev_rx, got)
}

fn state(task: &TaskService, exec: &str) -> TtrpcResult<api::StateResponse> {
    let mut r = api::StateRequest::new();
    r.id = "c1".into();
    r.exec_id = exec.into();
    task.handle_state(r)
}

/// Sends Wait on its own thread (containerd sends it while or before Start is in flight).
fn wait_async(task: &TaskService, exec: &str) -> JoinHandle<TtrpcResult<api::WaitResponse>> {
    let task = task.clone();
    let mut r = api::WaitRequest::new();
    r.id = "c1".into();
    r.exec_id = exec.into();
    std::thread::spawn(move || task.handle_wait(r))
}

fn start(task: &TaskService, exec: &str) -> TtrpcResult<api::StartResponse> {
    let mut r = api::StartRequest::new();
    r.id = "c1".into();
    r.exec_id = exec.into();
    task.handle_start(r)
}

fn delete(task: &TaskService, exec: &str) -> TtrpcResult<api::DeleteResponse> {
    let mut r = api::DeleteRequest::new();
    r.id = "c1".into();
    r.exec_id = exec.into();
    task.handle_delete(r)
}

#[test]
fn wait_before_start_then_exit_after_output_then_delete() {
    let tmp = std::env::temp_dir().join(format!("skiff-shim-task1-{}", std::process::id()));
    let (task, events, got) = created_task(&tmp);
    assert_eq!(
        state(&task, "").unwrap().status.enum_value(),
        Ok(Status::CREATED)
    );
    assert!(state(&task, "nope").is_err());

    let waiter = wait_async(&task, "");
    start(&task, "").unwrap();
    assert!(start(&task, "").is_err(), "started twice");
    let waited = waiter.join().unwrap().unwrap();
    assert_eq!(waited.exit_status, 3);
    // The output was complete (FIFO writer closed) by the time Wait answered.
    assert_eq!(
        got.recv_timeout(Duration::from_secs(2)).unwrap(),
        "hello \n"
    );
    let s = state(&task, "").unwrap();
    assert_eq!(s.status.enum_value(), Ok(Status::STOPPED));
    assert_eq!(s.exit_status, 3);

    let mut kill = api::KillRequest::new();
    kill.id = "c1".into();
    kill.signal = 15;
    assert!(task.handle_kill(kill).is_err(), "killing an exited process");

    assert_eq!(delete(&task, "").unwrap().exit_status, 3);
    assert!(state(&task, "").is_err(), "deleted");

    let topics: Vec<String> = events.try_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, ["/tasks/start", "/tasks/exit", "/tasks/delete"]);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn exec_waited_before_start() {
    let tmp = std::env::temp_dir().join(format!("skiff-shim-task2-{}", std::process::id()));
    // (The fake agent does not need init running; its exit would race the exec's events.)
    let (task, events, _got) = created_task(&tmp);
    let exec_fifo = tmp.join("exec-stdout");
    let exec_got = fifo_reader(&exec_fifo);
    let mut r = api::ExecProcessRequest::new();
    r.id = "c1".into();
    r.exec_id = "x1".into();
    r.stdout = exec_fifo.display().to_string();
    let mut spec = containerd_shim::protos::protobuf::well_known_types::any::Any::new();
    spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
    spec.value = br#"{"user":{"uid":0,"gid":0},"args":["true"],"cwd":"/"}"#.to_vec();
    r.spec = MessageField::some(spec);
    task.handle_exec(r).unwrap();
    assert_eq!(
        state(&task, "x1").unwrap().status.enum_value(),
        Ok(Status::CREATED)
    );
    let waiter = wait_async(&task, "x1");
    std::thread::sleep(Duration::from_millis(20));
    start(&task, "x1").unwrap();
    assert_eq!(waiter.join().unwrap().unwrap().exit_status, 4);
    assert_eq!(
        exec_got.recv_timeout(Duration::from_secs(2)).unwrap(),
        "hello e1\n"
    );
    assert_eq!(delete(&task, "x1").unwrap().exit_status, 4);
    assert!(state(&task, "x1").is_err());
    let topics: Vec<String> = events.try_iter().map(|(t, _)| t).collect();
    assert_eq!(
        topics,
        ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
