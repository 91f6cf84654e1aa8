//! aarch64 boot: an arm64 `Image` placed in RAM, an optional initrd, and a flattened device
//! tree built in code (no firmware, no ACPI).
//!
//! The guest physical map ([`layout`]):
//!
//! | range                     | what                                               |
//! |---------------------------|----------------------------------------------------|
//! | `0x0800_0000` 64 KiB      | GICv3 distributor                                  |
//! | `0x0810_0000` 128 KiB/CPU | GICv3 redistributors (room for [`MAX_CPUS`])       |
//! | `0x0900_0000` 4 KiB       | 16550 UART (`ns16550a`, reg-shift 0), SPI 1        |
//! | `0x0901_0000` 4 KiB       | boot timer register (the guest init writes to it)  |
//! | `0x0a00_0000` 512 B each  | virtio-mmio slots, SPI 16 + slot                   |
//! | `0x8000_0000` ..          | RAM: kernel at the start, initrd and FDT at the end |
//!
//! Boot protocol (Linux `Documentation/arm64/booting.rst`): the boot CPU enters the kernel at
//! the image's load address with `x0` = FDT address, `x1..x3` = 0, MMU and caches off, all of
//! DAIF masked, in EL1h. Secondary CPUs start through PSCI `CPU_ON` (method `hvc`).

use vm_fdt::FdtWriter;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

/// Guest physical addresses and sizes of everything the VMM places.
pub mod layout {
    /// First byte of RAM.
    pub const RAM_START: u64 = 0x8000_0000;
    /// Largest RAM size described (stays inside a 40-bit IPA space with room to spare).
    pub const MAX_RAM: u64 = 1 << 38;

    /// GICv3 distributor base.
    pub const GIC_DIST_ADDR: u64 = 0x0800_0000;
    /// GICv3 distributor size.
    pub const GIC_DIST_SIZE: u64 = 0x1_0000;
    /// GICv3 redistributor base (one 128 KiB frame pair per vCPU, in vCPU order).
    pub const GIC_REDIST_ADDR: u64 = 0x0810_0000;
    /// Size of one vCPU's redistributor (RD_base + SGI_base frames).
    pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
    /// Room reserved for the redistributors (up to the UART).
    pub const GIC_REDIST_ROOM: u64 = SERIAL_ADDR - GIC_REDIST_ADDR;

    /// 16550 UART base (`ns16550a`, byte registers, reg-shift 0).
    pub const SERIAL_ADDR: u64 = 0x0900_0000;
    /// UART MMIO window size.
    pub const SERIAL_SIZE: u64 = 0x1000;
    /// UART interrupt: SPI number (INTID 32 + this).
    pub const SERIAL_SPI: u32 = 1;
    /// UART input clock, as the 16550 emulation assumes.
    pub const SERIAL_CLOCK_HZ: u32 = 1_843_200;

    /// Boot timer register: the guest init writes a phase number here, the VMM timestamps it.
    pub const BOOT_TIMER_ADDR: u64 = 0x0901_0000;
    /// Boot timer MMIO window size.
    pub const BOOT_TIMER_SIZE: u64 = 0x1000;

    /// First virtio-mmio slot.
    pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
    /// Size of one virtio-mmio slot.
    pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
    /// Number of virtio-mmio slots.
    pub const VIRTIO_MMIO_SLOTS: u32 = 32;
    /// SPI of slot 0; slot `n` uses `VIRTIO_MMIO_SPI_BASE + n`.
    pub const VIRTIO_MMIO_SPI_BASE: u32 = 16;

    /// Most bytes the FDT may take (the arm64 boot protocol limit).
    pub const FDT_MAX_SIZE: u64 = 0x20_0000;
    /// The kernel image is placed at a 2 MiB-aligned base plus its `text_offset`.
    pub const KERNEL_ALIGN: u64 = 0x20_0000;
    /// Initrd alignment.
    pub const INITRD_ALIGN: u64 = 0x1000;

    // The MMIO ranges do not overlap each other or RAM.
    const _: () = assert!(GIC_DIST_ADDR + GIC_DIST_SIZE <= GIC_REDIST_ADDR);
    const _: () = assert!(SERIAL_ADDR + SERIAL_SIZE <= BOOT_TIMER_ADDR);
    const _: () = assert!(BOOT_TIMER_ADDR + BOOT_TIMER_SIZE <= VIRTIO_MMIO_BASE);
    const _: () =
        assert!(VIRTIO_MMIO_BASE + VIRTIO_MMIO_SLOTS as u64 * VIRTIO_MMIO_SIZE <= RAM_START);

