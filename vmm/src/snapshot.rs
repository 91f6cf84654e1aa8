//! Snapshots of a whole VM on disk: a directory holding `state` (everything but guest RAM, in
//! a versioned, checksummed file) and `memory` (guest RAM, a sparse file: pages the guest
//! never wrote are holes).
//!
//! Restore maps `memory` `MAP_PRIVATE`: a restored VM reads the file's pages through the page
//! cache (shared by every VM restored from the same snapshot) and gets a private copy of a page
//! only when it writes it. Pages a VM never touches cost it nothing.
//!
//! Integrity: `state` ends in a SHA-256 of everything before it, and records the length and a
//! SHA-256 of the data pages of `memory` (offset and contents of every non-zero page, found
//! with `SEEK_DATA`, so the cost follows what the guest wrote, not its RAM size). A truncated,
//! bit-flipped or foreign snapshot (another format version, backend, or Skiff version) is an
//! error, never a VM started from it. Hashing the memory is the slowest part of a restore, so
//! once a memory file has matched, `verified` records its identity (device, inode, size,
//! modification and change time, the digest it matched); a later load of the same unchanged
//! file skips the hash. Any write to the file changes its change time (which a user cannot
//! set), so the record no longer matches and the file is hashed again; files changed in the
//! last two seconds are never recorded (change times are coarse).
//!
//! A snapshot is written into a temporary sibling directory and renamed into place, so a
//! reader never sees half of one, and of two writers racing for the same directory one wins
//! and the other's copy is removed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

/// A record that `memory` matched the state's digest (see [`load`]): hashing tens of MiB costs
/// a restore more than everything else it does.
pub const VERIFIED_FILE: &str = "verified";
/// Seconds a memory file must have been unchanged before [`load`] records it as verified.
const STAMP_MIN_AGE_S: i64 = 2;

/// First bytes of a state file.
pub const MAGIC: &[u8; 8] = b"SKIFFSNP";
/// Version of the state file's layout; bumped on any change.
pub const FORMAT_VERSION: u32 = 1;
/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// File names inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file accepted (it holds registers and device state, not RAM).
const MAX_STATE_BYTES: u64 = 64 << 20;
const PAGE: usize = 4096;

/// Errors of snapshots.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a snapshot file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The snapshot is damaged, truncated, or not one this VMM can use.
    #[error("snapshot {}: {reason}", dir.display())]
    Invalid {
        /// The snapshot directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One guest RAM region and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// Everything of a VM but its RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    /// The hypervisor backend that wrote the blobs (`hypervisor::BACKEND_NAME`).
    pub backend: String,
    /// The Skiff version that wrote the snapshot.
    pub skiff_version: String,
    /// vCPU count.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Guest RAM layout.
    pub regions: Vec<RegionEntry>,
    /// The VM-wide hypervisor state blob.
    pub vm: Vec<u8>,
    /// One hypervisor state blob per vCPU, by vCPU id.
    pub vcpus: Vec<Vec<u8>>,
    /// Device states by name (e.g. `serial`).
    pub devices: Vec<(String, Vec<u8>)>,
    /// Length of the memory file.
    pub memory_len: u64,
    /// SHA-256 over the memory file's non-zero pages (see the module docs).
    pub memory_digest: [u8; 32],
}

impl VmState {
    /// The saved state of device `name`, if any.
    pub fn device(&self, name: &str) -> Option<&[u8]> {
        self.devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    }
}

/// This build's version string, recorded in and required of every snapshot.
pub fn skiff_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

// ---- encoding ----

struct Enc(Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
}

struct Dec<'a> {
    b: &'a [u8],
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err(format!(
                "ends early ({n} bytes wanted, {} left)",
                self.b.len()
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| format!("a length of {n}"))?;
        self.take(n)
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
    }
    /// A count of items each at least `min` bytes long: never more than could fit.
    fn count(&mut self, min: usize) -> std::result::Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min) > self.b.len() {
            return Err(format!("claims {n} entries, more than fit"));
        }
        Ok(n)
    }
}

