/* The boot-info block the VMM passes in RDI (boot protocol v2; mirrors arch/x86_64/boot_info.py). */
#ifndef PYROVISOR_BOOT_INFO_H
#define PYROVISOR_BOOT_INFO_H

#include <stdint.h>

#define PYROVISOR_BOOT_MAGIC 0x56525950u /* "PYRV" */
#define PYROVISOR_BOOT_VERSION 2u
#define PYROVISOR_MAX_RAM_RANGES 8
#define PYROVISOR_MAX_VIRTIO 16

struct pyrovisor_ram_range {
    uint64_t gpa;
    uint64_t size;
};

/* A virtio-mmio device (version 2 register layout) at [base, base + size), interrupt on IOAPIC pin irq. */
struct pyrovisor_virtio_mmio {
    uint64_t base;
    uint32_t size;
    uint32_t irq;
};

struct pyrovisor_boot_info {
    uint32_t magic;
    uint32_t version;
    uint32_t size;
    uint32_t nr_vcpus;
    uint64_t cmdline_gpa;
    uint32_t cmdline_len;
    uint32_t nr_ram_ranges;
    uint64_t initrd_gpa;
    uint64_t initrd_size;
    uint64_t kernel_start;
    uint64_t kernel_end;
    uint64_t page_tables_gpa;
    uint64_t page_tables_size;
    uint64_t gdt_gpa;
    uint64_t tss_gpa;
    uint32_t tss_stride;
    uint32_t gdt_limit;
    uint64_t tsc_khz;
    uint64_t direct_map_base;
    uint64_t kernel_map_base;
    uint16_t console_port;
    uint16_t debug_exit_port;
    uint8_t console_irq;
    uint8_t reserved[3];
    struct pyrovisor_ram_range ram[PYROVISOR_MAX_RAM_RANGES];
    /* version >= 2: the virtio-mmio devices (also on the command line as virtio_mmio.device=...) */
    uint32_t nr_virtio;
    uint32_t reserved2;
    struct pyrovisor_virtio_mmio virtio[PYROVISOR_MAX_VIRTIO];
};

#endif