    /// The virtio-mmio device in slot `slot`, or `None` past the last slot.
    pub fn virtio_mmio_slot(slot: u32) -> Option<super::VirtioMmioDevice> {
        (slot < VIRTIO_MMIO_SLOTS).then(|| super::VirtioMmioDevice {
            addr: VIRTIO_MMIO_BASE + u64::from(slot) * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            spi: VIRTIO_MMIO_SPI_BASE + slot,
        })
    }
}

/// Most vCPUs the layout has redistributor room for.
pub const MAX_CPUS: u32 = (layout::GIC_REDIST_ROOM / layout::GIC_REDIST_SIZE_PER_CPU) as u32;

/// The phandle of the GIC in the FDT.
const GIC_PHANDLE: u32 = 1;
/// `interrupts` cell 0: shared peripheral interrupt.
const GIC_SPI: u32 = 0;
/// `interrupts` cell 0: private peripheral interrupt.
const GIC_PPI: u32 = 1;
/// `interrupts` cell 2: edge, rising (the VMM pulses device lines).
const IRQ_EDGE_RISING: u32 = 1;
/// `interrupts` cell 2: level, active high.
const IRQ_LEVEL_HIGH: u32 = 4;

/// arm64 `Image` header magic, `"ARM\x64"` little-endian, at offset 0x38.
pub const IMAGE_MAGIC: u32 = 0x644d_5241;
/// Offset of the magic in the header.
const IMAGE_MAGIC_OFFSET: usize = 0x38;
/// Size of the arm64 `Image` header.
pub const IMAGE_HEADER_SIZE: usize = 64;
/// `text_offset` assumed for pre-3.17 images whose `image_size` is 0.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

/// A virtio-mmio device to describe in the FDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest physical base of the register window.
    pub addr: u64,
    /// Window size.
    pub size: u64,
    /// SPI number (INTID 32 + this).
    pub spi: u32,
}

/// The parsed arm64 `Image` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset of the image from a 2 MiB-aligned base.
    pub text_offset: u64,
    /// Bytes the kernel occupies once running (including BSS); 0 on pre-3.17 images.
    pub image_size: u64,
    /// Header flags (bit 0: big-endian, bits 1-2: page size, bit 3: placement anywhere).
    pub flags: u64,
}

fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Some(u32::from_le_bytes(a))
}

/// Names what a non-arm64 image looks like, for the error message.
fn describe_foreign_image(image: &[u8]) -> String {
    if image.starts_with(b"\x7fELF") {
        // e_machine at 0x12: 62 = x86-64, 183 = AArch64.
        return match image.get(0x12..0x14) {
            Some([183, 0]) => "an AArch64 ELF (vmlinux); boot arch/arm64/boot/Image instead".into(),
            Some([62, 0]) => "an x86-64 ELF (vmlinux), expected an arm64 Image".into(),
            _ => "an ELF for another architecture, expected an arm64 Image".into(),
        };
    }
    if image.get(0x202..0x206) == Some(b"HdrS") {
        return "an x86 bzImage, expected an arm64 Image".into();
    }
    if image.starts_with(&[0x1f, 0x8b]) {
        return "gzip-compressed (Image.gz); decompress it to an arm64 Image first".into();
    }
    "not an arm64 Image (no \"ARM\\x64\" magic at offset 0x38)".into()
}

/// Parses and checks the arm64 `Image` header.
pub fn parse_image_header(image: &[u8]) -> Result<ImageHeader> {
    if image.len() < IMAGE_HEADER_SIZE {
        if image.starts_with(b"\x7fELF") || image.starts_with(&[0x1f, 0x8b]) {
            return Err(Error::WrongArch(describe_foreign_image(image)));
        }
        return Err(Error::Kernel(format!(
            "is truncated: {} bytes, shorter than the {IMAGE_HEADER_SIZE}-byte arm64 Image header",
            image.len()
        )));
    }
    let truncated = || Error::Kernel("header is truncated".into());
    let magic = le_u32(image, IMAGE_MAGIC_OFFSET).ok_or_else(truncated)?;
    if magic != IMAGE_MAGIC {
        return Err(Error::WrongArch(describe_foreign_image(image)));
    }
    let text_offset = le_u64(image, 8).ok_or_else(truncated)?;
    let image_size = le_u64(image, 16).ok_or_else(truncated)?;
    let flags = le_u64(image, 24).ok_or_else(truncated)?;
    if flags & 1 != 0 {
        return Err(Error::Kernel(
            "is big-endian; only little-endian arm64 kernels boot".into(),
        ));
    }
    // The EFI stub's PE header offset: when set, it must lie inside the file.
    let pe_offset = le_u32(image, 0x3c).ok_or_else(truncated)?;
    if pe_offset as usize >= image.len() && pe_offset != 0 {
        return Err(Error::Kernel(format!(
            "is truncated: {} bytes, but its PE header is at {pe_offset:#x}",
            image.len()
        )));
    }
    if image_size != 0 && (image.len() as u64) > image_size {
        return Err(Error::Kernel(format!(
            "is {} bytes, larger than the {image_size} bytes its header declares",
            image.len()
        )));
    }
    Ok(ImageHeader {
        text_offset,
        image_size,
        flags,
    })
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelInfo {
    /// Entry point (the load address of the image).
    pub entry: u64,
    /// First byte past the running kernel (image plus BSS), 2 MiB-aligned.
    pub kernel_end: u64,
}

/// RAM layout `(guest address, size)`: one region at [`layout::RAM_START`].
pub fn memory_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    vec![(layout::RAM_START, mem_bytes.min(layout::MAX_RAM))]
}

