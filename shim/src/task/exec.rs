//! Execs and stdio: ExecProcess, the streams of a new process, ResizePty and CloseIO.

use super::*;

impl Inner {
    /// Takes the stdio streams of a just-created process and starts the copies.
    pub(super) fn connect_stdio(
        &self,
        sandbox: &Sandbox,
        guest: &str,
        guest_exec: &str,
        terminal: bool,
        [stdin, stdout, stderr]: [&str; 3],
    ) -> TtrpcResult<(Option<Stdin>, Vec<JoinHandle<()>>)> {
        let take = |kind| {
            sandbox
                .streams()
                .take(guest, guest_exec, kind, STREAM_TIMEOUT)
                .map_err(|e| rpc_err(Code::INTERNAL, format!("stdio stream: {e}")))
        };
        let mut outputs = Vec::new();
        if terminal {
            outputs.push(io::copy_out(take(StreamKind::Pty)?, stdout.to_string()));
        } else {
            outputs.push(io::copy_out(take(StreamKind::Stdout)?, stdout.to_string()));
            outputs.push(io::copy_out(take(StreamKind::Stderr)?, stderr.to_string()));
        }
        let stdin_stream = if stdin.is_empty() {
            None
        } else {
            let s = take(StreamKind::Stdin)?;
            let (stream, done) = io::copy_in(stdin.to_string(), s)
                .map_err(|e| rpc_err(Code::INTERNAL, format!("stdin stream: {e}")))?;
            Some(Stdin { stream, done })
        };
        Ok((stdin_stream, outputs))
    }
}

impl TaskService {
    pub(super) fn handle_exec(&self, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        if req.exec_id.is_empty() {
            return Err(rpc_err(Code::INVALID_ARGUMENT, "empty exec id"));
        }
        awake(&self.lookup(&req.id, "")?.sandbox, "exec a process")?;
        let mut process: Process = serde_json::from_slice(&req.spec.value)
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        process.set_terminal(Some(req.terminal));
        let (sandbox, guest, guest_exec) = {
            let mut st = self.inner.lock();
            let c = st.container_mut(&req.id)?;
            if c.procs.contains_key(&req.exec_id) {
                return Err(rpc_err(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} exists", req.exec_id),
                ));
            }
            let g = format!("e{}", c.next_exec);
            c.next_exec += 1;
            // Reserve the id while the agent works.
            c.procs.insert(
                req.exec_id.clone(),
                Proc {
                    guest_exec: Some(g.clone()),
                    status: Status::UNKNOWN,
                    exit: None,
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    stdin_stream: None,
                    outputs: Vec::new(),
                    watched: false,
                },
            );
            (c.sandbox.clone(), c.guest.clone(), g)
        };
        let r = sandbox
            .client()
            .exec(
                &guest,
                &guest_exec,
                process,
                skiff_protocol::Stdio {
                    stdin: !req.stdin.is_empty(),
                },
            )
            .map_err(agent_err("creating the exec"))
            .and_then(|_| {
                self.inner.connect_stdio(
                    &sandbox,
                    &guest,
                    &guest_exec,
                    req.terminal,
                    [&req.stdin, &req.stdout, &req.stderr],
                )
            });
        let mut st = self.inner.lock();
        let c = st.container_mut(&req.id)?;
        match r {
            Ok((stdin_stream, outputs)) => {
                if let Some(p) = c.procs.get_mut(&req.exec_id) {
                    p.status = Status::CREATED;
                    p.stdin_stream = stdin_stream;
                    p.outputs = outputs;
                }
                drop(st);
                let mut ev = TaskExecAdded::new();
                ev.container_id = req.id.clone();
                ev.exec_id = req.exec_id.clone();
                self.inner.publish(ev);
                Ok(api::Empty::new())
            }
            Err(e) => {
                c.procs.remove(&req.exec_id);
                self.inner.changed.notify_all();
                Err(e)
            }
        }
    }
}
