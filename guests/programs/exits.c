/* exits: N port-I/O or MMIO writes to a chosen device, timed from user mode, for exit benchmarks.
   Arguments: mode=pio|mmio count=N port=P (pio) addr=A (mmio, outside RAM) size=1|2|4. */
#include <ulib.h>

const char program_name[] = "exits";

int main(void)
{
    char mode[8];
    arg_str("mode", mode, sizeof mode, "pio");
    uint64_t count = arg_u64("count", 1000), port = arg_u64("port", 0x510), address = arg_u64("addr", 0xD0000000);
    uint64_t size = arg_u64("size", 1);
    bool pio = !strcmp(mode, "pio");
    if ((!pio && strcmp(mode, "mmio")) || (size != 1 && size != 2 && size != 4) || !count) {
        report(false, "bad arguments: mode=%s size=%lu count=%lu", mode, size, count);
        return 1;
    }
    uint64_t begin, cycles;
    if (pio) {
        long error = sys_ioperm((unsigned)port, (unsigned)size);
        if (error) {
            report(false, "port %#lx refused (error %ld)", port, error);
            return 1;
        }
        uint16_t target = (uint16_t)port;
        begin = rdtsc();
        for (uint64_t i = 0; i < count; i++) {
            if (size == 1)
                __asm__ volatile("outb %b0, %w1" : : "a"(i), "Nd"(target));
            else if (size == 2)
                __asm__ volatile("outw %w0, %w1" : : "a"(i), "Nd"(target));
            else
                __asm__ volatile("outl %k0, %w1" : : "a"(i), "Nd"(target));
        }
        cycles = rdtsc() - begin;
    } else {
        long mapped = sys_mapio(address, 4096);
        if (mapped < 0) {
            report(false, "cannot map %#lx (error %ld)", address, mapped);
            return 1;
        }
        begin = rdtsc();
        for (uint64_t i = 0; i < count; i++) {
            if (size == 1)
                *(volatile uint8_t *)mapped = (uint8_t)i;
            else if (size == 2)
                *(volatile uint16_t *)mapped = (uint16_t)i;
            else
                *(volatile uint32_t *)mapped = (uint32_t)i;
        }
        cycles = rdtsc() - begin;
    }
    uint64_t ns = env.tsc_khz ? cycles_to_ns(cycles) : 0;
    uint64_t per_exit_ns = ns / count;
    printf("exits %u: %lu %s writes of %lu bytes to %#lx: %lu.%02lu us each\n", env.pid, count, mode, size,
           pio ? port : address, per_exit_ns / 1000, per_exit_ns % 1000 / 10);
    report(true, "%lu %s writes done", count, mode);
    return (int)failures();
}
