/* ptrchase: a random pointer chase (one cyclic permutation of 64-byte nodes) over a buffer mapped with
   4 KiB or 2 MiB pages, reporting nanoseconds per access; the TLB and page-walk workload.
   Arguments: mib=N accesses=A page=4k|2m|both seed=S. */
#include <ulib.h>

const char program_name[] = "ptrchase";

#define NODE_BYTES 64

/* Builds the chase with Sattolo's algorithm (one cycle through every node), checks it, times it.
   Returns picoseconds per access, or 0 on failure. */
static uint64_t chase(uint64_t mib, uint64_t accesses, bool huge, uint64_t seed)
{
    long base = sys_mmap(mib << 20, huge ? MAP_HUGE : 0);
    if (base < 0) {
        report(false, "cannot map %lu MiB (error %ld)", mib, base);
        return 0;
    }
    uint8_t *nodes = (uint8_t *)base;
    uint64_t count = (mib << 20) / NODE_BYTES, state = seed | 1;
    for (uint64_t i = 0; i < count; i++)
        *(uint64_t *)(nodes + i * NODE_BYTES) = i;
    for (uint64_t i = count - 1; i > 0; i--) {
        uint64_t j = next_random(&state) % i;
        uint64_t *a = (uint64_t *)(nodes + i * NODE_BYTES), *b = (uint64_t *)(nodes + j * NODE_BYTES);
        uint64_t swap = *a;
        *a = *b;
        *b = swap;
    }
    for (uint64_t i = 0; i < count; i++) /* indices to pointers */
        *(uint64_t *)(nodes + i * NODE_BYTES) = (uint64_t)(nodes + *(uint64_t *)(nodes + i * NODE_BYTES) * NODE_BYTES);
    /* One full lap must visit every node and come back: proves a single cycle (and warms the TLB). */
    void *p = nodes;
    uint64_t steps = 0;
    do {
        p = *(void **)p;
        steps++;
    } while (p != nodes && steps <= count);
    if (steps != count) {
        report(false, "the chase is not one cycle: back after %lu of %lu nodes", steps, count);
        return 0;
    }
    uint64_t begin = rdtsc();
    for (uint64_t i = 0; i < accesses; i++)
        p = *(void **)p;
    uint64_t cycles = rdtsc() - begin;
    __asm__ volatile("" : : "r"(p)); /* keep the chase */
    uint64_t ps = (uint64_t)((unsigned __int128)cycles_to_ns(cycles) * 1000 / accesses);
    printf("ptrchase %u: %lu MiB, %s pages, %lu accesses: %lu.%02lu ns per access\n", env.pid, mib,
           huge ? "2m" : "4k", accesses, ps / 1000, ps % 1000 / 10);
    return ps ? ps : 1;
}

int main(void)
{
    uint64_t mib = arg_u64("mib", 16), accesses = arg_u64("accesses", 2000000), seed = arg_u64("seed", 7);
    char page[8];
    arg_str("page", page, sizeof page, "both");
    bool small = strcmp(page, "2m") != 0, huge = strcmp(page, "4k") != 0;
    if (!env.tsc_khz || !mib || !accesses || (!small && !huge)) {
        report(false, "needs the TSC frequency and mib, accesses > 0 (page=%s)", page);
        return 1;
    }
    uint64_t small_ps = small ? chase(mib, accesses, false, seed) : 0;
    uint64_t huge_ps = huge ? chase(mib, accesses, true, seed) : 0;
    if (small && huge && small_ps && huge_ps)
        printf("ptrchase %u: 4k/2m = %lu.%02lu\n", env.pid, small_ps / huge_ps, small_ps * 100 / huge_ps % 100);
    report((!small || small_ps) && (!huge || huge_ps), "chased %lu MiB with %s pages", mib, page);
    return (int)failures();
}