/// Encodes `s` as a complete state file (magic, version, body, SHA-256).
pub fn encode(s: &VmState) -> Vec<u8> {
    let mut e = Enc(Vec::new());
    e.0.extend_from_slice(MAGIC);
    e.u32(FORMAT_VERSION);
    e.bytes(s.backend.as_bytes());
    e.bytes(s.skiff_version.as_bytes());
    e.u32(s.cpus);
    e.u64(s.memory_mib);
    e.u32(s.regions.len() as u32);
    for r in &s.regions {
        e.u64(r.guest_addr);
        e.u64(r.size);
        e.u64(r.file_offset);
    }
    e.bytes(&s.vm);
    e.u32(s.vcpus.len() as u32);
    for v in &s.vcpus {
        e.bytes(v);
    }
    e.u32(s.devices.len() as u32);
    for (n, b) in &s.devices {
        e.bytes(n.as_bytes());
        e.bytes(b);
    }
    e.u64(s.memory_len);
    e.0.extend_from_slice(&s.memory_digest);
    let sum = Sha256::digest(&e.0);
    e.0.extend_from_slice(&sum);
    e.0
}

/// Decodes a state file, checking its checksum and everything this build requires of it.
pub fn decode(b: &[u8]) -> std::result::Result<VmState, String> {
    if b.len() < MAGIC.len() + 4 + 32 {
        return Err(format!("state file is too short ({} bytes)", b.len()));
    }
    if &b[..MAGIC.len()] != MAGIC {
        return Err("not a Skiff snapshot state file".into());
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("state file checksum mismatch (damaged or truncated)".into());
    }
    let mut d = Dec {
        b: &body[MAGIC.len()..],
    };
    let version = d.u32()?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "state format version {version}, this VMM reads {FORMAT_VERSION}"
        ));
    }
    let backend = d.string()?;
    if backend != crate::hypervisor::BACKEND_NAME {
        return Err(format!(
            "made by the {backend} backend, this VMM is {}",
            crate::hypervisor::BACKEND_NAME
        ));
    }
    let made_by = d.string()?;
    if made_by != skiff_version() {
        return Err(format!(
            "made by Skiff {made_by}, this is {}",
            skiff_version()
        ));
    }
    let cpus = d.u32()?;
    let memory_mib = d.u64()?;
    let n = d.count(24)?;
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        regions.push(RegionEntry {
            guest_addr: d.u64()?,
            size: d.u64()?,
            file_offset: d.u64()?,
        });
    }
    let vm = d.bytes()?.to_vec();
    let n = d.count(8)?;
    let mut vcpus = Vec::with_capacity(n);
    for _ in 0..n {
        vcpus.push(d.bytes()?.to_vec());
    }
    let n = d.count(16)?;
    let mut devices = Vec::with_capacity(n);
    for _ in 0..n {
        let name = d.string()?;
        devices.push((name, d.bytes()?.to_vec()));
    }
    let memory_len = d.u64()?;
    let mut memory_digest = [0u8; 32];
    memory_digest.copy_from_slice(d.take(32)?);
    if !d.b.is_empty() {
        return Err(format!("{} unexpected bytes at the end", d.b.len()));
    }
    if vcpus.len() != cpus as usize || cpus == 0 {
        return Err(format!("{} vCPU states for {cpus} vCPUs", vcpus.len()));
    }
    let mut end = 0u64;
    for r in &regions {
        if r.size == 0 || r.size % PAGE as u64 != 0 || r.file_offset != end {
            return Err("guest memory regions are not laid out back to back".into());
        }
        end = end
            .checked_add(r.size)
            .ok_or_else(|| "guest memory regions overflow".to_string())?;
    }
    if end != memory_len || regions.is_empty() {
        return Err(format!(
            "regions cover {end} bytes, the memory file has {memory_len}"
        ));
    }
    Ok(VmState {
        backend,
        skiff_version: made_by,
        cpus,
        memory_mib,
        regions,
        vm,
        vcpus,
        devices,
        memory_len,
        memory_digest,
    })
}

