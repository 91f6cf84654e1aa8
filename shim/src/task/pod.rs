//! Kubernetes pods: one VM per pod. containerd's CRI creates the pod's sandbox (pause)
//! container first; its shim boots the VM with two extra virtio-fs shares on a private tmpfs,
//! the pod directory: `pod` (rootfs policy, guest `/run/skiff/pod`) and `podvol` (volume
//! policy, guest `/run/skiff/podvol`). Each later container of the pod (annotation
//! `io.kubernetes.cri.container-type=container`) reaches this shim through containerd's
//! grouping on `io.kubernetes.cri.sandbox-id` (see [`crate::shim`]); its rootfs is
//! bind-mounted into `pod/<guest id>`, each host directory behind its bind mounts into
//! `podvol/<guest id>-<n>` (read-only binds remounted read-only), and it is created in the
//! running VM. Shares are fixed at boot; binds inside them are not, and the FUSE server's
//! lookups cross into them like any other mount. Unmounting the tmpfs detaches every bind.
//!
//! Namespaces a pod's container names by path (the sandbox's `/proc/<pid>/ns/...`) mean
//! "the pod's": network and IPC become the VM's own (shared by the pod's containers), UTS and
//! PID a new one (with the sandbox's host name).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use skiff_vmm::fs_device::{Share, SharePolicy};
use skiff_vmm::sandbox::SandboxShare;

use super::*;

/// CRI's annotation: `sandbox` or `container`.
pub(crate) const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation: the pod's sandbox container id.
pub(crate) const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The sandbox bundle's file naming the pod directory (for `shim delete` after a crash).
pub(crate) const POD_DIR_FILE: &str = "skiff-pod-dir";
/// Guest mount points of the pod shares.
const GUEST_POD: &str = "/run/skiff/pod";
const GUEST_POD_VOL: &str = "/run/skiff/podvol";
/// The pod directory's tmpfs holds only mount points.
const POD_TMPFS_OPTS: &std::ffi::CStr = c"size=64k,nr_inodes=4096,mode=0755";

/// The pod's sandbox id when `spec` is a later container of a CRI pod.
pub(crate) fn sandbox_of(spec: &Spec) -> Option<String> {
    let a = spec.annotations().as_ref()?;
    (a.get(CONTAINER_TYPE).map(String::as_str) == Some("container"))
        .then(|| a.get(SANDBOX_ID).cloned())
        .flatten()
        .filter(|s| !s.is_empty())
}

/// Whether `spec` is a CRI pod's sandbox container.
pub(crate) fn is_sandbox(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(CONTAINER_TYPE))
        .is_some_and(|t| t == "sandbox")
}

