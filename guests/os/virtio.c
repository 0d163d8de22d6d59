/* virtio-mmio devices. The kernel only finds them (the boot-info table and `virtio_mmio.device=` words on
   the command line), lends each to one address space at a time (SYS_VIRTIO_OPEN maps its registers and a
   zeroed, physically contiguous DMA area into the caller) and turns its interrupts into wake-ups
   (SYS_VIRTIO_WAIT). The drivers run in user mode (programs/ulib/virtio.c): every instruction here is
   emulated on hosts like this one, so the interrupt path only counts, sends the EOI and wakes the waiter. */
#include <pyrovisor/cmdline.h>
#include <pyrovisor/string.h>

#include "kernel.h"

#define VIRTIO_MAGIC 0x74726976u /* "virt" */
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_VENDOR_ID 0x00C
#define REG_STATUS 0x070
#define DIRECT_MAP_LIMIT (4ull << 30) /* what the boot page tables map for certain, the 3-4 GiB hole included */
#define MAX_CANDIDATES (2 * MAX_VIRTIO)
#define KEY "virtio_mmio.device="
#define KEY_LENGTH (sizeof KEY - 1)

/* The IOAPIC at its PC address (pyrovisor and QEMU); QEMU microvm with ACPI adds a second one for GSI 24-47. */
#define IOAPIC_BASE 0xFEC00000ull
#define IOAPIC2_BASE 0xFEC10000ull
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WINDOW 0x10
#define IOAPIC_REG_VERSION 0x01
#define IOAPIC_REDIRECTION 0x10
#define REDIRECTION_MASKED (1u << 16) /* bits 8-15 zero: fixed delivery, physical destination, active high, edge */
#define LAPIC_ID 0x20

struct virtio_device virtio_devices[MAX_VIRTIO];
uint32_t nr_virtio_devices;

struct candidate {
    uint64_t base;
    uint64_t size;
    uint64_t irq;
};
static struct candidate candidates[MAX_CANDIDATES];
static unsigned nr_candidates;
static unsigned waiting;          /* devices with a process asleep in SYS_VIRTIO_WAIT */
static uint32_t ioapic_pins[2];   /* redirection entries of each IOAPIC, 0 if absent; read at boot */

static inline uint32_t mmio_read(uint64_t phys) { return *(volatile uint32_t *)phys_to_virt(phys); }
static inline void mmio_write(uint64_t phys, uint32_t value) { *(volatile uint32_t *)phys_to_virt(phys) = value; }

static uint32_t ioapic_read(uint64_t base, uint32_t reg)
{
    mmio_write(base + IOAPIC_REGSEL, reg);
    return mmio_read(base + IOAPIC_WINDOW);
}

static void ioapic_write(uint64_t base, uint32_t reg, uint32_t value)
{
    mmio_write(base + IOAPIC_REGSEL, reg);
    mmio_write(base + IOAPIC_WINDOW, value);
}

static uint32_t ioapic_probe(uint64_t base)
{
    uint32_t version = ioapic_read(base, IOAPIC_REG_VERSION);
    if (version == 0 || version == 0xFFFFFFFFu)
        return 0;
    return ((version >> 16) & 0xFF) + 1;
}

/* Which IOAPIC and pin a GSI is: the first IOAPIC's pins come first, then the second's. */
static bool ioapic_pin(uint32_t gsi, uint64_t *base, uint32_t *pin)
{
    if (gsi < ioapic_pins[0]) {
        *base = IOAPIC_BASE;
        *pin = gsi;
        return true;
    }
    if (ioapic_pins[1] && gsi - ioapic_pins[0] < ioapic_pins[1]) {
        *base = IOAPIC2_BASE;
        *pin = gsi - ioapic_pins[0];
        return true;
    }
    return false;
}

static void route(struct virtio_device *device, unsigned cpu)
{
    uint64_t base;
    uint32_t pin;
    if (!ioapic_pin(device->irq, &base, &pin))
        return;
    uint32_t apic_id = mmio_read(LAPIC_GPA + LAPIC_ID) >> 24;
    device->vector = VECTOR_VIRTIO_BASE + (uint32_t)(device - virtio_devices);
    device->cpu = cpu;
    ioapic_write(base, IOAPIC_REDIRECTION + 2 * pin + 1, apic_id << 24);
    ioapic_write(base, IOAPIC_REDIRECTION + 2 * pin, device->vector);
}

