/* A small Multiboot kernel for the tests: it reports what a boot loader gave it (machine state, information
   structure, command line, modules), asks fw_cfg and the ACPI tables about the machine, starts the other CPUs
   with INIT/SIPI, and leaves through isa-debug-exit with the code its command line asks for ("exit=N").
   "compare" on the command line limits the report to what QEMU and pyrovisor must agree on. */
#include <stdint.h>

struct entry_state { uint32_t eax, ebx, cr0, eflags; uint16_t cs, ds, ss, es; uint32_t cr4; };
extern struct entry_state entry_state;
extern char _kernel_start[], _kernel_end[], ap_trampoline[], ap_trampoline_end[];

struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr, syms[4];
    uint32_t mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name;
};
struct mb_module { uint32_t start, end, string, reserved; };
struct mb_mmap { uint32_t size; uint64_t base, length; uint32_t type; } __attribute__((packed));

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint32_t bswap(uint32_t v) { return __builtin_bswap32(v); }
static inline uint32_t rd32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void wr32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

static void putc_(char c) { outb(0x3f8, (uint8_t)c); }
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void putn(const char *s, uint32_t n) { while (n-- && *s) putc_(*s++); }
static void hex(uint32_t v, int digits) { for (int i = digits - 1; i >= 0; i--) putc_("0123456789abcdef"[(v >> (4 * i)) & 15]); }
static void hex64(uint64_t v) {   /* without leading zeros */
    int digits = 1;
    while (digits < 16 && (v >> (4 * digits))) digits++;
    if (digits > 8) hex((uint32_t)(v >> 32), digits - 8);
    hex((uint32_t)v, digits > 8 ? 8 : digits);
}
static void dec(uint32_t v) { char b[11]; int n = 0; do { b[n++] = (char)('0' + v % 10); v /= 10; } while (v); while (n) putc_(b[--n]); }
static int starts(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }
static uint32_t length(const char *s) { uint32_t n = 0; while (s[n]) n++; return n; }
static uint16_t rd16(uintptr_t a) { __asm__("" : "+r"(a)); return *(volatile uint16_t *)a; }

static const char *word(const char *cmdline, const char *key) {   /* value after "key" in the command line */
    for (const char *s = cmdline; *s; s++)
        if ((s == cmdline || s[-1] == ' ') && starts(s, key)) return s + length(key);
    return 0;
}
static uint32_t number(const char *s) { uint32_t v = 0; while (s && *s >= '0' && *s <= '9') v = v * 10 + (uint32_t)(*s++ - '0'); return v; }
static int overlaps(uint32_t start, uint32_t end) { return start < (uint32_t)_kernel_end && (uint32_t)_kernel_start < end; }

/* fw_cfg: legacy ports and DMA */
static void fw_select(uint16_t key) { outw(0x510, key); }
static void fw_read(void *buf, uint32_t n) { uint8_t *p = buf; while (n--) *p++ = inb(0x511); }
static struct { uint32_t control, length; uint32_t address_high, address_low; } __attribute__((aligned(16))) dma;
static int fw_dma_read(uint16_t key, void *buf, uint32_t n) {
    dma.control = bswap(((uint32_t)key << 16) | 0x8 | 0x2);
    dma.length = bswap(n);
    dma.address_high = 0;
    dma.address_low = bswap((uint32_t)buf);
    outl(0x514, 0);
    outl(0x518, bswap((uint32_t)&dma));
    for (int i = 0; i < 1000000 && (bswap(dma.control) & ~1u); i++) { }
    return bswap(dma.control) == 0;
}

static uint8_t sum(const uint8_t *p, uint32_t n) { uint8_t s = 0; while (n--) s = (uint8_t)(s + *p++); return s; }
static uint32_t find_rsdp(void) {
    uint32_t ebda = (uint32_t)rd16(0x40e) << 4;
    for (uint32_t a = ebda; ebda && a < ebda + 1024; a += 16)
        if (starts((const char *)a, "RSD PTR ") && sum((const uint8_t *)a, 20) == 0) return a;
    for (uint32_t a = 0xe0000; a < 0x100000; a += 16)
        if (starts((const char *)a, "RSD PTR ") && sum((const uint8_t *)a, 20) == 0) return a;
    return 0;
}

