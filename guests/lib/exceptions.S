/* Entry stubs for the 32 exception vectors: push a uniform frame and call exception_dispatch. */
    .text


    .macro vector_stub number
    .p2align 4
exception_stub_\number:
    .if !((\number == 8) || (\number >= 10 && \number <= 14) || (\number == 17) || (\number == 21) || (\number == 29) || (\number == 30))
    pushq $0
    .endif
    pushq $\number
    jmp exception_common
    .endm

    .altmacro
    .set vector, 0
    .rept 32
    vector_stub %vector
    .set vector, vector + 1
    .endr

exception_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call exception_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .section .rodata
    .p2align 3
    .globl exception_stubs
exception_stubs:
    .macro stub_address number
    .quad exception_stub_\number
    .endm
    .set vector, 0
    .rept 32
    stub_address %vector
    .set vector, vector + 1
    .endr

    .section .note.GNU-stack, "", @progbits
