/* Boot: vCPU 0 sets up the kernel (IDT, page tables, per-vCPU state, the timer), reads the command line
   and starts one process per program in it; the other vCPUs wait for that, set themselves up and
   join the scheduler. Command line: `program key=value ...; program ...; kernel hz=100 ...`. */
#include <pyrovisor/console.h>
#include <pyrovisor/cmdline.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/string.h>

#include "kernel.h"

#define MSR_KERNEL_GS_BASE 0xC0000102u
#define FMASK_BITS ((1u << 8) | (1u << 9) | (1u << 10) | (1u << 14) | (1u << 18)) /* TF IF DF NT AC */
#define STAR_VALUE (((uint64_t)0x10 << 48) | ((uint64_t)KERNEL_CS << 32))
#define MAX_PROGRAMS MAX_PROCS
#define IMAGE_FLAGS (PTE_PRESENT | PTE_USER | PTE_ACCESSED)

struct os_options os_options = {.hz = 100, .slice = 1, .faultaround = 32};
const struct pyrovisor_boot_info *boot_info;
uint64_t kernel_pml4[512] __attribute__((aligned(4096)));
const struct archive_entry *archive_entries;
uint32_t archive_count;
uint64_t archive_phys;
static volatile uint32_t idt_ready, kernel_ready;

struct segment {
    const char *name;
    size_t name_length;
    const char *args;
    size_t args_length;
};

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* One `key=NUMBER` word: the options are read in a single pass over the text (every instruction here
   is emulated, so no repeated scans). */
struct option {
    const char *key;
    size_t key_length;
    const char *text; /* the value as written */
    size_t text_length;
    uint64_t value;
    bool numeric;
};

static bool next_option(const char **cursor, const char *end, struct option *option)
{
    const char *text = *cursor;
    while (text < end) {
        while (text < end && is_space(*text))
            text++;
        const char *word = text, *equals = 0;
        while (text < end && !is_space(*text)) {
            if (*text == '=' && !equals)
                equals = text;
            text++;
        }
        if (!equals || equals == word)
            continue;
        option->key = word;
        option->key_length = (size_t)(equals - word);
        option->text = equals + 1;
        option->text_length = (size_t)(text - equals - 1);
        const char *number_end;
        option->numeric = parse_u64(equals + 1, &number_end, &option->value) && number_end == text;
        *cursor = text;
        return true;
    }
    *cursor = end;
    return false;
}

static bool option_is(const struct option *option, const char *key, size_t key_length)
{
    return option->key_length == key_length && !memcmp(option->key, key, key_length);
}
#define OPTION_IS(option, key) option_is(option, key, sizeof key - 1)

static uint32_t option_u32(const struct option *option, uint32_t low, uint32_t high)
{
    if (!option->numeric || option->value < low || option->value > high) {
        kprintf("os: kernel option %.*s=%lu is outside %u..%u\n", (int)option->key_length, option->key,
                option->numeric ? option->value : 0, low, high);
        kernel_stop(OS_EXIT_PANIC);
    }
    return (uint32_t)option->value;
}

static void kernel_options(const struct segment *segment)
{
    const char *cursor = segment->args, *end = segment->args + segment->args_length;
    struct option option;
    while (next_option(&cursor, end, &option)) {
        if (OPTION_IS(&option, "hz"))
            os_options.hz = option_u32(&option, 10, 10000);
        else if (OPTION_IS(&option, "slice"))
            os_options.slice = option_u32(&option, 1, 1000);
        else if (OPTION_IS(&option, "bootmark"))
            os_options.bootmark = option_u32(&option, 0, 0xFFFF);
        else if (OPTION_IS(&option, "quiet"))
            os_options.quiet = option_u32(&option, 0, 1);
        else if (OPTION_IS(&option, "faultaround"))
            os_options.faultaround = option_u32(&option, 1, 512);
        else if (OPTION_IS(&option, "keepmm"))
            os_options.keepmm = option_u32(&option, 0, 1);
        else if (OPTION_IS(&option, "balloon_report")) {
            if (option.text_length == 3 && !memcmp(option.text, "lie", 3))
                os_options.balloon_lie = 1;
            else if (option.text_length == 6 && !memcmp(option.text, "honest", 6))
                os_options.balloon_lie = 0;
            else {
                kprintf("os: kernel option balloon_report=%.*s is not honest or lie\n", (int)option.text_length,
                        option.text);
                kernel_stop(OS_EXIT_PANIC);
            }
        } else {
            kprintf("os: unknown kernel option '%.*s'\n", (int)option.key_length, option.key);
            kernel_stop(OS_EXIT_PANIC);
        }
    }
}

