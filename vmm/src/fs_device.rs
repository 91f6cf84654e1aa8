//! Host directories shared into the guest over virtio-fs (Skiff's own FUSE server in the
//! devices crate): share specifications as the user writes them, and the device factory.

use std::path::PathBuf;
use std::sync::Arc;

use skiff_devices::virtio::fs::ReadSink;
use skiff_devices::virtio::fs::{Config, Ownership, Server};
pub use skiff_devices::virtio::fs::{FdBudget, SharePolicy};
use skiff_devices::virtio::virtio_fs::{FuseHandler, VirtioFs};

use crate::vm::MmioDeviceFactory;

/// One host directory exported to the guest under a virtio-fs tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Mount tag the guest uses (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// Host directory.
    pub host: PathBuf,
    /// Refuse every write (EROFS).
    pub read_only: bool,
    /// Store guest ownership in an xattr instead of chown (rootless image sharing).
    pub xattr_ownership: bool,
    /// What the guest may do to the host files: [`SharePolicy::Rootfs`] for the container's
    /// root filesystem (setuid, file capabilities), [`SharePolicy::Volume`] for everything
    /// bind-mounted from the host.
    pub policy: SharePolicy,
}

/// Errors of share setup (all are the user's: a bad path or spec).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A share spec does not parse.
    #[error("{0}")]
    Spec(String),
    /// The host directory cannot be shared.
    #[error("share {tag:?}: {source}")]
    Server {
        /// The share's tag.
        tag: String,
        /// Why.
        source: skiff_devices::virtio::fs::Error,
    },
    /// The device could not be made.
    #[error("share {tag:?}: {msg}")]
    Device {
        /// The share's tag.
        tag: String,
        /// Why.
        msg: String,
    },
}

/// Parses `TAG=DIR[:ro]` (the `vmm --share` syntax).
pub fn parse_share(s: &str) -> Result<Share, Error> {
    let (tag, rest) = s
        .split_once('=')
        .ok_or_else(|| Error::Spec(format!("--share {s:?}: expected TAG=DIR[:ro]")))?;
    let (dir, ro) = match rest.strip_suffix(":ro") {
        Some(d) => (d, true),
        None => (rest.strip_suffix(":rw").unwrap_or(rest), false),
    };
    if tag.is_empty() || tag.len() > 36 || dir.is_empty() {
        return Err(Error::Spec(format!(
            "--share {s:?}: expected TAG=DIR[:ro] with a 1 to 36 byte tag"
        )));
    }
    Ok(Share {
        tag: tag.into(),
        host: dir.into(),
        read_only: ro,
        xattr_ownership: false,
        policy: SharePolicy::Volume,
    })
}

/// Checks the share's host directory and makes its device (an error names the path). All
/// shares of one VM take their host fds from the same `budget` (one
/// [`FdBudget::default()`] per VM): a guest holding many inodes open gets `ENFILE`, whatever
/// the number of shares.
pub fn create(share: &Share, budget: &FdBudget) -> Result<MmioDeviceFactory, Error> {
    crate::sys::raise_nofile_limit();
    let mut cfg = Config::new(share.host.clone());
    cfg.read_only = share.read_only;
    cfg.policy = share.policy;
    cfg.fd_budget = budget.clone();
    cfg.ownership = if share.xattr_ownership {
        Ownership::Xattr
    } else {
        Ownership::Passthrough
    };
    let server = Server::new(cfg).map_err(|source| Error::Server {
        tag: share.tag.clone(),
        source,
    })?;
    let dev = VirtioFs::new(&share.tag, Arc::new(Confined(server))).map_err(|e| Error::Device {
        tag: share.tag.clone(),
        msg: e.to_string(),
    })?;
    Ok(Box::new(move |mem, irq, saved| {
        crate::vm::transport(Box::new(dev), mem, irq, saved)
    }))
}

/// The FUSE server with each worker thread confined: after the server's own per-thread setup
/// (dropping capabilities), the worker installs the `virtio-fs` seccomp allowlist.
#[derive(Debug)]
struct Confined(Server);

impl FuseHandler for Confined {
    fn handle(&self, req: &[u8], max_out: usize) -> Option<Vec<u8>> {
        self.0.handle(req, max_out)
    }

    fn handle_read_direct(
        &self,
        req: &[u8],
        max_out: usize,
        sink: &mut ReadSink<'_>,
    ) -> Option<(Vec<u8>, usize)> {
        self.0.handle_read_direct(req, max_out, sink)
    }

    fn thread_start(&self) {
        FuseHandler::thread_start(&self.0);
        // A failure leaves the worker under the `vmm` list it inherited from its vCPU thread.
        if let Err(e) = crate::seccomp::install(crate::seccomp::Kind::VirtioFs) {
            tracing::error!("virtio-fs worker: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn share_specs() {
        let s = parse_share("data=/srv/x:ro").unwrap();
        assert_eq!(
            (s.tag.as_str(), s.host.to_str().unwrap(), s.read_only),
            ("data", "/srv/x", true)
        );
        assert!(!parse_share("d=/a").unwrap().read_only);
        assert_eq!(parse_share("d=/a").unwrap().policy, SharePolicy::Volume);
        assert!(parse_share("/a").is_err());
        assert!(parse_share("=/a").is_err());
        assert!(parse_share("d=").is_err());
    }

    #[test]
    fn a_missing_directory_is_refused_before_boot() {
        let e = create(
            &parse_share("d=/no/such/dir").unwrap(),
            &FdBudget::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/no/such/dir"), "{e}");
        let e = create(&parse_share("d=/etc/passwd").unwrap(), &FdBudget::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("/etc/passwd"), "{e}");
    }
}
