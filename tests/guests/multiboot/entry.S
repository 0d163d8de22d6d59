/* Entry of the test Multiboot kernel: the header, the machine state at entry saved for kmain, a stack, and the
   real-mode trampoline the application processors run after INIT/SIPI. */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003          /* modules page-aligned, memory information */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    mov %eax, entry_state + 0
    mov %ebx, entry_state + 4
    mov %cr0, %eax
    mov %eax, entry_state + 8
    pushf
    pop %eax
    mov %eax, entry_state + 12
    mov %cs, %ax
    mov %ax, entry_state + 16
    mov %ds, %ax
    mov %ax, entry_state + 18
    mov %ss, %ax
    mov %ax, entry_state + 20
    mov %es, %ax
    mov %ax, entry_state + 22
    mov %cr4, %eax
    mov %eax, entry_state + 24
    mov $stack_top, %esp
    call kmain
1:  cli
    hlt
    jmp 1b

    /* Copied to 0x8000 and started by SIPI vector 0x08: count this CPU in at 0x7ff0, then halt for good. */
    .code16
    .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lock incw 0x7ff0
2:  hlt
    jmp 2b
ap_trampoline_end:

    .bss
    .align 16
    .globl entry_state
entry_state:
    .skip 32
stack:
    .skip 16384
stack_top:
    .section .note.GNU-stack, "", @progbits
