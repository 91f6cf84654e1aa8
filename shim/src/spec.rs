//! From containerd's bundle to what the VM needs: the rootfs share, one share per host
//! directory behind the spec's bind mounts (rewritten to point at the guest mounts of those
//! shares), and the rootfs mounts of `CreateTaskRequest` as `mount(2)` arguments.
//!
//! A bind-mounted host **file** (`/etc/localtime`, CRI's `hosts`, `resolv.conf`, `hostname`,
//! `termination-log`) is exposed alone, never with its directory: the shim mounts a small
//! private tmpfs at `<bundle>/skiff-files`, bind-mounts each such file onto an empty file in
//! its `ro/` or `rw/` directory there, and shares those directories. Sharing the file's parent
//! would hand the guest every sibling (all of host `/etc` for `/etc/localtime`).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use skiff_vmm::fs_device::Share;
use skiff_vmm::sandbox::{SandboxShare, MAX_SHARES};

/// Where the agent mounts the rootfs share in the guest (the container's root).
pub const GUEST_ROOTFS: &str = "/run/skiff/rootfs";
/// Where the agent mounts volume share N in the guest.
pub const GUEST_VOLUMES: &str = "/run/skiff/volumes";

/// Errors of spec planning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// More bind-mounted host directories than virtio-fs devices fit.
    #[error("the spec bind-mounts {0} host directories; at most {max} fit one VM", max = MAX_SHARES - 1)]
    TooManyShares(usize),
    /// A bind mount's source is not usable.
    #[error("bind mount source {0}: {1}")]
    Source(String, String),
    /// Exposing a bind-mounted file failed.
    #[error("exposing bind-mounted file {0}: {1}")]
    FileBind(String, String),
}

/// The directory (in the bundle) that holds the private tmpfs for bind-mounted files.
pub const FILES_DIR: &str = "skiff-files";

/// Size and inode bounds of that tmpfs: the guest can write into the `rw/` share, but not
/// fill host memory through it.
const FILES_TMPFS_OPTS: &std::ffi::CStr = c"size=1m,nr_inodes=256,mode=0700";

/// A host file bind-mounted into the container, exposed alone: bind-mounted onto the empty
/// file `at` (in the private tmpfs), whose directory is a share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileBind {
    /// The host file (the spec's source).
    pub src: PathBuf,
    /// Where it is bind-mounted: `<files dir>/{ro,rw}/<n>-<name>`.
    pub at: PathBuf,
    /// Read-only bind.
    pub read_only: bool,
}

/// What a container's VM needs from the host: its shares, and the files to bind first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The rootfs share first, then volumes.
    pub shares: Vec<SandboxShare>,
    /// Bind-mounted files, to be set up with [`bind_files`] before boot.
    pub files: Vec<FileBind>,
}

/// Is this spec mount a bind mount (type `bind`, or a `bind`/`rbind` option)?
pub fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Is this mount read-only (an `ro` option, the last of `ro`/`rw` wins)?
pub fn is_read_only(options: &[String]) -> bool {
    options
        .iter()
        .rev()
        .find(|o| *o == "ro" || *o == "rw")
        .is_some_and(|o| o == "ro")
}

/// Builds the shares for a container: the rootfs (`rootfs_host`, tag `rootfs`, mounted at
/// [`GUEST_ROOTFS`]) and one share per distinct (host directory, read-only) behind the spec's
/// bind mounts (tags `vol0`, `vol1`, ...; mounted under [`GUEST_VOLUMES`]). Each bind mount's
/// source is rewritten to its path inside the guest mount. A file source is not shared with
/// its directory: it gets a [`FileBind`] into `files_dir/ro` or `files_dir/rw`, and those
/// directories are the shares. Relative sources are resolved against `bundle`.
pub fn plan_shares(
    spec: &mut Spec,
    bundle: &Path,
    rootfs_host: PathBuf,
    files_dir: &Path,
) -> Result<Plan, Error> {
    let mut shares = vec![SandboxShare {
        share: Share {
            tag: "rootfs".into(),
            host: rootfs_host,
            read_only: false,
            xattr_ownership: false,
            policy: skiff_vmm::fs_device::SharePolicy::Rootfs,
        },
        guest_path: GUEST_ROOTFS.into(),
    }];
    let mut files = Vec::new();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in mounts.iter_mut() {
        if !is_bind(m) {
            continue;
        }
        let Some(src) = m.source().clone() else {
            continue;
        };
        let src = if src.is_absolute() {
            src
        } else {
            bundle.join(src)
        };
        let meta = std::fs::metadata(&src)
            .map_err(|e| Error::Source(src.display().to_string(), e.to_string()))?;
        let read_only = is_read_only(m.options().as_deref().unwrap_or_default());
        let (dir, entry) = if meta.is_dir() {
            (src.clone(), None)
        } else {
            let name = src
                .file_name()
                .ok_or_else(|| Error::Source(src.display().to_string(), "no file name".into()))?;
            // A readable, bounded entry name; the index keeps entries apart.
            let name: String = name.to_string_lossy().chars().take(64).collect();
            let entry = format!("{}-{}", files.len(), name.replace('/', "_"));
            let dir = files_dir.join(if read_only { "ro" } else { "rw" });
            files.push(FileBind {
                src: src.clone(),
                at: dir.join(&entry),
                read_only,
            });
            (dir, Some(entry))
        };
        let existing = shares
            .iter()
            .skip(1)
            .position(|s| s.share.host == dir && s.share.read_only == read_only);
        let n = match existing {
            Some(n) => n,
            None => {
                let n = shares.len() - 1;
                shares.push(SandboxShare {
                    share: Share {
                        tag: format!("vol{n}"),
                        host: dir,
                        read_only,
                        xattr_ownership: false,
                        policy: skiff_vmm::fs_device::SharePolicy::Volume,
                    },
                    guest_path: format!("{GUEST_VOLUMES}/{n}"),
                });
                n
            }
        };
        let mut guest = PathBuf::from(format!("{GUEST_VOLUMES}/{n}"));
        if let Some(f) = entry {
            guest.push(f);
        }
        m.set_source(Some(guest));
    }
    if shares.len() > MAX_SHARES {
        return Err(Error::TooManyShares(shares.len() - 1));
    }
    spec.set_mounts(Some(mounts));
    Ok(Plan { shares, files })
}

