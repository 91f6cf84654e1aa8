//! The task's lifecycle: Create (rootfs, shares, network namespace, VM, container, hooks),
//! Start, Wait, State, Kill and Delete.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::*;

impl TaskService {
    /// Creates the container; true when it booted the VM (else it joined its pod's VM).
    pub(super) fn create_inner(
        &self,
        req: &api::CreateTaskRequest,
    ) -> TtrpcResult<(Container, bool)> {
        let bundle = PathBuf::from(&req.bundle);
        let config = bundle.join("config.json");
        let text = std::fs::read_to_string(&config)
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, format!("{}: {e}", config.display())))?;
        let mut spec: Spec = serde_json::from_str(&text)
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, format!("{}: {e}", config.display())))?;
        if let Some(sandbox_id) = pod::sandbox_of(&spec) {
            return self
                .create_in_pod(req, bundle, spec, &sandbox_id)
                .map(|c| (c, false));
        }
        if !self.inner.lock().containers.is_empty() {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                format!(
                    "this shim already runs a VM; {} is not a container of its pod",
                    req.id
                ),
            ));
        }
        let is_pod = pod::is_sandbox(&spec);
        let vm = VmSettings::resolve(req.options.as_ref(), spec.annotations().as_ref())
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        tracing::info!(
            cpus = vm.cpus,
            memory_mib = vm.memory_mib,
            kernel = %vm.kernel.display(),
            "VM settings"
        );

        let (rootfs_host, mounted) = mount_rootfs(req, &bundle, &spec)?;
        let files_dir = bundle.join(spec::FILES_DIR);
        let mut pod_dir: Option<PathBuf> = None;
        let fail = |pod_dir: &Option<PathBuf>, e: ttrpc::Error| {
            spec::unbind_files(&files_dir);
            if let Some(t) = &mounted {
                unmount_rootfs(t);
            }
            if let Some(d) = pod_dir {
                pod::remove_dir(d);
                let _ = std::fs::remove_file(bundle.join(pod::POD_DIR_FILE));
            }
            e
        };
        let plan = spec::plan_shares(&mut spec, &bundle, rootfs_host, &files_dir)
            .map_err(|e| fail(&pod_dir, rpc_err(Code::INVALID_ARGUMENT, e)))?;
        spec::bind_files(&files_dir, &plan.files)
            .map_err(|e| fail(&pod_dir, rpc_err(Code::INTERNAL, e)))?;
        let mut shares = plan.shares;
        if is_pod {
            // The pod's later containers reach the VM through these two shares.
            let d = pod::make_dir().map_err(|e| fail(&pod_dir, rpc_err(Code::INTERNAL, e)))?;
            let _ = std::fs::write(bundle.join(pod::POD_DIR_FILE), d.as_os_str().as_bytes());
            shares.extend(pod::shares(&d));
            pod_dir = Some(d);
        }
        // The network namespace on the host (ctr --cni, CRI, nerdctl put CNI networks there).
        let net = match netns::plan(&spec) {
            netns::Plan::Host => None,
            netns::Plan::Path(p) if netns::is_own_namespace(&p) => {
                tracing::warn!(
                    "the spec joins the host's network namespace ({}): a VM cannot share the \
                     host's interfaces, so the container has loopback only",
                    p.display()
                );
                netns::strip_network_namespace(&mut spec);
                None
            }
            netns::Plan::New => {
                let holder = netns::Holder::spawn().map_err(|e| {
                    fail(
                        &pod_dir,
                        rpc_err(Code::INTERNAL, format!("network namespace: {e}")),
                    )
                })?;
                Some(Net {
                    path: holder.netns(),
                    holder: Some(holder),
                    owned: true,
                    wired: None,
                })
            }
            netns::Plan::Path(p) => {
                if !p.exists() {
                    return Err(fail(
                        &pod_dir,
                        rpc_err(
                            Code::INVALID_ARGUMENT,
                            format!("network namespace {} does not exist", p.display()),
                        ),
                    ));
                }
                let holder = netns::Holder::enter(&p).map_err(|e| {
                    fail(
                        &pod_dir,
                        rpc_err(
                            Code::INTERNAL,
                            format!("network namespace {}: {e}", p.display()),
                        ),
                    )
                })?;
                Some(Net {
                    path: p,
                    holder: Some(holder),
                    owned: false,
                    wired: None,
                })
            }
        };
        let task_pid = net
            .as_ref()
            .and_then(|n| n.holder.as_ref())
            .map_or(std::process::id(), netns::Holder::pid);
        let hook_spec = spec.clone();
        if net.is_some() {
            // The container shares the VM's namespace, where the card is.
            netns::strip_network_namespace(&mut spec);
        }
        let net_path = net.as_ref().map(|n| n.path.clone());
        if let Some(n) = net.as_ref().filter(|n| !n.owned) {
            // The tap goes into a namespace that outlives us: recorded for `shim delete`
            // after a crash (Start adds the interface it joined).
            let _ = std::fs::write(bundle.join(NET_FILE), format!("{}\n", n.path.display()));
        }
        let created_tap = |net_path: &Option<PathBuf>| {
            // A namespace that outlives the task (a path) must not keep our tap.
            if let (Some(p), Some(n)) = (net_path, net.as_ref()) {
                if !n.owned {
                    netns::unwire(p, netns::TAP, None);
                    let _ = std::fs::remove_file(bundle.join(NET_FILE));
                }
            }
        };
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_terminal(Some(req.terminal));
        spec.set_process(Some(process));

        // A fresh private directory (mode 0700, created exclusively by the sandbox) under
        // /run/skiff: never a predictable path in a world-writable directory. The bundle
        // itself is too deep for Unix socket paths (108 bytes) with CRI's 64-byte ids.
        let run_dir = skiff_vmm::run_dir::base()
            .map_err(|e| {
                fail(
                    &pod_dir,
                    rpc_err(Code::INTERNAL, format!("run directory: {e}")),
                )
            })?
            .join(format!(
                "shim-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() % 1_000_000_000)
                    .unwrap_or(0)
            ));
        // Recorded so `shim delete` can remove it after a crash.
        let _ = std::fs::write(bundle.join(RUN_DIR_FILE), run_dir.as_os_str().as_bytes());
        let sandbox = Sandbox::boot(SandboxConfig {
            kernel: vm.kernel,
            initrd: vm.initrd,
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            shares,
            console: vm.console,
            kernel_args: Vec::new(),
            run_dir,
            agent_timeout: vm.agent_timeout,
            timings: None,
            net: match &net_path {
                Some(p) => skiff_vmm::sandbox::SandboxNet::Netns {
                    netns: p.clone(),
                    tap: netns::TAP.into(),
                    mtu: netns::CARD_MTU,
                },
                None => skiff_vmm::sandbox::SandboxNet::None,
            },
            hostname: None,
            boot_slots: vm.boot_slots,
            warm_start: vm.warm_start,
        })
        .map_err(|e| {
            created_tap(&net_path);
            fail(
                &pod_dir,
                rpc_err(Code::INTERNAL, format!("booting the VM: {e}")),
            )
        })?;
        let sandbox = Arc::new(sandbox);
        let client = sandbox.client().clone();
        let stdio = skiff_protocol::Stdio {
            stdin: !req.stdin.is_empty(),
        };
        let boot_fail = |e: ttrpc::Error| {
            let _ = sandbox.shutdown(POWEROFF_TIMEOUT);
            created_tap(&net_path);
            fail(&pod_dir, e)
        };
        client
            .create_container_opts(CONTAINER, spec, GUEST_ROOTFS, req.terminal, stdio, true)
            .map_err(|e| boot_fail(agent_err("creating the container")(e)))?;
        let (stdin_stream, outputs) = self
            .inner
            .connect_stdio(
                &sandbox,
                CONTAINER,
                "",
                req.terminal,
                [&req.stdin, &req.stdout, &req.stderr],
            )
            .map_err(boot_fail)?;
        run_create_hooks(&hook_spec, &req.id, task_pid, &bundle).map_err(boot_fail)?;
        if let Some(dir) = &pod_dir {
            self.inner.lock().pod = Some(Pod {
                id: req.id.clone(),
                sandbox: sandbox.clone(),
                dir: dir.clone(),
                pid: task_pid,
                hostname: hook_spec.hostname().clone().filter(|h| !h.is_empty()),
                next: 0,
            });
        }
        let init = Proc::created(req, stdin_stream, outputs);
        Ok((
            Container {
                guest: CONTAINER.into(),
                bundle,
                pid: task_pid,
                spec: hook_spec,
                net,
                mounted_rootfs: mounted,
                sandbox,
                procs: HashMap::from([(String::new(), init)]),
                next_exec: 1,
                pod_binds: Vec::new(),
            },
            true,
        ))
    }
}

