/* Output on the 16550 serial console. */
#ifndef PYROVISOR_CONSOLE_H
#define PYROVISOR_CONSOLE_H

#include <stddef.h>
#include <stdint.h>

#define CONSOLE_PORT 0x3F8

void console_write(const char *text, size_t length);
/* Back to 8N1, no loopback, no interrupts: whatever state the UART was left in, output works again. */
void console_reset(void);
void console_putc(char c);

#endif
