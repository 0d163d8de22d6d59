/* Switching to user mode with IRETQ and the SYSCALL entry point (returns with IRETQ: SYSRETQ faults under kvm_pvm). */
#define USER_CS (0x20 | 3)
#define USER_DS (0x18 | 3)
#define RFLAGS_USER 0x202

    .text

/* long run_user(void (*entry)(void), void *user_stack_top) */
    .globl run_user
run_user:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, kernel_context_rsp(%rip)
    pushq $USER_DS
    push %rsi
    pushq $RFLAGS_USER
    pushq $USER_CS
    push %rdi
    iretq

/* Back in the kernel context saved by run_user, at CPL0, with the value in user_exit_value. */
    .globl resume_kernel
resume_kernel:
    mov kernel_context_rsp(%rip), %rsp
    mov user_exit_value(%rip), %rax
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret

/* void return_to_kernel(long value): called from the SYSCALL handler for SYS_EXIT. */
    .globl return_to_kernel
return_to_kernel:
    mov %rdi, user_exit_value(%rip)
    mov %cs, %ax
    test $3, %al
    jz resume_kernel
    /* The SYSCALL handler runs with user privilege (kvm_pvm): a privileged instruction raises #GP,
       whose handler runs at CPL0 and resumes the kernel there (see usermode.c). */
    .globl return_to_kernel_trap
return_to_kernel_trap:
    cli
    ud2

/* SYSCALL entry: RAX = number, RDI/RSI/RDX = arguments, RCX = user RIP, R11 = user RFLAGS. */
    .globl syscall_entry
syscall_entry:
    mov %rsp, syscall_user_rsp(%rip)
    lea syscall_stack_top(%rip), %rsp
    push %rcx
    push %r11
    mov %rax, %rcx
    /* syscall_dispatch(arg0, arg1, arg2, number) */
    call syscall_dispatch
    pop %r11
    pop %rcx
    mov syscall_user_rsp(%rip), %r10
    pushq $USER_DS
    push %r10
    push %r11
    pushq $USER_CS
    push %rcx
    iretq

    .bss
    .p2align 4
    .globl kernel_context_rsp
kernel_context_rsp: .quad 0
user_exit_value: .quad 0
syscall_user_rsp: .quad 0
    .p2align 4
syscall_stack: .space 8192
syscall_stack_top:

    .section .note.GNU-stack, "", @progbits