/// Takes the tap and qdisc out of a namespace that outlives the task; a holder's own
/// namespace ends with the holder (dropped with `n`).
fn release_net(n: &Net) {
    if !n.owned {
        netns::unwire(&n.path, netns::TAP, n.wired.as_deref());
    }
}

/// The rootfs: containerd's mounts (overlay, bind) on `<bundle>/rootfs`, or, without mounts,
/// the spec's root path as it is. Returns the host directory and what to unmount later.
pub(super) fn mount_rootfs(
    req: &api::CreateTaskRequest,
    bundle: &Path,
    spec: &Spec,
) -> TtrpcResult<(PathBuf, Option<PathBuf>)> {
    if req.rootfs.is_empty() {
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        return Ok((bundle.join(root), None));
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target)
        .map_err(|e| rpc_err(Code::INTERNAL, format!("{}: {e}", target.display())))?;
    for m in &req.rootfs {
        let typ = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let src = (!m.source.is_empty()).then_some(m.source.as_str());
        if let Err(e) = containerd_shim::mount::mount_rootfs(typ, src, &m.options, &target) {
            unmount_rootfs(&target);
            return Err(rpc_err(
                Code::INTERNAL,
                format!("mounting the rootfs ({} {}): {e}", m.type_, m.source),
            ));
        }
    }
    Ok((target.clone(), Some(target)))
}

