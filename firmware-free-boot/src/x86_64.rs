//! x86_64 firmware-free boot.
//!
//! Two entry paths:
//! - **PVH** (fastest): an ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note is entered in
//!   32-bit protected mode, paging off, with `%ebx` pointing at an `hvm_start_info`. 64-bit
//!   ELFs load through `linux-loader`; 32-bit x86 ELFs (e.g. `ld -m elf_i386` guests, which
//!   QEMU and Firecracker also boot as PVH) through this module's own bounds-checked
//!   program-header loader, and only with the PVH note.
//! - **64-bit Linux boot protocol**: a `bzImage` (entered at `startup_64`, load address + 0x200)
//!   or an ELF without the PVH note (entered at `e_entry`) runs in long mode on the identity
//!   page tables built here, with `%rsi` pointing at the zero page (`boot_params`).

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    ReadVolatile, VolatileMemoryError, VolatileSlice,
};

use crate::{Error, Result};

/// Guest physical layout (addresses below 1 MiB follow what Linux and Firecracker expect).
pub mod layout {
    /// GDT (5 entries).
    pub const GDT_ADDR: u64 = 0x500;
    /// IDT (empty).
    pub const IDT_ADDR: u64 = 0x540;
    /// PVH `hvm_start_info`.
    pub const PVH_INFO_ADDR: u64 = 0x6000;
    /// PVH module list (the initrd).
    pub const PVH_MODLIST_ADDR: u64 = 0x6100;
    /// PVH memory map.
    pub const PVH_MEMMAP_ADDR: u64 = 0x6200;
    /// Zero page (`boot_params`) for the 64-bit Linux boot protocol.
    pub const ZERO_PAGE_ADDR: u64 = 0x7000;
    /// Initial stack pointer.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// PML4 of the identity page tables (then one PDPT page and four PD pages).
    pub const PML4_ADDR: u64 = 0x9000;
    /// Kernel command line.
    pub const CMDLINE_ADDR: u64 = 0x20000;
    /// Longest command line (including the NUL).
    pub const CMDLINE_MAX: usize = 0x10000;
    /// Extended BIOS data area: the MP table lives here.
    pub const EBDA_START: u64 = 0x9fc00;
    /// Start of high memory (kernels load at or above it).
    pub const HIMEM_START: u64 = 0x10_0000;
    /// Start of the 32-bit MMIO hole (devices, IOAPIC, LAPIC).
    pub const MMIO_GAP_START: u64 = 0xc000_0000;
    /// End of the 32-bit MMIO hole.
    pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
    /// IOAPIC MMIO base.
    pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
    /// Local APIC MMIO base.
    pub const LAPIC_ADDR: u32 = 0xfee0_0000;
}

/// GDT used at entry: null, 64-bit code, data, TSS, 32-bit code.
pub const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: code, long mode
    0x00cf_9300_0000_ffff, // 0x10: data, 4 GiB flat
    0x008f_8b00_0000_ffff, // 0x18: TSS (busy)
    0x00cf_9b00_0000_ffff, // 0x20: code, 32-bit flat
];
/// Selector of the 64-bit code segment.
pub const SEL_CODE64: u16 = 0x08;
/// Selector of the data segment.
pub const SEL_DATA: u16 = 0x10;
/// Selector of the TSS.
pub const SEL_TSS: u16 = 0x18;
/// Selector of the 32-bit code segment.
pub const SEL_CODE32: u16 = 0x20;

/// CR0 bits.
pub const CR0_PE: u64 = 1;
/// CR0.ET.
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Size of an ELF32 program header.
const ELF32_PHDR_SIZE: u16 = 32;
/// Most program headers a 32-bit PVH ELF may have (each `PT_LOAD` is a copy into guest RAM).
const ELF32_MAX_PHDRS: u16 = 64;