// ---- memory ----

/// Feeds one non-zero page into the memory digest.
fn digest_page(h: &mut Sha256, offset: u64, page: &[u8]) {
    h.update(offset.to_le_bytes());
    h.update(page);
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|b| *b == 0)
}

/// Writes guest RAM to `path` (non-zero pages only; the rest stay holes) and returns the
/// region table, the file's length and its digest.
fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<(Vec<RegionEntry>, u64, [u8; 32])> {
    let io = |what, e| Error::Io {
        what,
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = File::create(path).map_err(|e| io("cannot create", e))?;
    let mut h = Sha256::new();
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut page = vec![0u8; PAGE];
    for r in mem.iter() {
        let size = r.len();
        regions.push(RegionEntry {
            guest_addr: r.start_addr().0,
            size,
            file_offset: offset,
        });
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(PAGE as u64) as usize;
            let buf = &mut page[..n];
            use vm_memory::Bytes;
            r.read_slice(buf, MemoryRegionAddress(at))
                .map_err(|e| io("cannot read guest memory for", std::io::Error::other(e)))?;
            if !is_zero(buf) {
                digest_page(&mut h, offset + at, buf);
                f.seek(SeekFrom::Start(offset + at))
                    .and_then(|_| f.write_all(buf))
                    .map_err(|e| io("cannot write", e))?;
            }
            at += n as u64;
        }
        offset += size;
    }
    f.set_len(offset).map_err(|e| io("cannot size", e))?;
    f.sync_all().map_err(|e| io("cannot sync", e))?;
    Ok((regions, offset, h.finalize().into()))
}

/// The digest of a memory file as written by [`write_memory`]: only its data extents are
/// read (`SEEK_DATA`/`SEEK_HOLE`), and zero pages inside them are skipped as holes are.
fn digest_memory(f: &mut File, len: u64) -> std::io::Result<[u8; 32]> {
    use std::os::fd::AsFd;
    let mut h = Sha256::new();
    let mut page = vec![0u8; PAGE];
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(f.as_fd(), rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(f.as_fd(), rustix::fs::SeekFrom::Hole(data))?.min(len);
        // Pages are what the writer hashed: start at the page holding `data`.
        let mut at = data - data % PAGE as u64;
        f.seek(SeekFrom::Start(at))?;
        while at < hole {
            let n = (len - at).min(PAGE as u64) as usize;
            f.read_exact(&mut page[..n])?;
            if !is_zero(&page[..n]) {
                digest_page(&mut h, at, &page[..n]);
            }
            at += n as u64;
        }
        pos = at.max(hole);
    }
    Ok(h.finalize().into())
}