/* Splits the command line at ';' into a program name and its arguments each. */
static unsigned parse_command_line(const char *text, struct segment *segments, unsigned capacity)
{
    unsigned count = 0;
    while (*text) {
        const char *start = text;
        while (*text && *text != ';')
            text++;
        const char *end = text;
        if (*text)
            text++;
        while (start < end && is_space(*start))
            start++;
        while (end > start && is_space(end[-1]))
            end--;
        if (start == end)
            continue;
        if (count == capacity) {
            kprintf("os: more than %u programs on the command line\n", capacity);
            kernel_stop(OS_EXIT_PANIC);
        }
        struct segment *segment = &segments[count++];
        segment->name = start;
        while (start < end && !is_space(*start))
            start++;
        segment->name_length = (size_t)(start - segment->name);
        while (start < end && is_space(*start))
            start++;
        segment->args = start;
        segment->args_length = (size_t)(end - start);
    }
    return count;
}

static bool is_kernel_segment(const struct segment *segment)
{
    return segment->name_length == 6 && !strncmp(segment->name, "kernel", 6);
}

static void load_archive(void)
{
    const struct pyrovisor_boot_info *boot = boot_info;
    if (!boot->initrd_size) {
        kprintf("os: no program archive: pass one with --initrd (the `os` manifest entry does)\n");
        kernel_stop(OS_EXIT_PANIC);
    }
    const struct archive_header *header = phys_to_virt(boot->initrd_gpa);
    if (header->magic != ARCHIVE_MAGIC || header->version != ARCHIVE_VERSION ||
        header->entry_size != sizeof(struct archive_entry) || boot->initrd_gpa & (PAGE_SIZE - 1)) {
        kprintf("os: the initrd is not a page-aligned program archive (magic %#x)\n", header->magic);
        kernel_stop(OS_EXIT_PANIC);
    }
    archive_phys = boot->initrd_gpa;
    archive_count = header->count;
    archive_entries = (const struct archive_entry *)(header + 1);
    for (uint32_t index = 0; index < archive_count; index++) {
        const struct archive_entry *entry = &archive_entries[index];
        if (entry->offset & (PAGE_SIZE - 1) || entry->image_size & (PAGE_SIZE - 1) ||
            entry->offset + entry->image_size > boot->initrd_size || entry->load_va & (PAGE_SIZE - 1) ||
            entry->rw_end > USER_MMAP_BASE || entry->load_va + entry->image_size > entry->rw_start) {
            kprintf("os: archive entry %u is malformed\n", index);
            kernel_stop(OS_EXIT_PANIC);
        }
    }
}

static int find_program(const struct segment *segment)
{
    for (uint32_t index = 0; index < archive_count; index++) {
        const char *name = archive_entries[index].name;
        if (segment->name_length < ARCHIVE_NAME_MAX && !strncmp(name, segment->name, segment->name_length) &&
            name[segment->name_length] == '\0')
            return (int)index;
    }
    return -1;
}

static void list_programs(void)
{
    kprintf("os: programs in the archive:");
    for (uint32_t index = 0; index < archive_count; index++)
        kprintf(" %s", archive_entries[index].name);
    kprintf("\n");
}