/// RAM ranges `(guest address, size)` for `mem_bytes` of guest RAM, skipping the MMIO hole.
pub fn memory_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(layout::MMIO_GAP_START);
    let mut v = vec![(0, low)];
    if mem_bytes > low {
        v.push((layout::MMIO_GAP_END, mem_bytes - low));
    }
    v
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode at this address, `%ebx` = `hvm_start_info`.
    Pvh(u64),
    /// 64-bit long mode at this address, `%rsi` = zero page.
    Linux64(u64),
}

/// What was loaded.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Entry point and mode.
    pub entry: Entry,
    /// First guest byte after the kernel.
    pub kernel_end: u64,
    /// Whether the image is a Linux kernel (has a "Linux" ELF note, or is a bzImage).
    pub is_linux: bool,
    /// The bzImage setup header, for the zero page.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// A kernel image in memory that `linux-loader` can read (it wants `ReadVolatile + Seek`).
struct ImageReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Read for ImageReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl ReadVolatile for ImageReader<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> std::result::Result<usize, VolatileMemoryError> {
        let mut rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n = rest.read_volatile(buf)?;
        self.pos += n;
        Ok(n)
    }
}

impl Seek for ImageReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => i128::from(p),
            SeekFrom::End(d) => self.data.len() as i128 + i128::from(d),
            SeekFrom::Current(d) => self.pos as i128 + i128::from(d),
        };
        if new < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        self.pos = usize::try_from(new).unwrap_or(usize::MAX);
        Ok(self.pos as u64)
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// One ELF note: its name (NULs trimmed), type and descriptor bytes.
struct Note<'a> {
    name: &'a [u8],
    kind: u32,
    desc: &'a [u8],
}

/// The notes of a little-endian ELF, 32- or 64-bit (by `e_ident[EI_CLASS]`). Bounded (64
/// program headers, 256 notes); every offset and length comes from the file and is checked, a
/// malformed note ends its segment's walk.
fn elf_notes(image: &[u8]) -> Vec<Note<'_>> {
    let mut notes = Vec::new();
    let elf32 = image.get(4) == Some(&1);
    // (e_phoff, e_phentsize, e_phnum) and, per program header, (p_offset, p_filesz).
    let header = if elf32 {
        (
            u32_at(image, 0x1c).map(u64::from),
            u16_at(image, 0x2a),
            u16_at(image, 0x2c),
        )
    } else {
        (
            u64_at(image, 0x20),
            u16_at(image, 0x36),
            u16_at(image, 0x38),
        )
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = header else {
        return notes;
    };
    for i in 0..usize::from(phnum.min(64)) {
        let Some(ph) = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i.checked_mul(usize::from(phentsize))?))
        else {
            break;
        };
        if u32_at(image, ph) != Some(4) {
            continue; // not PT_NOTE
        }
        let segment = if elf32 {
            (
                u32_at(image, ph.saturating_add(4)).map(u64::from),
                u32_at(image, ph.saturating_add(16)).map(u64::from),
            )
        } else {
            (
                u64_at(image, ph.saturating_add(8)),
                u64_at(image, ph.saturating_add(32)),
            )
        };
        let (Some(off), Some(size)) = segment else {
            continue;
        };
        let Ok(mut p) = usize::try_from(off) else {
            continue;
        };
        let end = usize::try_from(off.saturating_add(size))
            .unwrap_or(usize::MAX)
            .min(image.len());
        while p.saturating_add(12) <= end && notes.len() < 256 {
            let (Some(namesz), Some(descsz), Some(kind)) = (
                u32_at(image, p),
                u32_at(image, p.saturating_add(4)),
                u32_at(image, p.saturating_add(8)),
            ) else {
                break;
            };
            let (namesz, descsz) = (namesz as usize, descsz as usize);
            let name_at = p.saturating_add(12);
            let name = name_at
                .checked_add(namesz)
                .and_then(|e| image.get(name_at..e))
                .unwrap_or(&[]);
            let desc_at = name_at.saturating_add(namesz.div_ceil(4).saturating_mul(4));
            let desc = desc_at
                .checked_add(descsz)
                .and_then(|e| image.get(desc_at..e))
                .unwrap_or(&[]);
            let trimmed = name.iter().rposition(|&b| b != 0).map_or(0, |n| n + 1);
            notes.push(Note {
                name: &name[..trimmed],
                kind,
                desc,
            });
            p = desc_at.saturating_add(descsz.div_ceil(4).saturating_mul(4));
        }
    }
    notes
}