/// Saves a snapshot into `dir` (which must not exist yet): RAM from `mem`, the rest from
/// `state` (its region table, memory length and digest are filled in here).
pub fn save(dir: &Path, mut state: VmState, mem: &GuestMemoryMmap) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    std::fs::create_dir_all(parent).map_err(|e| Error::Io {
        what: "cannot create",
        path: parent.to_path_buf(),
        source: e,
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| Error::Io {
        what: "cannot create",
        path: tmp.clone(),
        source: e,
    })?;
    let result = (|| {
        let (regions, len, digest) = write_memory(mem, &tmp.join(MEMORY_FILE))?;
        state.regions = regions;
        state.memory_len = len;
        state.memory_digest = digest;
        let path = tmp.join(STATE_FILE);
        let io = |what, e| Error::Io {
            what,
            path: path.clone(),
            source: e,
        };
        let mut f = File::create(&path).map_err(|e| io("cannot create", e))?;
        f.write_all(&encode(&state))
            .and_then(|_| f.sync_all())
            .map_err(|e| io("cannot write", e))?;
        // Renaming a directory onto an existing non-empty one fails: the first writer wins.
        match std::fs::rename(&tmp, dir) {
            Ok(()) => Ok(()),
            Err(e) if dir.join(STATE_FILE).exists() => {
                tracing::debug!(
                    "snapshot {} was written by another VMM first ({e})",
                    dir.display()
                );
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => Err(Error::Io {
                what: "cannot move the snapshot into place at",
                path: dir.to_path_buf(),
                source: e,
            }),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// A thread that writes one snapshot when asked. Spawn it before the VM's threads enter their
/// seccomp allowlists (which hold no file creation): it stays outside them and does nothing
/// but wait for the state and write the files.
#[derive(Debug)]
pub struct Writer {
    tx: std::sync::mpsc::SyncSender<VmState>,
    rx: std::sync::mpsc::Receiver<Result<()>>,
}

impl Writer {
    /// Starts the thread, which will save into `dir` with RAM from `mem`.
    pub fn spawn(dir: PathBuf, mem: GuestMemoryMmap) -> std::io::Result<Self> {
        let (tx, req) = std::sync::mpsc::sync_channel::<VmState>(1);
        let (done, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || {
                if let Ok(state) = req.recv() {
                    let _ = done.send(save(&dir, state, &mem));
                }
            })?;
        Ok(Writer { tx, rx })
    }

    /// Has the thread save `state` and waits for it, at most `timeout`.
    pub fn write(&self, state: VmState, timeout: std::time::Duration) -> Result<()> {
        let gone = || Error::Io {
            what: "the snapshot writer thread ended before writing",
            path: PathBuf::new(),
            source: std::io::Error::other("thread gone"),
        };
        self.tx.send(state).map_err(|_| gone())?;
        match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::Io {
                what: "the snapshot was not written in time",
                path: PathBuf::new(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            }),
            Err(_) => Err(gone()),
        }
    }
}

/// A snapshot read back and checked: its state and its open memory file.
#[derive(Debug)]
pub struct Loaded {
    /// Everything but RAM.
    pub state: VmState,
    /// The memory file (mapped by [`Loaded::map_memory`]).
    pub memory: File,
    /// The memory digest was not computed: `verified` records that this very file (device,
    /// inode, size, modification and change times) already matched it.
    pub verified_by_stamp: bool,
}

/// Reads and checks the snapshot in `dir` (state checksum, version, backend, memory length
/// and digest).
pub fn load(dir: &Path) -> Result<Loaded> {
    let invalid = |reason: String| Error::Invalid {
        dir: dir.to_path_buf(),
        reason,
    };
    let state_path = dir.join(STATE_FILE);
    let f = File::open(&state_path).map_err(|e| Error::Io {
        what: "cannot open",
        path: state_path.clone(),
        source: e,
    })?;
    let mut bytes = Vec::new();
    f.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Io {
            what: "cannot read",
            path: state_path.clone(),
            source: e,
        })?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(invalid("state file is larger than any Skiff writes".into()));
    }
    let state = decode(&bytes).map_err(invalid)?;
    let mem_path = dir.join(MEMORY_FILE);
    let mut memory = File::open(&mem_path).map_err(|e| Error::Io {
        what: "cannot open",
        path: mem_path.clone(),
        source: e,
    })?;
    let len = memory
        .metadata()
        .map_err(|e| Error::Io {
            what: "cannot stat",
            path: mem_path.clone(),
            source: e,
        })?
        .len();
    if len != state.memory_len {
        return Err(invalid(format!(
            "memory file has {len} bytes, the state says {}",
            state.memory_len
        )));
    }
    let stamp_path = dir.join(VERIFIED_FILE);
    let stamp = memory
        .metadata()
        .ok()
        .map(|md| verified_stamp(&md, &state.memory_digest));
    let stamped = stamp
        .as_ref()
        .is_some_and(|(line, _)| std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == *line));
    if !stamped {
        let digest = digest_memory(&mut memory, len).map_err(|e| Error::Io {
            what: "cannot read",
            path: mem_path.clone(),
            source: e,
        })?;
        if digest != state.memory_digest {
            let _ = std::fs::remove_file(&stamp_path);
            return Err(invalid("memory file checksum mismatch (damaged)".into()));
        }
        if let Some((line, true)) = stamp {
            // Best effort (a read-only template directory just gets hashed every time).
            let tmp = dir.join(format!(".{VERIFIED_FILE}-{}", std::process::id()));
            if std::fs::write(&tmp, line).is_ok() && std::fs::rename(&tmp, &stamp_path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    Ok(Loaded {
        state,
        memory,
        verified_by_stamp: stamped,
    })
}

/// The `verified` line for a memory file with metadata `md` and the digest the state expects,
/// and whether it may be written: only for a file unchanged for [`STAMP_MIN_AGE_S`] (the
/// kernel's change times are coarse: a write within the same tick as the stamp would keep
/// them, one after that age cannot).
fn verified_stamp(md: &std::fs::Metadata, digest: &[u8; 32]) -> (String, bool) {
    use std::os::unix::fs::MetadataExt;
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let line = format!(
        "v1 {}:{} {} {}.{:09} {}.{:09} {hex}\n",
        md.dev(),
        md.ino(),
        md.len(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let old = now - md.ctime().max(md.mtime()) >= STAMP_MIN_AGE_S;
    (line, old)
}

impl Loaded {
    /// Maps the memory file as guest RAM, copy-on-write (`MAP_PRIVATE`): writes stay in this
    /// process, the file is never changed.
    pub fn map_memory(&self) -> Result<GuestMemoryMmap> {
        let mut regions = Vec::new();
        for r in &self.state.regions {
            let file = self.memory.try_clone().map_err(|e| Error::Io {
                what: "cannot reopen",
                path: PathBuf::from(MEMORY_FILE),
                source: e,
            })?;
            let size = usize::try_from(r.size).map_err(|_| Error::Invalid {
                dir: PathBuf::new(),
                reason: format!("region of {} bytes", r.size),
            })?;
            let mapping = MmapRegion::build(
                Some(FileOffset::new(file, r.file_offset)),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| Error::Io {
                what: "cannot map",
                path: PathBuf::from(MEMORY_FILE),
                source: std::io::Error::other(e.to_string()),
            })?;
            regions.push(
                GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                    Error::Invalid {
                        dir: PathBuf::new(),
                        reason: "a guest memory region wraps around".into(),
                    }
                })?,
            );
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Invalid {
            dir: PathBuf::new(),
            reason: format!("guest memory regions: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vm_memory::Bytes;

    fn sample() -> VmState {
        VmState {
            backend: crate::hypervisor::BACKEND_NAME.into(),
            skiff_version: skiff_version(),
            cpus: 2,
            memory_mib: 2,
            regions: vec![],
            vm: vec![1, 2, 3],
            vcpus: vec![vec![4; 10], vec![5; 20]],
            devices: vec![("serial".into(), vec![6; 7])],
            memory_len: 0,
            memory_digest: [0; 32],
        }
    }

    fn mem() -> GuestMemoryMmap {
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 30), 1 << 20),
        ])
        .unwrap();
        m.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        m.write_slice(&[0xab; 5000], GuestAddress((1 << 30) + 4000))
            .unwrap();
        m
    }

    #[test]
    fn save_load_map_round_trip_and_copy_on_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        save(&dir, sample(), &mem()).unwrap();
        let l = load(&dir).unwrap();
        assert_eq!(l.state.vcpus, sample().vcpus);
        assert_eq!(l.state.device("serial"), Some(&[6u8; 7][..]));
        assert_eq!(l.state.regions.len(), 2);
        let m = l.map_memory().unwrap();
        let mut b = [0u8; 5];
        m.read_slice(&mut b, GuestAddress(0x1234)).unwrap();
        assert_eq!(&b, b"hello");
        let mut b = [0u8; 5000];
        m.read_slice(&mut b, GuestAddress((1 << 30) + 4000))
            .unwrap();
        assert_eq!(b, [0xab; 5000]);
        // Writes stay private: the file and a second mapping never see them.
        m.write_slice(b"XXXXX", GuestAddress(0x1234)).unwrap();
        let m2 = load(&dir).unwrap().map_memory().unwrap();
        let mut b = [0u8; 5];
        m2.read_slice(&mut b, GuestAddress(0x1234)).unwrap();
        assert_eq!(&b, b"hello");
        // Mostly holes: the file's blocks cover the written pages only.
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap();
        assert_eq!(md.len(), 2 << 20);
        assert!(md.blocks() * 512 <= 64 << 10, "{} blocks", md.blocks());
        // A second writer of the same snapshot leaves the first one, valid.
        save(&dir, sample(), &mem()).unwrap();
        load(&dir).unwrap();
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no temp dir left"
        );
    }

    #[test]
    fn damaged_snapshots_are_refused_with_a_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        save(&dir, sample(), &mem()).unwrap();
        let state = std::fs::read(dir.join(STATE_FILE)).unwrap();
        // Every truncation and every single-bit flip of the state file.
        for cut in 0..state.len() {
            assert!(decode(&state[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..state.len() * 8 {
            let mut s = state.clone();
            s[i / 8] ^= 1 << (i % 8);
            assert!(decode(&s).is_err(), "bit {i}");
        }
        // Memory: truncated, and one bit flipped in a written page.
        let mp = dir.join(MEMORY_FILE);
        let orig = std::fs::read(&mp).unwrap();
        std::fs::write(&mp, &orig[..orig.len() - PAGE]).unwrap();
        assert!(load(&dir)
            .unwrap_err()
            .to_string()
            .contains("memory file has"));
        let mut flipped = orig.clone();
        flipped[0x1235] ^= 0x10;
        std::fs::write(&mp, &flipped).unwrap();
        assert!(load(&dir).unwrap_err().to_string().contains("checksum"));
        // A page that was zero becoming non-zero is caught too.
        let mut flipped = orig.clone();
        flipped[0x8000] = 1;
        std::fs::write(&mp, &flipped).unwrap();
        assert!(load(&dir).unwrap_err().to_string().contains("checksum"));
        std::fs::write(&mp, &orig).unwrap();
        load(&dir).unwrap();
        // Another version or backend.
        let mut s = sample();
        s.skiff_version = "0.0.0-other".into();
        assert!(decode(&encode(&s)).unwrap_err().contains("made by Skiff"));
        let mut s = sample();
        s.backend = "hvf-aarch64x".into();
        assert!(decode(&encode(&s)).unwrap_err().contains("backend"));
    }

    #[test]
    fn a_verified_memory_file_is_hashed_again_only_when_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        save(&dir, sample(), &mem()).unwrap();
        // Fresh files are never recorded (coarse change times).
        assert!(!load(&dir).unwrap().verified_by_stamp);
        assert!(!dir.join(VERIFIED_FILE).exists());
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert!(!load(&dir).unwrap().verified_by_stamp);
        assert!(dir.join(VERIFIED_FILE).exists());
        let l = load(&dir).unwrap();
        assert!(l.verified_by_stamp);
        let mut b = [0u8; 5];
        l.map_memory()
            .unwrap()
            .read_slice(&mut b, GuestAddress(0x1234))
            .unwrap();
        assert_eq!(&b, b"hello");
        // One bit flipped in place (same size): the change time moves, the record no longer
        // matches, the hash catches it.
        let mp = dir.join(MEMORY_FILE);
        let mut f = std::fs::OpenOptions::new().write(true).open(&mp).unwrap();
        f.seek(SeekFrom::Start(0x1235)).unwrap();
        f.write_all(b"f").unwrap();
        drop(f);
        assert!(load(&dir).unwrap_err().to_string().contains("checksum"));
        assert!(!dir.join(VERIFIED_FILE).exists());
        // A forged record for the damaged file does not help: it must name its change time.
        std::fs::write(
            dir.join(VERIFIED_FILE),
            std::fs::read_to_string(dir.join(STATE_FILE)).unwrap_or_default(),
        )
        .unwrap();
        assert!(load(&dir).unwrap_err().to_string().contains("checksum"));
    }
}
