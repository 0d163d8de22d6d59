/* echo: reads a line from the serial console and prints it back; proves keyboard input reaches the guest. */
#include <pyrovisor/boot_info.h>
#include <pyrovisor/io.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/report.h>

#define LSR_DATA_READY 0x01
#define LINE_MAX 80

static char read_char(uint16_t port)
{
    while (!(inb(port + 5) & LSR_DATA_READY))
        ;
    return (char)inb(port);
}

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu);

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu)
{
    (void)cpu;
    char line[LINE_MAX + 1];
    int length = 0;
    printf("type a line:\n");
    for (;;) {
        char c = read_char(boot->console_port);
        if (c == '\r' || c == '\n' || length == LINE_MAX)
            break;
        line[length++] = c;
    }
    line[length] = '\0';
    printf("echo: %s\n", line);
    report(length > 0, "read %d characters from the console", length);
    return report_summary();
}