static void mask(struct virtio_device *device)
{
    uint64_t base;
    uint32_t pin;
    if (device->vector && ioapic_pin(device->irq, &base, &pin))
        ioapic_write(base, IOAPIC_REDIRECTION + 2 * pin, REDIRECTION_MASKED);
    device->vector = 0;
}

static void add_candidate(uint64_t base, uint64_t size, uint64_t irq)
{
    for (unsigned index = 0; index < nr_candidates; index++)
        if (candidates[index].base == base)
            return; /* the boot-info table and the command line name the same device */
    if (nr_candidates == MAX_CANDIDATES) {
        kprintf("os: too many virtio-mmio devices, %#lx ignored\n", base);
        return;
    }
    candidates[nr_candidates++] = (struct candidate){base, size, irq};
}

static bool is_separator(char c) { return c == ' ' || c == '\t' || c == '\n' || c == ';' || c == '\0'; }

/* <size>@<base>:<irq>[:<id>], as Linux reads it: size in bytes or with a K/M/G suffix, numbers decimal or 0x. */
static bool parse_device(const char *text, const char *end, struct candidate *out)
{
    const char *cursor;
    uint64_t id;
    if (!parse_u64(text, &cursor, &out->size))
        return false;
    switch (*cursor) {
    case 'k': case 'K': out->size <<= 10; cursor++; break;
    case 'm': case 'M': out->size <<= 20; cursor++; break;
    case 'g': case 'G': out->size <<= 30; cursor++; break;
    }
    if (*cursor++ != '@' || !parse_u64(cursor, &cursor, &out->base) || *cursor++ != ':' ||
        !parse_u64(cursor, &cursor, &out->irq))
        return false;
    if (*cursor == ':' && !parse_u64(cursor + 1, &cursor, &id))
        return false;
    return cursor == end && out->size;
}

/* Before the command line is split into programs: collect the devices and blank their words out, wherever
   they are (QEMU appends them to the end, which is inside the last program's or the kernel's segment). */
void virtio_discover(const struct pyrovisor_boot_info *boot, char *cmdline)
{
    if (boot->version >= 2 && boot->size >= offsetof(struct pyrovisor_boot_info, virtio)) {
        uint32_t count = boot->nr_virtio < PYROVISOR_MAX_VIRTIO ? boot->nr_virtio : PYROVISOR_MAX_VIRTIO;
        uint32_t room = (uint32_t)((boot->size - offsetof(struct pyrovisor_boot_info, virtio)) /
                                   sizeof(struct pyrovisor_virtio_mmio)); /* what the VMM says it wrote */
        if (count > room)
            count = room;
        for (uint32_t index = 0; index < count; index++)
            add_candidate(boot->virtio[index].base, boot->virtio[index].size, boot->virtio[index].irq);
    }
    for (char *text = cmdline; *text;) {
        if (is_separator(*text)) {
            text++;
            continue;
        }
        char *word = text;
        while (!is_separator(*text))
            text++;
        if ((size_t)(text - word) < KEY_LENGTH || memcmp(word, KEY, KEY_LENGTH))
            continue;
        struct candidate device;
        if (parse_device(word + KEY_LENGTH, text, &device))
            add_candidate(device.base, device.size, device.irq);
        else
            kprintf("os: ignoring malformed '%.*s'\n", (int)(text - word), word);
        for (char *blank = word; blank < text; blank++)
            *blank = ' ';
    }
}

static const char *device_name(uint32_t id)
{
    switch (id) {
    case 1: return "network";
    case 2: return "block";
    case 3: return "console";
    case 4: return "entropy";
    case 5: return "balloon";
    case 9: return "9p";
    case 16: return "gpu";
    case 18: return "input";
    case 19: return "vsock";
    case 26: return "fs";
    default: return "other";
    }
}

