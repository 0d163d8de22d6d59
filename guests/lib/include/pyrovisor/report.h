/* kvm-unit-tests style reporting: PASS:/FAIL: lines, a summary, and an exit code for the host. */
#ifndef PYROVISOR_REPORT_H
#define PYROVISOR_REPORT_H

#include <stdbool.h>

#define EXIT_SUCCESS_CODE 0
#define EXIT_FAILURES_CODE 1
#define EXIT_EXCEPTION_CODE 2
#define EXIT_PANIC_CODE 3

void report(bool condition, const char *format, ...) __attribute__((format(printf, 2, 3)));
void report_info(const char *format, ...) __attribute__((format(printf, 1, 2)));
/* Prints "SUMMARY: N tests, M failures" and returns the exit code the run deserves. */
int report_summary(void);

/* Stop the VM through the debug-exit port with this exit code. */
void __attribute__((noreturn)) guest_exit(int code);
void __attribute__((noreturn, format(printf, 1, 2))) panic(const char *format, ...);

#endif