/* A process running `program` with the segment's arguments; 0 when the process table is full. */
static struct process *spawn(const struct segment *segment, int program, uint32_t parent)
{
    const struct archive_entry *entry = &archive_entries[program];
    struct mm *mm = mm_create();
    if (!mm)
        return 0;
    /* The image straight from the archive, read-only and shared: nothing is copied at CPL0. */
    mm_map_range(mm, entry->load_va, archive_phys + entry->offset, entry->image_size / PAGE_SIZE, IMAGE_FLAGS);
    mm_add_vma(mm, entry->load_va, entry->load_va + entry->image_size, 0);
    if (entry->rw_end > entry->rw_start)
        mm_add_vma(mm, entry->rw_start & ~(PAGE_SIZE - 1), (entry->rw_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1),
                   VMA_WRITE);
    struct process *process = process_create(segment->name, segment->name_length, mm, parent);
    if (!process) {
        mm_release(mm);
        return 0;
    }
    process->program = (uint32_t)program;
    process->args_offset = (uint32_t)(segment->args - (const char *)phys_to_virt(boot_info->cmdline_gpa));
    process->args_len = (uint32_t)segment->args_length;
    /* Two options every program takes, read by the kernel: cpu=N (pin) and start_ms=M (start later). */
    uint64_t start_ms = 0;
    const char *cursor = segment->args, *end = segment->args + segment->args_length;
    struct option option;
    while (next_option(&cursor, end, &option)) {
        if (OPTION_IS(&option, "cpu") && option.numeric && option.value < os_info.nr_cpus)
            process->affinity = (int32_t)option.value;
        else if (OPTION_IS(&option, "cpu"))
            kprintf("os: pid %u: cpu= ignored: not a vCPU index below %u\n", process->pid, os_info.nr_cpus);
        else if (OPTION_IS(&option, "start_ms") && option.numeric)
            start_ms = option.value;
    }
    uint64_t args_va = USER_ARGS_VA + (boot_info->cmdline_gpa & (PAGE_SIZE - 1)) + process->args_offset;
    if (!os_options.quiet) {
        struct kline line = {0};
        kline_str(&line, "os: pid ");
        kline_dec(&line, process->pid);
        kline_str(&line, " ");
        kline_str(&line, process->name);
        kline_str(&line, " started [");
        kline_mem(&line, segment->args, segment->args_length);
        kline_str(&line, "]");
        kline_end(&line);
    }
    process_start(process, entry->entry, USER_STACK_TOP, args_va, segment->args_length, os_info.tsc_khz,
                  process->pid, os_info.nr_cpus);
    if (start_ms)
        sleep_until(process, (start_ms * os_options.hz + 999) / 1000);
    else
        make_runnable(process);
    return process;
}

/* SYS_SPAWN: one "program k=v ..." line from a process (the sandbox's runner). The line is copied after
   the boot command line, into the page every process sees at USER_ARGS_VA, so the child finds its
   arguments where programs look for them. Until that page is full; a VM runs few such commands. */
long spawn_command(const char *line, size_t length, uint32_t parent)
{
    static size_t used; /* bytes of the command-line page taken: the boot line, its NUL, earlier commands */
    char *page = phys_to_virt(boot_info->cmdline_gpa);
    if (!used)
        used = boot_info->cmdline_len + 1;
    if (!length || used >= PAGE_SIZE || length >= PAGE_SIZE - used)
        return -E_INVAL;
    for (size_t index = 0; index < length; index++)
        if (line[index] == ';' || line[index] == '\0')
            return -E_INVAL; /* one program per call */
    char *copy = page + used;
    memcpy(copy, line, length);
    copy[length] = '\0';
    struct segment segment;
    if (parse_command_line(copy, &segment, 1) != 1 || is_kernel_segment(&segment))
        return -E_INVAL;
    int program = find_program(&segment);
    if (program < 0)
        return -E_INVAL;
    struct process *process = spawn(&segment, program, parent);
    if (!process)
        return -E_AGAIN;
    used += length + 1;
    return process->pid;
}

/* Per-vCPU set-up, on the VMM's boot page tables until the last step. */
static void cpu_setup(unsigned cpu)
{
    const struct pyrovisor_boot_info *boot = boot_info;
    struct cpu *here = &cpus[cpu];
    here->index = cpu;
    here->syscall_entry = (uint64_t)syscall_entry_cpl0;
    tss_init(boot, cpu, 0); /* writes its GDT descriptor through the identity map */
    struct descriptor_pointer gdt = {(uint16_t)boot->gdt_limit, DIRECT_MAP_BASE + boot->gdt_gpa};
    __asm__ volatile("lgdt %0" : : "m"(gdt));
    wrmsr(MSR_STAR, STAR_VALUE);
    wrmsr(MSR_LSTAR, USER_ENTRY_VA);
    wrmsr(MSR_FMASK, FMASK_BITS);
    wrmsr(MSR_KERNEL_GS_BASE, (uint64_t)here);
    here->cr3 = kernel_to_phys(kernel_pml4);
    write_cr3(here->cr3);
    lapic_timer_start(os_options.hz);
    here->online = 1;
}

