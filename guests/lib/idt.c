/* The IDT: exception gates to the stubs in exceptions.S; unhandled exceptions report and stop the VM. */
#include <pyrovisor/console.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/gate.h>
#include <pyrovisor/idt.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/report.h>

static struct idt_gate idt[IDT_ENTRIES] __attribute__((aligned(16)));
static exception_hook hooks[EXCEPTION_VECTORS];
extern const uint64_t exception_stubs[EXCEPTION_VECTORS];

void idt_set_gate(unsigned vector, void (*handler)(void), unsigned dpl)
{
    idt[vector] = interrupt_gate((uint64_t)handler, dpl);
}

void idt_init(void)
{
    for (unsigned vector = 0; vector < EXCEPTION_VECTORS; vector++)
        idt_set_gate(vector, (void (*)(void))exception_stubs[vector], 0);
    struct descriptor_pointer pointer = {sizeof idt - 1, (uint64_t)idt};
    load_idt(&pointer);
}

void idt_set_hook(unsigned vector, exception_hook hook)
{
    if (vector < EXCEPTION_VECTORS)
        hooks[vector] = hook;
}

void exception_dispatch(struct exception_frame *frame);

void exception_dispatch(struct exception_frame *frame)
{
    if (frame->vector < EXCEPTION_VECTORS && hooks[frame->vector] && hooks[frame->vector](frame))
        return;
    uint64_t cr2 = frame->vector == VECTOR_PAGE_FAULT ? read_cr2() : 0;
    char line[160];
    int length = snprintf(line, sizeof line, "EXCEPTION: vector=%lu (%s) error=%#lx rip=%#lx cr2=%#lx cs=%#lx\n",
                          frame->vector, exception_name((unsigned)frame->vector), frame->error_code, frame->rip,
                          cr2, frame->cs);
    /* Straight to a known-good console, not through printf's sink, which may point at a user-mode path. */
    console_reset();
    console_write(line, (size_t)length < sizeof line ? (size_t)length : sizeof line - 1);
    guest_exit(EXIT_EXCEPTION_CODE);
}
