/* cache: a large, cold "page cache". Arguments: mib=N (64), seconds=S (0 = sleep forever), page=2m|4k (2m).
   It maps N MiB with MAP_CACHE, writes every 4 KiB page once, then sleeps. The kernel counts these pages as
   CACHES in the balloon statistics and, when an allocation would otherwise fail (or the balloon wants pages and
   no free memory is left), takes them back before deflating the balloon, like a clean page cache; the program
   never looks at them again, so it does not notice. Lines:
       cache P: N MiB of cache at ADDR (2 MiB pages) written in T ms, sleeping for S s|forever
       PASS: cache P: slept S s */
#include <ulib.h>

const char program_name[] = "cache";

int main(void)
{
    uint64_t mib = arg_u64("mib", 64), seconds = arg_u64("seconds", 0);
    char page[4];
    arg_str("page", page, sizeof page, "2m");
    bool huge = strcmp(page, "4k");
    if (!mib) {
        report(false, "bad arguments: mib=0");
        return 1;
    }
    long base = sys_mmap(mib << 20, MAP_CACHE | (huge ? MAP_HUGE : 0));
    if (is_error(base)) {
        report(false, "cannot map %lu MiB (error %ld)", mib, base);
        return 1;
    }
    volatile uint64_t *memory = (volatile uint64_t *)base;
    uint64_t start = now_ns();
    for (uint64_t index = 0; index < mib * 256; index++)
        memory[index * 512] = index | 0xCAC4E00000000000ull;
    uint64_t took_ms = (now_ns() - start) / 1000000;
    if (seconds)
        printf("cache %u: %lu MiB of cache at %#lx (%s pages) written in %lu ms, sleeping for %lu s\n", env.pid, mib,
               (uint64_t)base, huge ? "2 MiB" : "4 KiB", took_ms, seconds);
    else
        printf("cache %u: %lu MiB of cache at %#lx (%s pages) written in %lu ms, sleeping forever\n", env.pid, mib,
               (uint64_t)base, huge ? "2 MiB" : "4 KiB", took_ms);
    for (uint64_t slept = 0; !seconds || slept < seconds; slept++)
        sys_sleep(1000);
    report(true, "slept %lu s", seconds);
    return (int)failures();
}
