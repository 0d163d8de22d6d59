/* The user-program library: start-up, console output through SYS_WRITE, arguments, time, reporting. */
#include <stdarg.h>

#include <pyrovisor/cmdline.h>

#include <ulib.h>

struct program_env env;
static unsigned failed;

void ulib_start(const char *args, size_t length, uint64_t tsc_khz, uint64_t pid, uint64_t nr_cpus);
void thread_trampoline(void);

/* printf's default sink (lib/printf.c): one system call per formatted piece, so lines stay whole. */
void console_write(const char *text, size_t length);
void console_write(const char *text, size_t length) { sys_write(text, length); }

void sys_exit(long code)
{
    syscall1(SYS_EXIT, code);
    for (;;)
        ;
}

void ulib_start(const char *args, size_t length, uint64_t tsc_khz, uint64_t pid, uint64_t nr_cpus)
{
    env.args = args;
    env.args_length = length;
    env.tsc_khz = tsc_khz;
    env.pid = (uint32_t)pid;
    env.nr_cpus = (uint32_t)nr_cpus;
    sys_exit(main());
}

long thread_create(long (*fn)(uint64_t), uint64_t arg, uint64_t stack_size, long cpu)
{
    long stack = sys_mmap(stack_size, 0);
    if (stack < 0)
        return stack;
    return syscall5(SYS_THREAD, (long)thread_trampoline, stack + (long)stack_size, (long)fn, (long)arg, cpu);
}

static bool is_space(char c) { return c == ' ' || c == '\t'; }

/* The value text of `key=` among the argument words, and its length. */
static const char *find_value(const char *key, size_t *value_length)
{
    size_t key_length = strlen(key);
    const char *text = env.args, *end = env.args + env.args_length;
    while (text < end) {
        while (text < end && is_space(*text))
            text++;
        const char *word = text;
        while (text < end && !is_space(*text))
            text++;
        if ((size_t)(text - word) > key_length && !strncmp(word, key, key_length) && word[key_length] == '=') {
            *value_length = (size_t)(text - word) - key_length - 1;
            return word + key_length + 1;
        }
    }
    return 0;
}

uint64_t arg_u64(const char *key, uint64_t fallback)
{
    size_t length;
    const char *value = find_value(key, &length);
    char number[24];
    if (!value || !length || length >= sizeof number)
        return fallback;
    memcpy(number, value, length);
    number[length] = '\0';
    const char *end;
    uint64_t result;
    if (!parse_u64(number, &end, &result) || *end) {
        printf("%s %u: ignoring %s=%s (not a number)\n", program_name, env.pid, key, number);
        return fallback;
    }
    return result;
}

bool arg_str(const char *key, char *buffer, size_t size, const char *fallback)
{
    size_t length;
    const char *value = find_value(key, &length);
    if (!value) {
        value = fallback;
        length = strlen(fallback);
    }
    if (length >= size)
        length = size - 1;
    memcpy(buffer, value, length);
    buffer[length] = '\0';
    return value != fallback;
}

uint64_t cycles_to_ns(uint64_t cycles)
{
    return (uint64_t)((unsigned __int128)cycles * 1000000u / (env.tsc_khz ? env.tsc_khz : 1));
}

/* When SYS_TIME changed to at least `target` (it counts whole ticks without a TSC frequency): the new value
   and TSC readings bracketing the change, from before the last call that still saw the old value to after
   the first that saw the new one. */
struct tick_edge {
    uint64_t time, low, high;
};

static struct tick_edge tick_edge(uint64_t target)
{
    uint64_t previous = rdtsc();
    for (;;) {
        uint64_t before = rdtsc(), time = (uint64_t)sys_time(), after = rdtsc();
        if (time >= target)
            return (struct tick_edge){time, previous, after};
        previous = before;
    }
}

uint64_t tsc_khz(void)
{
    if (env.tsc_khz)
        return env.tsc_khz;
    /* Time the TSC over 200 ms of timer ticks. A measurement whose edges are uncertain by more than 0.5 %
       of it (this process was preempted in the middle) is taken again, up to 4 times. */
    const uint64_t window_ns = 200000000;
    uint64_t best_khz = 0, best_width = ~0ull, best_cycles = 1;
    for (unsigned attempt = 0; attempt < 4; attempt++) {
        struct tick_edge first = tick_edge((uint64_t)sys_time() + 1);
        struct tick_edge last = tick_edge(first.time + window_ns);
        uint64_t cycles = (last.low + last.high) / 2 - (first.low + first.high) / 2;
        uint64_t width = (first.high - first.low) + (last.high - last.low);
        if ((unsigned __int128)width * best_cycles < (unsigned __int128)best_width * cycles) {
            best_width = width;
            best_cycles = cycles;
            best_khz = (uint64_t)((unsigned __int128)cycles * 1000000u / (last.time - first.time));
        }
        if (width * 200 < cycles)
            break;
    }
    env.tsc_khz = best_khz;
    printf("%s %u: TSC frequency unknown, measured against the kernel's timer: %lu kHz (+-%lu.%02lu %%)\n",
           program_name, env.pid, env.tsc_khz, best_width * 50 / best_cycles, best_width * 5000 / best_cycles % 100);
    return env.tsc_khz;
}

uint64_t now_ns(void)
{
    if (env.tsc_khz)
        return cycles_to_ns(rdtsc());
    return (uint64_t)sys_time();
}

void report(bool condition, const char *format, ...)
{
    char line[200];
    va_list args;
    va_start(args, format);
    vsnprintf(line, sizeof line, format, args);
    va_end(args);
    if (!condition)
        failed++;
    printf("%s: %s %u: %s\n", condition ? "PASS" : "FAIL", program_name, env.pid, line);
}

unsigned failures(void) { return failed; }
