/* ticker: from user mode, fills a buffer with a pattern, then prints numbered ticks, re-checking the pattern each time,
   and between ticks dirties another region at a steady rate.
   Command line: ticks=N (0: forever) period_ms=M buffer_mib=K dirty_mib=D dirty_rate=R (pages per second).
   A liveness, data-integrity and memory-load witness for snapshots and migration. */
#include <pyrovisor/boot_info.h>
#include <pyrovisor/console.h>
#include <pyrovisor/cmdline.h>
#include <pyrovisor/idt.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/report.h>
#include <pyrovisor/usermode.h>

#define BUFFER_BASE 0x1000000ull /* 16 MiB, identity-mapped */

extern char __image_start[], __image_end[];
static uint8_t user_stack[16384] __attribute__((aligned(16)));
static uint64_t ticks, period_ms, buffer_words, tsc_per_ms, dirty_pages, dirty_rate;

static inline uint64_t rdtsc(void)
{
    uint32_t low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((uint64_t)high << 32) | low;
}

static uint64_t pattern(uint64_t index) { return (index * 0x9E3779B97F4A7C15ull) ^ 0xC0FFEEull; }

static void user_write(const char *text, size_t length) { user_syscall(SYS_WRITE, (long)text, (long)length, 0); }

static uint64_t dirty_region(void) { return BUFFER_BASE + ((buffer_words * 8 + 4095) & ~4095ull); }

/* Spin until `deadline`, writing one word into the next page of the dirty region whenever the rate says so.
   Time the vCPU spent descheduled (paused, throttled) is not made up beyond a 10 ms burst: like real work,
   the dirtying advances with the CPU time the guest gets. */
static uint64_t dirty_until(uint64_t deadline, uint64_t *credit_start, uint64_t written)
{
    volatile uint64_t *region = (volatile uint64_t *)dirty_region();
    uint64_t burst = dirty_rate / 100 + 1, now;
    while ((now = rdtsc()) < deadline) {
        if (!dirty_pages)
            continue;
        uint64_t due = (now - *credit_start) / tsc_per_ms * dirty_rate / 1000;
        if (due > written + burst) { /* we were not running: forget the backlog */
            *credit_start += (due - written - burst) * 1000 / dirty_rate * tsc_per_ms;
            due = written + burst;
        }
        for (; written < due; written++)
            region[(written % dirty_pages) * 512] = written;
    }
    return written;
}

static void user_main(void)
{
    volatile uint64_t *buffer = (volatile uint64_t *)BUFFER_BASE;
    printf_set_sink(user_write);
    for (uint64_t i = 0; i < buffer_words; i++)
        buffer[i] = pattern(i);
    volatile uint64_t *region = (volatile uint64_t *)dirty_region();
    for (uint64_t i = 0; i < dirty_pages * 512; i++) /* the working set holds data before the rate applies */
        region[i] = pattern(i) + 1;
    printf("ticker: %lu MiB filled\n", (unsigned long)(buffer_words * 8 >> 20));
    long failures = 0;
    uint64_t start = rdtsc(), credit_start = start, written = 0;
    for (uint64_t tick = 1; ticks == 0 || tick <= ticks; tick++) {
        written = dirty_until(rdtsc() + period_ms * tsc_per_ms, &credit_start, written);
        uint64_t bad = buffer_words;
        for (uint64_t i = 0; i < buffer_words; i++) {
            if (buffer[i] != pattern(i)) {
                bad = i;
                break;
            }
        }
        if (bad == buffer_words) {
            printf("tick %lu ok\n", (unsigned long)tick);
            if (dirty_pages && tick % 100 == 0)
                printf("dirtied %lu pages (%lu pages/s)\n", (unsigned long)written,
                       (unsigned long)(written * 1000 / ((rdtsc() - start) / tsc_per_ms + 1)));
        } else {
            printf("tick %lu MISMATCH at word %lu\n", (unsigned long)tick, (unsigned long)bad);
            failures++;
        }
    }
    user_syscall(SYS_EXIT, failures, 0, 0);
}

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu);

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu)
{
    ticks = cmdline_u64(boot, "ticks", 10);
    period_ms = cmdline_u64(boot, "period_ms", 10);
    buffer_words = (cmdline_u64(boot, "buffer_mib", 4) << 20) / 8;
    tsc_per_ms = boot->tsc_khz ? boot->tsc_khz : 1000000;
    dirty_pages = (cmdline_u64(boot, "dirty_mib", 0) << 20) / 4096;
    dirty_rate = cmdline_u64(boot, "dirty_rate", 0);
    if (dirty_region() + dirty_pages * 4096 > boot->ram[0].size)
        panic("buffer_mib + dirty_mib too large for this guest's RAM");
    idt_init();
    usermode_init(boot, cpu);
    user_mode_accessible(__image_start, __image_end);
    user_mode_accessible((void *)BUFFER_BASE, (void *)(dirty_region() + dirty_pages * 4096));
    long failures = run_user(user_main, user_stack + sizeof user_stack);
    printf_set_sink(console_write); /* the kernel must never print through the user's system call */
    report(failures == 0, "pattern intact on every tick");
    return report_summary();
}
