/* memdirty: dirties pages of a working set at a given rate, sequentially, at random or with a hot/cold
   split, and reports the rate it achieved; the load for migration and working-set tests.
   Arguments: pages=N rate=R (pages/s, 0: as fast as it can, never sleeping) seconds=S (0: forever)
   pattern=seq|random|hotcold hot=H (% of pages that are hot) hotfrac=F (% of writes to them) seed=X
   page=2m|4k (how the working set is mapped). */
#include <ulib.h>

const char program_name[] = "memdirty";

#define PAGE_WORDS 512

int main(void)
{
    uint64_t pages = arg_u64("pages", 1024), rate = arg_u64("rate", 10000), seconds = arg_u64("seconds", 2);
    uint64_t hot_percent = arg_u64("hot", 10), hot_writes = arg_u64("hotfrac", 90), seed = arg_u64("seed", 1) | 1;
    char pattern[12], page[8];
    arg_str("pattern", pattern, sizeof pattern, "seq");
    arg_str("page", page, sizeof page, "2m");
    bool random = !strcmp(pattern, "random"), hotcold = !strcmp(pattern, "hotcold");
    if ((!random && !hotcold && strcmp(pattern, "seq")) || !pages || hot_percent > 100 || hot_writes > 100) {
        report(false, "bad arguments: pattern=%s pages=%lu hot=%lu hotfrac=%lu", pattern, pages, hot_percent,
               hot_writes);
        return 1;
    }
    long base = sys_mmap(pages * 4096, strcmp(page, "4k") ? MAP_HUGE : 0);
    if (base < 0) {
        report(false, "cannot map %lu pages (error %ld)", pages, base);
        return 1;
    }
    volatile uint64_t *memory = (volatile uint64_t *)base;
    for (uint64_t i = 0; i < pages; i++) /* the working set exists before the rate applies */
        memory[i * PAGE_WORDS] = i;
    uint64_t hot_pages = pages * hot_percent / 100;
    if (!hot_pages)
        hot_pages = 1;
    printf("memdirty %u: %lu pages at %#lx, %s, target %lu pages/s for %lu s\n", env.pid, pages, (uint64_t)base,
           pattern, rate, seconds);

    /* Credit-based pacing: whatever is due gets written, then the process sleeps to the next timer tick
       (so several can share a vCPU). A backlog of up to 250 ms is made up (the host may not run the vCPU
       for a while); beyond that, time the guest did not get is not made up, as with real work. */
    uint64_t start = now_ns(), credit_start = start, written = 0, second_mark = start, second_written = 0;
    uint64_t burst = rate / 4 + 1, state = seed, second = 0, deadline = start + seconds * 1000000000ull;
    for (bool last = false; !last;) {
        uint64_t now = now_ns();
        if (seconds && now >= deadline) { /* the final round: what was due by the deadline, no more */
            now = deadline;
            last = true;
        }
        uint64_t due = rate ? (now - credit_start) / 1000 * rate / 1000000 : written + 64;
        if (rate && due > written + burst) {
            credit_start += (due - written - burst) * 1000000 / rate * 1000;
            due = written + burst;
        }
        for (; written < due; written++) {
            uint64_t index;
            if (random) {
                index = next_random(&state) % pages;
            } else if (hotcold) {
                uint64_t draw = next_random(&state);
                if (draw % 100 < hot_writes || hot_pages == pages)
                    index = (draw >> 8) % hot_pages;
                else
                    index = hot_pages + (draw >> 8) % (pages - hot_pages);
            } else {
                index = written % pages;
            }
            memory[index * PAGE_WORDS + 1] = written;
        }
        if (now - second_mark >= 1000000000ull) {
            second++;
            printf("memdirty %u: second %lu: %lu pages dirtied\n", env.pid, second, written - second_written);
            second_mark = now;
            second_written = written;
        }
        if (rate && !last)
            sys_sleep(1); /* nothing more is due before the next tick */
    }
    uint64_t end = now_ns();
    uint64_t elapsed_ms = ((seconds && end > deadline ? deadline : end) - start) / 1000000;
    uint64_t achieved = elapsed_ms ? written * 1000 / elapsed_ms : 0;
    printf("memdirty %u: dirtied %lu pages in %lu ms: %lu pages/s (target %lu, %s over %lu pages)\n", env.pid,
           written, elapsed_ms, achieved, rate, pattern, pages);
    report(written > 0 && (!rate || achieved * 10 >= rate * 9), "%lu pages/s achieved, target %lu", achieved, rate);
    return (int)failures();
}
