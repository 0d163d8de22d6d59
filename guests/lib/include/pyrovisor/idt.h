/* Exception handling: an IDT whose handlers report the fault and stop the VM, with optional hooks. */
#ifndef PYROVISOR_IDT_H
#define PYROVISOR_IDT_H

#include <stdbool.h>
#include <stdint.h>

#include <pyrovisor/gate.h>

#define VECTOR_GENERAL_PROTECTION 13
#define VECTOR_PAGE_FAULT 14

/* What the entry stubs save, lowest address first. */
struct exception_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

/* A hook returns true when it handled the exception (the faulting context then resumes). */
typedef bool (*exception_hook)(struct exception_frame *frame);

void idt_init(void);
void idt_set_hook(unsigned vector, exception_hook hook);
void idt_set_gate(unsigned vector, void (*handler)(void), unsigned dpl);

#endif
