/* PASS:/FAIL: reporting and the exit path through the debug-exit port. */
#include <pyrovisor/console.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/io.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/report.h>

#define DEBUG_EXIT_PORT 0xF4

static unsigned tests_run, tests_failed;

static void vreport(const char *prefix, const char *format, va_list args)
{
    char line[200];
    vsnprintf(line, sizeof line, format, args);
    printf("%s: %s\n", prefix, line);
}

void report(bool condition, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    tests_run++;
    if (!condition)
        tests_failed++;
    vreport(condition ? "PASS" : "FAIL", format, args);
    va_end(args);
}

void report_info(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vreport("INFO", format, args);
    va_end(args);
}

int report_summary(void)
{
    printf("SUMMARY: %u tests, %u failures\n", tests_run, tests_failed);
    return tests_failed ? EXIT_FAILURES_CODE : EXIT_SUCCESS_CODE;
}

void guest_exit(int code)
{
    outb(DEBUG_EXIT_PORT, (uint8_t)code);
    halt_forever();
}

void panic(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vreport("PANIC", format, args);
    va_end(args);
    guest_exit(EXIT_PANIC_CODE);
}
