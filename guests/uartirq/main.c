/* uartirq: reads a line from the console by interrupt — IRQ 4 through KVM's in-kernel PIC to vector 0x24 —
   sleeping in HLT in between, and prints it back with the number of interrupts it took. */
#include <pyrovisor/boot_info.h>
#include <pyrovisor/console.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/idt.h>
#include <pyrovisor/io.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/report.h>

#define UART_VECTOR 0x24 /* IRQ 4 with the PIC at vector base 0x20, as pyrovisor leaves it */
#define PIC_MASTER_DATA 0x21
#define PIC_MASTER_COMMAND 0x20
#define PIC_EOI 0x20
#define IER_RX_DATA 0x01
#define MCR_OUT2 0x08
#define LSR_DATA_READY 0x01
#define LINE_MAX 80

extern void uart_interrupt_entry(void);
void uart_interrupt(void);

static char line[LINE_MAX + 1];
static volatile int length, interrupts, complete;

void uart_interrupt(void)
{
    interrupts++;
    while (inb(CONSOLE_PORT + 5) & LSR_DATA_READY) {
        char c = (char)inb(CONSOLE_PORT);
        if (c == '\n' || c == '\r' || length == LINE_MAX)
            complete = 1;
        else if (!complete)
            line[length++] = c;
    }
    outb(PIC_MASTER_COMMAND, PIC_EOI);
}

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu);

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu)
{
    (void)boot;
    (void)cpu;
    idt_init();
    idt_set_gate(UART_VECTOR, uart_interrupt_entry, 0);
    outb(PIC_MASTER_DATA, (uint8_t)~(1u << 4)); /* unmask IRQ 4 only */
    outb(CONSOLE_PORT + 4, MCR_OUT2);            /* OUT2 gates the UART's interrupt line on a PC */
    outb(CONSOLE_PORT + 1, IER_RX_DATA);
    printf("type a line:\n");
    while (!complete)
        __asm__ volatile("sti; hlt; cli"); /* sleep until an interrupt arrives */
    outb(CONSOLE_PORT + 1, 0);
    line[length] = '\0';
    printf("irq echo: %s\n", line);
    report(interrupts > 0 && length > 0, "%d characters arrived in %d UART interrupt(s)", length, interrupts);
    return report_summary();
}
