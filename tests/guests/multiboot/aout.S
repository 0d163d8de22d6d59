/* A Multiboot kernel in the a.out-kludge form: a flat binary whose header gives the load and entry addresses.
   It checks the magic and that its bss reads as zero, then exits through isa-debug-exit with 5 (QEMU: 11). */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00010002
    .set BASE, 0x200000
    .code32
    .text
    .globl entry
header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long header
    .long header
    .long load_end
    .long bss_end
    .long entry
entry:
    mov $message, %esi
    cmp $0x2BADB002, %eax
    jne fail
    cmpl $0, bss_word
    jne fail
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $5, %al
    out %al, $0xf4
fail:
    mov $1, %al
    out %al, $0xf4
    hlt
message:
    .asciz "aout: entered with the Multiboot magic, bss zeroed\n"
    .align 4
load_end:
    .bss
bss_word:
    .long 0
    .skip 4092
bss_end:
