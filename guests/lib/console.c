/* Polled 16550 output: wait for THR empty, then send up to a FIFO's worth of bytes. */
#include <pyrovisor/console.h>
#include <pyrovisor/io.h>

#define LSR_OFFSET 5
#define LSR_THR_EMPTY 0x20
#define TX_FIFO_BYTES 16

void console_write(const char *text, size_t length)
{
    while (length) {
        while (!(inb(CONSOLE_PORT + LSR_OFFSET) & LSR_THR_EMPTY))
            ;
        size_t burst = length < TX_FIFO_BYTES ? length : TX_FIFO_BYTES;
        for (size_t i = 0; i < burst; i++)
            outb(CONSOLE_PORT, (uint8_t)text[i]);
        text += burst;
        length -= burst;
    }
}

void console_putc(char c) { console_write(&c, 1); }

void console_reset(void)
{
    outb(CONSOLE_PORT + 3, 0x03); /* LCR: 8N1, divisor latch off */
    outb(CONSOLE_PORT + 1, 0x00); /* IER: no interrupts */
    outb(CONSOLE_PORT + 4, 0x0B); /* MCR: DTR, RTS, OUT2; loopback off */
}
