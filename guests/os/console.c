/* Kernel console output: whole strings with REP OUTSB, 16 bytes (one 16550 FIFO) per burst, so a line
   costs a few exits instead of one per character; and the way the kernel stops the VM. */
#include <stdarg.h>

#include <pyrovisor/console.h>
#include <pyrovisor/io.h>
#include <pyrovisor/printf.h>

#include "kernel.h"

#define LSR_OFFSET 5
#define LSR_THR_EMPTY 0x20
#define FIFO_BYTES 16
#define DEBUG_EXIT_PORT 0xF4

void kputs(const char *text, size_t length)
{
    while (length) {
        while (!(inb(CONSOLE_PORT + LSR_OFFSET) & LSR_THR_EMPTY))
            cpu_relax();
        size_t burst = length < FIFO_BYTES ? length : FIFO_BYTES;
        const char *cursor = text;
        size_t count = burst;
        __asm__ volatile("rep outsb" : "+S"(cursor), "+c"(count) : "d"((uint16_t)CONSOLE_PORT) : "memory");
        text += burst;
        length -= burst;
    }
}

int kprintf(const char *format, ...)
{
    char line[256];
    va_list args;
    va_start(args, format);
    int length = vsnprintf(line, sizeof line, format, args);
    va_end(args);
    kputs(line, (size_t)length < sizeof line ? (size_t)length : sizeof line - 1);
    return length;
}

void kernel_stop(int code)
{
    outb(DEBUG_EXIT_PORT, (uint8_t)code);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* Lines built piece by piece: a few instructions a character, where vsnprintf takes about fifteen. */
void kline_mem(struct kline *line, const char *text, size_t length)
{
    size_t room = sizeof line->text - 1 - line->length;
    if (length > room)
        length = room;
    for (size_t i = 0; i < length; i++)
        line->text[line->length + i] = text[i];
    line->length += length;
}

void kline_str(struct kline *line, const char *text)
{
    while (*text && line->length < sizeof line->text - 1)
        line->text[line->length++] = *text++;
}

void kline_dec(struct kline *line, uint64_t value)
{
    char digits[20];
    size_t count = 0;
    do {
        digits[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (count && line->length < sizeof line->text - 1)
        line->text[line->length++] = digits[--count];
}

void kline_end(struct kline *line)
{
    line->text[line->length++] = '\n';
    kputs(line->text, line->length);
    line->length = 0;
}
