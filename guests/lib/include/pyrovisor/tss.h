/* A per-vCPU task-state segment with an I/O permission bitmap for ports 0..TSS_IOMAP_PORTS-1. */
#ifndef PYROVISOR_TSS_H
#define PYROVISOR_TSS_H

#include <stdint.h>

#include <pyrovisor/boot_info.h>

#define TSS_IOMAP_PORTS 0x1000
#define TSS_MAX_CPUS 32

/* Installs this vCPU's TSS (all ports denied at CPL3) with `rsp0` as the stack for entries from
   user mode, and loads TR. Under kvm_pvm the bitmap is what governs CPL3 port access (IOPL is ignored). */
void tss_init(const struct pyrovisor_boot_info *boot, unsigned cpu, uint64_t rsp0);
void tss_allow_ports(unsigned cpu, uint16_t first, uint16_t count);
void tss_deny_ports(unsigned cpu, uint16_t first, uint16_t count);
void tss_set_rsp0(unsigned cpu, uint64_t rsp0);

#endif
