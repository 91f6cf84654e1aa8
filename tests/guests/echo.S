/* Tiny PVH guest for the interactive console: prints "ready>", then echoes every byte the
 * UART (COM1) receives, upper-cased for a-z, polling the line status register (no
 * interrupts); on 'q' it prints "bye" and resets through the i8042 (a clean end, status 0).
 * APs are never started. */
#define COM1 0x3f8

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
    mov $123, %al                   /* boot timer: "userspace" reached */
    mov $0x3f0, %dx
    out %al, %dx
    mov $ready, %esi
    call puts
1:  mov $COM1+5, %dx                /* LSR: bit 0 = data ready */
    in %dx, %al
    test $1, %al
    jz 1b
    mov $COM1, %dx                  /* RBR */
    in %dx, %al
    cmp $'q', %al
    je 3f
    cmp $'a', %al
    jb 2f
    cmp $'z', %al
    ja 2f
    sub $0x20, %al
2:  call putc
    jmp 1b
3:  mov $bye, %esi
    call puts
    mov $0xfe, %al                  /* pulse the reset line through the i8042 */
    out %al, $0x64
4:  hlt
    jmp 4b

/* putc: %al to COM1 (THR). */
putc:
    mov $COM1, %dx
    out %al, %dx
    ret

/* puts: the NUL-terminated string at %esi. */
puts:
    lodsb
    test %al, %al
    jz 5f
    call putc
    jmp puts
5:  ret

ready: .asciz "ready>"
bye:   .asciz "<bye\n"
