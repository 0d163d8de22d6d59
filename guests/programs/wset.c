/* wset: a workload whose working set is known exactly, so that a host can compare its estimate with the truth.
   Arguments: mib=N (the working set without a schedule; 64), schedule=MIB:SECONDS,MIB:SECONDS,... (phases),
   seconds=S (total run time: the schedule repeats until then; 0 = the schedule once, or forever without one),
   mode=read|write|mixed, pattern=uniform|hotcold, hot_pct=P (20), period_ms=T (100), cold_period_ms=C (1000),
   page=2m|4k (2m).
   It allocates and writes the largest size once, then, phase after phase, touches exactly the first ws_mib MiB of
   it: one access per 4 KiB page (a load, a store, or in mixed mode a store on even pages and a load on odd ones),
   sweeping the set over and over as fast as it can, in user mode with no system call in the loop. With hotcold,
   the first hot_pct % of the set is swept continuously and the rest touched at an even pace, each page once per
   cold_period_ms. Once a second (the only system call) it prints
       wset P: t=<ms> phase=<k> ws_mib=<N> touched=<pages> ops=<touches in the last second>
   and at each phase change
       wset P: phase k: ws_mib=N from t=<ms>
   with t counted from the start of phase 0. */
#include <pyrovisor/cmdline.h>
#include <ulib.h>

const char program_name[] = "wset";

#define MAX_PHASES 32
#define PAGE_WORDS 512
#define BLOCK 1024 /* touches between two looks at the clock */

struct phase {
    uint64_t mib, seconds;
};

static volatile uint64_t *memory;
static uint64_t sink;
static int mode; /* 0 read, 1 write, 2 mixed */

static inline void touch(uint64_t page, uint64_t stamp)
{
    volatile uint64_t *word = &memory[page * PAGE_WORDS];
    if (mode == 1 || (mode == 2 && !(page & 1)))
        *word = stamp;
    else
        sink += *word;
}

/* `count` touches of the pages [first, first + size), continuing from *cursor. */
static void sweep(uint64_t first, uint64_t size, uint64_t *cursor, uint64_t count, uint64_t stamp)
{
    uint64_t at = *cursor;
    for (uint64_t done = 0; done < count; done++) {
        touch(first + at, stamp);
        if (++at == size)
            at = 0;
    }
    *cursor = at;
}

static unsigned parse_schedule(const char *text, struct phase *phases)
{
    unsigned count = 0;
    while (*text) {
        const char *end;
        if (count == MAX_PHASES || !parse_u64(text, &end, &phases[count].mib) || *end != ':')
            return 0;
        if (!parse_u64(end + 1, &end, &phases[count].seconds) || (*end && *end != ','))
            return 0;
        count++;
        text = *end ? end + 1 : end;
    }
    return count;
}

