//! Warm start: VM templates. A template is a snapshot ([`crate::snapshot`]) of a VM whose
//! agent came up and is dialing the host, before any container exists. `vmm run` and the shim
//! restore one instead of booting a kernel.
//!
//! One template per combination of everything that shapes the booted guest: Skiff's version
//! and hypervisor backend, the snapshot format, the kernel and initramfs (path, size,
//! modification time, inode), vCPUs, memory, the kernel command line and the virtio-fs tags
//! (one device per share). Its directory is `templates/<key>` in the cache
//! (`${SKIFF_CACHE:-~/.cache/skiff}`); the key is a SHA-256 of all of it, so a template made
//! from other inputs is never used.
//!
//! Shares differ per container: the template has the same virtio-fs devices (same tags, in
//! the same slots) as the run, bound to an empty directory while the template is made; a
//! restored VM's devices serve the run's directories. Nothing was mounted in the guest then
//! (the agent mounts shares only when the host asks, after it connected), so no file of the
//! template's directories is known to the guest.
//!
//! Making one: a VM boots with `skiff.template=1`; its agent writes 200 to the boot timer and
//! starts dialing the host, which does not answer; the VMM saves the VM at that stamp and ends
//! it. A VM restored from it gets a vsock transport reset, its agent's next dial reaches the
//! real host, which first sends `Reseed` (fresh entropy, the clock).
//!
//! A VM with a network card restores a template with one too: made over a backend that
//! carries nothing ([`NullBackend`], offering the same features as the run's backend: the
//! virtio-net header or not, which the key holds with the MTU) with the MAC address
//! [`TEMPLATE_MAC`]. The guest's interface stays down until the agent is told the run's
//! network; then it gets the run's MAC address (`set_mac`) before it comes up, and the
//! restored card carries the run's backend from the first frame.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use skiff_devices::virtio::net::{NetConfig, NullBackend};

use crate::fs_device::{self, Share};
use crate::snapshot::{self, Loaded};
use crate::timings::Timings;
use crate::vm::{self, GuestExit, SerialOut, SnapshotAt, VmConfig, VmControl};

/// Kernel command-line flag that puts the agent in template mode.
pub const TEMPLATE_ARG: &str = "skiff.template=1";
/// The boot-timer value the agent writes in template mode.
pub const TEMPLATE_STAMP: u8 = 200;
/// The MAC address of a template's network card (a restored guest's interface has it until
/// the agent sets the run's).
pub const TEMPLATE_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];

/// What a network card looks like to the guest, apart from its MAC address: the features it
/// offers (offloads only over a backend with the virtio-net header) and its MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetShape {
    /// The backend carries the virtio-net header (tap): checksum and segmentation offloads.
    pub vnet_hdr: bool,
    /// The MTU the card reports.
    pub mtu: u16,
}

/// Errors making or finding a template.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The template VM did not get to the point of being saved.
    #[error("making the template: {0}")]
    Make(String),
    /// Another run was making the same template for longer than the wait allowed.
    #[error("another run kept making this template for {0:?}")]
    Busy(Duration),
    /// A template exists but cannot be used.
    #[error(transparent)]
    Damaged(#[from] snapshot::Error),
}

/// Everything that shapes the template's guest.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs with the agent.
    pub initrd: PathBuf,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The run's kernel command line (the template adds [`TEMPLATE_ARG`]).
    pub cmdline: String,
    /// Tags of the virtio-fs devices, in slot order.
    pub tags: Vec<String>,
    /// The network card after them, if any.
    pub net: Option<NetShape>,
}

/// The template directory: `$SKIFF_TEMPLATES`, else `${SKIFF_CACHE:-~/.cache/skiff}/templates`.
pub fn templates_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SKIFF_TEMPLATES").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("SKIFF_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"))
                .join(".cache/skiff")
        });
    cache.join("templates")
}

fn file_identity(h: &mut Sha256, what: &str, p: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let canon = std::fs::canonicalize(p).map_err(|e| Error::Io {
        what: "cannot find",
        path: p.to_path_buf(),
        source: e,
    })?;
    let md = std::fs::metadata(&canon).map_err(|e| Error::Io {
        what: "cannot stat",
        path: canon.clone(),
        source: e,
    })?;
    h.update(format!(
        "{what}={}\0{}\0{}.{}\0{}:{}\0",
        canon.display(),
        md.len(),
        md.mtime(),
        md.mtime_nsec(),
        md.dev(),
        md.ino()
    ));
    Ok(())
}

