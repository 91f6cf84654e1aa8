//! The x86_64 half of the GDB stub: guest virtual addresses through the guest's page tables,
//! and GDB's register file from the vCPU's registers. Pure functions over guest memory.

use gdbstub_arch::x86::reg::X86_64CoreRegs;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::hypervisor::x86_64::{Regs, Sregs};

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Linux's kernel text mapping on x86_64 (`__START_KERNEL_map`, 1 GiB): the kernel is linked
/// there and Skiff loads it unrelocated, so virtual `__START_KERNEL_map + x` is physical `x`
/// once the kernel's own page tables are up. Before that (the PVH entry runs without paging)
/// the stub translates these addresses the same way, so `break start_kernel` can be set at the
/// first instruction.
pub const KERNEL_TEXT_MAP: u64 = 0xffff_ffff_8000_0000;
const KERNEL_TEXT_MAP_SIZE: u64 = 1 << 30;

/// What decides the translation of a virtual address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Paging {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

impl From<&Sregs> for Paging {
    fn from(s: &Sregs) -> Self {
        Paging {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        }
    }
}

/// Outcome of a page walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Physical address and bytes left in its page.
    Mapped(u64, u64),
    /// The top-level entry is absent: the address space has nothing there at all.
    NoTopLevel,
    /// Absent further down (or the tables are not in guest memory).
    NotMapped,
}

fn entry<M: GuestMemory>(mem: &M, table: u64, index: u64, size: u64) -> Option<u64> {
    let addr = GuestAddress(table.checked_add(index * size)?);
    if size == 8 {
        mem.read_obj::<u64>(addr).ok()
    } else {
        mem.read_obj::<u32>(addr).ok().map(u64::from)
    }
}

fn walk<M: GuestMemory>(mem: &M, p: Paging, va: u64) -> Walk {
    if p.cr0 & CR0_PG == 0 {
        // Bytes to the end of the address space (all of it from 0: saturates).
        return Walk::Mapped(va, (u64::MAX - va).saturating_add(1));
    }
    if p.efer & EFER_LMA != 0 {
        let levels: u32 = if p.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let mut table = p.cr3 & ADDR_MASK;
        for level in (0..levels).rev() {
            let shift = 12 + 9 * level;
            let Some(e) = entry(mem, table, (va >> shift) & 0x1ff, 8) else {
                return Walk::NotMapped;
            };
            if e & PRESENT == 0 {
                return if level + 1 == levels {
                    Walk::NoTopLevel
                } else {
                    Walk::NotMapped
                };
            }
            // 1 GiB pages at level 2, 2 MiB pages at level 1.
            if level == 0 || (level <= 2 && e & PAGE_SIZE_BIT != 0) {
                let size = 1u64 << shift;
                let base = e & ADDR_MASK & !(size - 1);
                let off = va & (size - 1);
                return Walk::Mapped(base + off, size - off);
            }
            table = e & ADDR_MASK;
        }
        return Walk::NotMapped;
    }
    let va = va & 0xffff_ffff;
    if p.cr4 & CR4_PAE != 0 {
        // PAE: 4 PDPT entries, then 2 MiB or 4 KiB pages.
        let Some(pdpte) = entry(mem, p.cr3 & 0xffff_ffe0, va >> 30, 8) else {
            return Walk::NotMapped;
        };
        if pdpte & PRESENT == 0 {
            return Walk::NoTopLevel;
        }
        let Some(pde) = entry(mem, pdpte & ADDR_MASK, (va >> 21) & 0x1ff, 8) else {
            return Walk::NotMapped;
        };
        if pde & PRESENT == 0 {
            return Walk::NotMapped;
        }
        if pde & PAGE_SIZE_BIT != 0 {
            let off = va & 0x1f_ffff;
            return Walk::Mapped((pde & ADDR_MASK & !0x1f_ffff) + off, 0x20_0000 - off);
        }
        let Some(pte) = entry(mem, pde & ADDR_MASK, (va >> 12) & 0x1ff, 8) else {
            return Walk::NotMapped;
        };
        if pte & PRESENT == 0 {
            return Walk::NotMapped;
        }
        let off = va & 0xfff;
        return Walk::Mapped((pte & ADDR_MASK) + off, 0x1000 - off);
    }
    // 32-bit paging: 4 MiB pages with PSE, else 4 KiB.
    let Some(pde) = entry(mem, p.cr3 & 0xffff_f000, va >> 22, 4) else {
        return Walk::NotMapped;
    };
    if pde & PRESENT == 0 {
        return Walk::NoTopLevel;
    }
    if p.cr4 & CR4_PSE != 0 && pde & PAGE_SIZE_BIT != 0 {
        let off = va & 0x3f_ffff;
        return Walk::Mapped((pde & 0xffc0_0000) + off, 0x40_0000 - off);
    }
    let Some(pte) = entry(mem, pde & 0xffff_f000, (va >> 12) & 0x3ff, 4) else {
        return Walk::NotMapped;
    };
    if pte & PRESENT == 0 {
        return Walk::NotMapped;
    }
    let off = va & 0xfff;
    Walk::Mapped((pte & 0xffff_f000) + off, 0x1000 - off)
}

