//! Host input a user can get wrong: any bytes as a kernel image must give an error, not a
//! panic, and never write outside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]) else {
        return;
    };
    let _ = firmware_free_boot::x86_64::elf_note_names(data);
    let _ = firmware_free_boot::x86_64::load_kernel(&mem, data);
});