/* After the banner: read each candidate's identity registers and keep the virtio 1.x (version 2) ones. */
void virtio_probe(void)
{
    if (!nr_candidates)
        return;
    ioapic_pins[0] = ioapic_probe(IOAPIC_BASE);
    for (unsigned index = 0; index < nr_candidates; index++) {
        const struct candidate *found = &candidates[index];
        if (found->irq >= ioapic_pins[0] && !ioapic_pins[1])
            ioapic_pins[1] = ioapic_probe(IOAPIC2_BASE);
    }
    for (unsigned index = 0; index < nr_candidates; index++) {
        const struct candidate *found = &candidates[index];
        if (found->base & 3 || found->size < 0x100 || found->size > (1u << 20) ||
            found->base + found->size > DIRECT_MAP_LIMIT || mm_is_ram(found->base, found->size)) {
            kprintf("os: virtio-mmio at %#lx size %#lx irq %lu: not a device window below 4 GiB outside RAM, skipped\n",
                    found->base, found->size, found->irq);
            continue;
        }
        uint32_t magic = mmio_read(found->base + REG_MAGIC), version = mmio_read(found->base + REG_VERSION);
        uint32_t id = mmio_read(found->base + REG_DEVICE_ID);
        if (magic != VIRTIO_MAGIC) {
            kprintf("os: virtio-mmio at %#lx irq %lu: bad magic %#x, skipped\n", found->base, found->irq, magic);
            continue;
        }
        if (version != 2) {
            kprintf("os: virtio-mmio at %#lx irq %lu: version %u (only 2, virtio 1.x, is supported), skipped\n",
                    found->base, found->irq, version);
            continue;
        }
        if (!id) {
            kprintf("os: virtio-mmio at %#lx irq %lu: no device (DeviceID 0), skipped\n", found->base, found->irq);
            continue;
        }
        if (nr_virtio_devices == MAX_VIRTIO) {
            kprintf("os: virtio-mmio at %#lx: more than %u devices, skipped\n", found->base, MAX_VIRTIO);
            continue;
        }
        struct virtio_device *device = &virtio_devices[nr_virtio_devices];
        device->base = found->base;
        device->size = (uint32_t)found->size;
        device->irq = (uint32_t)found->irq;
        device->device_id = id;
        device->vendor_id = mmio_read(found->base + REG_VENDOR_ID);
        uint64_t ioapic;
        uint32_t pin;
        kprintf("os: virtio %u: base %#lx size %#x irq %u: device %u (%s), vendor %#x%s\n", nr_virtio_devices,
                device->base, device->size, device->irq, id, device_name(id), device->vendor_id,
                ioapic_pin(device->irq, &ioapic, &pin) ? "" : " (no IOAPIC pin for this irq: polling only)");
        nr_virtio_devices++;
    }
}

/* SYS_VIRTIO_OPEN, with the caller's arguments checked for range (info is a user address). */
long virtio_open(unsigned cpu, struct process *process, uint64_t device_id, uint64_t nth, uint64_t dma_bytes,
                 struct virtio_open_info *info, uint64_t flags)
{
    if (dma_bytes > VIRTIO_DMA_MAX || flags & ~(uint64_t)VIRTIO_OPEN_IRQ)
        return -E_INVAL;
    struct virtio_device *device = 0;
    for (uint32_t index = 0; index < nr_virtio_devices; index++) {
        struct virtio_device *candidate = &virtio_devices[index];
        if (device_id ? candidate->device_id == device_id && !nth-- : index == nth) {
            device = candidate;
            break;
        }
    }
    if (!device)
        return -E_NODEV;
    if (device->owner || device->bound)
        return -E_BUSY; /* another address space has it, or the kernel drives it (the balloon) */
    uint64_t ioapic;
    uint32_t pin;
    if (flags & VIRTIO_OPEN_IRQ && !ioapic_pin(device->irq, &ioapic, &pin))
        return -E_INVAL;
    struct mm *mm = process->mm;
    uint64_t register_page = device->base & ~(PAGE_SIZE - 1);
    uint64_t register_pages = (device->base + device->size - register_page + PAGE_SIZE - 1) / PAGE_SIZE;
    uint64_t dma_pages = (dma_bytes + PAGE_SIZE - 1) / PAGE_SIZE;
    uint64_t start = (mm->mmap_next + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1);
    uint64_t end = start + (register_pages + dma_pages) * PAGE_SIZE;
    if (mm->nr_vmas == MAX_VMAS || end > USER_MMAP_END)
        return -E_NOMEM;
    uint64_t dma_phys = 0;
    if (dma_pages && !(dma_phys = page_alloc_contiguous(dma_pages)))
        return -E_NOMEM;
    mm_add_vma(mm, start, end, 0); /* every page is present: nothing in it is demand-zero */
    mm_map_range(mm, start, register_page, register_pages,
                 PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_PWT | PTE_PCD | PTE_ACCESSED | PTE_DIRTY | PTE_NX);
    if (dma_pages)
        mm_map_owned(mm, start + register_pages * PAGE_SIZE, dma_phys, dma_pages);
    mm->mmap_next = end;
    device->owner = mm;
    device->owner_pid = process->pid;
    device->dma_phys = dma_phys;
    device->dma_size = dma_pages * PAGE_SIZE;
    device->pending = 0;
    device->waiter = 0;
    if (flags & VIRTIO_OPEN_IRQ)
        route(device, cpu);
    info->regs = start + (device->base - register_page);
    info->dma = dma_pages ? start + register_pages * PAGE_SIZE : 0;
    info->dma_phys = dma_phys;
    info->dma_size = device->dma_size;
    info->base = device->base;
    info->size = device->size;
    info->index = (uint32_t)(device - virtio_devices);
    info->device_id = device->device_id;
    info->irq = device->irq;
    info->vector = device->vector;
    return info->index;
}

