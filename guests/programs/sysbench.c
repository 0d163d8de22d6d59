/* sysbench: times N system calls (getpid) and N demand-zero page faults from user mode, to show what
   kernel entries cost on this host. Arguments: count=N pages=P (4 KiB faults, one page at a time). */
#include <ulib.h>

const char program_name[] = "sysbench";

int main(void)
{
    uint64_t count = arg_u64("count", 1000), pages = arg_u64("pages", 256);
    if (!env.tsc_khz || !count) {
        report(false, "needs the TSC frequency and count > 0");
        return 1;
    }
    long pid = 0;
    uint64_t begin = rdtsc();
    for (uint64_t i = 0; i < count; i++)
        pid = sys_getpid();
    uint64_t syscall_ns = cycles_to_ns(rdtsc() - begin) / count;
    printf("sysbench %u: %lu getpid calls: %lu.%02lu us each\n", env.pid, count, syscall_ns / 1000,
           syscall_ns % 1000 / 10);
    uint64_t fault_ns = 0;
    if (pages) {
        /* Every other page, so the kernel's fault-around (which maps the pages after a fault) cannot
           serve the next touch: each touch below is one fault... unless fault-around is wider than 2. */
        long base = sys_mmap(pages * 2 * 4096, 0);
        if (is_error(base)) {
            report(false, "cannot map %lu pages (error %ld)", pages, base);
            return 1;
        }
        begin = rdtsc();
        for (uint64_t i = 0; i < pages; i++)
            ((volatile uint8_t *)base)[(pages - 1 - i) * 2 * 4096] = 1; /* downwards: fault-around maps upwards */
        fault_ns = cycles_to_ns(rdtsc() - begin) / pages;
        printf("sysbench %u: %lu page faults: %lu.%02lu us each\n", env.pid, pages, fault_ns / 1000,
               fault_ns % 1000 / 10);
    }
    report(pid == (long)env.pid, "%lu system calls%s", count, pages ? " and page faults timed" : "");
    return (int)failures();
}