/// The spec's prestart and createRuntime hooks, run on the host at Create with the task's
/// pid (its network namespace is the container's), as runc runs them.
pub(super) fn run_create_hooks(spec: &Spec, id: &str, pid: u32, bundle: &Path) -> TtrpcResult<()> {
    let Some(h) = spec.hooks() else {
        return Ok(());
    };
    let state = netns::hook_state(spec, id, "creating", pid, bundle);
    #[allow(deprecated)]
    let prestart = h.prestart().clone().unwrap_or_default();
    for (kind, hooks) in [
        ("prestart", prestart),
        (
            "createRuntime",
            h.create_runtime().clone().unwrap_or_default(),
        ),
    ] {
        netns::run_hooks(kind, &hooks, &state)
            .map_err(|e| rpc_err(Code::FAILED_PRECONDITION, e))?;
    }
    Ok(())
}

impl Proc {
    /// A container's init, created.
    pub(super) fn created(
        req: &api::CreateTaskRequest,
        stdin_stream: Option<Stdin>,
        outputs: Vec<JoinHandle<()>>,
    ) -> Self {
        Proc {
            guest_exec: None,
            status: Status::CREATED,
            exit: None,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            stdin_stream,
            outputs,
            watched: false,
        }
    }
}

/// The Task methods that tests drive without a ttrpc context.
impl TaskService {
    /// Resumes the vCPUs and publishes TaskResumed.
    pub(super) fn resume_vm(&self, id: &str, sandbox: &Sandbox) -> TtrpcResult<()> {
        sandbox
            .resume()
            .map_err(|e| rpc_err(Code::INTERNAL, format!("resuming the VM: {e}")))?;
        tracing::info!("VM resumed");
        let mut ev = TaskResumed::new();
        ev.container_id = id.to_owned();
        self.inner.publish(ev);
        Ok(())
    }

