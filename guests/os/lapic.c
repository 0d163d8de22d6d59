/* The local APIC timer: periodic ticks at os_options.hz on every vCPU (in-kernel LAPIC, 1 ns per count). */
#include "kernel.h"

#define LAPIC_EOI 0xB0
#define LAPIC_SVR 0xF0
#define LAPIC_ICR_LOW 0x300
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_ASSERT (1u << 14)
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3E0
#define SVR_ENABLE 0x100
#define LVT_PERIODIC (1u << 17)
#define DIVIDE_BY_1 0xB
#define LAPIC_COUNTS_PER_SECOND 1000000000u /* KVM's and QEMU's APIC timers count nanoseconds */

static inline volatile uint32_t *lapic_register(unsigned offset)
{
    return (volatile uint32_t *)((uint8_t *)phys_to_virt(LAPIC_GPA) + offset);
}

void lapic_enable(void) { *lapic_register(LAPIC_SVR) = SVR_ENABLE | VECTOR_SPURIOUS; }

void lapic_timer_start(uint32_t hz)
{
    lapic_enable();
    *lapic_register(LAPIC_TIMER_DIVIDE) = DIVIDE_BY_1;
    *lapic_register(LAPIC_LVT_TIMER) = VECTOR_TIMER | LVT_PERIODIC;
    *lapic_register(LAPIC_TIMER_INITIAL) = LAPIC_COUNTS_PER_SECOND / hz;
}

void lapic_eoi(void) { *lapic_register(LAPIC_EOI) = 0; }

/* A fixed IPI to every other vCPU (they wait for it in HLT at boot). */
void lapic_wake_others(void) { *lapic_register(LAPIC_ICR_LOW) = ICR_ALL_BUT_SELF | ICR_ASSERT | VECTOR_WAKEUP; }
