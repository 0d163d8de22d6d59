/* exits: N device-register writes from user mode, timed, for exit and I/O-mechanism benchmarks.
   Arguments: mode=pio|mmio|doorbell|ram count=N port=P (pio) addr=A (mmio, doorbell: outside RAM) size=1|2|4|8
   value=seq|tsc (mmio) mailbox=M cached=0|1 (doorbell, ram) sync=S rounds=R; docs/guest-os.md section 5.1 and
   benchmarks/io_exits.py. */
#include <ulib.h>

const char program_name[] = "exits";

/* The page of the VMM's sync device (sync=S, MMIO, trapped): a read of SYNC_HOST_TSC returns the host's
   TSC, which the guest brackets with its own (SYNC_T1, SYNC_T2) so the host can bound the TSC offset; the
   marks bracket the writes, so the host can take its exit counters exactly around them. */
#define SYNC_HOST_TSC 0x00
#define SYNC_T1 0x08
#define SYNC_T2 0x10
#define SYNC_START 0x18 /* written just before the first write: the guest's TSC */
#define SYNC_END 0x20   /* written just after the last write: the guest's TSC */
#define SYNC_COUNT 0x28 /* written after SYNC_END: how many writes the guest made */

/* The mailbox (mailbox=M, a page of RAM outside the kernel's RAM, mapped write-back): write i (from 1)
   stores its TSC, then i. In mode ram these two stores are the write; in mode doorbell they come before the
   doorbell store, so the device knows when the writes it is told about were made. */
#define MAILBOX_SEQ 0
#define MAILBOX_TSC 1

static inline uint64_t fenced_rdtsc(void)
{
    uint32_t low, high;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(low), "=d"(high) : : "memory");
    return ((uint64_t)high << 32) | low;
}

static inline void store64(uint64_t address, uint64_t value) { *(volatile uint64_t *)address = value; }

static long map(uint64_t phys, unsigned flags)
{
    long mapped = syscall5(SYS_MAPIO, (long)phys, 4096, flags, 0, 0);
    if (is_error(mapped))
        report(false, "cannot map %#lx (error %ld)", phys, mapped);
    return mapped;
}

/* `rounds` round trips to the host's TSC register (each one exits twice more to report the bracket). */
static void sync_rounds(uint64_t sync, uint64_t rounds)
{
    for (uint64_t round = 0; round < rounds; round++) {
        uint64_t before = fenced_rdtsc();
        (void)*(volatile uint64_t *)(sync + SYNC_HOST_TSC);
        uint64_t after = fenced_rdtsc();
        store64(sync + SYNC_T1, before);
        store64(sync + SYNC_T2, after);
    }
}

static void write_register(uint64_t address, uint64_t size, uint64_t value)
{
    if (size == 1)
        *(volatile uint8_t *)address = (uint8_t)value;
    else if (size == 2)
        *(volatile uint16_t *)address = (uint16_t)value;
    else if (size == 4)
        *(volatile uint32_t *)address = (uint32_t)value;
    else
        *(volatile uint64_t *)address = value;
}

int main(void)
{
    char mode[10], value[8];
    arg_str("mode", mode, sizeof mode, "pio");
    arg_str("value", value, sizeof value, "seq");
    uint64_t count = arg_u64("count", 1000), port = arg_u64("port", 0x510), address = arg_u64("addr", 0xD0000000);
    uint64_t size = arg_u64("size", 1), mailbox_phys = arg_u64("mailbox", 0), sync_phys = arg_u64("sync", 0);
    uint64_t rounds = arg_u64("rounds", 8), cached = arg_u64("cached", 1);
    bool pio = !strcmp(mode, "pio"), mmio = !strcmp(mode, "mmio"), doorbell = !strcmp(mode, "doorbell");
    bool ram = !strcmp(mode, "ram"), tsc_values = !strcmp(value, "tsc");
    bool size_ok = size == 1 || size == 2 || size == 4 || (size == 8 && mmio);
    if (!(pio || mmio || doorbell || ram) || !size_ok || !count || (strcmp(value, "seq") && !tsc_values) ||
        ((doorbell || ram) && !mailbox_phys)) {
        report(false, "bad arguments: mode=%s size=%lu count=%lu value=%s mailbox=%#lx", mode, size, count, value,
               mailbox_phys);
        return 1;
    }
    if (ram)
        size = 8;
    long target = 0, mailbox = 0, sync = 0;
    if (pio) {
        long error = sys_ioperm((unsigned)port, (unsigned)size);
        if (error) {
            report(false, "port %#lx refused (error %ld)", port, error);
            return 1;
        }
    } else if (!ram && is_error(target = map(address, 0))) {
        return 1;
    }
    if (mailbox_phys && is_error(mailbox = map(mailbox_phys, cached ? MAPIO_CACHED : 0)))
        return 1;
    if (sync_phys && is_error(sync = map(sync_phys, 0)))
        return 1;
    volatile uint64_t *box = (volatile uint64_t *)mailbox;
    if (sync) {
        sync_rounds((uint64_t)sync, rounds);
        store64((uint64_t)sync + SYNC_START, rdtsc());
    }
    uint64_t begin = rdtsc();
    if (pio) {
        uint16_t where = (uint16_t)port;
        for (uint64_t i = 0; i < count; i++) {
            if (size == 1)
                __asm__ volatile("outb %b0, %w1" : : "a"(i), "Nd"(where));
            else if (size == 2)
                __asm__ volatile("outw %w0, %w1" : : "a"(i), "Nd"(where));
            else
                __asm__ volatile("outl %k0, %w1" : : "a"(i), "Nd"(where));
        }
    } else if (mmio) {
        for (uint64_t i = 0; i < count; i++)
            write_register((uint64_t)target, size, tsc_values ? rdtsc() : i);
    } else if (doorbell) {
        for (uint64_t i = 0; i < count; i++) {
            box[MAILBOX_TSC] = rdtsc();
            box[MAILBOX_SEQ] = i + 1;
            *(volatile uint32_t *)target = (uint32_t)i;
        }
    } else {
        for (uint64_t i = 0; i < count; i++) {
            box[MAILBOX_TSC] = rdtsc();
            box[MAILBOX_SEQ] = i + 1;
        }
    }
    uint64_t end = rdtsc(), cycles = end - begin;
    if (sync) {
        store64((uint64_t)sync + SYNC_END, end);
        store64((uint64_t)sync + SYNC_COUNT, count);
        sync_rounds((uint64_t)sync, rounds);
    }
    uint64_t ns = env.tsc_khz ? cycles_to_ns(cycles) : 0;
    uint64_t per_write_ns = ns / count;
    printf("exits %u: %lu %s writes of %lu bytes to %#lx: %lu.%02lu us each\n", env.pid, count, mode, size,
           pio ? port : ram ? mailbox_phys : address, per_write_ns / 1000, per_write_ns % 1000 / 10);
    if (sync)
        printf("exits %u: %lu cycles from the first write to the last (TSC %lu kHz)\n", env.pid, cycles, env.tsc_khz);
    report(true, "%lu %s writes done", count, mode);
    return (int)failures();
}