/// Names of the ELF notes in a little-endian ELF, 32- or 64-bit (bounded; malformed notes end
/// the walk).
pub fn elf_note_names(image: &[u8]) -> Vec<String> {
    elf_notes(image)
        .iter()
        .map(|n| String::from_utf8_lossy(n.name).into_owned())
        .collect()
}

/// The 32-bit PVH entry point of an ELF (its first `Xen` note of type
/// `XEN_ELFNOTE_PHYS32_ENTRY` with a descriptor of at least 4 bytes).
fn pvh_entry(image: &[u8]) -> Option<u64> {
    elf_notes(image)
        .iter()
        .find(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
        .and_then(|n| u32_at(n.desc, 0))
        .map(u64::from)
}

/// Loads a 32-bit x86 ELF that has a PVH entry note (what QEMU and Firecracker boot as PVH,
/// e.g. an `ld -m elf_i386` guest). `linux-loader` only reads ELF64, so the program headers are
/// walked here: every offset, size and address comes from the file and is checked (in the
/// file, no overflow, at or above 1 MiB where the boot tables end, inside guest RAM) before a
/// byte is copied. Each `PT_LOAD` segment's file bytes go to its `p_paddr`; the rest of
/// `p_memsz` is left as it is (fresh guest RAM is zero).
fn load_elf32(mem: &GuestMemoryMmap, image: &[u8]) -> Result<LoadedKernel> {
    let bad = |what: String| Error::Kernel(format!("is a 32-bit ELF with {what}"));
    if image.get(5) != Some(&1) {
        return Err(bad("big-endian data (x86 ELFs are little-endian)".into()));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        u32_at(image, 0x1c),
        u16_at(image, 0x2a),
        u16_at(image, 0x2c),
    ) else {
        return Err(bad("a truncated header".into()));
    };
    if phentsize < ELF32_PHDR_SIZE {
        return Err(bad(format!(
            "program headers of {phentsize} bytes (expected at least {ELF32_PHDR_SIZE})"
        )));
    }
    if phnum > ELF32_MAX_PHDRS {
        return Err(bad(format!(
            "{phnum} program headers (at most {ELF32_MAX_PHDRS} are accepted)"
        )));
    }
    let table_end = (phoff as usize)
        .checked_add(usize::from(phnum) * usize::from(phentsize))
        .filter(|&end| end <= image.len());
    if table_end.is_none() {
        return Err(bad(format!(
            "{phnum} program headers at file offset {phoff:#x}, past the end of the file ({} \
             bytes; truncated?)",
            image.len()
        )));
    }
    let Some(entry) = pvh_entry(image) else {
        return Err(Error::Kernel(
            "is a 32-bit ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): only 32-bit \
             ELFs booted through PVH are supported"
                .into(),
        ));
    };
    let mut kernel_end = 0u64;
    let mut loaded = 0usize;
    for i in 0..usize::from(phnum) {
        let hdr = (phoff as usize)
            .checked_add(i * usize::from(phentsize))
            .and_then(|at| image.get(at..at.checked_add(usize::from(ELF32_PHDR_SIZE))?))
            .ok_or_else(|| bad(format!("program header {i} past the end of the file")))?;
        let field = |off: usize| u32_at(hdr, off).unwrap_or(0);
        if field(0) != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (field(4), field(12), field(16), field(20));
        if filesz > memsz {
            return Err(bad(format!(
                "segment {i} larger in the file ({filesz} bytes) than in memory ({memsz} bytes)"
            )));
        }
        if memsz == 0 {
            continue;
        }
        let data = (offset as usize)
            .checked_add(filesz as usize)
            .and_then(|end| image.get(offset as usize..end))
            .ok_or_else(|| {
                bad(format!(
                    "segment {i} (file offset {offset:#x}, {filesz} bytes) past the end of the \
                     file ({} bytes; truncated?)",
                    image.len()
                ))
            })?;
        let (start, end) = (u64::from(paddr), u64::from(paddr) + u64::from(memsz));
        if start < layout::HIMEM_START {
            return Err(bad(format!(
                "segment {i} at {start:#x}, below 1 MiB (where the boot tables live)"
            )));
        }
        if !mem.check_range(GuestAddress(start), memsz as usize) {
            return Err(Error::Kernel(format!(
                "segment {i} at {start:#x}..{end:#x} does not fit in guest RAM (raise --memory?)"
            )));
        }
        mem.write_slice(data, GuestAddress(start))
            .map_err(|_| Error::GuestWrite {
                what: "kernel segment",
                addr: start,
            })?;
        kernel_end = kernel_end.max(end);
        loaded += 1;
    }
    if loaded == 0 {
        return Err(bad("no loadable segment".into()));
    }
    Ok(LoadedKernel {
        entry: Entry::Pvh(entry),
        kernel_end,
        is_linux: elf_notes(image).iter().any(|n| n.name == b"Linux"),
        setup_header: None,
    })
}

/// Loads `image` (a vmlinux ELF or a bzImage) into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, image: &[u8]) -> Result<LoadedKernel> {
    if image.len() < 64 {
        return Err(Error::Kernel(format!(
            "is truncated ({} bytes): not a vmlinux ELF or bzImage",
            image.len()
        )));
    }
    if image.get(0x38..0x3c) == Some(b"ARM\x64") {
        return Err(Error::WrongArch(
            "an arm64 Image, this VMM boots x86_64 kernels".into(),
        ));
    }
    if image.starts_with(b"\x7fELF") {
        let machine = u16_at(image, 18).unwrap_or(0);
        if image[4] == 1 && machine == EM_386 {
            return load_elf32(mem, image);
        }
        if image[4] != 2 || machine != EM_X86_64 {
            return Err(Error::WrongArch(format!(
                "ELF class {} machine {machine}, expected a 64-bit x86_64 ELF (machine 62) or a \
                 32-bit x86 ELF with a PVH note (machine 3)",
                image[4]
            )));
        }
        let mut r = ImageReader {
            data: image,
            pos: 0,
        };
        let res = Elf::load(mem, None, &mut r, Some(GuestAddress(layout::HIMEM_START)))
            .map_err(|e| Error::Kernel(format!("is not a loadable vmlinux (truncated?): {e}")))?;
        let is_linux = elf_note_names(image).iter().any(|n| n == "Linux");
        let entry = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Entry::Pvh(a.raw_value()),
            _ => Entry::Linux64(u64_at(image, 0x18).unwrap_or(0)),
        };
        return Ok(LoadedKernel {
            entry,
            kernel_end: res.kernel_end,
            is_linux,
            setup_header: None,
        });
    }
    if image.get(0x202..0x206) == Some(b"HdrS") {
        let mut r = ImageReader {
            data: image,
            pos: 0,
        };
        let res = BzImage::load(mem, None, &mut r, Some(GuestAddress(layout::HIMEM_START)))
            .map_err(|e| Error::Kernel(format!("is not a loadable bzImage (truncated?): {e}")))?;
        return Ok(LoadedKernel {
            entry: Entry::Linux64(res.kernel_load.raw_value() + 0x200),
            kernel_end: res.kernel_end,
            is_linux: true,
            setup_header: res.setup_header,
        });
    }
    Err(Error::Kernel(
        "is neither a vmlinux ELF nor a bzImage".into(),
    ))
}