static uint8_t apic_ids[64];
static uint32_t madt_cpus(uint32_t rsdp) {   /* enabled local APICs in the MADT, their IDs in apic_ids */
    uint32_t rsdt = rd32(rsdp + 16), count = 0;
    for (uint32_t e = rsdt + 36; e < rsdt + rd32(rsdt + 4); e += 4) {
        uint32_t t = rd32(e);
        if (!starts((const char *)t, "APIC") || sum((const uint8_t *)t, rd32(t + 4))) continue;
        for (uint32_t p = t + 44; p < t + rd32(t + 4); p += *(uint8_t *)(p + 1)) {
            const uint8_t *entry = (const uint8_t *)p;
            if (entry[0] == 0 && (entry[4] & 1) && count < 64) apic_ids[count++] = entry[3];
            if (entry[1] == 0) break;
        }
    }
    return count;
}

static void delay(uint32_t n) { for (volatile uint32_t i = 0; i < n; i++) { } }
static uint32_t start_aps(uint32_t cpus) {   /* INIT-SIPI-SIPI to every other CPU; how many checked in */
    volatile uint16_t *count = (volatile uint16_t *)0x7ff0;
    uint8_t *trampoline = (uint8_t *)0x8000;
    for (char *s = ap_trampoline; s < ap_trampoline_end; s++) *trampoline++ = (uint8_t)*s;
    *count = 0;
    uint32_t self = rd32(0xfee00020) >> 24;
    wr32(0xfee000f0, rd32(0xfee000f0) | 0x100);   /* software-enable the LAPIC before sending IPIs */
    for (uint32_t i = 0; i < cpus; i++) {
        if (apic_ids[i] == self) continue;
        wr32(0xfee00310, (uint32_t)apic_ids[i] << 24);
        wr32(0xfee00300, 0x4500);
        delay(1000);
        for (int sipi = 0; sipi < 2; sipi++) {
            wr32(0xfee00310, (uint32_t)apic_ids[i] << 24);
            wr32(0xfee00300, 0x4608);
            delay(200);
        }
    }
    for (uint32_t spin = 0; spin < 2000000 && *count < cpus - 1; spin++) { }
    return *count + 1u;
}

