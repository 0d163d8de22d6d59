/* An x86-64 interrupt gate, as the IDT holds it, and the names of the architectural exception vectors. */
#ifndef PYROVISOR_GATE_H
#define PYROVISOR_GATE_H

#include <stdint.h>

#include <pyrovisor/cpu.h>

#define GATE_INTERRUPT 0x8E
#define IDT_ENTRIES 256
#define EXCEPTION_VECTORS 32 /* vectors 0-31 are the CPU's exceptions */

struct __attribute__((packed)) idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attributes;
    uint16_t offset_middle;
    uint32_t offset_high;
    uint32_t reserved;
};

/* A gate to `handler` in the kernel code segment; `dpl` 3 lets user mode raise it with INT n. */
static inline struct idt_gate interrupt_gate(uint64_t handler, unsigned dpl)
{
    return (struct idt_gate){
        .offset_low = (uint16_t)handler,
        .selector = KERNEL_CS,
        .type_attributes = (uint8_t)(GATE_INTERRUPT | (dpl << 5)),
        .offset_middle = (uint16_t)(handler >> 16),
        .offset_high = (uint32_t)(handler >> 32),
    };
}

/* "#PF page fault" for 14, "reserved" for vectors without an architectural exception. */
const char *exception_name(unsigned vector);

#endif