/// Writes the command line (NUL-terminated) at [`layout::CMDLINE_ADDR`].
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<()> {
    if cmdline.len() + 1 > layout::CMDLINE_MAX {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX - 1,
        });
    }
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    mem.write_slice(&b, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|_| Error::GuestWrite {
            what: "command line",
            addr: layout::CMDLINE_ADDR,
        })
}

/// Places the initrd at the highest page-aligned address that fits below the MMIO hole, the
/// end of low RAM and `max_addr`, above `kernel_end`. Returns its guest address.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &[u8],
    kernel_end: u64,
    max_addr: u64,
) -> Result<u64> {
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&e| e <= layout::MMIO_GAP_START)
        .max()
        .unwrap_or(0);
    let top = low_end.min(max_addr.saturating_add(1));
    let size = initrd.len() as u64;
    let floor = kernel_end.div_ceil(4096) * 4096;
    let room = top.saturating_sub(floor);
    if size > room {
        return Err(Error::InitrdTooBig { size, room });
    }
    let addr = (top - size) & !0xfff;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(|_| Error::GuestWrite {
            what: "initrd",
            addr,
        })?;
    Ok(addr)
}

/// The e820 map for these RAM regions: low RAM up to the EBDA, the EBDA reserved, RAM from
/// 1 MiB, and RAM above 4 GiB.
pub fn e820_map(regions: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::EBDA_START,
            0x10_0000 - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for &(start, size) in regions {
        let end = start + size;
        let s = start.max(layout::HIMEM_START);
        if end > s {
            v.push((s, end - s, E820_RAM));
        }
    }
    v
}

