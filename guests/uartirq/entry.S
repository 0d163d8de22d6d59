/* Interrupt entry for the UART's IRQ 4 (vector 0x24 with the PIC at base 0x20): save, call C, IRETQ. */
    .text
    .globl uart_interrupt_entry
uart_interrupt_entry:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    cld
    call uart_interrupt
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq

    .section .note.GNU-stack, "", @progbits