fn ram_end(mem_bytes: u64) -> u64 {
    layout::RAM_START + mem_bytes.min(layout::MAX_RAM)
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x & !(a - 1))
}

fn write(mem: &GuestMemoryMmap, what: &'static str, bytes: &[u8], addr: u64) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| Error::GuestWrite { what, addr })
}

/// Where the FDT goes: the last 2 MiB of RAM.
pub fn fdt_addr(mem_bytes: u64) -> Result<u64> {
    let end = ram_end(mem_bytes);
    end.checked_sub(layout::FDT_MAX_SIZE)
        .filter(|a| *a >= layout::RAM_START)
        .map(|a| a & !(layout::KERNEL_ALIGN - 1))
        .filter(|a| *a >= layout::RAM_START)
        .ok_or_else(|| {
            Error::MemoryTooSmall(format!(
                "{mem_bytes} bytes of RAM leave no room for the {} byte device tree",
                layout::FDT_MAX_SIZE
            ))
        })
}

/// Copies an arm64 `Image` to RAM at `RAM_START + text_offset`. `limit` is the first byte the
/// kernel must not reach (the FDT).
pub fn load_kernel(mem: &GuestMemoryMmap, image: &[u8], limit: u64) -> Result<KernelInfo> {
    let hdr = parse_image_header(image)?;
    let (text_offset, size) = if hdr.image_size == 0 {
        (LEGACY_TEXT_OFFSET, image.len() as u64)
    } else {
        (hdr.text_offset, hdr.image_size)
    };
    let too_big = || {
        Error::MemoryTooSmall(format!(
            "the kernel needs {size} bytes at offset {text_offset:#x}, RAM below the device tree ends at {limit:#x}"
        ))
    };
    let entry = layout::RAM_START
        .checked_add(text_offset)
        .ok_or_else(too_big)?;
    let end = entry.checked_add(size).ok_or_else(too_big)?;
    if end > limit {
        return Err(too_big());
    }
    write(mem, "kernel image", image, entry)?;
    let kernel_end = align_up(end, layout::KERNEL_ALIGN).ok_or_else(too_big)?;
    Ok(KernelInfo { entry, kernel_end })
}

/// Places the initrd as high as possible below `limit` (the FDT), above `kernel_end`.
/// Returns `(address, size)`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &[u8],
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64)> {
    let size = initrd.len() as u64;
    let room = limit.saturating_sub(kernel_end);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(layout::INITRD_ALIGN - 1))
        .filter(|a| *a >= kernel_end)
        .ok_or(Error::InitrdTooBig { size, room })?;
    write(mem, "initrd", initrd, addr)?;
    Ok((addr, size))
}

/// The MPIDR affinity of vCPU `cpu`: Aff0 = cpu % 16, Aff1 = cpu / 16 (16 CPUs per cluster,
/// so GICv3 SGIs reach every CPU through the 16-bit target list).
pub fn mpidr(cpu: u32) -> u64 {
    u64::from(cpu % 16) | (u64::from(cpu / 16) << 8)
}

/// What the FDT describes.
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    /// Kernel command line (`/chosen/bootargs`).
    pub cmdline: &'a str,
    /// Number of vCPUs.
    pub cpus: u32,
    /// RAM size in bytes (starting at [`layout::RAM_START`]).
    pub mem_bytes: u64,
    /// Initrd `(address, size)`.
    pub initrd: Option<(u64, u64)>,
    /// virtio-mmio devices.
    pub virtio: &'a [VirtioMmioDevice],
}

/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 2048;

fn fdt_err(e: vm_fdt::Error) -> Error {
    Error::Fdt(e.to_string())
}

/// Builds the flattened device tree.
pub fn create_fdt(cfg: &FdtConfig<'_>) -> Result<Vec<u8>> {
    if cfg.cmdline.len() >= CMDLINE_MAX {
        return Err(Error::CmdlineTooLong {
            len: cfg.cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(cfg.cpus));
    }
    let mut f = FdtWriter::new().map_err(fdt_err)?;
    let root = f.begin_node("").map_err(fdt_err)?;
    f.property_string("compatible", "linux,dummy-virt")
        .map_err(fdt_err)?;
    f.property_string("model", "skiff").map_err(fdt_err)?;
    f.property_u32("#address-cells", 2).map_err(fdt_err)?;
    f.property_u32("#size-cells", 2).map_err(fdt_err)?;
    f.property_u32("interrupt-parent", GIC_PHANDLE)
        .map_err(fdt_err)?;

    // CPUs.
    let cpus = f.begin_node("cpus").map_err(fdt_err)?;
    f.property_u32("#address-cells", 1).map_err(fdt_err)?;
    f.property_u32("#size-cells", 0).map_err(fdt_err)?;
    for cpu in 0..cfg.cpus {
        let aff = mpidr(cpu) as u32;
        let n = f.begin_node(&format!("cpu@{aff:x}")).map_err(fdt_err)?;
        f.property_string("device_type", "cpu").map_err(fdt_err)?;
        f.property_string("compatible", "arm,arm-v8")
            .map_err(fdt_err)?;
        f.property_string("enable-method", "psci")
            .map_err(fdt_err)?;
        f.property_u32("reg", aff).map_err(fdt_err)?;
        f.end_node(n).map_err(fdt_err)?;
    }
    f.end_node(cpus).map_err(fdt_err)?;

    // Memory.
    let size = cfg.mem_bytes.min(layout::MAX_RAM);
    let m = f
        .begin_node(&format!("memory@{:x}", layout::RAM_START))
        .map_err(fdt_err)?;
    f.property_string("device_type", "memory")
        .map_err(fdt_err)?;
    f.property_array_u64("reg", &[layout::RAM_START, size])
        .map_err(fdt_err)?;
    f.end_node(m).map_err(fdt_err)?;

    // PSCI through HVC.
    let p = f.begin_node("psci").map_err(fdt_err)?;
    f.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )
    .map_err(fdt_err)?;
    f.property_string("method", "hvc").map_err(fdt_err)?;
    f.end_node(p).map_err(fdt_err)?;

    // GICv3.
    let g = f
        .begin_node(&format!("intc@{:x}", layout::GIC_DIST_ADDR))
        .map_err(fdt_err)?;
    f.property_string("compatible", "arm,gic-v3")
        .map_err(fdt_err)?;
    f.property_null("interrupt-controller").map_err(fdt_err)?;
    f.property_u32("#interrupt-cells", 3).map_err(fdt_err)?;
    f.property_array_u64(
        "reg",
        &[
            layout::GIC_DIST_ADDR,
            layout::GIC_DIST_SIZE,
            layout::GIC_REDIST_ADDR,
            u64::from(cfg.cpus) * layout::GIC_REDIST_SIZE_PER_CPU,
        ],
    )
    .map_err(fdt_err)?;
    f.property_phandle(GIC_PHANDLE).map_err(fdt_err)?;
    f.end_node(g).map_err(fdt_err)?;

    // Architected timer: secure phys, non-secure phys, virtual, hypervisor PPIs.
    let t = f.begin_node("timer").map_err(fdt_err)?;
    f.property_string("compatible", "arm,armv8-timer")
        .map_err(fdt_err)?;
    let mut irqs = Vec::new();
    for ppi in [13, 14, 11, 10] {
        irqs.extend_from_slice(&[GIC_PPI, ppi, IRQ_LEVEL_HIGH]);
    }
    f.property_array_u32("interrupts", &irqs).map_err(fdt_err)?;
    f.property_null("always-on").map_err(fdt_err)?;
    f.end_node(t).map_err(fdt_err)?;

    // UART.
    let uart_name = format!("uart@{:x}", layout::SERIAL_ADDR);
    let u = f.begin_node(&uart_name).map_err(fdt_err)?;
    f.property_string("compatible", "ns16550a")
        .map_err(fdt_err)?;
    f.property_array_u64("reg", &[layout::SERIAL_ADDR, layout::SERIAL_SIZE])
        .map_err(fdt_err)?;
    f.property_u32("reg-shift", 0).map_err(fdt_err)?;
    f.property_u32("reg-io-width", 1).map_err(fdt_err)?;
    f.property_u32("clock-frequency", layout::SERIAL_CLOCK_HZ)
        .map_err(fdt_err)?;
    f.property_array_u32(
        "interrupts",
        &[GIC_SPI, layout::SERIAL_SPI, IRQ_EDGE_RISING],
    )
    .map_err(fdt_err)?;
    f.end_node(u).map_err(fdt_err)?;

    // Boot timer (no driver; described so the guest can find it in /proc/device-tree).
    let b = f
        .begin_node(&format!("boot-timer@{:x}", layout::BOOT_TIMER_ADDR))
        .map_err(fdt_err)?;
    f.property_string("compatible", "skiff,boot-timer")
        .map_err(fdt_err)?;
    f.property_array_u64("reg", &[layout::BOOT_TIMER_ADDR, layout::BOOT_TIMER_SIZE])
        .map_err(fdt_err)?;
    f.end_node(b).map_err(fdt_err)?;

    // virtio-mmio.
    for d in cfg.virtio {
        let v = f
            .begin_node(&format!("virtio_mmio@{:x}", d.addr))
            .map_err(fdt_err)?;
        f.property_string("compatible", "virtio,mmio")
            .map_err(fdt_err)?;
        f.property_array_u64("reg", &[d.addr, d.size])
            .map_err(fdt_err)?;
        f.property_array_u32("interrupts", &[GIC_SPI, d.spi, IRQ_EDGE_RISING])
            .map_err(fdt_err)?;
        f.property_null("dma-coherent").map_err(fdt_err)?;
        f.end_node(v).map_err(fdt_err)?;
    }

    // Chosen.
    let c = f.begin_node("chosen").map_err(fdt_err)?;
    f.property_string("bootargs", cfg.cmdline)
        .map_err(fdt_err)?;
    f.property_string("stdout-path", &format!("/{uart_name}"))
        .map_err(fdt_err)?;
    if let Some((addr, size)) = cfg.initrd {
        f.property_u64("linux,initrd-start", addr)
            .map_err(fdt_err)?;
        f.property_u64("linux,initrd-end", addr + size)
            .map_err(fdt_err)?;
    }
    f.end_node(c).map_err(fdt_err)?;

    f.end_node(root).map_err(fdt_err)?;
    let blob = f.finish().map_err(fdt_err)?;
    if blob.len() as u64 > layout::FDT_MAX_SIZE {
        return Err(Error::Fdt(format!(
            "the device tree is {} bytes, more than the {} the boot protocol allows",
            blob.len(),
            layout::FDT_MAX_SIZE
        )));
    }
    Ok(blob)
}

