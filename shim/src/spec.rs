//! From containerd's bundle to what the VM needs: the rootfs share, one share per host
//! directory behind the spec's bind mounts (rewritten to point at the guest mounts of those
//! shares), and the rootfs mounts of `CreateTaskRequest` as `mount(2)` arguments.

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
/// source is rewritten to its path inside the guest mount; a file source shares its parent
/// directory. Relative sources are resolved against `bundle`.
pub fn plan_shares(
    spec: &mut Spec,
    bundle: &Path,
    rootfs_host: PathBuf,
) -> Result<Vec<SandboxShare>, Error> {
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
        let (dir, file) = if meta.is_dir() {
            (src.clone(), None)
        } else {
            let name = src
                .file_name()
                .map(PathBuf::from)
                .ok_or_else(|| Error::Source(src.display().to_string(), "no file name".into()))?;
            let parent = src.parent().map(Path::to_path_buf).ok_or_else(|| {
                Error::Source(src.display().to_string(), "no parent directory".into())
            })?;
            (parent, Some(name))
        };
        let read_only = is_read_only(m.options().as_deref().unwrap_or_default());
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
        if let Some(f) = file {
            guest.push(f);
        }
        m.set_source(Some(guest));
    }
    if shares.len() > MAX_SHARES {
        return Err(Error::TooManyShares(shares.len() - 1));
    }
    spec.set_mounts(Some(mounts));
    Ok(shares)
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
        let mut spec = Spec::default();
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        let defaults = mounts.len();
        mounts.push(bind(&data, "/data", &["rbind", "rw"]));
        mounts.push(bind(&file, "/etc/hosts", &["rbind", "ro"]));
        mounts.push(bind(&data, "/data2", &["rbind"]));
        spec.set_mounts(Some(mounts));

        let shares = plan_shares(&mut spec, &tmp, tmp.join("rootfs")).unwrap();
        let _ = std::fs::remove_dir_all(&tmp);

        assert_eq!(shares.len(), 3, "{shares:?}");
        assert_eq!(shares[0].guest_path, GUEST_ROOTFS);
        assert_eq!(shares[0].share.tag, "rootfs");
        assert_eq!(
            (shares[1].share.host.clone(), shares[1].share.read_only),
            (data.clone(), false)
        );
        assert_eq!(
            (shares[2].share.host.clone(), shares[2].share.read_only),
            (tmp.clone(), true)
        );
        assert_eq!(shares[2].share.tag, "vol1");
        let m = spec.mounts().clone().unwrap();
        let src = |i: usize| m[defaults + i].source().clone().unwrap();
        assert_eq!(src(0), PathBuf::from("/run/skiff/volumes/0"));
        assert_eq!(src(1), PathBuf::from("/run/skiff/volumes/1/hosts"));
        assert_eq!(src(2), PathBuf::from("/run/skiff/volumes/0"));
        // The default (non-bind) mounts are untouched.
        assert_eq!(m[0], Spec::default().mounts().clone().unwrap()[0]);
    }

    #[test]
    fn a_missing_bind_source_is_named() {
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![bind(
            Path::new("/no/such/dir"),
            "/x",
            &["rbind"],
        )]));
        let e = plan_shares(&mut spec, Path::new("/"), PathBuf::from("/r")).unwrap_err();
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