/* SYS_VIRTIO_WAIT: interrupts already counted are returned at once; otherwise the caller sleeps until the
   next one (virtio_interrupt sets its result) or the timeout (the result stays 0). */
long virtio_wait(unsigned cpu, struct process *process, struct trap_frame *frame, uint64_t index,
                 uint64_t timeout_ms)
{
    if (index >= nr_virtio_devices)
        return -E_INVAL;
    struct virtio_device *device = &virtio_devices[index];
    if (device->owner != process->mm)
        return -E_PERM;
    if (!device->vector)
        return -E_INVAL;
    if (device->pending) {
        long count = device->pending;
        device->pending = 0;
        return count;
    }
    if (!timeout_ms)
        return 0;
    if (device->waiter)
        return -E_BUSY;
    if (device->cpu != cpu)
        route(device, cpu); /* the process moved: follow it, so the interrupt wakes the vCPU it sleeps on */
    device->waiter = process;
    waiting++;
    uint64_t tick = ~0ull;
    if (timeout_ms < (1ull << 32))
        tick = os_info.jiffies + (timeout_ms * os_options.hz + 999) / 1000;
    frame->rax = 0;
    sleep_until(process, tick);
    schedule(cpu, frame);
}

/* The interrupt of device `index` on vCPU `cpu` (the kernel lock is held, the EOI sent). */
void virtio_interrupt(unsigned cpu, unsigned index, struct trap_frame *frame)
{
    struct virtio_device *device = &virtio_devices[index];
    device->interrupts++;
    if (device->bound) {
        balloon_interrupt();
        return;
    }
    struct process *waiter = device->waiter;
    if (!waiter) {
        device->pending++;
        return;
    }
    device->waiter = 0;
    waiting--;
    process_frame(waiter)->rax = device->pending + 1;
    device->pending = 0;
    wake_process(waiter);
    if (!cpus[cpu].current)
        schedule(cpu, frame); /* an idle vCPU runs it now rather than at its next tick */
}

/* A SYS_VIRTIO_WAIT sleeper woken by its timeout (wake_sleepers) stops being the device's waiter. */
void virtio_wait_timed_out(const struct process *process)
{
    if (!waiting)
        return;
    for (uint32_t index = 0; index < nr_virtio_devices; index++) {
        if (virtio_devices[index].waiter == process) {
            virtio_devices[index].waiter = 0;
            waiting--;
        }
    }
}

/* The last user of an address space exited (also with keepmm): reset its devices, so that they stop using
   its DMA pages, mask their interrupts and make them free for another process. */
void virtio_release(const struct mm *mm)
{
    for (uint32_t index = 0; index < nr_virtio_devices; index++) {
        struct virtio_device *device = &virtio_devices[index];
        if (device->owner != mm)
            continue;
        mmio_write(device->base + REG_STATUS, 0);
        mask(device);
        device->owner = 0;
        device->owner_pid = 0;
        device->pending = 0;
    }
}

/* A kernel driver takes the first device with this id: no process can open it, its interrupt goes to the driver
   (routed to vCPU `cpu`, if it has an IOAPIC pin). */
struct virtio_device *virtio_bind_kernel(uint32_t device_id, unsigned cpu)
{
    for (uint32_t index = 0; index < nr_virtio_devices; index++) {
        struct virtio_device *device = &virtio_devices[index];
        if (device->device_id != device_id || device->owner || device->bound)
            continue;
        device->bound = 1;
        route(device, cpu);
        return device;
    }
    return 0;
}

void virtio_summary(void)
{
    for (uint32_t index = 0; index < nr_virtio_devices; index++) {
        const struct virtio_device *device = &virtio_devices[index];
        kprintf("os: virtio %u (%s): %lu interrupts\n", index, device_name(device->device_id), device->interrupts);
    }
}
