//! Private run directories (vsock sockets, console log) for a sandbox or a `vmm run`.
//!
//! A run directory is created with `mkdir(2)` and mode 0700 in one step, and never removed
//! and recreated: a path someone else prepared (a symlink, a directory of theirs) makes
//! creation fail instead of being used. The base is `/run/skiff` for root (like runc's
//! `/run/runc`), `$XDG_RUNTIME_DIR/skiff` for other users, else the temporary directory. A
//! base Skiff creates must end up a real directory owned by this user that nobody else may
//! write; the temporary directory (sticky, world-writable) is only used as the parent of the
//! exclusive `mkdir`.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Errors of run-directory creation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The base directory is not private to this user.
    #[error("{0}: not a private directory of this user (owner, mode or symlink); refusing it")]
    NotPrivate(PathBuf),
    /// A filesystem call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The base directory for this user (created and checked when it is Skiff's own).
pub fn base() -> Result<PathBuf, Error> {
    let euid = rustix::process::geteuid();
    let own = if euid.is_root() {
        Some(PathBuf::from("/run/skiff"))
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .map(|d| d.join("skiff"))
    };
    let Some(dir) = own else {
        return Ok(std::env::temp_dir());
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", &dir)(e)),
    }
    check_private(&dir, euid.as_raw())?;
    Ok(dir)
}

/// A directory is private when it is a real directory (not a symlink) owned by `uid` that
/// neither group nor others may write.
pub fn check_private(dir: &Path, uid: u32) -> Result<(), Error> {
    let m = std::fs::symlink_metadata(dir).map_err(io("checking", dir))?;
    if !m.file_type().is_dir() || m.uid() != uid || m.permissions().mode() & 0o022 != 0 {
        return Err(Error::NotPrivate(dir.to_path_buf()));
    }
    Ok(())
}

/// Creates a fresh run directory `<base>/<prefix>-<pid>-<n>` with mode 0700.
pub fn create(prefix: &str) -> Result<PathBuf, Error> {
    create_in(&base()?, prefix)
}

/// Creates a fresh run directory in `base` (see [`create`]).
pub fn create_in(base: &Path, prefix: &str) -> Result<PathBuf, Error> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let mut last = None;
    for _ in 0..64 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let salt = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 1_000_000)
            .unwrap_or(0);
        let dir = base.join(format!("{prefix}-{pid}-{n}-{salt}"));
        match create_exclusive(&dir) {
            Ok(()) => return Ok(dir),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                last = Some(source);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io("creating a run directory in", base)(
        last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AlreadyExists)),
    ))
}

/// `mkdir(dir, 0700)`: fails if anything (a symlink included) is already at `dir`.
pub fn create_exclusive(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io("creating", dir))?;
    // The umask cannot widen 0700, but make the mode exact anyway.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("setting the mode of", dir))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn run_directories_are_fresh_and_private() {
        let base = scratch("fresh");
        let a = create_in(&base, "t").unwrap();
        let b = create_in(&base, "t").unwrap();
        assert_ne!(a, b);
        let m = std::fs::metadata(&a).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_prepared_symlink_is_never_followed() {
        let base = scratch("link");
        let victim = base.join("victim");
        std::fs::create_dir(&victim).unwrap();
        let planted = base.join("run");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let e = create_exclusive(&planted).unwrap_err();
        assert!(e.to_string().contains("File exists"), "{e}");
        // Nothing was created in, or removed from, the symlink's target.
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        assert!(std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_base_others_can_write_is_refused() {
        let base = scratch("base");
        let uid = rustix::process::geteuid().as_raw();
        check_private(&base, uid).unwrap_or_else(|_| {
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap()
        });
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            check_private(&base, uid),
            Err(Error::NotPrivate(_))
        ));
        let link = base.join("l");
        std::os::unix::fs::symlink("/tmp", &link).unwrap();
        assert!(matches!(
            check_private(&link, uid),
            Err(Error::NotPrivate(_))
        ));
        assert!(matches!(
            check_private(&base, uid + 1),
            Err(Error::NotPrivate(_))
        ));
        let _ = std::fs::remove_dir_all(&base);
    }
}