void kernel_main(uint64_t boot_phys, unsigned cpu)
{
    const struct pyrovisor_boot_info *boot = phys_to_virt(boot_phys);
    os_info.boot_tsc = os_info.tick_tsc = rdtsc();
    if (boot->magic != PYROVISOR_BOOT_MAGIC) {
        kprintf("os: no pyrovisor boot info at %#lx\n", boot_phys);
        kernel_stop(OS_EXIT_PANIC);
    }
    boot_info = boot;
    os_info.nr_cpus = boot->nr_vcpus < MAX_CPUS ? boot->nr_vcpus : MAX_CPUS;
    os_info.tsc_khz = boot->tsc_khz;
    os_info.next_pid = 1;
    idt_setup();
    idt_ready = 1;
    const uint64_t *boot_pml4 = phys_to_virt(boot->page_tables_gpa);
    kernel_pml4[273] = boot_pml4[273]; /* the direct map and the kernel map, as the VMM built them */
    kernel_pml4[511] = boot_pml4[511];

    static struct segment segments[MAX_PROGRAMS + 1];
    virtio_discover(boot, phys_to_virt(boot->cmdline_gpa)); /* takes the virtio_mmio.device= words out */
    unsigned count = parse_command_line(phys_to_virt(boot->cmdline_gpa), segments, MAX_PROGRAMS + 1);
    unsigned programs = 0;
    for (unsigned index = 0; index < count; index++) {
        if (!is_kernel_segment(&segments[index])) {
            programs++;
            continue;
        }
        kernel_options(&segments[index]);
    }
    os_info.hz = os_options.hz;
    cpu_setup(cpu);
    struct kline line = {0};
    kline_str(&line, "pyrovisor os: ");
    kline_dec(&line, os_info.nr_cpus);
    kline_str(&line, " vCPU(s), ");
    kline_dec(&line, (boot->ram[0].size + (boot->nr_ram_ranges > 1 ? boot->ram[1].size : 0)) >> 20);
    kline_str(&line, " MiB, ");
    kline_dec(&line, boot->initrd_size ? ((const struct archive_header *)phys_to_virt(boot->initrd_gpa))->count : 0);
    kline_str(&line, " programs in the archive, ");
    kline_dec(&line, programs);
    kline_str(&line, " to run, ");
    kline_dec(&line, os_options.hz);
    kline_str(&line, " Hz");
    kline_end(&line);
    virtio_probe();
    mm_init();
    load_archive();
    if (!programs) {
        kprintf("os: nothing to run; give programs on the command line, e.g. \"counter count=5; memcheck mib=4\"\n");
        list_programs();
        kernel_stop(OS_EXIT_OK);
    }
    balloon_init(); /* a virtio-balloon device is the kernel's own */
    for (unsigned index = 0; index < count; index++) {
        if (is_kernel_segment(&segments[index]))
            continue;
        int program = find_program(&segments[index]);
        if (program < 0) {
            kprintf("os: no program '%.*s' in the archive\n", (int)segments[index].name_length, segments[index].name);
            list_programs();
            kernel_stop(OS_EXIT_PANIC);
        }
        if (!spawn(&segments[index], program, 0)) {
            kprintf("os: too many processes (at most %u)\n", MAX_PROCS);
            kernel_stop(OS_EXIT_PANIC);
        }
    }
    os_info.magic = OS_INFO_MAGIC;
    kernel_ready = 1;
    if (os_info.nr_cpus > 1)
        lapic_wake_others();
    klock(cpu);
    schedule(cpu, 0);
}

/* The other vCPUs: wait (in HLT, not spinning: emulated spinning would take host CPU time from vCPU 0)
   for vCPU 0 to finish booting, then set themselves up and join the scheduler. */
void ap_main(unsigned cpu)
{
    while (!idt_ready) /* a few hundred microseconds */
        cpu_relax();
    idt_load();
    lapic_enable(); /* a software-disabled LAPIC would not take the wake-up IPI */
    while (!kernel_ready)
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    if (cpu >= os_info.nr_cpus)
        halt_forever();
    cpu_setup(cpu);
    klock(cpu);
    schedule(cpu, 0);
}
