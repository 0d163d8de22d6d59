/* Per-vCPU TSS with an I/O permission bitmap, installed in the GDT slot the VMM reserved for the vCPU. */
#include <pyrovisor/cpu.h>
#include <pyrovisor/tss.h>

#include <stddef.h>

struct __attribute__((packed)) tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
};

struct __attribute__((packed, aligned(16))) tss_with_bitmap {
    struct tss64 tss;
    uint8_t iomap[TSS_IOMAP_PORTS / 8];
    uint8_t iomap_end; /* the CPU may read one byte past the bitmap: it must be all ones */
};

static struct tss_with_bitmap tss_table[TSS_MAX_CPUS];

void tss_init(const struct pyrovisor_boot_info *boot, unsigned cpu, uint64_t rsp0)
{
    struct tss_with_bitmap *entry = &tss_table[cpu];
    uint64_t *bitmap = (uint64_t *)entry->iomap;
    for (size_t i = 0; i < sizeof entry->iomap / sizeof *bitmap; i++)
        bitmap[i] = ~0ull;
    entry->iomap_end = 0xFF;
    entry->tss.iomap_base = offsetof(struct tss_with_bitmap, iomap);
    entry->tss.rsp[0] = rsp0;

    uint64_t base = (uint64_t)entry;
    uint64_t limit = sizeof *entry - 1;
    uint16_t selector = (uint16_t)(FIRST_TSS_SELECTOR + 16 * cpu);
    uint64_t *descriptor = (uint64_t *)(boot->gdt_gpa + selector);
    descriptor[0] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ull << 40) | (((limit >> 16) & 0xF) << 48) |
                    (((base >> 24) & 0xFF) << 56);
    descriptor[1] = base >> 32;
    load_tr(selector);
}

void tss_allow_ports(unsigned cpu, uint16_t first, uint16_t count)
{
    for (unsigned port = first; port < (unsigned)first + count && port < TSS_IOMAP_PORTS; port++)
        tss_table[cpu].iomap[port / 8] &= (uint8_t)~(1u << (port % 8));
}

void tss_deny_ports(unsigned cpu, uint16_t first, uint16_t count)
{
    for (unsigned port = first; port < (unsigned)first + count && port < TSS_IOMAP_PORTS; port++)
        tss_table[cpu].iomap[port / 8] |= (uint8_t)(1u << (port % 8));
}

void tss_set_rsp0(unsigned cpu, uint64_t rsp0) { tss_table[cpu].tss.rsp[0] = rsp0; }
