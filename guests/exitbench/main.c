/* exitbench: N port writes, then N MMIO writes, from user mode, between marker writes the host times. */
#include <pyrovisor/boot_info.h>
#include <pyrovisor/cmdline.h>
#include <pyrovisor/idt.h>
#include <pyrovisor/io.h>
#include <pyrovisor/report.h>
#include <pyrovisor/tss.h>
#include <pyrovisor/usermode.h>

/* Shared with benchmarks/exit_latency.py and its C baseline. */
#define BENCH_PORT 0x510
#define MARKER_PORT 0x511
#define BENCH_MMIO 0xD0000000ull
#define MARK_PIO_START 1
#define MARK_MMIO_START 2
#define MARK_DONE 3

extern char __image_start[], __image_end[];
static uint8_t user_stack[8192] __attribute__((aligned(16)));
static uint64_t iterations;

static void user_loop(void)
{
    volatile uint32_t *mmio = (volatile uint32_t *)BENCH_MMIO;
    uint64_t count = iterations;
    outb(MARKER_PORT, MARK_PIO_START);
    for (uint64_t i = 0; i < count; i++)
        outb(BENCH_PORT, (uint8_t)i);
    outb(MARKER_PORT, MARK_MMIO_START);
    for (uint64_t i = 0; i < count; i++)
        *mmio = (uint32_t)i;
    outb(MARKER_PORT, MARK_DONE);
    user_syscall(SYS_EXIT, 0, 0, 0);
}

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu);

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu)
{
    iterations = cmdline_u64(boot, "iterations", 1000);
    idt_init();
    usermode_init(boot, cpu);
    tss_allow_ports(cpu, BENCH_PORT, 2);
    user_mode_accessible(__image_start, __image_end);
    user_mode_accessible((void *)BENCH_MMIO, (void *)(BENCH_MMIO + 4096));
    long result = run_user(user_loop, user_stack + sizeof user_stack);
    report(result == 0, "%lu port writes and %lu MMIO writes from user mode", iterations, iterations);
    return report_summary();
}
