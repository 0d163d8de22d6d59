/* memcheck: fills N MiB with a deterministic pattern, then keeps verifying it and reports any mismatch;
   a data-integrity witness. Arguments: mib=N passes=P (0: forever) interval_ms=I seed=S page=2m|4k. */
#include <ulib.h>

const char program_name[] = "memcheck";

static uint64_t pattern(uint64_t index, uint64_t seed) { return (index * 0x9E3779B97F4A7C15ull) ^ (seed << 32) ^ index; }

int main(void)
{
    uint64_t mib = arg_u64("mib", 16), passes = arg_u64("passes", 3), interval_ms = arg_u64("interval_ms", 0);
    uint64_t seed = arg_u64("seed", 1);
    char page[8];
    arg_str("page", page, sizeof page, "2m");
    uint64_t words = (mib << 20) / 8;
    long base = sys_mmap(mib << 20, strcmp(page, "4k") ? MAP_HUGE : 0);
    if (base < 0) {
        report(false, "cannot map %lu MiB (error %ld)", mib, base);
        return 1;
    }
    volatile uint64_t *buffer = (volatile uint64_t *)base;
    uint64_t start = now_ns(), dirty = 0;
    for (uint64_t i = 0; i < words; i++) {
        dirty += buffer[i] != 0; /* demand-zero memory, fresh or given back by an exited process */
        buffer[i] = pattern(i, seed);
    }
    report(dirty == 0, "%lu MiB of new memory read as zero (%lu words were not)", mib, dirty);
    printf("memcheck %u: %lu MiB filled at %#lx in %lu ms (%s pages)\n", env.pid, mib, (uint64_t)base,
           (now_ns() - start) / 1000000, page);
    uint64_t bad_total = 0, pass;
    for (pass = 1; !passes || pass <= passes; pass++) {
        uint64_t bad = 0, pass_start = now_ns();
        for (uint64_t i = 0; i < words; i++) {
            uint64_t expected = pattern(i, seed);
            if (buffer[i] != expected) {
                if (bad < 3)
                    printf("memcheck %u: MISMATCH at offset %#lx: %#lx, expected %#lx\n", env.pid, i * 8, buffer[i],
                           expected);
                bad++;
            }
        }
        bad_total += bad;
        printf("memcheck %u: pass %lu %s (%lu bad words, %lu ms)\n", env.pid, pass, bad ? "FAILED" : "ok", bad,
               (now_ns() - pass_start) / 1000000);
        if (interval_ms)
            sys_sleep(interval_ms);
    }
    report(bad_total == 0, "%lu MiB intact after %lu passes", mib, pass - 1);
    return (int)failures();
}