    pub(super) fn handle_start(&self, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let Target {
            sandbox,
            guest,
            exec: guest_exec,
            status,
        } = self.lookup(&req.id, &req.exec_id)?;
        if status != Status::CREATED {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                format!("process {:?} was already started", req.exec_id),
            ));
        }
        awake(&sandbox, "start a process")?;
        if req.exec_id.is_empty() {
            self.wire_network(&req.id, &sandbox)?;
        }
        sandbox
            .client()
            .start(&guest, guest_exec.as_deref())
            .map_err(agent_err("starting the process"))?;
        let pid = self.task_pid(&req.id);
        let (outputs, watched) = {
            let mut st = self.inner.lock();
            let p = st
                .container_mut(&req.id)?
                .procs
                .get_mut(&req.exec_id)
                .ok_or_else(|| not_found("process"))?;
            p.status = Status::RUNNING;
            let watched = std::mem::replace(&mut p.watched, true);
            (std::mem::take(&mut p.outputs), watched)
        };
        // Published before the watcher can publish the exit.
        if req.exec_id.is_empty() {
            let mut ev = TaskStart::new();
            ev.container_id = req.id.clone();
            ev.pid = pid;
            self.inner.publish(ev);
        } else {
            let mut ev = TaskExecStarted::new();
            ev.container_id = req.id.clone();
            ev.exec_id = req.exec_id.clone();
            ev.pid = pid;
            self.inner.publish(ev);
        }
        tracing::info!(
            container = req.id.as_str(),
            exec = req.exec_id.as_str(),
            ms = format!("{:.1}", sandbox.ms_since_start()),
            "boot phase (ms since VMM start): process started"
        );
        if !watched {
            self.inner.watch_exit(
                sandbox.clone(),
                req.id.clone(),
                guest,
                req.exec_id.clone(),
                guest_exec,
                outputs,
            );
        }
        if req.exec_id.is_empty() {
            // poststart hooks: a failure is a warning (OCI runtime spec).
            self.run_hooks_warn(&req.id, "poststart", "running");
        }
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    pub(super) fn handle_wait(&self, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut st = self.inner.lock();
        loop {
            let p = st
                .container(&req.id)?
                .procs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&format!("process {:?}", req.exec_id)))?;
            if let Some((status, at)) = &p.exit {
                let mut resp = api::WaitResponse::new();
                resp.exit_status = *status;
                resp.exited_at = MessageField::some(at.clone());
                return Ok(resp);
            }
            st = self
                .inner
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(super) fn handle_state(&self, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let st = self.inner.lock();
        let c = st.container(&req.id)?;
        let p = c
            .procs
            .get(&req.exec_id)
            .ok_or_else(|| not_found(&format!("process {:?}", req.exec_id)))?;
        let mut resp = api::StateResponse::new();
        resp.id = req.id.clone();
        resp.bundle = c.bundle.display().to_string();
        resp.pid = c.pid;
        resp.status = EnumOrUnknown::new(if p.status == Status::RUNNING && c.sandbox.is_paused() {
            Status::PAUSED
        } else {
            p.status
        });
        resp.stdin = p.stdin.clone();
        resp.stdout = p.stdout.clone();
        resp.stderr = p.stderr.clone();
        resp.terminal = p.terminal;
        if let Some((status, at)) = &p.exit {
            resp.exit_status = *status;
            resp.exited_at = MessageField::some(at.clone());
        }
        resp.exec_id = req.exec_id.clone();
        Ok(resp)
    }

    pub(super) fn handle_kill(&self, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let Target {
            sandbox,
            guest,
            exec: guest_exec,
            status,
        } = self.lookup(&req.id, &req.exec_id)?;
        if status == Status::STOPPED && !req.all {
            return Err(rpc_err(Code::NOT_FOUND, "process already finished"));
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| rpc_err(Code::INVALID_ARGUMENT, "bad signal number"))?;
        if sandbox.is_paused() {
            // Like a frozen cgroup: SIGKILL still kills; other signals wait for a resume.
            if signal != libc::SIGKILL {
                awake(&sandbox, "deliver a signal other than SIGKILL")?;
            }
            self.resume_vm(&req.id, &sandbox)?;
        }
        sandbox
            .client()
            .signal(&guest, guest_exec.as_deref(), signal, req.all)
            .map_err(agent_err("signalling"))?;
        if status == Status::CREATED {
            // As under runc, a signal can end a process that was never started (its exit is
            // reported and it can be deleted): watch for its exit from now on.
            let outputs = {
                let mut st = self.inner.lock();
                match st
                    .containers
                    .get_mut(&req.id)
                    .and_then(|c| c.procs.get_mut(&req.exec_id))
                {
                    Some(p) if !p.watched => {
                        p.watched = true;
                        Some(std::mem::take(&mut p.outputs))
                    }
                    _ => None,
                }
            };
            if let Some(outputs) = outputs {
                self.inner.watch_exit(
                    sandbox,
                    req.id.clone(),
                    guest,
                    req.exec_id.clone(),
                    guest_exec,
                    outputs,
                );
            }
        }
        Ok(api::Empty::new())
    }

    pub(super) fn handle_delete(
        &self,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let Target {
            sandbox,
            guest,
            exec: guest_exec,
            status,
        } = self.lookup(&req.id, &req.exec_id)?;
        if status == Status::RUNNING || status == Status::UNKNOWN {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                format!("process {:?} is still running", req.exec_id),
            ));
        }
        let client = sandbox.client().clone();
        // Bounded: a VM that crashed or wedged must not keep Delete (and the cleanup after
        // it: power-off, unmount) from finishing.
        if status == Status::CREATED {
            // Never started: kill it so the agent can remove it.
            let _ = client.call_timeout(
                skiff_protocol::Request::Signal {
                    id: guest.clone(),
                    exec_id: guest_exec.clone(),
                    signal: libc::SIGKILL,
                    all: false,
                },
                DELETE_AGENT_TIMEOUT,
            );
        }
        let deleted = client.call_timeout(
            skiff_protocol::Request::Delete {
                id: guest.clone(),
                exec_id: guest_exec.clone(),
            },
            DELETE_AGENT_TIMEOUT,
        );
        if let Err(e) = deleted {
            if !req.exec_id.is_empty() {
                return Err(agent_err("deleting the exec")(e));
            }
            // The container goes away anyway.
            tracing::warn!("deleting the container in the guest: {e}");
        }
        let mut resp = api::DeleteResponse::new();
        resp.pid = self.task_pid(&req.id);
        let (exit_status, exited_at) = {
            let mut st = self.inner.lock();
            let c = st.container_mut(&req.id)?;
            let p = c.procs.remove(&req.exec_id);
            p.and_then(|p| p.exit).unwrap_or((137, Timestamp::now()))
        };
        resp.exit_status = exit_status;
        resp.exited_at = MessageField::some(exited_at.clone());
        if req.exec_id.is_empty() {
            // The container: forget it; the VM powers off with the last container of the
            // shim (a pod's VM outlives its sandbox container while others remain).
            let (c, last) = {
                let mut st = self.inner.lock();
                let c = st.containers.remove(&req.id);
                self.inner.changed.notify_all();
                (c, st.containers.is_empty())
            };
            if last && sandbox.shutdown(POWEROFF_TIMEOUT).is_none() {
                tracing::warn!("the VM did not power off; it ends with the shim");
            }
            if let Some(mut c) = c {
                for b in c.pod_binds.iter().rev() {
                    pod::unbind(b);
                }
                spec::unbind_files(&c.bundle.join(spec::FILES_DIR));
                let _ = std::fs::remove_file(c.bundle.join(RUN_DIR_FILE));
                // poststop hooks run while the holder (the task's pid) still exists: a hook
                // that tears down CNI needs its namespace.
                if let Some(h) = c.spec.hooks() {
                    let state = netns::hook_state(&c.spec, &req.id, "stopped", c.pid, &c.bundle);
                    if let Err(e) = netns::run_hooks(
                        "poststop",
                        &h.poststop().clone().unwrap_or_default(),
                        &state,
                    ) {
                        tracing::warn!("{e}");
                    }
                }
                if let Some(n) = c.net.take() {
                    let _ = std::fs::remove_file(c.bundle.join(NET_FILE));
                    if last {
                        release_net(&n);
                    } else {
                        // The pod's other containers still use the VM's card.
                        self.inner.lock().lingering.push(n);
                    }
                }
                if let Some(t) = c.mounted_rootfs.as_ref() {
                    unmount_rootfs(t);
                }
            }
            if last {
                let (lingering, pod) = {
                    let mut st = self.inner.lock();
                    (std::mem::take(&mut st.lingering), st.pod.take())
                };
                for n in &lingering {
                    release_net(n);
                }
                if let Some(p) = pod {
                    pod::remove_dir(&p.dir);
                }
            }
            let mut ev = TaskDelete::new();
            ev.container_id = req.id.clone();
            ev.id = req.id.clone();
            ev.pid = resp.pid;
            ev.exit_status = exit_status;
            ev.exited_at = MessageField::some(exited_at);
            self.inner.publish(ev);
        }
        Ok(resp)
    }
}
