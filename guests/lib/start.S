/* Entry from the VMM: 64-bit mode, paging on, RDI = boot info, RSI = vCPU index, RSP = boot stack. */
    .section .text.boot, "ax"
    .globl _start
_start:
    xor %ebp, %ebp
    and $-16, %rsp
    call kmain
    mov %eax, %edi
    call guest_exit
1:  hlt
    jmp 1b

    .section .note.GNU-stack, "", @progbits
