/* Tiny 64-bit guest for the GDB stub (entered in long mode on Skiff's identity page tables,
 * like long64.S): counts %rbx to 1000, passes `checkpoint` and `second` (labels GDB breaks
 * on), prints "rbx=<%rbx in hex>" (a debugger may have changed it), then resets. */
#define COM1 0x3f8
    .text
    .code64
    .globl _start
_start:
    cli
    mov $0x80000, %rsp
    xor %ebx, %ebx
    .globl count_loop
count_loop:
    inc %rbx
    cmp $1000, %rbx
    jne count_loop
    .globl checkpoint
checkpoint:
    nop
    nop
    .globl second
second:
    nop
    lea msg(%rip), %rsi
    call puts
    mov $16, %ecx
1:  rol $4, %rbx
    mov %bl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 2f
    add $('a' - '0' - 10), %al
2:  mov $COM1, %dx
    out %al, %dx
    dec %ecx
    jnz 1b
    mov $'\n', %al
    out %al, %dx
3:  mov $0xfe, %al
    out %al, $0x64
    hlt
    jmp 3b

puts:
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

msg: .asciz "rbx="