/// The template key of `spec` (hex).
pub fn key(spec: &TemplateSpec) -> Result<String, Error> {
    let mut h = Sha256::new();
    h.update(format!(
        "skiff={}\0backend={}\0format={}\0",
        snapshot::skiff_version(),
        crate::hypervisor::BACKEND_NAME,
        snapshot::FORMAT_VERSION
    ));
    file_identity(&mut h, "kernel", &spec.kernel)?;
    file_identity(&mut h, "initrd", &spec.initrd)?;
    h.update(format!(
        "cpus={}\0mem={}\0cmdline={}\0",
        spec.cpus, spec.memory_mib, spec.cmdline
    ));
    for t in &spec.tags {
        h.update(format!("tag={t}\0"));
    }
    if let Some(n) = spec.net {
        h.update(format!("net=vnet_hdr:{},mtu:{}\0", n.vnet_hdr, n.mtu));
    }
    Ok(h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// What [`find_or_make`] found.
#[derive(Debug)]
pub enum Found {
    /// A valid template, read and checked.
    Ready(Arc<Loaded>),
    /// None existed; one was made now (and is returned read and checked).
    Made(Arc<Loaded>),
}

/// The template for `spec`: the existing one when it is valid; else made now (a cold boot of
/// a template VM, at most `timeout`). A damaged template is removed and reported as an error
/// (the caller boots cold and warns; the next run makes a new one).
///
/// Makers of the same template take turns (an exclusive `flock` on `templates/.<key>.lock`,
/// waited for at most `timeout`): the first makes it, the others then find it ready, so N
/// runs started at once boot one template VM, not N.
pub fn find_or_make(spec: &TemplateSpec, timeout: Duration) -> Result<Found, Error> {
    let key = key(spec)?;
    let parent = templates_dir();
    let dir = parent.join(&key);
    if let Some(found) = existing(&dir)? {
        return Ok(Found::Ready(found));
    }
    // A cache that cannot take a template (read-only, full) must not cost a template boot.
    std::fs::create_dir_all(&parent)
        .and_then(|_| tempfile_probe(&parent))
        .map_err(|e| Error::Io {
            what: "cannot write templates in",
            path: parent.clone(),
            source: e,
        })?;
    let lock_path = parent.join(format!(".{key}.lock"));
    let _lock = lock(&lock_path, timeout)?;
    // Made by the run that held the lock before us?
    if let Some(found) = existing(&dir)? {
        return Ok(Found::Ready(found));
    }
    make(spec, &dir, timeout)?;
    Ok(Found::Made(Arc::new(snapshot::load(&dir)?)))
}

/// The template in `dir` if there is one; a damaged one is removed and reported.
fn existing(dir: &Path) -> Result<Option<Arc<Loaded>>, Error> {
    if !dir.join(snapshot::STATE_FILE).exists() {
        return Ok(None);
    }
    match snapshot::load(dir) {
        Ok(l) => Ok(Some(Arc::new(l))),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(Error::Damaged(e))
        }
    }
}

/// An exclusive `flock` on `path` (created if missing), waited for at most `timeout`; held
/// until the returned file is dropped (also when the process dies).
fn lock(path: &Path, timeout: Duration) -> Result<std::fs::File, Error> {
    use rustix::fs::{flock, FlockOperation};
    let io = |what, e| Error::Io {
        what,
        path: path.to_path_buf(),
        source: e,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io("cannot open", e))?;
    let start = Instant::now();
    let mut noted = false;
    loop {
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(f),
            Err(rustix::io::Errno::WOULDBLOCK) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io("cannot lock", e.into())),
        }
        if start.elapsed() >= timeout {
            return Err(Error::Busy(timeout));
        }
        if !noted {
            tracing::info!(lock = %path.display(), "another run is making this template; waiting for it");
            noted = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots a template VM for `spec` and saves it in `dir` (atomically: of two makers racing,
/// one's copy stays).
pub fn make(spec: &TemplateSpec, dir: &Path, timeout: Duration) -> Result<(), Error> {
    let t0 = Instant::now();
    let work = crate::run_dir::base()
        .map_err(|e| Error::Make(e.to_string()))?
        .join(format!(
            "template-{}-{}",
            std::process::id(),
            t0.elapsed().as_nanos() ^ u128::from(rand_u32())
        ));
    crate::run_dir::create_exclusive(&work).map_err(|e| Error::Make(e.to_string()))?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(work.clone());
    let empty = work.join("empty");
    std::fs::create_dir(&empty).map_err(|e| Error::Io {
        what: "cannot create",
        path: empty.clone(),
        source: e,
    })?;
    let uds = work.join("vsock.sock");
    let (vsock, events) = crate::vsock_device::create(&uds).map_err(Error::Make)?;
    let mut devices = vec![vsock];
    let budget = fs_device::FdBudget::default();
    for tag in &spec.tags {
        let share = Share {
            tag: tag.clone(),
            host: empty.clone(),
            read_only: true,
            xattr_ownership: false,
            policy: Default::default(),
        };
        devices.push(fs_device::create(&share, &budget).map_err(|e| Error::Make(e.to_string()))?);
    }
    // Kept until the VM ends.
    let mut _net_loop = None;
    if let Some(n) = spec.net {
        let backend = NullBackend::new(n.vnet_hdr)
            .map_err(|e| Error::Make(format!("the template's network card: {e}")))?;
        let mut ncfg = NetConfig::new(TEMPLATE_MAC);
        ncfg.mtu = n.mtu;
        let (f, l) = crate::net_device::create_with_backend(Box::new(backend), ncfg)
            .map_err(|e| Error::Make(e.to_string()))?;
        devices.push(f);
        _net_loop = Some(l);
    }
    let console = work.join("console.log");
    let cfg = VmConfig {
        kernel: spec.kernel.clone(),
        initrd: Some(spec.initrd.clone()),
        cmdline: format!("{} {TEMPLATE_ARG}", spec.cmdline),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        serial: SerialOut::File(console.clone()),
        pit: vm::PitMode::Auto,
        snapshot: Some(SnapshotAt {
            dir: dir.to_path_buf(),
            stamp: TEMPLATE_STAMP,
        }),
        restore: None,
        serial_in: None,
        gdb: None,
    };
    let control = VmControl::new();
    let ctl = control.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("template-vm".into())
        .spawn(move || {
            let _ = tx.send(vm::run_controlled(
                &cfg,
                Timings::new(Instant::now()),
                devices,
                &ctl,
            ));
        })
        .map_err(|e| Error::Make(format!("cannot start the template VM: {e}")))?;
    let r = match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            control.stop();
            let _ = rx.recv_timeout(Duration::from_secs(5));
            let _ = events.stop();
            return Err(Error::Make(format!(
                "the template VM did not get ready within {timeout:?}; console:\n{}",
                crate::sandbox::console_tail(&console)
            )));
        }
    };
    let _ = events.stop();
    match r {
        Ok(res) if res.exit == GuestExit::Snapshotted => {
            tracing::info!(
                dir = %dir.display(),
                ms = format!("{:.0}", t0.elapsed().as_secs_f64() * 1e3),
                "template made"
            );
            Ok(())
        }
        Ok(res) => Err(Error::Make(format!(
            "the template VM ended ({:?}) before it was saved; console:\n{}",
            res.exit,
            crate::sandbox::console_tail(&console)
        ))),
        Err(e) => Err(Error::Make(format!("the template VM failed: {e}"))),
    }
}

/// Creates and removes a file in `dir`: whether a template could be written there.
fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(format!(".probe-{}-{}", std::process::id(), rand_u32()));
    std::fs::File::create(&p)?;
    std::fs::remove_file(&p)
}

fn rand_u32() -> u32 {
    let b = entropy();
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// 64 bytes of fresh host entropy (`/dev/urandom`) for [`skiff_protocol::Client::reseed`].
pub fn entropy() -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; 64];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        // Never the same bytes twice even then: the clock and the process id.
        let seed = format!("{}-{}", now_ns(), std::process::id());
        b = Sha256::digest(seed.as_bytes()).to_vec();
    }
    b
}

/// The host's wall clock in nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One template on disk (for `vmm template ls`).
#[derive(Debug)]
pub struct Listed {
    /// Its directory.
    pub dir: PathBuf,
    /// Bytes the files take on disk (the memory file is sparse).
    pub disk_bytes: u64,
    /// What it is, or why it cannot be used.
    pub summary: Result<String, String>,
}

/// Every template in the cache.
pub fn list() -> Vec<Listed> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(templates_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if !dir.is_dir() || e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let disk_bytes = [snapshot::STATE_FILE, snapshot::MEMORY_FILE]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.blocks() * 512)
            .sum();
        let summary = snapshot::load(&dir)
            .map(|l| {
                format!(
                    "{} vCPU, {} MiB, {} virtio devices",
                    l.state.cpus,
                    l.state.memory_mib,
                    l.state.devices.len().saturating_sub(1)
                )
            })
            .map_err(|e| e.to_string());
        out.push(Listed {
            dir,
            disk_bytes,
            summary,
        });
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    out
}

/// Removes every template; returns how many.
pub fn remove_all() -> Result<usize, Error> {
    let dir = templates_dir();
    let n = list().len();
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::Io {
            what: "cannot remove",
            path: dir,
            source: e,
        }),
    }
}