/// Writes the FDT blob at `addr`.
pub fn write_fdt(mem: &GuestMemoryMmap, blob: &[u8], addr: u64) -> Result<()> {
    write(mem, "device tree", blob, addr)
}

/// What the boot CPU needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLayout {
    /// Kernel entry (PC of the boot CPU).
    pub entry: u64,
    /// FDT address (X0 of the boot CPU).
    pub fdt_addr: u64,
    /// First byte past the kernel.
    pub kernel_end: u64,
    /// Initrd `(address, size)`.
    pub initrd: Option<(u64, u64)>,
}

/// What to lay out.
#[derive(Debug, Clone)]
pub struct BootParams<'a> {
    /// The arm64 `Image`.
    pub kernel: &'a [u8],
    /// Optional initrd.
    pub initrd: Option<&'a [u8]>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// vCPUs.
    pub cpus: u32,
    /// RAM bytes.
    pub mem_bytes: u64,
    /// virtio-mmio devices to describe.
    pub virtio: &'a [VirtioMmioDevice],
}

/// Lays the whole guest out: kernel at the start of RAM, FDT in the last 2 MiB, initrd just
/// below the FDT.
pub fn load(mem: &GuestMemoryMmap, p: &BootParams<'_>) -> Result<BootLayout> {
    let fdt = fdt_addr(p.mem_bytes)?;
    let kernel = load_kernel(mem, p.kernel, fdt)?;
    let initrd = match p.initrd {
        Some(bytes) => Some(load_initrd(mem, bytes, kernel.kernel_end, fdt)?),
        None => None,
    };
    let blob = create_fdt(&FdtConfig {
        cmdline: p.cmdline,
        cpus: p.cpus,
        mem_bytes: p.mem_bytes,
        initrd,
        virtio: p.virtio,
    })?;
    write_fdt(mem, &blob, fdt)?;
    Ok(BootLayout {
        entry: kernel.entry,
        fdt_addr: fdt,
        kernel_end: kernel.kernel_end,
        initrd,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A tiny FDT reader: the tree of nodes with raw property values.
    #[derive(Debug, Default)]
    struct Node {
        name: String,
        props: Vec<(String, Vec<u8>)>,
        children: Vec<Node>,
    }

    impl Node {
        fn child(&self, name: &str) -> &Node {
            self.children
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("no node {name} under {}", self.name))
        }
        fn at(&self, path: &str) -> &Node {
            path.split('/')
                .filter(|s| !s.is_empty())
                .fold(self, |n, s| n.child(s))
        }
        fn prop(&self, name: &str) -> &[u8] {
            self.props
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_slice())
                .unwrap_or_else(|| panic!("no property {name} in {}", self.name))
        }
        fn has(&self, name: &str) -> bool {
            self.props.iter().any(|(n, _)| n == name)
        }
        fn str(&self, name: &str) -> String {
            let v = self.prop(name);
            String::from_utf8(v[..v.len() - 1].to_vec()).unwrap()
        }
        fn strs(&self, name: &str) -> Vec<String> {
            self.prop(name)
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8(s.to_vec()).unwrap())
                .collect()
        }
        fn u32s(&self, name: &str) -> Vec<u32> {
            self.prop(name)
                .chunks(4)
                .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
                .collect()
        }
        fn u64s(&self, name: &str) -> Vec<u64> {
            self.prop(name)
                .chunks(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect()
        }
    }

    fn be32(b: &[u8], off: usize) -> u32 {
        u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn parse_fdt(b: &[u8]) -> Node {
        assert_eq!(be32(b, 0), 0xd00d_feed, "FDT magic");
        assert_eq!(be32(b, 4) as usize, b.len(), "totalsize");
        let off_struct = be32(b, 8) as usize;
        let off_strings = be32(b, 12) as usize;
        assert!(be32(b, 20) >= 16, "version");
        let string_at = |off: usize| {
            let s = &b[off_strings + off..];
            let end = s.iter().position(|c| *c == 0).unwrap();
            String::from_utf8(s[..end].to_vec()).unwrap()
        };
        let mut pos = off_struct;
        let mut stack: Vec<Node> = Vec::new();
        loop {
            let tok = be32(b, pos);
            pos += 4;
            match tok {
                1 => {
                    let end = b[pos..].iter().position(|c| *c == 0).unwrap();
                    let name = String::from_utf8(b[pos..pos + end].to_vec()).unwrap();
                    pos = (pos + end + 1 + 3) & !3;
                    stack.push(Node {
                        name,
                        ..Default::default()
                    });
                }
                2 => {
                    let n = stack.pop().unwrap();
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(n),
                        None => {
                            assert_eq!(be32(b, pos), 9, "FDT_END after the root");
                            return n;
                        }
                    }
                }
                3 => {
                    let len = be32(b, pos) as usize;
                    let nameoff = be32(b, pos + 4) as usize;
                    pos += 8;
                    let val = b[pos..pos + len].to_vec();
                    pos = (pos + len + 3) & !3;
                    stack
                        .last_mut()
                        .unwrap()
                        .props
                        .push((string_at(nameoff), val));
                }
                4 => {}
                t => panic!("bad token {t:#x} at {pos:#x}"),
            }
        }
    }

    fn mem(bytes: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(layout::RAM_START), bytes as usize)]).unwrap()
    }

    fn image(text_offset: u64, image_size: u64, body: usize) -> Vec<u8> {
        let mut v = vec![0u8; IMAGE_HEADER_SIZE + body];
        v[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes()); // b #0x40
        v[8..16].copy_from_slice(&text_offset.to_le_bytes());
        v[16..24].copy_from_slice(&image_size.to_le_bytes());
        v[24..32].copy_from_slice(&0xau64.to_le_bytes()); // 4K pages, anywhere
        v[0x38..0x3c].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
        for (i, b) in v[IMAGE_HEADER_SIZE..].iter_mut().enumerate() {
            *b = i as u8;
        }
        v
    }

    #[test]
    fn parses_image_header() {
        let h = parse_image_header(&image(0, 0x10_0000, 100)).unwrap();
        assert_eq!(h.text_offset, 0);
        assert_eq!(h.image_size, 0x10_0000);
        assert_eq!(h.flags, 0xa);
    }

    #[test]
    fn rejects_truncated_and_foreign_images() {
        let img = image(0, 0x10_0000, 100);
        assert!(matches!(
            parse_image_header(&img[..40]),
            Err(Error::Kernel(_))
        ));
        assert!(matches!(parse_image_header(&[]), Err(Error::Kernel(_))));
        let mut elf = vec![0u8; 256];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[0x12] = 62;
        match parse_image_header(&elf) {
            Err(Error::WrongArch(m)) => assert!(m.contains("x86-64"), "{m}"),
            other => panic!("{other:?}"),
        }
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        match parse_image_header(&bz) {
            Err(Error::WrongArch(m)) => assert!(m.contains("bzImage"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_image_header(&[0u8; 128]),
            Err(Error::WrongArch(_))
        ));
        // PE header offset beyond the file: cut short.
        let mut cut = image(0, 0x10_0000, 100);
        cut[0x3c..0x40].copy_from_slice(&0x1000u32.to_le_bytes());
        assert!(matches!(parse_image_header(&cut), Err(Error::Kernel(_))));
        // Big-endian.
        let mut be = image(0, 0x10_0000, 100);
        be[24] = 1;
        assert!(matches!(parse_image_header(&be), Err(Error::Kernel(_))));
    }

    #[test]
    fn loads_kernel_at_text_offset() {
        let m = mem(64 << 20);
        let img = image(0x8_0000, 0x30_0000, 4096);
        let k = load_kernel(&m, &img, fdt_addr(64 << 20).unwrap()).unwrap();
        assert_eq!(k.entry, layout::RAM_START + 0x8_0000);
        assert_eq!(k.kernel_end, layout::RAM_START + 0x40_0000);
        let mut back = vec![0u8; img.len()];
        m.read_slice(&mut back, GuestAddress(k.entry)).unwrap();
        assert_eq!(back, img);
        // Legacy image (image_size 0) goes at 0x80000.
        let k = load_kernel(&m, &image(0, 0, 16), u64::MAX).unwrap();
        assert_eq!(k.entry, layout::RAM_START + 0x8_0000);
        // Huge declared size or text_offset: an error, no panic.
        assert!(matches!(
            load_kernel(&m, &image(u64::MAX - 10, 0x1000, 0), u64::MAX),
            Err(Error::MemoryTooSmall(_))
        ));
        assert!(matches!(
            load_kernel(&m, &image(0, 1 << 40, 0), fdt_addr(64 << 20).unwrap()),
            Err(Error::MemoryTooSmall(_))
        ));
    }

    #[test]
    fn initrd_goes_below_the_fdt_or_is_too_big() {
        let m = mem(64 << 20);
        let fdt = fdt_addr(64 << 20).unwrap();
        assert_eq!(fdt, layout::RAM_START + (62 << 20));
        let rd = vec![0x5au8; 10_000];
        let (addr, size) = load_initrd(&m, &rd, layout::RAM_START + (4 << 20), fdt).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % layout::INITRD_ALIGN, 0);
        assert!(addr + size <= fdt);
        assert!(fdt - (addr + size) < layout::INITRD_ALIGN);
        let big = vec![0u8; 60 << 20];
        match load_initrd(&m, &big, layout::RAM_START + (4 << 20), fdt) {
            Err(Error::InitrdTooBig { size, room }) => {
                assert_eq!(size, 60 << 20);
                assert_eq!(room, 58 << 20);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tiny_memory_is_an_error() {
        assert!(matches!(fdt_addr(1 << 20), Err(Error::MemoryTooSmall(_))));
        assert!(fdt_addr(2 << 20).is_ok());
    }

    #[test]
    fn mpidr_clusters_of_sixteen() {
        assert_eq!(mpidr(0), 0);
        assert_eq!(mpidr(15), 15);
        assert_eq!(mpidr(16), 0x100);
        assert_eq!(mpidr(33), 0x201);
    }

    #[test]
    fn virtio_slots() {
        let d = layout::virtio_mmio_slot(2).unwrap();
        assert_eq!(d.addr, 0x0a00_0400);
        assert_eq!(d.spi, 18);
        assert!(layout::virtio_mmio_slot(layout::VIRTIO_MMIO_SLOTS).is_none());
        let last = layout::virtio_mmio_slot(layout::VIRTIO_MMIO_SLOTS - 1).unwrap();
        assert!(last.addr + last.size <= layout::RAM_START);
    }

    #[test]
    fn fdt_describes_the_machine() {
        let virtio = [
            layout::virtio_mmio_slot(0).unwrap(),
            layout::virtio_mmio_slot(1).unwrap(),
        ];
        let blob = create_fdt(&FdtConfig {
            cmdline: "console=ttyS0 quiet",
            cpus: 18,
            mem_bytes: 256 << 20,
            initrd: Some((0x8f00_0000, 0x1234)),
            virtio: &virtio,
        })
        .unwrap();
        let root = parse_fdt(&blob);
        assert_eq!(root.u32s("#address-cells"), [2]);
        assert_eq!(root.u32s("#size-cells"), [2]);
        assert_eq!(root.u32s("interrupt-parent"), [GIC_PHANDLE]);

        let mem = root.at("memory@80000000");
        assert_eq!(mem.str("device_type"), "memory");
        assert_eq!(mem.u64s("reg"), [0x8000_0000, 256 << 20]);

        let cpus = root.at("cpus");
        assert_eq!(cpus.children.len(), 18);
        let c17 = cpus.child("cpu@101");
        assert_eq!(c17.u32s("reg"), [0x101]);
        assert_eq!(c17.str("enable-method"), "psci");
        assert_eq!(c17.str("device_type"), "cpu");
        assert_eq!(cpus.child("cpu@0").u32s("reg"), [0]);

        let psci = root.at("psci");
        assert_eq!(psci.strs("compatible"), ["arm,psci-1.0", "arm,psci-0.2"]);
        assert_eq!(psci.str("method"), "hvc");

        let gic = root.at("intc@8000000");
        assert_eq!(gic.str("compatible"), "arm,gic-v3");
        assert!(gic.has("interrupt-controller"));
        assert_eq!(gic.u32s("#interrupt-cells"), [3]);
        assert_eq!(gic.u32s("phandle"), [GIC_PHANDLE]);
        assert_eq!(
            gic.u64s("reg"),
            [0x0800_0000, 0x1_0000, 0x0810_0000, 18 * 0x2_0000]
        );

        let timer = root.at("timer");
        assert_eq!(timer.str("compatible"), "arm,armv8-timer");
        assert_eq!(
            timer.u32s("interrupts"),
            [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );

        let uart = root.at("uart@9000000");
        assert_eq!(uart.str("compatible"), "ns16550a");
        assert_eq!(uart.u64s("reg"), [0x0900_0000, 0x1000]);
        assert_eq!(uart.u32s("reg-shift"), [0]);
        assert_eq!(uart.u32s("interrupts"), [0, layout::SERIAL_SPI, 1]);
        assert_eq!(uart.u32s("clock-frequency"), [1_843_200]);

        let bt = root.at("boot-timer@9010000");
        assert_eq!(bt.u64s("reg"), [layout::BOOT_TIMER_ADDR, 0x1000]);

        let v1 = root.at("virtio_mmio@a000200");
        assert_eq!(v1.str("compatible"), "virtio,mmio");
        assert_eq!(v1.u64s("reg"), [0x0a00_0200, 0x200]);
        assert_eq!(v1.u32s("interrupts"), [0, 17, 1]);
        assert!(root
            .children
            .iter()
            .any(|c| c.name == "virtio_mmio@a000000"));

        let chosen = root.at("chosen");
        assert_eq!(chosen.str("bootargs"), "console=ttyS0 quiet");
        assert_eq!(chosen.str("stdout-path"), "/uart@9000000");
        assert_eq!(chosen.u64s("linux,initrd-start"), [0x8f00_0000]);
        assert_eq!(chosen.u64s("linux,initrd-end"), [0x8f00_1234]);
    }

    #[test]
    fn fdt_without_initrd_or_devices() {
        let blob = create_fdt(&FdtConfig {
            cmdline: "",
            cpus: 1,
            mem_bytes: 16 << 20,
            initrd: None,
            virtio: &[],
        })
        .unwrap();
        let root = parse_fdt(&blob);
        assert!(!root.at("chosen").has("linux,initrd-start"));
        assert!(!root.children.iter().any(|c| c.name.starts_with("virtio")));
        assert_eq!(root.at("cpus").children.len(), 1);
    }

    #[test]
    fn fdt_rejects_bad_input() {
        let long = "x".repeat(CMDLINE_MAX);
        let cfg = |cmdline, cpus| FdtConfig {
            cmdline,
            cpus,
            mem_bytes: 16 << 20,
            initrd: None,
            virtio: &[],
        };
        assert!(matches!(
            create_fdt(&cfg(&long, 1)),
            Err(Error::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            create_fdt(&cfg("", 0)),
            Err(Error::TooManyCpus(0))
        ));
        assert!(matches!(
            create_fdt(&cfg("", MAX_CPUS + 1)),
            Err(Error::TooManyCpus(_))
        ));
    }

    #[test]
    fn load_lays_everything_out() {
        let m = mem(128 << 20);
        let rd = vec![7u8; 3 << 20];
        let b = load(
            &m,
            &BootParams {
                kernel: &image(0, 0x20_0000, 1000),
                initrd: Some(&rd),
                cmdline: "console=ttyS0",
                cpus: 2,
                mem_bytes: 128 << 20,
                virtio: &[],
            },
        )
        .unwrap();
        assert_eq!(b.entry, layout::RAM_START);
        assert_eq!(b.fdt_addr, layout::RAM_START + (126 << 20));
        let (ra, rs) = b.initrd.unwrap();
        assert!(ra >= b.kernel_end && ra + rs <= b.fdt_addr);
        let mut hdr = [0u8; 8];
        m.read_slice(&mut hdr, GuestAddress(b.fdt_addr)).unwrap();
        assert_eq!(be32(&hdr, 0), 0xd00d_feed);
        let total = be32(&hdr, 4) as usize;
        let mut blob = vec![0u8; total];
        m.read_slice(&mut blob, GuestAddress(b.fdt_addr)).unwrap();
        let root = parse_fdt(&blob);
        assert_eq!(root.at("chosen").u64s("linux,initrd-start"), [ra]);
        assert_eq!(root.at("chosen").u64s("linux,initrd-end"), [ra + rs]);
    }
}
