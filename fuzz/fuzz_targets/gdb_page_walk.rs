//! Guest-controlled input of the GDB stub: the guest's page tables (and its CR0/CR3/CR4/EFER)
//! decide how a virtual address translates. Any tables and registers must give a translation
//! inside guest memory or none: no panic, no endless walk, no access outside guest RAM.
//! Input: CR0, CR3, CR4, EFER, a virtual address (5 x u64 LE), then guest memory from 0.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_vmm::gdb::x86_64::{read_virt, translate, write_virt, Paging};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 4 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 40 {
        return;
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let p = Paging {
        cr0: word(0),
        cr3: word(1),
        cr4: word(2),
        efer: word(3),
    };
    let va = word(4);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let image = &data[40..];
    let _ = mem.write_slice(&image[..image.len().min(MEM)], GuestAddress(0));
    if let Some((pa, left)) = translate(&mem, p, va) {
        assert!(left > 0, "an empty page");
        let _ = pa;
    }
    let mut buf = [0u8; 64];
    let n = read_virt(&mem, p, va, &mut buf);
    assert!(n <= buf.len());
    let _ = write_virt(&mem, p, va.wrapping_add(1), &buf[..8]);
});
