/* The 64-bit half of the PVH entry: recreate pyrovisor's boot state (GDT, TSS, boot info, command line)
   from QEMU's hvm_start_info, so a guest cannot tell which VMM started it. */
#include <pyrovisor/boot_info.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/io.h>
#include <pyrovisor/string.h>

#include <stdbool.h>
#include <stddef.h>

#define BOOT_INFO_GPA 0x1000
#define CMDLINE_GPA 0x2000
#define CMDLINE_MAX 4095
#define GDT_GPA 0x3000
#define TSS_GPA 0x4000
#define TSS_SIZE 104
#define PAGE_TABLES_GPA 0x10000
#define PAGE_TABLES_PAGES 7
#define HVM_START_MAGIC 0x336EC578u
#define E820_RAM 1

struct hvm_memmap_entry {
    uint64_t addr, size;
    uint32_t type, reserved;
};

struct hvm_modlist_entry {
    uint64_t paddr, size, cmdline_paddr, reserved;
};

struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};

extern char __image_start[], __image_end[];
void *pvh_setup(const struct hvm_start_info *start);

#define KERNEL_MAP_BASE 0xFFFFFFFF80000000ull

/* Guests linked at the kernel map report their image by kernel-map address: make it physical. */
static uint64_t physical(const void *address)
{
    uint64_t value = (uint64_t)address;
    return value >= KERNEL_MAP_BASE ? value - KERNEL_MAP_BASE : value;
}

static uint32_t tsc_khz_from_cpuid(void)
{
    uint32_t eax, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0x40000000), "c"(0));
    if (eax < 0x40000010)
        return 0;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0x40000010), "c"(0));
    return eax; /* KVM's and VMware's timing leaf: TSC frequency in kHz */
}

/* KVM's paravirtual clock, where the timing leaf is missing (QEMU's default CPU models): the TSC-to-
   nanoseconds factor KVM publishes gives the frequency (as Linux's pvclock_tsc_khz does). The clock is
   switched off again at once, so KVM does not keep writing into that memory. */
#define MSR_KVM_SYSTEM_TIME_NEW 0x4B564D01u
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define PVCLOCK_GPA (BOOT_INFO_GPA + 0x800) /* scratch: the boot info uses less than 0x800 bytes */

struct pvclock_time {
    uint32_t version, pad;
    uint64_t tsc_timestamp, system_time;
    uint32_t tsc_to_system_mul;
    int8_t tsc_shift;
    uint8_t flags, pad2[2];
};

static uint32_t tsc_khz_from_kvmclock(void)
{
    uint32_t eax, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0x40000000), "c"(0));
    if (ebx != 0x4B4D564Bu || ecx != 0x564B4D56u || edx != 0x4D || eax < 0x40000001) /* "KVMKVMKVM" */
        return 0;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0x40000001), "c"(0));
    if (!(eax & KVM_FEATURE_CLOCKSOURCE2))
        return 0;
    volatile struct pvclock_time *clock = (volatile struct pvclock_time *)PVCLOCK_GPA;
    clock->version = 0;
    clock->tsc_to_system_mul = 0;
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, PVCLOCK_GPA | 1);
    uint32_t version, mul;
    int8_t shift;
    do {
        version = clock->version;
        mul = clock->tsc_to_system_mul;
        shift = clock->tsc_shift;
    } while ((version & 1) || version != clock->version);
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
    if (!mul)
        return 0;
    uint64_t khz = (1000000ull << 32) / mul;
    return (uint32_t)(shift < 0 ? khz << -shift : khz >> shift);
}

#define MEMMAP_MAX 32

