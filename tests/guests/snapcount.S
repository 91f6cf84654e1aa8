/* Tiny PVH guest for snapshot tests: counts 1..LIMIT, printing each value on its own line,
 * keeping the count in memory (COUNTER), a running sum in a general register (%ebp) and, with
 * SSE=1, the same sum in an SSE register (%xmm0; without it "xmm=" repeats %ebp: PVM's
 * instruction emulator, which runs ring-0 guest code on PVM hosts, cannot execute SSE). After printing SNAP_AT it writes 200 to the boot timer
 * (the VMM's --snapshot-on-stamp default), then goes on. At LIMIT it prints
 * "sum=<ebp> xmm=<xmm0>" and resets cleanly. Restored from a snapshot, it must go on from
 * where it stopped with memory, general and SSE registers intact: the two sums are then
 * both LIMIT*(LIMIT+1)/2. */
#ifndef LIMIT
#define LIMIT 20
#endif
#ifndef SNAP_AT
#define SNAP_AT 5
#endif
#ifndef DELAY
#define DELAY 4000000
#endif
#ifndef SSE
#define SSE 1
#endif
#define COM1 0x3f8
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
#if SSE
    mov %cr0, %eax                  /* SSE on: CR0.EM off, CR0.MP on, CR4.OSFXSR */
    and $~0x4, %eax
    or $0x2, %eax
    mov %eax, %cr0
    mov %cr4, %eax
    or $0x600, %eax
    mov %eax, %cr4
    pxor %xmm0, %xmm0
#endif
    xor %ebp, %ebp
    movl $0, COUNTER
    mov $123, %al                   /* boot timer: userspace reached */
    mov $0x3f0, %dx
    out %al, %dx
next:
    incl COUNTER
    mov COUNTER, %eax
    add %eax, %ebp
#if SSE
    movd %eax, %xmm1
    paddd %xmm1, %xmm0
#endif
    call putdec
    mov $'\n', %al
    call putc
    cmpl $SNAP_AT, COUNTER
    jne 1f
    mov $200, %al                   /* ask for the snapshot */
    mov $0x3f0, %dx
    out %al, %dx
1:  mov $DELAY, %ecx
2:  dec %ecx
    jnz 2b
    cmpl $LIMIT, COUNTER
    jb next
    mov $msg_sum, %esi
    call puts
    mov %ebp, %eax
    call putdec
    mov $msg_xmm, %esi
    call puts
#if SSE
    movd %xmm0, %eax
#else
    mov %ebp, %eax
#endif
    call putdec
    mov $'\n', %al
    call putc
    mov $0xfe, %al                  /* clean reset through the i8042 */
    out %al, $0x64
3:  hlt
    jmp 3b

/* putc: %al to COM1 */
putc:
    push %edx
    mov $COM1, %dx
    out %al, %dx
    pop %edx
    ret

/* puts: the NUL-terminated string at %esi */
puts:
    push %eax
4:  lodsb
    test %al, %al
    jz 5f
    call putc
    jmp 4b
5:  pop %eax
    ret

/* putdec: %eax in decimal */
putdec:
    push %ebx
    push %ecx
    push %edx
    mov $10, %ebx
    xor %ecx, %ecx
6:  xor %edx, %edx
    div %ebx
    add $'0', %dl
    push %edx
    inc %ecx
    test %eax, %eax
    jnz 6b
7:  pop %eax
    call putc
    loop 7b
    pop %edx
    pop %ecx
    pop %ebx
    ret

    .data
msg_sum: .asciz "sum="
msg_xmm: .asciz " xmm="