/// Sets up the [`FileBind`]s of a plan: a private tmpfs at `files_dir` (bounded in size and
/// inodes), then each file bind-mounted onto an empty file there (read-only binds remounted
/// read-only). Needs root (the shim's case). On failure everything done is undone.
pub fn bind_files(files_dir: &Path, files: &[FileBind]) -> Result<(), Error> {
    if files.is_empty() {
        return Ok(());
    }
    let err = |p: &Path, e: &dyn std::fmt::Display| {
        Error::FileBind(p.display().to_string(), e.to_string())
    };
    // Leftovers of a crashed shim for the same bundle go first.
    unbind_files(files_dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(files_dir)
        .map_err(|e| err(files_dir, &e))?;
    let r = (|| {
        rustix::mount::mount(
            "tmpfs",
            files_dir,
            "tmpfs",
            rustix::mount::MountFlags::NOSUID
                | rustix::mount::MountFlags::NODEV
                | rustix::mount::MountFlags::NOEXEC,
            Some(FILES_TMPFS_OPTS),
        )
        .map_err(|e| err(files_dir, &e))?;
        for f in files {
            if let Some(dir) = f.at.parent() {
                match std::fs::DirBuilder::new().mode(0o755).create(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(err(dir, &e)),
                }
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&f.at)
                .map_err(|e| err(&f.at, &e))?;
            rustix::mount::mount_bind(&f.src, &f.at).map_err(|e| err(&f.src, &e))?;
            if f.read_only {
                rustix::mount::mount_remount(
                    &f.at,
                    rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
                    "",
                )
                .map_err(|e| err(&f.src, &e))?;
            }
        }
        Ok(())
    })();
    if r.is_err() {
        unbind_files(files_dir);
    }
    r
}

/// Undoes [`bind_files`]: detaches the tmpfs with every bind in it, then removes the (now
/// empty) directory. Never deletes through a mount: only `rmdir` of the mount point.
pub fn unbind_files(files_dir: &Path) {
    for _ in 0..8 {
        // Detaching the tmpfs takes the binds inside it along.
        if rustix::mount::unmount(files_dir, rustix::mount::UnmountFlags::DETACH).is_err() {
            break;
        }
    }
    let _ = std::fs::remove_dir(files_dir);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use oci_spec::runtime::Mount;

    fn bind(src: &Path, dst: &str, opts: &[&str]) -> Mount {
        let mut m = Mount::default();
        m.set_destination(PathBuf::from(dst));
        m.set_typ(Some("bind".into()));
        m.set_source(Some(src.to_path_buf()));
        m.set_options(Some(opts.iter().map(|s| s.to_string()).collect()));
        m
    }

    #[test]
    fn bind_mounts_become_shares_and_point_into_the_guest() {
        let tmp = std::env::temp_dir().join(format!("skiff-shim-spec-{}", std::process::id()));
        let data = tmp.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let file = tmp.join("hosts");
        std::fs::write(&file, "x").unwrap();
        let files_dir = tmp.join("bundle").join(FILES_DIR);
        let mut spec = Spec::default();
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        let defaults = mounts.len();
        mounts.push(bind(&data, "/data", &["rbind", "rw"]));
        mounts.push(bind(&file, "/etc/hosts", &["rbind", "ro"]));
        mounts.push(bind(&data, "/data2", &["rbind"]));
        mounts.push(bind(&file, "/etc/hosts2", &["rbind", "rw"]));
        spec.set_mounts(Some(mounts));

        let plan = plan_shares(&mut spec, &tmp, tmp.join("rootfs"), &files_dir).unwrap();
        let _ = std::fs::remove_dir_all(&tmp);
        let shares = plan.shares;

        assert_eq!(shares.len(), 4, "{shares:?}");
        assert_eq!(shares[0].guest_path, GUEST_ROOTFS);
        assert_eq!(shares[0].share.tag, "rootfs");
        assert_eq!(
            (shares[1].share.host.clone(), shares[1].share.read_only),
            (data.clone(), false)
        );
        // The file's directory (`tmp`, with `data` and everything else in it) is never shared.
        for s in &shares {
            assert_ne!(s.share.host, tmp, "{shares:?}");
        }
        assert_eq!(
            (shares[2].share.host.clone(), shares[2].share.read_only),
            (files_dir.join("ro"), true)
        );
        assert_eq!(shares[2].share.tag, "vol1");
        assert_eq!(
            (shares[3].share.host.clone(), shares[3].share.read_only),
            (files_dir.join("rw"), false)
        );
        assert_eq!(
            plan.files,
            vec![
                FileBind {
                    src: file.clone(),
                    at: files_dir.join("ro/0-hosts"),
                    read_only: true
                },
                FileBind {
                    src: file.clone(),
                    at: files_dir.join("rw/1-hosts"),
                    read_only: false
                },
            ]
        );
        let m = spec.mounts().clone().unwrap();
        let src = |i: usize| m[defaults + i].source().clone().unwrap();
        assert_eq!(src(0), PathBuf::from("/run/skiff/volumes/0"));
        assert_eq!(src(1), PathBuf::from("/run/skiff/volumes/1/0-hosts"));
        assert_eq!(src(2), PathBuf::from("/run/skiff/volumes/0"));
        assert_eq!(src(3), PathBuf::from("/run/skiff/volumes/2/1-hosts"));
        // The default (non-bind) mounts are untouched.
        assert_eq!(m[0], Spec::default().mounts().clone().unwrap()[0]);
    }

    /// The escape the security review found: a file bind mount exposed its siblings. Needs
    /// root (bind mounts), which the shim always has and CI runs as.
    #[test]
    fn a_bound_file_is_exposed_alone() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED a_bound_file_is_exposed_alone: needs root for bind mounts");
            return;
        }
        let tmp = std::env::temp_dir().join(format!("skiff-shim-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let host = tmp.join("hostdir");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("file.txt"), "mine\n").unwrap();
        std::fs::write(host.join("sibling.txt"), "secret\n").unwrap();
        let files_dir = tmp.join("bundle").join(FILES_DIR);
        std::fs::create_dir_all(tmp.join("bundle")).unwrap();
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![
            bind(&host.join("file.txt"), "/ro.txt", &["rbind", "ro"]),
            bind(&host.join("file.txt"), "/rw.txt", &["rbind", "rw"]),
        ]));
        let plan = plan_shares(&mut spec, &tmp, tmp.join("rootfs"), &files_dir).unwrap();
        bind_files(&files_dir, &plan.files).unwrap();
        let listing = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // Every shared directory holds the bound file and nothing else.
        for s in &plan.shares[1..] {
            let names = listing(&s.share.host);
            assert_eq!(names.len(), 1, "{names:?}");
            assert!(!names.iter().any(|n| n.contains("sibling")), "{names:?}");
        }
        let ro = files_dir.join("ro/0-file.txt");
        let rw = files_dir.join("rw/1-file.txt");
        assert_eq!(std::fs::read_to_string(&ro).unwrap(), "mine\n");
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(&ro)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        std::fs::write(&rw, "changed\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(host.join("file.txt")).unwrap(),
            "changed\n"
        );
        // The tmpfs is bounded: the guest cannot fill host memory through the rw share.
        let big = std::fs::write(files_dir.join("rw/fill"), vec![0u8; 4 << 20]);
        assert!(big.is_err(), "4 MiB fit in the files tmpfs");
        unbind_files(&files_dir);
        assert!(!files_dir.exists());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(FILES_DIR), "{mounts}");
        assert_eq!(listing(&host), vec!["file.txt", "sibling.txt"]);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn a_missing_bind_source_is_named() {
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![bind(
            Path::new("/no/such/dir"),
            "/x",
            &["rbind"],
        )]));
        let e = plan_shares(
            &mut spec,
            Path::new("/"),
            PathBuf::from("/r"),
            Path::new("/f"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/no/such/dir"), "{e}");
    }

    #[test]
    fn read_only_options() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(is_read_only(&o(&["rbind", "ro"])));
        assert!(!is_read_only(&o(&["rbind"])));
        assert!(!is_read_only(&o(&["ro", "rw"])));
    }
}