void *pvh_setup(const struct hvm_start_info *start)
{
    /* Take everything from QEMU's structures before writing anything: the firmware may have put them (the
       command line, the memory map) where the boot info and command line go (SeaBIOS's PVH ROM puts the
       command line at 0x11c0 and hvm_start_info at 0x21e0). */
    char cmdline_copy[CMDLINE_MAX + 1];
    struct hvm_memmap_entry map[MEMMAP_MAX];
    struct hvm_modlist_entry module = {0};
    size_t length = 0;
    uint32_t map_entries = 0;
    bool valid = start->magic == HVM_START_MAGIC;
    if (valid && start->cmdline_paddr) {
        const char *source = (const char *)start->cmdline_paddr;
        while (source[length] && length < CMDLINE_MAX)
            length++;
        memcpy(cmdline_copy, source, length);
    }
    if (valid) {
        map_entries = start->memmap_entries < MEMMAP_MAX ? start->memmap_entries : MEMMAP_MAX;
        memcpy(map, (const void *)start->memmap_paddr, map_entries * sizeof map[0]);
        if (start->nr_modules)
            module = *(const struct hvm_modlist_entry *)start->modlist_paddr;
    }

    struct pyrovisor_boot_info *boot = (struct pyrovisor_boot_info *)BOOT_INFO_GPA;
    memset(boot, 0, sizeof *boot);
    _Static_assert(sizeof *boot <= 0x800, "the boot info and the kvmclock scratch area share a page");
    boot->magic = PYROVISOR_BOOT_MAGIC;
    boot->version = PYROVISOR_BOOT_VERSION;
    boot->size = sizeof *boot;
    boot->nr_vcpus = 1;

    char *cmdline = (char *)CMDLINE_GPA;
    memcpy(cmdline, cmdline_copy, length);
    cmdline[length] = '\0';
    boot->cmdline_gpa = CMDLINE_GPA;
    boot->cmdline_len = (uint32_t)length;

    /* RAM as pyrovisor describes it: from 0 to the end of the RAM range holding the image. */
    for (uint32_t i = 0; i < map_entries && boot->nr_ram_ranges < PYROVISOR_MAX_RAM_RANGES; i++) {
        if (map[i].type != E820_RAM || map[i].addr + map[i].size <= physical(__image_end))
            continue;
        uint64_t base = boot->nr_ram_ranges ? map[i].addr : 0;
        boot->ram[boot->nr_ram_ranges].gpa = base;
        boot->ram[boot->nr_ram_ranges].size = map[i].addr + map[i].size - base;
        boot->nr_ram_ranges++;
    }
    boot->initrd_gpa = module.paddr;
    boot->initrd_size = module.size;
    boot->kernel_start = physical(__image_start);
    boot->kernel_end = physical(__image_end);
    boot->page_tables_gpa = PAGE_TABLES_GPA;
    boot->page_tables_size = PAGE_TABLES_PAGES * 4096;
    boot->tsc_khz = tsc_khz_from_cpuid();
    if (!boot->tsc_khz)
        boot->tsc_khz = tsc_khz_from_kvmclock();
    boot->direct_map_base = 0xFFFF888000000000ull;
    boot->kernel_map_base = 0xFFFFFFFF80000000ull;
    boot->console_port = 0x3F8;
    boot->debug_exit_port = 0xF4;
    boot->console_irq = 4;

    /* The PICs as pyrovisor leaves them: vectors 0x20-0x2f, every line masked (the BIOS left them at
       0x08, where the timer's IRQ 0 would look like a double fault). */
    static const uint8_t pic_init[][2] = {
        {0x20, 0x11}, {0xA0, 0x11}, {0x21, 0x20}, {0xA1, 0x28}, {0x21, 0x04}, {0xA1, 0x02},
        {0x21, 0x01}, {0xA1, 0x01}, {0x21, 0xFF}, {0xA1, 0xFF},
    };
    for (size_t i = 0; i < sizeof pic_init / sizeof pic_init[0]; i++)
        outb(pic_init[i][0], pic_init[i][1]);

    /* The GDT and TSS pyrovisor gives vCPU 0, then reload every segment register from them. */
    uint64_t *gdt = (uint64_t *)GDT_GPA;
    gdt[0] = 0;
    gdt[1] = 0x00AF9B000000FFFFull;
    gdt[2] = 0x00CF93000000FFFFull;
    gdt[3] = 0x00CFF3000000FFFFull;
    gdt[4] = 0x00AFFB000000FFFFull;
    uint64_t tss = TSS_GPA, limit = TSS_SIZE - 1;
    gdt[5] = (limit & 0xFFFF) | ((tss & 0xFFFFFF) << 16) | (0x89ull << 40) | (((tss >> 24) & 0xFF) << 56);
    gdt[6] = tss >> 32;
    memset((void *)TSS_GPA, 0, TSS_SIZE);
    *(uint16_t *)(TSS_GPA + 102) = TSS_SIZE; /* no I/O permission bitmap */
    boot->gdt_gpa = GDT_GPA;
    boot->gdt_limit = 7 * 8 - 1;
    boot->tss_gpa = TSS_GPA;
    boot->tss_stride = 128;
    struct descriptor_pointer pointer = {(uint16_t)boot->gdt_limit, GDT_GPA};
    __asm__ volatile("lgdt %0\n\t"
                     "pushq $0x08\n\t"
                     "leaq 1f(%%rip), %%rax\n\t"
                     "pushq %%rax\n\t"
                     "lretq\n"
                     "1:\n\t"
                     "mov $0x10, %%eax\n\t"
                     "mov %%eax, %%ds\n\t"
                     "mov %%eax, %%es\n\t"
                     "mov %%eax, %%ss\n\t"
                     "mov %%eax, %%fs\n\t"
                     "mov %%eax, %%gs"
                     :
                     : "m"(pointer)
                     : "rax", "memory");
    load_tr(0x28);
    return boot;
}
