/* Privileged CPU helpers: MSRs, control registers, descriptor tables. */
#ifndef PYROVISOR_CPU_H
#define PYROVISOR_CPU_H

#include <stdint.h>

#define MSR_EFER 0xC0000080u
#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_FMASK 0xC0000084u

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define FIRST_TSS_SELECTOR 0x28

#define RFLAGS_RESERVED (1u << 1)
#define RFLAGS_IF (1u << 9)

struct __attribute__((packed)) descriptor_pointer {
    uint16_t limit;
    uint64_t base;
};

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t low, high;
    __asm__ volatile("rdmsr" : "=a"(low), "=d"(high) : "c"(msr));
    return ((uint64_t)high << 32) | low;
}

static inline void wrmsr(uint32_t msr, uint64_t value)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)) : "memory");
}

static inline uint64_t read_cr2(void)
{
    uint64_t value;
    __asm__ volatile("mov %%cr2, %0" : "=r"(value));
    return value;
}

static inline uint64_t read_cr3(void)
{
    uint64_t value;
    __asm__ volatile("mov %%cr3, %0" : "=r"(value));
    return value;
}

static inline void write_cr3(uint64_t value) { __asm__ volatile("mov %0, %%cr3" : : "r"(value) : "memory"); }

/* Privilege level the code is running at, from the low bits of CS. On kvm_pvm hosts the handler
   that SYSCALL enters runs with user privilege (3), on VMX/SVM hosts with 0. */
static inline unsigned current_privilege(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

static inline void load_idt(const struct descriptor_pointer *pointer) { __asm__ volatile("lidt %0" : : "m"(*pointer)); }
static inline void load_tr(uint16_t selector) { __asm__ volatile("ltr %0" : : "r"(selector)); }
static inline void __attribute__((noreturn)) halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

#endif
