/* counter: a heartbeat with a monotonically increasing count, a liveness witness for pause, snapshot
   and migration. Arguments: count=N (0: forever) period_ms=M. */
#include <ulib.h>

const char program_name[] = "counter";

int main(void)
{
    uint64_t count = arg_u64("count", 10), period_ms = arg_u64("period_ms", 100);
    uint64_t start = (uint64_t)sys_time(), last = start;
    bool monotonic = true;
    uint64_t beat;
    for (beat = 1; !count || beat <= count; beat++) {
        sys_sleep(period_ms);
        uint64_t now = (uint64_t)sys_time();
        monotonic &= now >= last;
        last = now;
        printf("counter %u: beat %lu at %lu ms on vCPU %ld\n", env.pid, beat, (now - start) / 1000000, sys_getcpu());
    }
    uint64_t elapsed_ms = (last - start) / 1000000;
    /* A sleep ends at a timer tick: each may be up to one tick (10 ms at 100 Hz) short of the period. */
    uint64_t tick_ms = 10, minimum = count * (period_ms > tick_ms ? period_ms - tick_ms : 0);
    report(monotonic && elapsed_ms >= minimum, "%lu beats in %lu ms (period %lu ms), time monotonic", count,
           elapsed_ms, period_ms);
    return (int)failures();
}
