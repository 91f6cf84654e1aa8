//! The shim binary's modes: `start` (spawn the server, print its address), `delete` (clean up
//! after a server that died) and the server's lifetime ([`Service`]); the Task API it serves
//! is [`crate::task`].

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags, StartOpts};
use oci_spec::runtime::Spec;

use crate::netns;
use crate::spec;
use crate::task::{TaskService, NET_FILE, RUN_DIR_FILE};

/// How long the server may take to stop after Shutdown before the process exits anyway.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// The file in the bundle holding the shim server's pid (for `delete` after a crash).
pub(crate) const PID_FILE: &str = "shim.pid";

/// The `containerd_shim::Shim` implementation (binary modes and server lifetime).
pub struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: PathBuf,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .field("bundle", &self.bundle)
            .finish_non_exhaustive()
    }
}

fn bundle_dir(flags: &Flags) -> PathBuf {
    if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    } else {
        PathBuf::from(&flags.bundle)
    }
}

impl containerd_shim::Shim for Service {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Self {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: bundle_dir(args),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // `spawn` starts `<this binary> -namespace … -id … -address … -socket …` with stdin and
        // stderr on /dev/null and stdout on a pipe it reads until the server, once listening,
        // points its stdout elsewhere: containerd's pipe is never held by the server.
        // A later container of a CRI pod goes to its sandbox's server (same grouping, same
        // socket: the new server finds it in use and working, writes its address and exits).
        let grouping = std::fs::read_to_string(bundle_dir_of_start().join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Spec>(&t).ok())
            .and_then(|s| crate::task::pod_sandbox_of(&s))
            .unwrap_or_else(|| opts.id.clone());
        let (pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        tracing::info!("shim server started: pid {pid}, {address}");
        // containerd reconnects through `<bundle>/address` after a restart.
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<api::DeleteResponse, containerd_shim::Error> {
        let pid = cleanup_after_crash(&self.bundle, &self.id);
        let mut r = api::DeleteResponse::new();
        r.pid = pid.unwrap_or(0);
        r.exit_status = 137;
        r.exited_at = MessageField::some(Timestamp::now());
        Ok(r)
    }

    fn wait(&mut self) {
        self.exit.wait();
        // The server's shutdown joins its connections, which could wait on a handler still
        // blocked in Wait (Shutdown{now}); the process, and the VM in it, must end anyway.
        std::thread::spawn(|| {
            std::thread::sleep(EXIT_GRACE);
            tracing::warn!("shim server did not stop within {EXIT_GRACE:?}; exiting");
            std::process::exit(0);
        });
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        // (The pid file is written at Create: this process may be a pod container's `start`
        // server that finds its pod's server running and exits.)
        TaskService::new(
            self.id.clone(),
            self.namespace.clone(),
            self.exit.clone(),
            publisher,
        )
    }
}

/// `delete` after the server died: kills a surviving server (its VM goes with it), unmounts
/// the rootfs, removes the socket. Returns the server's pid if known.
fn cleanup_after_crash(bundle: &Path, id: &str) -> Option<u32> {
    let pid: Option<u32> = std::fs::read_to_string(bundle.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    if let Some(p) = pid {
        // Only a shim server for this container (pids are reused).
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let ours = cmdline
            .split(|b| *b == 0)
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] == b"-id" && w[1] == id.as_bytes());
        if ours && p != std::process::id() {
            if let Some(raw) = rustix::process::Pid::from_raw(p as i32) {
                let _ = rustix::process::kill_process(raw, rustix::process::Signal::KILL);
            }
            // Let the kernel tear down its mappings and descriptors before unmounting.
            for _ in 0..50 {
                if !alive(p) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    spec::unbind_files(&bundle.join(spec::FILES_DIR));
    remove_pod_dir(bundle);
    unmount_rootfs(&bundle.join("rootfs"));
    remove_run_dir(bundle);
    remove_tap(bundle);
    if let Ok(addr) = std::fs::read_to_string(bundle.join("address")) {
        let path = addr.trim().trim_start_matches("unix://");
        // A pod container's address is its pod's server, which may well be alive.
        if std::fs::symlink_metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false)
            && std::os::unix::net::UnixStream::connect(path).is_err()
        {
            let _ = std::fs::remove_file(path);
        }
    }
    pid
}

/// Takes the tap and qdisc out of a network namespace that outlives the task (a spec path:
/// CRI's), after a crash. A holder's namespace went away with the holder.
fn remove_tap(bundle: &Path) {
    let Ok(text) = std::fs::read_to_string(bundle.join("config.json")) else {
        return;
    };
    let Ok(spec) = serde_json::from_str::<Spec>(&text) else {
        return;
    };
    // Only the container that wired the namespace recorded it (a pod's other containers
    // name the same namespace but never touch its tap).
    let Ok(recorded) = std::fs::read_to_string(bundle.join(NET_FILE)) else {
        return;
    };
    if let netns::Plan::Path(p) = netns::plan(&spec) {
        let iface = recorded.lines().nth(1).map(str::to_owned);
        if p.exists() {
            netns::unwire(&p, netns::TAP, iface.as_deref());
        }
    }
    let _ = std::fs::remove_file(bundle.join(NET_FILE));
}

/// Removes the run directory named in the bundle, if it is one of ours (directly under the
/// private base, named `shim-*`).
fn remove_run_dir(bundle: &Path) {
    let Ok(raw) = std::fs::read(bundle.join(RUN_DIR_FILE)) else {
        return;
    };
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&raw));
    let ours = skiff_vmm::run_dir::base().is_ok_and(|b| dir.parent() == Some(b.as_path()))
        && dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("shim-"));
    if ours {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_file(bundle.join(RUN_DIR_FILE));
}

/// Detaches a pod's directory named in the (sandbox's) bundle, if it is one of ours.
fn remove_pod_dir(bundle: &Path) {
    let file = bundle.join(crate::task::POD_DIR_FILE);
    let Ok(raw) = std::fs::read(&file) else {
        return;
    };
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&raw));
    let ours = skiff_vmm::run_dir::base().is_ok_and(|b| dir.parent() == Some(b.as_path()))
        && dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("pod-"));
    if ours {
        crate::task::remove_pod_dir(&dir);
    }
    let _ = std::fs::remove_file(file);
}

/// The bundle of `shim start`: its working directory (containerd starts it there).
fn bundle_dir_of_start() -> PathBuf {
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
}

/// Whether process `pid` exists and is not a zombie.
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Unmounts `target` and everything below it (lazily).
pub(crate) fn unmount_rootfs(target: &Path) {
    if let Some(t) = target.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(t), libc::MNT_DETACH) {
            tracing::warn!("unmounting {t}: {e}");
        }
    }
}