/// Makes the pod directory: a fresh private directory under the run base with a small
/// tmpfs on it, holding `rootfs/` and `vol/`.
pub(crate) fn make_dir() -> Result<PathBuf, String> {
    let dir = skiff_vmm::run_dir::base()
        .map_err(|e| format!("run directory: {e}"))?
        .join(format!(
            "pod-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() % 1_000_000_000)
                .unwrap_or(0)
        ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let r = (|| {
        rustix::mount::mount(
            "tmpfs",
            &dir,
            "tmpfs",
            rustix::mount::MountFlags::NOSUID
                | rustix::mount::MountFlags::NODEV
                | rustix::mount::MountFlags::NOEXEC,
            Some(POD_TMPFS_OPTS),
        )
        .map_err(|e| format!("pod tmpfs on {}: {e}", dir.display()))?;
        for d in ["rootfs", "vol"] {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(dir.join(d))
                .map_err(|e| format!("{}: {e}", dir.join(d).display()))?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        remove_dir(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// Detaches the pod tmpfs (and every bind in it) and removes the mount point. Never deletes
/// through a mount: only `rmdir`.
pub(crate) fn remove_dir(dir: &Path) {
    unmount_all(dir);
    let _ = std::fs::remove_dir(dir);
}

fn unmount_all(p: &Path) {
    for _ in 0..8 {
        if rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH).is_err() {
            break;
        }
    }
}

/// The two pod shares in `dir`.
pub(crate) fn shares(dir: &Path) -> [SandboxShare; 2] {
    let share = |tag: &str, sub: &str, policy, guest: &str| SandboxShare {
        share: Share {
            tag: tag.into(),
            host: dir.join(sub),
            read_only: false,
            xattr_ownership: false,
            policy,
        },
        guest_path: guest.into(),
    };
    [
        share("pod", "rootfs", SharePolicy::Rootfs, GUEST_POD),
        share("podvol", "vol", SharePolicy::Volume, GUEST_POD_VOL),
    ]
}

/// Bind-mounts `src` (recursively) on a new directory `dst`; read-only if asked.
fn bind(src: &Path, dst: &Path, read_only: bool) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("binding {} into the pod: {e}", src.display());
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(dst)
        .map_err(|e| err(&e))?;
    let r = rustix::mount::mount_bind_recursive(src, dst)
        .map_err(|e| err(&e))
        .and_then(|()| {
            if read_only {
                rustix::mount::mount_remount(
                    dst,
                    rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
                    "",
                )
                .map_err(|e| err(&e))
            } else {
                Ok(())
            }
        });
    if r.is_err() {
        unbind(dst);
    }
    r
}

/// Undoes [`bind`].
pub(crate) fn unbind(dst: &Path) {
    unmount_all(dst);
    let _ = std::fs::remove_dir(dst);
}

/// Namespaces named by path (the sandbox's) become the pod's: see the module comment.
fn adapt_namespaces(spec: &mut Spec, hostname: Option<&str>) {
    let Some(mut linux) = spec.linux().clone() else {
        return;
    };
    let mut uts = false;
    if let Some(nss) = linux.namespaces().clone() {
        let nss = nss
            .into_iter()
            .filter(|n| {
                let pods = n.typ() == LinuxNamespaceType::Network
                    || (n.typ() == LinuxNamespaceType::Ipc && n.path().is_some());
                !pods
            })
            .map(|mut n| {
                if n.path().is_some() {
                    n.set_path(None);
                }
                uts |= n.typ() == LinuxNamespaceType::Uts;
                n
            })
            .collect();
        linux.set_namespaces(Some(nss));
    }
    spec.set_linux(Some(linux));
    if uts && spec.hostname().as_deref().unwrap_or("").is_empty() {
        spec.set_hostname(hostname.map(str::to_owned));
    }
}

impl TaskService {
    /// Creates a later container of the pod whose sandbox is `sandbox_id` in the pod's VM.
    pub(super) fn create_in_pod(
        &self,
        req: &api::CreateTaskRequest,
        bundle: PathBuf,
        mut spec: Spec,
        sandbox_id: &str,
    ) -> TtrpcResult<Container> {
        let (sandbox, dir, pid, hostname, guest) = {
            let mut st = self.inner.lock();
            let Some(pod) = st.pod.as_mut().filter(|p| p.id == sandbox_id) else {
                return Err(rpc_err(
                    Code::FAILED_PRECONDITION,
                    format!("pod sandbox {sandbox_id} does not run in this shim"),
                ));
            };
            pod.next += 1;
            (
                pod.sandbox.clone(),
                pod.dir.clone(),
                pod.pid,
                pod.hostname.clone(),
                format!("c{}", pod.next),
            )
        };
        awake(&sandbox, "create a container in the pod")?;
        let (rootfs_host, mounted) = lifecycle::mount_rootfs(req, &bundle, &spec)?;
        let files_dir = bundle.join(spec::FILES_DIR);
        let mut binds: Vec<PathBuf> = Vec::new();
        let undo = |binds: &[PathBuf], e: ttrpc::Error| {
            for b in binds.iter().rev() {
                unbind(b);
            }
            spec::unbind_files(&files_dir);
            if let Some(t) = &mounted {
                unmount_rootfs(t);
            }
            e
        };
        let plan = spec::plan_shares(&mut spec, &bundle, rootfs_host, &files_dir)
            .map_err(|e| undo(&binds, rpc_err(Code::INVALID_ARGUMENT, e)))?;
        spec::bind_files(&files_dir, &plan.files)
            .map_err(|e| undo(&binds, rpc_err(Code::INTERNAL, e)))?;
        // The rootfs share's directory, then each volume's, bound into the pod shares; the
        // spec's sources move from the volume's own guest mount to its place in `podvol`.
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for (n, s) in plan.shares.iter().enumerate() {
            let (dst, guest_now) = if n == 0 {
                (dir.join("rootfs").join(&guest), None)
            } else {
                let name = format!("{guest}-{n}");
                (
                    dir.join("vol").join(&name),
                    Some(PathBuf::from(GUEST_POD_VOL).join(name)),
                )
            };
            bind(&s.share.host, &dst, s.share.read_only)
                .map_err(|e| undo(&binds, rpc_err(Code::INTERNAL, e)))?;
            binds.push(dst);
            let Some(guest_now) = guest_now else { continue };
            for m in mounts.iter_mut() {
                let Some(src) = m.source().clone() else {
                    continue;
                };
                if let Ok(rest) = src.strip_prefix(&s.guest_path) {
                    m.set_source(Some(guest_now.join(rest)));
                }
            }
        }
        spec.set_mounts(Some(mounts));
        adapt_namespaces(&mut spec, hostname.as_deref());
        let hook_spec = spec.clone();
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_terminal(Some(req.terminal));
        spec.set_process(Some(process));
        let rootfs_guest = format!("{GUEST_POD}/{guest}");
        let client = sandbox.client().clone();
        client
            .create_container_opts(
                &guest,
                spec,
                &rootfs_guest,
                req.terminal,
                skiff_protocol::Stdio {
                    stdin: !req.stdin.is_empty(),
                },
                true,
            )
            .map_err(|e| undo(&binds, agent_err("creating the container")(e)))?;
        let gone = |binds: &[PathBuf], e: ttrpc::Error| {
            let _ = client.call_timeout(
                skiff_protocol::Request::Signal {
                    id: guest.clone(),
                    exec_id: None,
                    signal: libc::SIGKILL,
                    all: true,
                },
                DELETE_AGENT_TIMEOUT,
            );
            let _ = client.call_timeout(
                skiff_protocol::Request::Delete {
                    id: guest.clone(),
                    exec_id: None,
                },
                DELETE_AGENT_TIMEOUT,
            );
            undo(binds, e)
        };
        let (stdin_stream, outputs) = self
            .inner
            .connect_stdio(
                &sandbox,
                &guest,
                "",
                req.terminal,
                [&req.stdin, &req.stdout, &req.stderr],
            )
            .map_err(|e| gone(&binds, e))?;
        lifecycle::run_create_hooks(&hook_spec, &req.id, pid, &bundle)
            .map_err(|e| gone(&binds, e))?;
        tracing::info!(
            container = req.id.as_str(),
            guest = guest.as_str(),
            "container created in the pod's VM"
        );
        Ok(Container {
            guest,
            bundle,
            pid,
            spec: hook_spec,
            net: None,
            mounted_rootfs: mounted,
            sandbox,
            procs: HashMap::from([(String::new(), Proc::created(req, stdin_stream, outputs))]),
            next_exec: 1,
            pod_binds: binds,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec_with(ann: &[(&str, &str)]) -> Spec {
        let mut s = Spec::default();
        s.set_annotations(Some(
            ann.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        s
    }

    #[test]
    fn pod_containers_are_recognised_by_cri_annotations() {
        let c = spec_with(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "abc")]);
        assert_eq!(sandbox_of(&c).as_deref(), Some("abc"));
        assert!(!is_sandbox(&c));
        let s = spec_with(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "abc")]);
        assert_eq!(sandbox_of(&s), None);
        assert!(is_sandbox(&s));
        assert_eq!(
            sandbox_of(&spec_with(&[(CONTAINER_TYPE, "container")])),
            None
        );
        assert_eq!(sandbox_of(&Spec::default()), None);
    }

    #[test]
    fn namespaces_named_by_path_become_the_pods() {
        use oci_spec::runtime::LinuxNamespaceBuilder;
        let ns = |t, p: Option<&str>| {
            let mut b = LinuxNamespaceBuilder::default().typ(t);
            if let Some(p) = p {
                b = b.path(p);
            }
            b.build().unwrap()
        };
        let mut s = Spec::default();
        let mut linux = s.linux().clone().unwrap_or_default();
        linux.set_namespaces(Some(vec![
            ns(LinuxNamespaceType::Mount, None),
            ns(LinuxNamespaceType::Network, Some("/var/run/netns/cni-1")),
            ns(LinuxNamespaceType::Ipc, Some("/proc/42/ns/ipc")),
            ns(LinuxNamespaceType::Uts, Some("/proc/42/ns/uts")),
            ns(LinuxNamespaceType::Pid, None),
        ]));
        s.set_linux(Some(linux));
        s.set_hostname(None);
        adapt_namespaces(&mut s, Some("web-pod"));
        let got: Vec<(LinuxNamespaceType, bool)> = s
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| (n.typ(), n.path().is_some()))
            .collect();
        assert_eq!(
            got,
            vec![
                (LinuxNamespaceType::Mount, false),
                (LinuxNamespaceType::Uts, false),
                (LinuxNamespaceType::Pid, false),
            ]
        );
        assert_eq!(s.hostname().as_deref(), Some("web-pod"));
    }
}
