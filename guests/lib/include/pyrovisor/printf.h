/* Formatted output: %d %i %u %x %X %p %s %c %%, with l/ll/z sizes, width, the 0, - and # flags, and a
   precision for strings (%.5s, %.*s). */
#ifndef PYROVISOR_PRINTF_H
#define PYROVISOR_PRINTF_H

#include <stdarg.h>
#include <stddef.h>

int vsnprintf(char *buffer, size_t size, const char *format, va_list args);
int snprintf(char *buffer, size_t size, const char *format, ...) __attribute__((format(printf, 3, 4)));
int printf(const char *format, ...) __attribute__((format(printf, 1, 2)));

/* Where printf sends its text; the default writes to the serial console. User programs point it at
   their write system call. */
void printf_set_sink(void (*sink)(const char *text, size_t length));

#endif