/// Translates guest virtual address `va` for a vCPU with paging state `p`: the guest physical
/// address and how many bytes from it lie in the same page. Addresses in the kernel text
/// mapping translate as [`KERNEL_TEXT_MAP`] says while the address space has nothing there
/// (paging off, or no top-level entry).
pub fn translate<M: GuestMemory>(mem: &M, p: Paging, va: u64) -> Option<(u64, u64)> {
    let in_text_map =
        (KERNEL_TEXT_MAP..=KERNEL_TEXT_MAP + (KERNEL_TEXT_MAP_SIZE - 1)).contains(&va);
    let text_map = || {
        let pa = va - KERNEL_TEXT_MAP;
        (pa, KERNEL_TEXT_MAP_SIZE - pa)
    };
    match walk(mem, p, va) {
        Walk::Mapped(pa, left) if p.cr0 & CR0_PG != 0 || !in_text_map => Some((pa, left)),
        Walk::Mapped(..) | Walk::NoTopLevel if in_text_map => Some(text_map()),
        _ => None,
    }
}

/// Reads guest virtual memory into `data`; returns how many bytes could be read (stops at the
/// first address that does not translate or is not guest RAM).
pub fn read_virt<M: GuestMemory>(mem: &M, p: Paging, va: u64, data: &mut [u8]) -> usize {
    let mut done = 0;
    while done < data.len() {
        let Some((pa, left)) = translate(mem, p, va.wrapping_add(done as u64)) else {
            break;
        };
        let n = (data.len() - done).min(usize::try_from(left).unwrap_or(usize::MAX));
        if mem
            .read_slice(&mut data[done..done + n], GuestAddress(pa))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

/// Writes `data` to guest virtual memory; false (nothing or part written) when some address
/// does not translate or is not guest RAM.
pub fn write_virt<M: GuestMemory>(mem: &M, p: Paging, va: u64, data: &[u8]) -> bool {
    let mut done = 0;
    while done < data.len() {
        let Some((pa, left)) = translate(mem, p, va.wrapping_add(done as u64)) else {
            return false;
        };
        let n = (data.len() - done).min(usize::try_from(left).unwrap_or(usize::MAX));
        if mem
            .write_slice(&data[done..done + n], GuestAddress(pa))
            .is_err()
        {
            return false;
        }
        done += n;
    }
    true
}

/// GDB's register file (general registers, RIP, RFLAGS, segment selectors; the FPU and SSE
/// registers read as zero).
pub fn to_gdb(r: &Regs, s: &Sregs) -> X86_64CoreRegs {
    let mut g = X86_64CoreRegs {
        regs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        eflags: r.rflags as u32,
        rip: r.rip,
        ..Default::default()
    };
    g.segments.cs = u32::from(s.cs.selector);
    g.segments.ss = u32::from(s.ss.selector);
    g.segments.ds = u32::from(s.ds.selector);
    g.segments.es = u32::from(s.es.selector);
    g.segments.fs = u32::from(s.fs.selector);
    g.segments.gs = u32::from(s.gs.selector);
    g
}

/// The general registers, RIP and RFLAGS GDB wrote (segment and FPU writes are ignored).
pub fn from_gdb(g: &X86_64CoreRegs, old: &Regs) -> Regs {
    let [rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15] = g.regs;
    Regs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rsp,
        rbp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip: g.rip,
        // The upper half of RFLAGS is reserved (zero).
        rflags: (old.rflags & !0xffff_ffff) | u64::from(g.eflags),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    const LONG: Paging = Paging {
        cr0: CR0_PG | 1,
        cr3: 0x10_0000,
        cr4: CR4_PAE,
        efer: EFER_LMA | (1 << 8),
    };

    /// PML4 at 1 MiB; va 0x4000_0000_1000 -> 4 KiB page at 0x30_0000; 0x20_0000 -> 2 MiB page
    /// at 0x40_0000 (through PDPT 0); 1 GiB page for 0x8000_0000 -> 0x4000_0000.
    fn tables(m: &GuestMemoryMmap) {
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).unwrap();
        // PML4[0] -> PDPT at 0x10_1000; PML4[0x80] -> PDPT at 0x10_2000
        w(0x10_0000, 0x10_1000 | 3);
        w(0x10_0000 + 0x80 * 8, 0x10_2000 | 3);
        // PDPT0[0] -> PD at 0x10_3000; PDPT0[2] -> 1 GiB page at 0x4000_0000
        w(0x10_1000, 0x10_3000 | 3);
        w(0x10_1000 + 2 * 8, 0x4000_0000 | 0x83);
        // PD[1] -> 2 MiB page at 0x40_0000
        w(0x10_3000 + 8, 0x40_0000 | 0x83);
        // PDPT1[0] -> PD at 0x10_4000; PD[0] -> PT at 0x10_5000; PT[1] -> 0x30_0000
        w(0x10_2000, 0x10_4000 | 3);
        w(0x10_4000, 0x10_5000 | 3);
        w(0x10_5000 + 8, 0x30_0000 | 3);
    }

    #[test]
    fn four_level_walk_with_4k_2m_and_1g_pages() {
        let m = mem();
        tables(&m);
        assert_eq!(
            translate(&m, LONG, 0x4000_0000_1234),
            Some((0x30_0234, 0x1000 - 0x234))
        );
        assert_eq!(
            translate(&m, LONG, 0x20_0010),
            Some((0x40_0010, 0x20_0000 - 0x10))
        );
        assert_eq!(
            translate(&m, LONG, 0x8000_0005),
            Some((0x4000_0005, (1 << 30) - 5))
        );
        // Not mapped: PT entry absent, PD entry absent, top-level absent.
        assert_eq!(translate(&m, LONG, 0x4000_0000_2000), None);
        assert_eq!(translate(&m, LONG, 0x60_0000), None);
        assert_eq!(translate(&m, LONG, 0x1000_0000_0000), None);
    }

    #[test]
    fn kernel_text_addresses_translate_before_the_kernel_maps_them() {
        let m = mem();
        tables(&m);
        let start_kernel = KERNEL_TEXT_MAP + 0x0300_1234;
        // Paging off (the PVH entry) and a top-level hole: the kernel's own mapping.
        let off = Paging::default();
        assert_eq!(translate(&m, off, start_kernel).unwrap().0, 0x0300_1234);
        assert_eq!(translate(&m, LONG, start_kernel).unwrap().0, 0x0300_1234);
        // Paging off, other addresses are physical (to the end of the address space; found
        // by the gdb_page_walk fuzz target: 0 overflowed the byte count).
        assert_eq!(translate(&m, off, 0x1234).unwrap().0, 0x1234);
        assert_eq!(translate(&m, off, 0), Some((0, u64::MAX)));
        assert_eq!(translate(&m, off, u64::MAX), Some((u64::MAX, 1)));
        let mut b = [0u8; 2];
        assert_eq!(read_virt(&m, off, u64::MAX, &mut b), 0);
        // Once the kernel maps the top level, its tables decide.
        m.write_obj(0x10_1000u64 | 3, GuestAddress(0x10_0000 + 511 * 8))
            .unwrap();
        assert_eq!(translate(&m, LONG, start_kernel), None);
    }

    #[test]
    fn virtual_reads_and_writes_cross_pages() {
        let m = mem();
        tables(&m);
        // 0x1f_fffe..0x20_0002 crosses from an unmapped 2 MiB page: a short read.
        let mut buf = [0u8; 4];
        assert_eq!(read_virt(&m, LONG, 0x1f_fffe, &mut buf), 0);
        assert!(write_virt(&m, LONG, 0x20_0000, &[1, 2, 3, 4]));
        assert_eq!(read_virt(&m, LONG, 0x20_0000, &mut buf), 4);
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x40_0000)).unwrap(),
            0x0403_0201
        );
        // Tables pointing outside guest memory: no translation, no panic.
        m.write_obj(0xffff_f000u64 | 3, GuestAddress(0x10_0000 + 5 * 8))
            .unwrap();
        assert_eq!(translate(&m, LONG, 5 << 39), None);
        assert!(!write_virt(&m, LONG, 5 << 39, &[0]));
    }

    #[test]
    fn pae_and_32_bit_walks() {
        let m = mem();
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).unwrap();
        // PAE: PDPT at 0x20_0000, [1] -> PD at 0x20_1000, PD[0] 2 MiB -> 0x60_0000
        w(0x20_0000 + 8, 0x20_1000 | 1);
        w(0x20_1000, 0x60_0000 | 0x81);
        let pae = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x20_0000,
            cr4: CR4_PAE,
            efer: 0,
        };
        assert_eq!(translate(&m, pae, 0x4000_0042).unwrap().0, 0x60_0042);
        // 32-bit: PD at 0x30_0000, PDE[1] 4 MiB -> 0x80_0000 with PSE
        m.write_obj(0x80_0083u32, GuestAddress(0x30_0000 + 4))
            .unwrap();
        let flat = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x30_0000,
            cr4: CR4_PSE,
            efer: 0,
        };
        assert_eq!(translate(&m, flat, 0x40_0010).unwrap().0, 0x80_0010);
    }

    #[test]
    fn registers_round_trip_through_gdb() {
        let r = Regs {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r15: 16,
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..Regs::default()
        };
        let mut s = Sregs::default();
        s.cs.selector = 0x10;
        let g = to_gdb(&r, &s);
        assert_eq!(
            g.regs[6], 8,
            "GDB's order is rax rbx rcx rdx rsi rdi rbp rsp"
        );
        assert_eq!(g.regs[7], 7);
        assert_eq!(g.segments.cs, 0x10);
        assert_eq!(from_gdb(&g, &r), r);
    }
}