/// Writes `hvm_start_info`, its memory map and the initrd module for a PVH entry.
pub fn configure_pvh(
    mem: &GuestMemoryMmap,
    regions: &[(u64, u64)],
    initrd: Option<(u64, u64)>,
) -> Result<u64> {
    let map = e820_map(regions);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = layout::PVH_MEMMAP_ADDR + (i * std::mem::size_of_val(&e)) as u64;
        mem.write_obj(e, GuestAddress(at))
            .map_err(|_| Error::GuestWrite {
                what: "PVH memory map",
                addr: at,
            })?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(layout::PVH_MODLIST_ADDR))
            .map_err(|_| Error::GuestWrite {
                what: "PVH module list",
                addr: layout::PVH_MODLIST_ADDR,
            })?;
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(layout::PVH_INFO_ADDR))
        .map_err(|_| Error::GuestWrite {
            what: "hvm_start_info",
            addr: layout::PVH_INFO_ADDR,
        })?;
    Ok(layout::PVH_INFO_ADDR)
}

/// Writes the zero page for the 64-bit Linux boot protocol.
pub fn configure_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    regions: &[(u64, u64)],
    initrd: Option<(u64, u64)>,
) -> Result<u64> {
    let mut params = boot_params::default();
    if let Some(h) = kernel.setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = if params.hdr.kernel_alignment == 0 {
        0x100_0000
    } else {
        params.hdr.kernel_alignment
    };
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(regions);
    if map.len() > params.e820_table.len() {
        return Err(Error::MemoryTooSmall("too many e820 entries".into()));
    }
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(|_| Error::GuestWrite {
            what: "zero page",
            addr: layout::ZERO_PAGE_ADDR,
        })?;
    Ok(layout::ZERO_PAGE_ADDR)
}

/// Highest address the initrd may end at for this kernel.
pub fn initrd_max_addr(kernel: &LoadedKernel) -> u64 {
    match kernel.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        // PVH and ELF kernels take the initrd anywhere below 4 GiB.
        _ => layout::MMIO_GAP_START - 1,
    }
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, e) in GDT.iter().enumerate() {
        let at = layout::GDT_ADDR + (i * 8) as u64;
        mem.write_obj(*e, GuestAddress(at))
            .map_err(|_| Error::GuestWrite {
                what: "GDT",
                addr: at,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(|_| Error::GuestWrite {
            what: "IDT",
            addr: layout::IDT_ADDR,
        })
}

/// Builds identity page tables for the first 4 GiB (2 MiB pages). Returns CR3.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<u64> {
    let pml4 = layout::PML4_ADDR;
    let pdpt = pml4 + 0x1000;
    let pd = pml4 + 0x2000;
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|_| Error::GuestWrite {
                what: "page tables",
                addr: at,
            })
    };
    w(pdpt | 0x3, pml4)?;
    for i in 0..4u64 {
        w((pd + i * 0x1000) | 0x3, pdpt + i * 8)?;
    }
    for i in 0..2048u64 {
        // present | writable | 2 MiB page
        w((i << 21) | 0x83, pd + i * 8)?;
    }
    Ok(pml4)
}

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x)).wrapping_neg()
}