int main(void)
{
    char schedule_text[512], mode_text[8], pattern[10], page[4];
    bool scheduled = arg_str("schedule", schedule_text, sizeof schedule_text, "");
    arg_str("mode", mode_text, sizeof mode_text, "read");
    arg_str("pattern", pattern, sizeof pattern, "uniform");
    arg_str("page", page, sizeof page, "2m");
    uint64_t mib = arg_u64("mib", 64), seconds = arg_u64("seconds", scheduled ? 0 : 10);
    uint64_t hot_pct = arg_u64("hot_pct", 20), period_ms = arg_u64("period_ms", 100);
    uint64_t cold_period_ms = arg_u64("cold_period_ms", 1000);
    mode = !strcmp(mode_text, "read") ? 0 : !strcmp(mode_text, "write") ? 1 : !strcmp(mode_text, "mixed") ? 2 : -1;
    bool hotcold = !strcmp(pattern, "hotcold");
    struct phase phases[MAX_PHASES];
    unsigned count = scheduled ? parse_schedule(schedule_text, phases) : 1;
    if (!scheduled)
        phases[0] = (struct phase){mib, seconds};
    if (mode < 0 || (!hotcold && strcmp(pattern, "uniform")) || !count || hot_pct > 100 || !period_ms ||
        cold_period_ms < period_ms) {
        report(false, "bad arguments: mode=%s pattern=%s schedule=%s hot_pct=%lu period_ms=%lu cold_period_ms=%lu",
               mode_text, pattern, schedule_text, hot_pct, period_ms, cold_period_ms);
        return 1;
    }
    uint64_t total_mib = scheduled ? 0 : mib, schedule_seconds = 0;
    for (unsigned index = 0; index < count; index++) {
        if (phases[index].mib > total_mib)
            total_mib = phases[index].mib;
        schedule_seconds += phases[index].seconds;
    }
    if (scheduled && !seconds)
        seconds = schedule_seconds;
    if (!total_mib || (scheduled && !schedule_seconds)) {
        report(false, "nothing to do: %lu MiB, %lu s in the schedule", total_mib, schedule_seconds);
        return 1;
    }

    uint64_t khz = tsc_khz(), pages = total_mib * 256;
    long base = sys_mmap(total_mib << 20, strcmp(page, "4k") ? MAP_HUGE : 0);
    if (is_error(base)) {
        report(false, "cannot map %lu MiB (error %ld)", total_mib, base);
        return 1;
    }
    memory = (volatile uint64_t *)base;
    uint64_t start = rdtsc();
    for (uint64_t index = 0; index < pages; index++) /* every page is the process's own from now on */
        memory[index * PAGE_WORDS] = index;
    uint64_t t0 = rdtsc();
    printf("wset %u: %lu MiB at %#lx (%s pages) written in %lu ms; mode %s, pattern %s, period %lu ms\n", env.pid,
           total_mib, (uint64_t)base, strcmp(page, "4k") ? "2 MiB" : "4 KiB", (t0 - start) / khz, mode_text, pattern,
           period_ms);
    if (hotcold)
        printf("wset %u: hot %lu %% of the set every period, the rest once every %lu ms\n", env.pid, hot_pct,
               cold_period_ms);

    uint64_t second = khz * 1000, end = seconds ? t0 + seconds * second : ~0ull, next_print = t0 + second;
    uint64_t total_ops = 0, late = 0, phases_run = 0, longest_sweep = 0;
    for (unsigned index = 0;; index = (index + 1) % count) {
        uint64_t phase_start = rdtsc();
        if (phase_start >= end)
            break;
        uint64_t phase_end = phases[index].seconds && scheduled ? phase_start + phases[index].seconds * second : end;
        if (phase_end > end)
            phase_end = end;
        uint64_t ws = phases[index].mib * 256, hot = hotcold ? ws * hot_pct / 100 : ws;
        if (ws && !hot)
            hot = 1;
        uint64_t cold = ws - hot, hot_cursor = 0, cold_cursor = 0, cold_done = 0;
        uint64_t second_hot = 0, second_cold = 0, sweep_start = phase_start, swept = 0, sweeps = 0;
        printf("wset %u: phase %lu: ws_mib=%lu from t=%lu\n", env.pid, phases_run, phases[index].mib,
               (phase_start - t0) / khz);
        for (;;) {
            uint64_t now = rdtsc();
            /* The cold part: what is due by now, at cold pages per cold period (before a line is printed, so that
               a stretch the vCPU did not run is caught up within the second it belongs to). */
            if (cold) {
                uint64_t until = now < phase_end ? now : phase_end;
                uint64_t due = (uint64_t)((unsigned __int128)(until - phase_start) * cold / (cold_period_ms * khz));
                if (due > cold_done) {
                    sweep(hot, cold, &cold_cursor, due - cold_done, now);
                    second_cold += due - cold_done;
                    cold_done = due;
                }
            }
            if (now >= next_print) {
                uint64_t touched = (second_hot < hot ? second_hot : hot) + (second_cold < cold ? second_cold : cold);
                printf("wset %u: t=%lu phase=%lu ws_mib=%lu touched=%lu ops=%lu\n", env.pid, (now - t0) / khz,
                       phases_run, phases[index].mib, touched, second_hot + second_cold);
                next_print += second;
                if (next_print <= now)
                    next_print = now + second; /* the vCPU did not run for a while: no catching up */
                second_hot = second_cold = 0;
                now = rdtsc();
            }
            if (now >= phase_end)
                break;
            if (!ws) {
                __asm__ volatile("pause");
                continue;
            }
            /* The hot part (all of it with uniform): the next block of a continuous sweep. */
            uint64_t step = hot - swept < BLOCK ? hot - swept : BLOCK;
            sweep(0, hot, &hot_cursor, step, now);
            swept += step;
            second_hot += step;
            if (swept == hot) {
                uint64_t finished = rdtsc(), took = finished - sweep_start;
                if (took > longest_sweep)
                    longest_sweep = took;
                if (took > period_ms * khz && sweeps) /* not the first: pages new to the set may be cold on the host */
                    late++;
                sweeps++;
                sweep_start = finished;
                swept = 0;
            }
            total_ops += step;
        }
        total_ops += cold_done;
        phases_run++;
    }
    uint64_t elapsed_ms = (rdtsc() - t0) / khz;
    if (late)
        printf("wset %u: %lu sweeps of the hot set took longer than period_ms=%lu (longest %lu ms)\n", env.pid, late,
               period_ms, longest_sweep / khz);
    report(true, "%lu phases in %lu ms, %lu touches (%lu per second), longest sweep %lu us", phases_run, elapsed_ms,
           total_ops, elapsed_ms ? total_ops * 1000 / elapsed_ms : 0, longest_sweep * 1000 / khz);
    (void)sink;
    return (int)failures();
}
