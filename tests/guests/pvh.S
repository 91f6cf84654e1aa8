/* Tiny PVH guest (32-bit protected-mode entry through XEN_ELFNOTE_PHYS32_ENTRY).
 * Prints "PVH magic=ok cmdline=<cmdline>", stamps the boot timer, then does ACTION:
 *   0 clean reset (i8042 0xfe)          1 panic-style warm reset (0x1234 at 0x472)
 *   2 triple fault (null IDT + ud2)     3 garbage to ports and MMIO, then "SURVIVED", reset
 *   4 SMP: INIT/SIPI all APs, wait until NCPUS-1 of them check in, print "SMP <n> ok", reset */
#ifndef ACTION
#define ACTION 0
#endif
#ifndef NCPUS
#define NCPUS 1
#endif
#define COM1 0x3f8
#define APCOUNT 0x1000
#define TRAMP 0x10000

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
    mov %ebx, %edi                  /* start_info */
    mov $msg_pvh, %esi
    call puts
    cmpl $0x336ec578, (%edi)
    jne 1f
    mov $msg_ok, %esi
    jmp 2f
1:  mov $msg_bad, %esi
2:  call puts
    mov $msg_cmd, %esi
    call puts
    mov 24(%edi), %esi              /* cmdline_paddr (low 32 bits) */
    call puts
    mov $msg_nl, %esi
    call puts
    mov $123, %al                   /* boot timer: userspace reached */
    mov $0x3f0, %dx
    out %al, %dx

#if ACTION == 1
    movw $0x1234, 0x472
#endif
#if ACTION == 2
    lidt null_idt
    ud2
#endif
#if ACTION == 3
    /* Every port below 0x1000 except the i8042 command port: byte, word and dword writes
     * and reads, plus string I/O. */
    xor %ecx, %ecx
3:  cmp $0x64, %ecx
    je 4f
    mov %ecx, %edx
    mov %ecx, %eax
    imul $0x9e3779b1, %eax
    out %al, %dx
    out %ax, %dx
    out %eax, %dx
    in %dx, %al
    in %dx, %ax
    in %dx, %eax
4:  inc %ecx
    cmp $0x1000, %ecx
    jb 3b
    mov $0x3f9, %dx                  /* rep outsb/insb on the serial IER */
    mov $garbage, %esi
    mov $16, %ecx
    rep outsb
    mov $0x90000, %edi
    mov $16, %ecx
    rep insb
    /* MMIO: unclaimed hole, beyond RAM, the IOAPIC window. */
    mov $0xd0000000, %ebx
5:  movl $0xdeadbeef, (%ebx)
    movb $0x5a, 3(%ebx)
    movw $0xa5a5, 6(%ebx)
    mov (%ebx), %eax
    add $0x100000, %ebx
    cmp $0xe0000000, %ebx
    jb 5b
    movl $0xffffffff, 0x7ff0000
    mov 0x7ff0000, %eax
    movl $0x12345678, 0xfec00000
    mov $0x03, %al                   /* the spray scrambled the UART: back to 8N1, DLAB off, */
    mov $0x3fb, %dx
    out %al, %dx
    xor %al, %al                     /* no loopback */
    mov $0x3fc, %dx
    out %al, %dx
    mov $msg_survived, %esi
    call puts
#endif
#if ACTION == 4
    mov $tramp_start, %esi          /* copy the real-mode trampoline below 1 MiB */
    mov $TRAMP, %edi
    mov $(tramp_end - tramp_start), %ecx
    rep movsb
    movl $0, APCOUNT
    movl $0x1ff, 0xfee000f0          /* LAPIC software enable (SVR) */
    movl $0x000c4500, 0xfee00300     /* INIT to all but self */
    mov $100000, %ecx
6:  loop 6b
    movl $0x000c4610, 0xfee00300     /* SIPI, vector 0x10 -> 0x10000 */
    mov $100000, %ecx
7:  loop 7b
    movl $0x000c4610, 0xfee00300     /* second SIPI, as the MP spec says */
    mov $200000000, %ecx
8:  cmpl $(NCPUS - 1), APCOUNT
    je 9f
    pause
    loop 8b
    mov $msg_smp_timeout, %esi
    call puts
    jmp reset
9:  mov $msg_smp, %esi
    call puts
    mov APCOUNT, %eax
    inc %eax
    add $'0', %al
    mov $COM1, %dx
    out %al, %dx
    mov $msg_smp_ok, %esi
    call puts
#endif

reset:
    mov $0xfe, %al                  /* pulse the reset line through the i8042 */
    out %al, $0x64
    xor %al, %al                    /* QEMU (benchmark anchor): isa-debug-exit */
    out %al, $0xf4
    hlt
    jmp reset

puts:                               /* esi = NUL-terminated string */
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

    .code16
tramp_start:
    xor %ax, %ax
    mov %ax, %ds
    lock incl APCOUNT
1:  cli
    hlt
    jmp 1b
tramp_end:

    .code32
    .balign 8
null_idt:
    .word 0
    .long 0
garbage:
    .byte 0xff, 0x00, 0x5a, 0xa5, 0x01, 0x80, 0x7f, 0xfe, 0x10, 0x20, 0x40, 0x08, 0x04, 0x02, 0x03, 0xcc
msg_pvh:      .asciz "PVH magic="
msg_ok:       .asciz "ok"
msg_bad:      .asciz "BAD"
msg_cmd:      .asciz " cmdline="
msg_nl:       .asciz "\n"
msg_survived: .asciz "SURVIVED\n"
msg_smp:      .asciz "SMP "
msg_smp_ok:   .asciz " ok\n"
msg_smp_timeout: .asciz "SMP timeout\n"