/// Most CPUs the MP table (and the xAPIC ids) describe.
pub const MAX_CPUS: u32 = 254;

/// Writes an Intel MP 1.4 table at the EBDA for `cpus` processors, one IOAPIC (id `cpus`) with
/// 24 pins wired 1:1 to ISA IRQs, ExtINT on LINT0 and NMI on LINT1.
pub fn write_mptable(mem: &GuestMemoryMmap, cpus: u32) -> Result<()> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id as u8;
        e[2] = 0x14; // LAPIC version
        e[3] = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0 = ISA
    count += 1;
    let mut io = [2u8, ioapic_id, 0x11, 1, 0, 0, 0, 0];
    io[4..8].copy_from_slice(&layout::IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    for irq in 0..24u8 {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0, irq -> ioapic pin irq
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT -> LINT0, NMI -> LINT1 on all LAPICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec rev 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"SKIFF   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&[0; 6]); // OEM table pointer + size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&layout::LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // ext table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = layout::EBDA_START + 16;
    if table_addr + table.len() as u64 > 0xa0000 {
        return Err(Error::TooManyCpus(cpus));
    }
    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec rev
    fp[10] = checksum(&fp);
    mem.write_slice(&fp, GuestAddress(layout::EBDA_START))
        .map_err(|_| Error::GuestWrite {
            what: "MP floating pointer",
            addr: layout::EBDA_START,
        })?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(|_| Error::GuestWrite {
            what: "MP table",
            addr: table_addr,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        let r: Vec<(GuestAddress, usize)> = memory_regions(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&r).unwrap()
    }

    #[test]
    fn regions_skip_the_mmio_hole() {
        assert_eq!(memory_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            memory_regions(4 << 30),
            vec![(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)]
        );
    }

    #[test]
    fn mptable_checksums_and_cpu_count() {
        let m = mem(64 << 20);
        write_mptable(&m, 4).unwrap();
        let mut fp = [0u8; 16];
        m.read_slice(&mut fp, GuestAddress(layout::EBDA_START))
            .unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(fp.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        m.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut table = vec![0u8; len];
        m.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert_eq!(table.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let cpus = table[44..].chunks(20).take_while(|c| c[0] == 0).count();
        assert_eq!(cpus, 4);
        assert!(write_mptable(&m, 0).is_err());
        assert!(write_mptable(&m, 255).is_err());
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem(64 << 20);
        let cr3 = write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(cr3)).unwrap();
        let pdpt = pml4 & !0xfff;
        let pd3: u64 = m.read_obj(GuestAddress(pdpt + 3 * 8)).unwrap();
        let last: u64 = m.read_obj(GuestAddress((pd3 & !0xfff) + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
        assert_eq!(last & 0x83, 0x83);
    }

    #[test]
    fn bad_images_are_named() {
        let m = mem(64 << 20);
        let e = load_kernel(&m, b"short").unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut arm = vec![0u8; 128];
        arm[0x38..0x3c].copy_from_slice(b"ARM\x64");
        let e = load_kernel(&m, &arm).unwrap_err();
        assert!(matches!(e, Error::WrongArch(_)), "{e}");
        let mut elf32 = vec![0u8; 128];
        elf32[..4].copy_from_slice(b"\x7fELF");
        elf32[4] = 1;
        elf32[5] = 1;
        elf32[18] = 3;
        // An x86 ELF32 is loadable through PVH only; without the note it is refused by name.
        elf32[0x2a] = 32;
        let e = load_kernel(&m, &elf32).unwrap_err();
        assert!(matches!(e, Error::Kernel(_)), "{e}");
        assert!(e.to_string().contains("PVH"), "{e}");
        elf32[18] = 40; // EM_ARM
        assert!(matches!(
            load_kernel(&m, &elf32).unwrap_err(),
            Error::WrongArch(_)
        ));
        let mut trunc = vec![0u8; 128];
        trunc[..4].copy_from_slice(b"\x7fELF");
        trunc[4] = 2;
        trunc[5] = 1;
        trunc[18] = 62;
        let e = load_kernel(&m, &trunc).unwrap_err();
        assert!(matches!(e, Error::Kernel(_)), "{e}");
        assert!(load_kernel(&m, &[0x55u8; 4096]).is_err());
    }

    #[test]
    fn initrd_goes_high_and_too_big_is_an_error() {
        let m = mem(64 << 20);
        let a = load_initrd(&m, &[7u8; 10000], 0x200_0000, u64::MAX).unwrap();
        assert_eq!(a & 0xfff, 0);
        assert!(a + 10000 <= 64 << 20 && a >= 60 << 20);
        let e = load_initrd(&m, &vec![0u8; 63 << 20], 0x200_0000, u64::MAX).unwrap_err();
        assert!(matches!(e, Error::InitrdTooBig { .. }));
    }

    #[test]
    fn pvh_start_info_and_e820() {
        let m = mem(256 << 20);
        load_cmdline(&m, "console=ttyS0").unwrap();
        let regions = memory_regions(256 << 20);
        let at = configure_pvh(&m, &regions, Some((0x800_0000, 4096))).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        let last: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (0x10_0000, (256 << 20) - 0x10_0000, 1)
        );
        let e = load_cmdline(&m, &"x".repeat(layout::CMDLINE_MAX)).unwrap_err();
        assert!(matches!(e, Error::CmdlineTooLong { .. }));
    }

    /// A minimal ELF32 PVH guest, built in memory like `ld -m elf_i386` would: the ELF header,
    /// a `PT_LOAD` segment for `code` at `paddr` (plus `bss` bytes), a `PT_NOTE` with the Xen
    /// `XEN_ELFNOTE_PHYS32_ENTRY` note (and a "Linux" note if asked).
    fn elf32_pvh(paddr: u32, entry: u32, code: &[u8], bss: u32, linux_note: bool) -> Vec<u8> {
        let mut notes = Vec::new();
        let mut note = |name: &[u8], kind: u32, desc: &[u8]| {
            notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&kind.to_le_bytes());
            notes.extend_from_slice(name);
            notes.resize(notes.len().div_ceil(4) * 4, 0);
            notes.extend_from_slice(desc);
            notes.resize(notes.len().div_ceil(4) * 4, 0);
        };
        if linux_note {
            note(b"Linux\0", 6, b"6.1\0");
        }
        note(b"Xen\0", 18, &entry.to_le_bytes());
        let phoff = 52u32;
        let notes_at = phoff + 2 * 32;
        let code_at = notes_at + notes.len() as u32;
        let mut f = vec![0u8; 52];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 1; // ELFCLASS32
        f[5] = 1; // little-endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..28].copy_from_slice(&entry.to_le_bytes());
        f[28..32].copy_from_slice(&phoff.to_le_bytes());
        f[40..42].copy_from_slice(&52u16.to_le_bytes()); // e_ehsize
        f[42..44].copy_from_slice(&32u16.to_le_bytes()); // e_phentsize
        f[44..46].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        let phdr = |kind: u32, off: u32, addr: u32, filesz: u32, memsz: u32| {
            [kind, off, addr, addr, filesz, memsz, 7, 4]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        let len = code.len() as u32;
        f.extend(phdr(1, code_at, paddr, len, len + bss));
        f.extend(phdr(4, notes_at, 0, notes.len() as u32, notes.len() as u32));
        f.extend_from_slice(&notes);
        f.extend_from_slice(code);
        f
    }

    const CODE: &[u8] = b"\xfa\xbc\x00\x00\x08\x00\xf4PVH32 guest code";

    #[test]
    fn elf32_with_a_pvh_note_loads_at_its_physical_address() {
        let m = mem(64 << 20);
        let image = elf32_pvh(0x10_0000, 0x10_0000, CODE, 0x3000, false);
        let k = load_kernel(&m, &image).unwrap();
        assert_eq!(k.entry, Entry::Pvh(0x10_0000));
        assert_eq!(k.kernel_end, 0x10_0000 + CODE.len() as u64 + 0x3000);
        assert!(!k.is_linux);
        let mut back = vec![0u8; CODE.len()];
        m.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(back, CODE);
        assert_eq!(initrd_max_addr(&k), layout::MMIO_GAP_START - 1);
        // The entry need not be the segment's start; a "Linux" note marks a Linux kernel.
        let image = elf32_pvh(0x20_0000, 0x20_0004, CODE, 0, true);
        let k = load_kernel(&m, &image).unwrap();
        assert_eq!(k.entry, Entry::Pvh(0x20_0004));
        assert!(k.is_linux);
        assert_eq!(elf_note_names(&image), vec!["Linux", "Xen"]);
    }

    #[test]
    fn elf32_hostile_headers_are_errors() {
        let m = mem(64 << 20);
        let good = elf32_pvh(0x10_0000, 0x10_0000, CODE, 0, false);
        let load_ph = 52;
        let set = |img: &mut Vec<u8>, at: usize, v: u32| {
            img[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        type Mutation<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
        let cases: Vec<(&str, Mutation<'_>)> = vec![
            (
                "past the end",
                Box::new(move |i| set(i, load_ph + 4, 0xffff_fff0)),
            ),
            (
                "past the end",
                Box::new(move |i| {
                    set(i, load_ph + 16, 0x10_0000);
                    set(i, load_ph + 20, 0x10_0000);
                }),
            ),
            (
                "larger in the file",
                Box::new(move |i| set(i, load_ph + 20, 1)),
            ),
            (
                "below 1 MiB",
                Box::new(move |i| set(i, load_ph + 12, 0x7000)),
            ),
            (
                "guest RAM",
                Box::new(move |i| set(i, load_ph + 12, 0xffff_f000)),
            ),
            (
                "guest RAM",
                Box::new(move |i| set(i, load_ph + 20, 0xffff_ffff)),
            ),
            (
                "guest RAM",
                Box::new(move |i| set(i, load_ph + 12, 0x3ff_fff0)),
            ),
            ("program header", Box::new(|i| set(i, 28, 0xffff_ffe0))),
            ("program header", Box::new(|i| set(i, 28, u32::MAX))),
            ("program headers of 8", Box::new(|i| i[42] = 8)),
            (
                "program headers",
                Box::new(|i| i[44..46].copy_from_slice(&[0xff, 0xff])),
            ),
            ("no loadable segment", Box::new(move |i| set(i, load_ph, 6))),
            ("big-endian", Box::new(|i| i[5] = 2)),
            ("PVH", Box::new(|i| set(i, 52 + 2 * 32 + 8, 17))), // the note's type
        ];
        for (want, mutate) in cases {
            let mut image = good.clone();
            mutate(&mut image);
            let e = load_kernel(&m, &image).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?}, got {e}");
        }
        // Truncated anywhere: an error, never a panic.
        for n in 0..good.len() {
            assert!(load_kernel(&m, &good[..n]).is_err(), "truncated at {n}");
        }
        // Every byte of the headers and notes flipped to a few values: no panic.
        for at in 0..good.len() - CODE.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut image = good.clone();
                image[at] = v;
                let _ = load_kernel(&m, &image);
                let _ = elf_note_names(&image);
            }
        }
    }

    #[test]
    fn note_walker_survives_garbage() {
        let mut img = vec![0xffu8; 256];
        img[..4].copy_from_slice(b"\x7fELF");
        let _ = elf_note_names(&img);
        let _ = elf_note_names(&[]);
    }
}
