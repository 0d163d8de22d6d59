/* chaos: a hostile guest. From user mode, writes and reads random values of random sizes at random ports
   (0..0xfff, the UART often, never the exit port) and random addresses of the MMIO hole, then resets the
   UART and reports. The VMM must survive all of it. Command line: operations=N seed=S. */
#include <pyrovisor/boot_info.h>
#include <pyrovisor/cmdline.h>
#include <pyrovisor/console.h>
#include <pyrovisor/idt.h>
#include <pyrovisor/io.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/report.h>
#include <pyrovisor/tss.h>
#include <pyrovisor/usermode.h>

#define MMIO_WINDOW 0xD0000000ull /* unbacked, inside the 3-4 GiB hole */
#define MMIO_WINDOW_SIZE 0x200000ull
#define DEBUG_EXIT_PORT 0xF4

extern char __image_start[], __image_end[];
static uint8_t user_stack[8192] __attribute__((aligned(16)));
static uint64_t operations, state;
static volatile uint64_t reads_checksum;

static uint64_t next_random(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

/* Ports of KVM's in-kernel PIC: garbage there remaps device interrupts onto exception vectors, which only
   hurts this guest (it then dies of "exceptions"); the point here is the VMM's own devices. */
static int is_pic_port(uint16_t port) { return (port & ~1) == 0x20 || (port & ~1) == 0xA0 || (port & ~1) == 0x4D0; }

/* A port for an access of `size` bytes whose every byte is a port this guest may use. */
static uint16_t random_port(uint64_t r, unsigned size)
{
    uint16_t port = (r & 3) == 0 ? (uint16_t)(CONSOLE_PORT + ((r >> 2) & 7)) /* the UART, a quarter of the time */
                                 : (uint16_t)((r >> 8) & 0xFFF);
    port &= (uint16_t)~(size - 1);
    for (unsigned byte = 0; byte < size; byte++) {
        uint16_t p = (uint16_t)(port + byte);
        if ((p >= DEBUG_EXIT_PORT && p < DEBUG_EXIT_PORT + 4) || is_pic_port(p) || p >= TSS_IOMAP_PORTS)
            return 0x80;
    }
    return port;
}

static void user_chaos(void)
{
    uint64_t checksum = 0;
    for (uint64_t i = 0; i < operations; i++) {
        uint64_t r = next_random(), value = next_random();
        volatile uint8_t *mmio = (volatile uint8_t *)(MMIO_WINDOW + ((r >> 20) % (MMIO_WINDOW_SIZE - 8)));
        switch ((r >> 16) % 9) {
        case 0: outb(random_port(r, 1), (uint8_t)value); break;
        case 1: __asm__ volatile("outw %0, %1" : : "a"((uint16_t)value), "Nd"(random_port(r, 2))); break;
        case 2: outl(random_port(r, 4), (uint32_t)value); break;
        case 3: checksum += inb(random_port(r, 1)); break;
        case 4: checksum += inl(random_port(r, 4)); break;
        case 5: *mmio = (uint8_t)value; break;
        case 6: *(volatile uint32_t *)mmio = (uint32_t)value; break;
        case 7: *(volatile uint64_t *)mmio = value; break;
        default: checksum += *(volatile uint32_t *)mmio; break;
        }
    }
    reads_checksum = checksum;
    user_syscall(SYS_EXIT, 0, 0, 0);
}

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu);

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu)
{
    operations = cmdline_u64(boot, "operations", 20000);
    state = cmdline_u64(boot, "seed", 0x9E3779B97F4A7C15ull) | 1;
    idt_init();
    usermode_init(boot, cpu);
    tss_allow_ports(cpu, 0, DEBUG_EXIT_PORT);                       /* every port below the exit port */
    tss_allow_ports(cpu, DEBUG_EXIT_PORT + 4, TSS_IOMAP_PORTS - DEBUG_EXIT_PORT - 4); /* and above it */
    user_mode_accessible(__image_start, __image_end);
    user_mode_accessible((void *)MMIO_WINDOW, (void *)(MMIO_WINDOW + MMIO_WINDOW_SIZE));
    long result = run_user(user_chaos, user_stack + sizeof user_stack);
    console_reset();
    printf("\n");
    report(result == 0, "%lu random device accesses from user mode (reads summed to %#lx)", operations,
           reads_checksum);
    return report_summary();
}