void kmain(void) {
    struct entry_state *st = &entry_state;
    struct mb_info *mbi = (struct mb_info *)st->ebx;
    const char *cmdline = (mbi->flags & 4) ? (const char *)mbi->cmdline : "";
    int compare = word(cmdline, "compare") != 0;
    puts_("mb: hello\n");
    if (!compare) {
        puts_("mb: magic="); hex(st->eax, 8); puts_(" info="); hex(st->ebx, 8);
        puts_(" cr0="); hex(st->cr0, 8); puts_(" cr4="); hex(st->cr4, 8); puts_(" eflags="); hex(st->eflags, 8);
        puts_(" cs="); hex(st->cs, 4); puts_(" ds="); hex(st->ds, 4); puts_(" es="); hex(st->es, 4);
        puts_(" ss="); hex(st->ss, 4); puts_("\n");
        puts_("mb: flags="); hex(mbi->flags, 8); puts_(" mem_lower="); dec(mbi->mem_lower);
        puts_(" mem_upper="); dec(mbi->mem_upper); puts_("\n");
        if (mbi->flags & 0x40)
            for (uint32_t a = mbi->mmap_addr; a < mbi->mmap_addr + mbi->mmap_length; a += ((struct mb_mmap *)a)->size + 4) {
                struct mb_mmap *m = (struct mb_mmap *)a;
                puts_("mb: mmap "); hex64(m->base); puts_(" "); hex64(m->length); puts_(" "); dec(m->type); puts_("\n");
            }
        if (mbi->flags & 0x200) { puts_("mb: loader="); puts_((const char *)mbi->boot_loader_name); puts_("\n"); }
        int clash = overlaps(st->ebx, st->ebx + sizeof *mbi) || overlaps(mbi->cmdline, mbi->cmdline + 1)
                    || overlaps(mbi->mmap_addr, mbi->mmap_addr + mbi->mmap_length);
        struct mb_module *mods = (struct mb_module *)mbi->mods_addr;
        for (uint32_t i = 0; (mbi->flags & 8) && i < mbi->mods_count; i++)
            clash |= overlaps(mods[i].start, mods[i].end) || overlaps(mods[i].string, mods[i].string + 1)
                     || (mods[i].start & 0xfff);
        puts_(clash ? "mb: boot data overlaps the kernel or a module is not page-aligned\n" : "mb: layout ok\n");
    }
    puts_("mb: cmdline=["); puts_(cmdline); puts_("]\n");
    struct mb_module *mods = (struct mb_module *)mbi->mods_addr;
    puts_("mb: modules="); dec((mbi->flags & 8) ? mbi->mods_count : 0); puts_("\n");
    for (uint32_t i = 0; (mbi->flags & 8) && i < mbi->mods_count; i++) {
        puts_("mb: module "); dec(i); puts_(" ["); puts_((const char *)mods[i].string); puts_("] size=");
        dec(mods[i].end - mods[i].start); puts_(" text=["); putn((const char *)mods[i].start, mods[i].end - mods[i].start > 24 ? 24 : mods[i].end - mods[i].start);
        puts_("]\n");
    }

    char signature[5] = {0};
    uint32_t features = 0, nb_cpus = 0;
    uint64_t ram = 0, ram_dma = 0;
    fw_select(0); fw_read(signature, 4);
    fw_select(1); fw_read(&features, 4);
    fw_select(5); fw_read(&nb_cpus, 2);
    fw_select(3); fw_read(&ram, 8);
    puts_("fw_cfg: signature="); puts_(signature); puts_(" cpus="); dec(nb_cpus); puts_(" ram="); hex64(ram);
    puts_(" dma="); dec((features >> 1) & 1); puts_("\n");
    if (features & 2) {
        int ok = fw_dma_read(3, &ram_dma, 8);
        puts_("fw_cfg: dma read "); puts_(ok ? "ok" : "failed"); puts_(" ram="); hex64(ram_dma); puts_("\n");
        if (!compare) {
            static uint8_t dir[4 + 64 * 64];
            fw_dma_read(0x19, dir, 4);
            uint32_t files = bswap(*(uint32_t *)dir);
            fw_dma_read(0x19, dir, 4 + 64 * (files > 64 ? 64 : files));
            for (uint32_t i = 0; i < files && i < 64; i++) {
                uint8_t *f = dir + 4 + 64 * i;
                puts_("fw_cfg: file "); puts_((const char *)f + 8); puts_(" size="); dec(bswap(*(uint32_t *)f));
                puts_(" key="); hex(((uint32_t)f[4] << 8) | f[5], 4); puts_("\n");
            }
        }
    }

    uint32_t rsdp = find_rsdp(), cpus = rsdp ? madt_cpus(rsdp) : 0;
    puts_("acpi: rsdp "); puts_(rsdp ? "found" : "missing");
    if (!compare && rsdp) { puts_(" at "); hex(rsdp, 5); }
    puts_(" madt cpus="); dec(cpus); puts_("\n");
    if (cpus > 1) { uint32_t up = start_aps(cpus); puts_("smp: "); dec(up); puts_(" of "); dec(cpus); puts_(" cpus up\n"); }

    const char *exit_code = word(cmdline, "exit=");
    puts_("mb: bye\n");
    outb(0xf4, (uint8_t)number(exit_code));
}
