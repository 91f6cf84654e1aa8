/* Tiny PVH guest for pause/resume tests: stamps the boot timer, then increments the 32-bit
 * counter at COUNTER (guest physical, paging off) forever, without any exit to the VMM.
 * APs are never started (they wait for INIT/SIPI). */
#define COUNTER 0x70000

    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long _start
    .balign 4

    .text
    .code32
    .globl _start
_start:
    cli
    mov $0x80000, %esp
    movl $0, COUNTER
    mov $123, %al                   /* boot timer: "userspace" reached */
    mov $0x3f0, %dx
    out %al, %dx
1:  incl COUNTER
    jmp 1b
