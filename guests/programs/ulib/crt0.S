/* Program start-up: copy initialised data out of the read-only image, then ulib_start(). Also the thread
   trampoline. At entry RDI = arguments, RSI = their length, RDX = TSC kHz, RCX = pid, R8 = vCPUs. */
#include <os/abi.h>

    .section .text.start, "ax"
    .globl _start
_start:
    lea __data_load(%rip), %r9
    lea __data_start(%rip), %r10
    lea __data_end(%rip), %r11
1:  cmp %r11, %r10
    jae 2f
    mov (%r9), %rax
    mov %rax, (%r10)
    add $8, %r9
    add $8, %r10
    jmp 1b
2:  xor %ebp, %ebp
    call ulib_start
    ud2

/* Threads start here with RDI = function, RSI = its argument (SYS_THREAD's arg0 and arg1). */
    .globl thread_trampoline
thread_trampoline:
    mov %rdi, %rax
    mov %rsi, %rdi
    xor %ebp, %ebp
    call *%rax
    mov %rax, %rdi
    mov $SYS_EXIT, %eax
    syscall
    ud2

    .section .note.GNU-stack, "", @progbits
