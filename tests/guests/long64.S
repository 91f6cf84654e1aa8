/* Tiny 64-bit guest: an ELF without a PVH note, so the VMM enters it in long mode on the
 * identity page tables it built, with %rsi = zero page. Prints "LONG64 zeropage=ok
 * cmdline=<cmdline> high=ok" (high: a 64-bit register operation and a read through the page
 * tables above 1 GiB only work in long mode with Skiff's 4 GiB identity map), then resets. */
#define COM1 0x3f8
    .text
    .code64
    .globl _start
_start:
    cli
    mov $0x80000, %rsp
    mov %rsi, %r12
    lea msg_l(%rip), %rsi
    call puts
    cmpl $0x53726448, 0x202(%r12)   /* "HdrS" in the zero page's setup header */
    jne 1f
    cmpq $0x7000, %r12
    jne 1f
    lea msg_ok(%rip), %rsi
    jmp 2f
1:  lea msg_bad(%rip), %rsi
2:  call puts
    lea msg_cmd(%rip), %rsi
    call puts
    mov 0x228(%r12), %esi           /* cmd_line_ptr */
    call puts
    lea msg_high(%rip), %rsi
    call puts
    movabs $0x123456789, %rax
    shr $32, %rax
    cmp $1, %rax
    jne 3f
    mov $0x7ff0000, %rbx            /* below RAM end (128 MiB) */
    movabs $0x1122334455667788, %rax
    mov %rax, (%rbx)
    cmp (%rbx), %rax
    jne 3f
    lea msg_ok(%rip), %rsi
    jmp 4f
3:  lea msg_bad(%rip), %rsi
4:  call puts
    lea msg_nl(%rip), %rsi
    call puts
    mov $123, %al
    mov $0x3f0, %dx
    out %al, %dx
5:  mov $0xfe, %al
    out %al, $0x64
    hlt
    jmp 5b

puts:
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

msg_l:    .asciz "LONG64 zeropage="
msg_ok:   .asciz "ok"
msg_bad:  .asciz "BAD"
msg_cmd:  .asciz " cmdline="
msg_high: .asciz " high="
msg_nl:   .asciz "\n"
