/* Tiny arm64 guest: an arm64 Image (the Linux boot header, so `vmm --kernel` loads it like a
 * kernel) that prints "ARM64 hello from EL1, x0=fdt" on the 16550 at 0x0900_0000, stamps the
 * boot timer (0x0901_0000) with 123 and powers off through PSCI SYSTEM_OFF (HVC). With
 * -DPANIC it asks for PSCI SYSTEM_RESET after the stamp instead. x0 holds the FDT address
 * at entry (the Linux arm64 boot protocol); the guest prints "fdt" when it points at an FDT
 * (magic d00dfeed). */
#define UART 0x09000000
#define BOOT_TIMER 0x09010000
    .text
    .globl _start
_start:
    b       entry                   /* code0/code1 */
    .long   0
    .quad   0                       /* text_offset */
    .quad   image_end - _start      /* image_size */
    .quad   0                       /* flags: little-endian, 4K pages unspecified */
    .quad   0, 0, 0                 /* res2..res4 */
    .ascii  "ARM\x64"               /* magic at 0x38 */
    .long   0                       /* res5 */
entry:
    mov     x19, x0                 /* FDT address */
    ldr     x20, =UART
    adr     x1, msg
    bl      puts
    ldr     w2, [x19]               /* FDT magic, big-endian d00dfeed */
    ldr     w3, =0xedfe0dd0
    cmp     w2, w3
    adr     x1, fdt_ok
    adr     x4, fdt_bad
    csel    x1, x1, x4, eq
    bl      puts
    ldr     x5, =BOOT_TIMER
    mov     w6, #123
    strb    w6, [x5]
#ifdef PANIC
    ldr     w0, =0x84000009         /* PSCI SYSTEM_RESET */
#else
    ldr     w0, =0x84000008         /* PSCI SYSTEM_OFF */
#endif
    hvc     #0
1:  wfi
    b       1b

puts:                               /* x1: NUL-terminated string, x20: UART */
    ldrb    w2, [x1], #1
    cbz     w2, 2f
    strb    w2, [x20]
    b       puts
2:  ret

msg:     .asciz "ARM64 hello from EL1, x0="
fdt_ok:  .asciz "fdt\n"
fdt_bad: .asciz "BAD\n"
    .balign 8
    .ltorg
image_end:
