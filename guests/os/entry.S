/* Kernel entries: boot (vCPU 0 and the others), exception and interrupt stubs, the two ways a system
   call arrives (a #GP from the user-privilege SYSCALL target on kvm_pvm, or real CPL0 on VMX/SVM),
   and the way back to user mode (IRETQ from a trap frame). */
#include "kernel.h"

    .section .text.boot, "ax"
    .globl _start
_start:                                  /* vCPU 0: RDI = boot info (physical), RSI = 0 */
    lea idle_stacks + IDLE_STACK_SIZE(%rip), %rsp
    xor %ebp, %ebp
    call kernel_main
    ud2

    .globl ap_start
ap_start:                                /* other vCPUs, started by the VMM: RSI = vCPU index */
    cmp $MAX_CPUS, %rsi
    jae 2f
    lea 1(%rsi), %rax
    shl $13, %rax                        /* IDLE_STACK_SIZE */
    lea idle_stacks(%rip), %rsp
    add %rax, %rsp
    mov %esi, %edi
    xor %ebp, %ebp
    call ap_main
2:  cli
    hlt
    jmp 2b

/* The SYSCALL target (LSTAR), mapped into every process at USER_ENTRY_VA, user-executable.
   On kvm_pvm it runs with user privilege: SWAPGS raises #GP, and the #GP handler runs the system
   call at CPL0 (trap.c). On VMX/SVM it runs at CPL0: SWAPGS gives the per-vCPU area, and the jump
   leads into the kernel. Position-independent: it runs at a different address than it is linked at. */
    .section .text.uentry, "ax"
    .globl user_entry_page
user_entry_page:
    swapgs
    jmp *%gs:CPU_SYSCALL_ENTRY

/* The zeroing upcall (trap.c): the kernel sends a process here, at CPL3, with RDI = the new pages, RCX = their
   size in qwords, RAX = 0, DF clear; the ud2 brings it back to the kernel, which restores its registers. */
    .p2align 4
    .globl user_zero_stub, user_zero_done
user_zero_stub:
    rep stosq
user_zero_done:
    ud2

    .text
/* SYSCALL at CPL0: user RSP still loaded, RCX = user RIP, R11 = user RFLAGS, GS = per-vCPU area,
   interrupts off (FMASK). Build the same frame an interrupt from user mode would. */
    .globl syscall_entry_cpl0
syscall_entry_cpl0:
    mov %rsp, %gs:CPU_USER_RSP
    mov %gs:CPU_KSTACK_TOP, %rsp
    pushq $USER_DS
    pushq %gs:CPU_USER_RSP
    push %r11
    pushq $USER_CS
    push %rcx
    swapgs
    pushq $0
    pushq $VECTOR_SYSCALL
    jmp trap_common

    .macro stub vector, has_error
    .p2align 4
vector_\vector:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vector
    jmp trap_common
    .endm

    stub 0, 0
    stub 1, 0
    stub 2, 0
    stub 3, 0
    stub 4, 0
    stub 5, 0
    stub 6, 0
    stub 7, 0
    stub 8, 1
    stub 9, 0
    stub 10, 1
    stub 11, 1
    stub 12, 1
    stub 13, 1
    stub 14, 1
    stub 15, 0
    stub 16, 0
    stub 17, 1
    stub 18, 0
    stub 19, 0
    stub 20, 0
    stub 21, 1
    stub 22, 0
    stub 23, 0
    stub 24, 0
    stub 25, 0
    stub 26, 0
    stub 27, 0
    stub 28, 0
    stub 29, 1
    stub 30, 1
    stub 31, 0
    stub 64, 0                           /* VECTOR_TIMER */
    stub 65, 0                           /* VECTOR_WAKEUP */
    .irp vector, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95
    stub \vector, 0                      /* VECTOR_VIRTIO_BASE + device index */
    .endr

    .p2align 4
    .globl spurious_entry
spurious_entry:                          /* the LAPIC's spurious vector: no EOI, nothing to do */
    iretq

trap_common:
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
    call trap_handler                    /* returns to resume this same frame */
trap_return:
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

/* void resume_frame(struct trap_frame *frame): continue another context. The lock is released only
   once this vCPU stands on that context's stack, so no other vCPU can pick the old one up while
   this one still runs on it. */
    .globl resume_frame
resume_frame:
    mov %rdi, %rsp
    movl $0, kernel_lock(%rip)
    jmp trap_return

/* void idle_on_stack(uint64_t stack_top): sleep in HLT until an interrupt brings work. */
    .globl idle_on_stack
idle_on_stack:
    mov %rdi, %rsp
    movl $0, kernel_lock(%rip)
1:  sti
    hlt
    cli
    jmp 1b

    .section .rodata
    .p2align 3
    .globl vector_stubs
vector_stubs:
    .quad vector_0, vector_1, vector_2, vector_3, vector_4, vector_5, vector_6, vector_7
    .quad vector_8, vector_9, vector_10, vector_11, vector_12, vector_13, vector_14, vector_15
    .quad vector_16, vector_17, vector_18, vector_19, vector_20, vector_21, vector_22, vector_23
    .quad vector_24, vector_25, vector_26, vector_27, vector_28, vector_29, vector_30, vector_31
    .quad vector_64, vector_65
    .quad vector_80, vector_81, vector_82, vector_83, vector_84, vector_85, vector_86, vector_87
    .quad vector_88, vector_89, vector_90, vector_91, vector_92, vector_93, vector_94, vector_95

    .bss
    .p2align 12
    .globl idle_stacks
idle_stacks:
    .space MAX_CPUS * IDLE_STACK_SIZE

    .section .note.GNU-stack, "", @progbits
