/* falseshare: two threads on two vCPUs increment their own counters, first on the same cache line, then
   on separate lines, with plain and with locked increments, and report the rates.
   Arguments: iterations=N (per thread and phase). */
#include <ulib.h>

const char program_name[] = "falseshare";

#define LINE 64
#define PHASES 4

struct shared {
    volatile uint64_t same[2];                  /* both counters in one cache line */
    uint8_t pad0[2 * LINE - 16];
    volatile uint64_t apart0;                   /* two lines apart from apart1 (no adjacent-line effects) */
    uint8_t pad1[2 * LINE - 8];
    volatile uint64_t apart1;
    uint8_t pad2[2 * LINE - 8];
    volatile uint32_t arrived, generation;      /* the barrier, on its own line */
    uint8_t pad3[2 * LINE - 8];
    uint64_t begin[2][PHASES], end[2][PHASES];
    long cpu[2][PHASES];
    uint64_t iterations;
};

static struct shared *shared;

static void barrier(void)
{
    uint32_t generation = shared->generation;
    if (__atomic_add_fetch(&shared->arrived, 1, __ATOMIC_ACQ_REL) == 2) {
        shared->arrived = 0;
        __atomic_store_n(&shared->generation, generation + 1, __ATOMIC_RELEASE);
        return;
    }
    while (__atomic_load_n(&shared->generation, __ATOMIC_ACQUIRE) == generation)
        __asm__ volatile("pause");
}

static volatile uint64_t *counter_for(unsigned id, unsigned phase)
{
    if (phase % 2 == 0)
        return &shared->same[id];
    return id ? &shared->apart1 : &shared->apart0;
}

static long worker(uint64_t id)
{
    uint64_t n = shared->iterations;
    for (unsigned phase = 0; phase < PHASES; phase++) {
        volatile uint64_t *counter = counter_for((unsigned)id, phase);
        barrier();
        shared->cpu[id][phase] = sys_getcpu();
        barrier();
        shared->begin[id][phase] = rdtsc();
        if (phase < 2) {
            for (uint64_t i = 0; i < n; i++) /* one read-modify-write instruction, not atomic */
                __asm__ volatile("incq %0" : "+m"(*counter));
        } else {
            for (uint64_t i = 0; i < n; i++)
                __atomic_fetch_add(counter, 1, __ATOMIC_SEQ_CST);
        }
        shared->end[id][phase] = rdtsc();
        barrier();
    }
    return 0;
}

static uint64_t max2(uint64_t a, uint64_t b) { return a > b ? a : b; }
static uint64_t min2(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* Million increments per second by both threads together, over the whole phase (first start to last
   end, on the shared TSC): two threads that did not really run at the same time count as half speed. */
static uint64_t rate(unsigned phase)
{
    uint64_t first = min2(shared->begin[0][phase], shared->begin[1][phase]);
    uint64_t last = max2(shared->end[0][phase], shared->end[1][phase]);
    uint64_t ns = cycles_to_ns(last - first);
    return ns ? 2 * shared->iterations * 1000 / ns : 0;
}

/* Percent of the phase during which both threads were incrementing. */
static uint64_t overlap(unsigned phase)
{
    uint64_t first = min2(shared->begin[0][phase], shared->begin[1][phase]);
    uint64_t last = max2(shared->end[0][phase], shared->end[1][phase]);
    uint64_t start = max2(shared->begin[0][phase], shared->begin[1][phase]);
    uint64_t stop = min2(shared->end[0][phase], shared->end[1][phase]);
    return stop > start && last > first ? (stop - start) * 100 / (last - first) : 0;
}

int main(void)
{
    long address = sys_mmap(sizeof(struct shared), 0);
    if (address < 0 || !env.tsc_khz) {
        report(false, "needs memory (%ld) and the TSC frequency", address);
        return 1;
    }
    shared = (struct shared *)address;
    shared->iterations = arg_u64("iterations", 20000000);
    bool parallel = env.nr_cpus > 1;
    if (parallel)
        sys_setcpu(0);
    long tid = thread_create(worker, 1, 65536, parallel ? 1 : -1);
    if (tid < 0) {
        report(false, "cannot start the second thread (error %ld)", tid);
        return 1;
    }
    worker(0);
    static const char *const names[2] = {"plain", "locked"};
    for (unsigned kind = 0; kind < 2; kind++) {
        uint64_t same = rate(2 * kind), apart = rate(2 * kind + 1);
        uint64_t ratio100 = same ? apart * 100 / same : 0;
        printf("falseshare %u: %s: same line %lu M/s, separate lines %lu M/s, ratio %lu.%02lu "
               "(threads overlapped %lu%% and %lu%%)\n",
               env.pid, names[kind], same, apart, ratio100 / 100, ratio100 % 100, overlap(2 * kind),
               overlap(2 * kind + 1));
    }
    uint64_t expected = 2 * shared->iterations; /* plain then locked on each counter */
    report(shared->same[0] == expected && shared->same[1] == expected && shared->apart0 == expected &&
               shared->apart1 == expected,
           "every counter reached %lu", expected);
    bool apart = true;
    for (unsigned phase = 0; phase < PHASES; phase++)
        apart &= shared->cpu[0][phase] != shared->cpu[1][phase];
    if (parallel)
        report(apart, "the threads ran on vCPUs %ld and %ld in every phase", shared->cpu[0][0], shared->cpu[1][0]);
    else
        printf("falseshare %u: one vCPU: the threads took turns, there is no sharing to measure\n", env.pid);
    return (int)failures();
}
