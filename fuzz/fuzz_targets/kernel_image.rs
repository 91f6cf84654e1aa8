//! Host input a user can get wrong: any bytes as a kernel image must give an error, not a
//! panic, and never write outside guest memory. Each input is tried as it is and behind a
//! valid x86 ELF32 identification (class 1, little-endian, EM_386), so the fuzzer reaches the
//! 32-bit PVH program-header loader at once (its header fields, program headers and notes all
//! come from the input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]) else {
        return;
    };
    let _ = firmware_free_boot::x86_64::elf_note_names(data);
    let _ = firmware_free_boot::x86_64::load_kernel(&mem, data);

    let mut elf32 = b"\x7fELF\x01\x01\x01".to_vec();
    elf32.resize(16, 0);
    elf32.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf32.extend_from_slice(&3u16.to_le_bytes()); // EM_386
    elf32.extend_from_slice(data);
    let _ = firmware_free_boot::x86_64::elf_note_names(&elf32);
    let _ = firmware_free_boot::x86_64::load_kernel(&mem, &elf32);
});
