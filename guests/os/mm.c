/* Memory: a bump allocator over never-used (hence zero) RAM, reuse of pages the host has zeroed
   (the page-discard port), per-process page tables sharing the kernel half, demand-zero faults,
   and tearing an address space down. No memory is ever cleared at (emulated) CPL0. */
#include <pyrovisor/io.h>

#include "kernel.h"

#define DISCARD_PORT 0x518
#define DISCARD_SIGNATURE 0x43534944u /* "DISC" */
#define DISCARD_BATCH 32
#define FREE_RUNS 256
#define FREE_HUGE 64
#define TABLE_FLAGS (PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED)
#define DATA_FLAGS (PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_NX | PTE_OWNED)
#define KERNEL_PML4_DIRECT 273 /* the direct map: 0xffff888000000000 */
#define KERNEL_PML4_KERNEL 511 /* the kernel map: 0xffffffff80000000 */

struct mm mm_table[MAX_PROCS];

/* What the page-discard device reads: ranges of pages the guest no longer needs; it zeroes them. */
struct discard_request {
    uint32_t count;
    uint32_t reserved;
    struct {
        uint64_t gpa;
        uint64_t pages;
    } ranges[DISCARD_BATCH];
};

struct page_run {
    uint64_t phys;
    uint64_t pages;
};

static struct discard_request discard;
static struct page_run free_runs[FREE_RUNS];
static unsigned free_run_count;
static uint64_t free_huge[FREE_HUGE];
static unsigned free_huge_count;
static int discard_present = -1; /* unknown until the first release */
static uint64_t ram_low, ram_high; /* the allocatable range */

void mm_init(void)
{
    const struct pyrovisor_boot_info *boot = boot_info;
    uint64_t start = boot->kernel_end, end = boot->ram[0].gpa + boot->ram[0].size;
    uint64_t initrd_start = boot->initrd_gpa, initrd_end = boot->initrd_gpa + boot->initrd_size;
    if (boot->initrd_size && initrd_end > start && initrd_start < end) {
        if (initrd_start - start >= end - initrd_end) /* keep the larger side of the archive */
            end = initrd_start;
        else
            start = initrd_end;
    }
    ram_low = (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    ram_high = end & ~(HUGE_SIZE - 1);
    os_info.free_next = ram_low;
    os_info.huge_next = ram_high;
}

static void __attribute__((noreturn)) out_of_memory(void)
{
    kprintf("os: out of memory (%lu KiB left between the 4 KiB and 2 MiB allocators)\n",
            (os_info.huge_next - os_info.free_next) >> 10);
    kernel_stop(OS_EXIT_PANIC);
}

uint64_t page_alloc(void)
{
    if (free_run_count) {
        struct page_run *run = &free_runs[free_run_count - 1];
        uint64_t phys = run->phys;
        run->phys += PAGE_SIZE;
        if (!--run->pages)
            free_run_count--;
        os_info.pages_reused++;
        return phys;
    }
    if (os_info.free_next + PAGE_SIZE > os_info.huge_next)
        out_of_memory();
    uint64_t phys = os_info.free_next;
    os_info.free_next += PAGE_SIZE;
    return phys;
}

/* Up to `wanted` contiguous zeroed pages; returns the first and sets *count (at least 1). */
static uint64_t page_alloc_run(uint64_t wanted, uint64_t *count)
{
    if (free_run_count) {
        struct page_run *run = &free_runs[free_run_count - 1];
        uint64_t phys = run->phys, taken = run->pages < wanted ? run->pages : wanted;
        run->phys += taken * PAGE_SIZE;
        run->pages -= taken;
        if (!run->pages)
            free_run_count--;
        os_info.pages_reused += taken;
        *count = taken;
        return phys;
    }
    uint64_t room = (os_info.huge_next - os_info.free_next) / PAGE_SIZE;
    if (!room)
        out_of_memory();
    uint64_t phys = os_info.free_next;
    *count = room < wanted ? room : wanted;
    os_info.free_next += *count * PAGE_SIZE;
    return phys;
}

uint64_t page_alloc_contiguous(uint64_t pages)
{
    for (unsigned index = 0; index < free_run_count; index++) {
        struct page_run *run = &free_runs[index];
        if (run->pages < pages)
            continue;
        uint64_t phys = run->phys;
        run->phys += pages * PAGE_SIZE;
        run->pages -= pages;
        if (!run->pages)
            free_runs[index] = free_runs[--free_run_count];
        os_info.pages_reused += pages;
        return phys;
    }
    /* Fresh pages, leaving room for the page tables that will map them. */
    if ((os_info.huge_next - os_info.free_next) / PAGE_SIZE < pages + pages / 512 + 8)
        return 0;
    uint64_t phys = os_info.free_next;
    os_info.free_next += pages * PAGE_SIZE;
    return phys;
}

uint64_t huge_alloc(void)
{
    if (free_huge_count) {
        os_info.pages_reused += 512;
        return free_huge[--free_huge_count];
    }
    if (os_info.huge_next < os_info.free_next + HUGE_SIZE)
        out_of_memory();
    os_info.huge_next -= HUGE_SIZE;
    return os_info.huge_next;
}

bool mm_is_ram(uint64_t phys, uint64_t length)
{
    for (uint32_t index = 0; index < boot_info->nr_ram_ranges; index++) {
        const struct pyrovisor_ram_range *ram = &boot_info->ram[index];
        if (phys < ram->gpa + ram->size && ram->gpa < phys + length)
            return true;
    }
    return false;
}

/* Pages go back on the free lists only after the host zeroed them; without the device they are
   simply not reused (zeroing them here, at emulated CPL0, would cost about a millisecond a page). */
static void discard_flush(void)
{
    if (!discard.count)
        return;
    if (discard_present < 0)
        discard_present = inl(DISCARD_PORT) == DISCARD_SIGNATURE;
    if (discard_present) {
        outl(DISCARD_PORT, (uint32_t)kernel_to_phys(&discard));
        for (uint32_t index = 0; index < discard.count; index++) {
            uint64_t phys = discard.ranges[index].gpa, pages = discard.ranges[index].pages;
            os_info.pages_discarded += pages;
            if (pages == 512 && !(phys & (HUGE_SIZE - 1)) && free_huge_count < FREE_HUGE) {
                free_huge[free_huge_count++] = phys;
            } else if (free_run_count < FREE_RUNS) {
                free_runs[free_run_count++] = (struct page_run){phys, pages};
            }
        }
    }
    discard.count = 0;
}

static void release_pages(uint64_t phys, uint64_t pages)
{
    if (discard.count) {
        uint64_t *last_pages = &discard.ranges[discard.count - 1].pages;
        if (discard.ranges[discard.count - 1].gpa + *last_pages * PAGE_SIZE == phys && pages != 512 &&
            *last_pages != 512) {
            *last_pages += pages;
            return;
        }
    }
    if (discard.count == DISCARD_BATCH)
        discard_flush();
    discard.ranges[discard.count].gpa = phys;
    discard.ranges[discard.count].pages = pages;
    discard.count++;
}

/* The entry for `va` at the level whose entries map 1 << shift bytes, creating tables on the way. */
static uint64_t *walk(struct mm *mm, uint64_t va, unsigned stop_shift, bool create)
{
    uint64_t *table = phys_to_virt(mm->cr3);
    for (unsigned shift = 39; shift > stop_shift; shift -= 9) {
        uint64_t *entry = &table[(va >> shift) & 511];
        if (!(*entry & PTE_PRESENT)) {
            if (!create)
                return 0;
            *entry = page_alloc() | TABLE_FLAGS;
            mm->table_pages++;
        } else if (*entry & PTE_HUGE) {
            return 0;
        }
        table = phys_to_virt(*entry & PTE_ADDRESS);
    }
    return &table[(va >> stop_shift) & 511];
}

struct mm *mm_create(void)
{
    struct mm *mm = 0;
    for (unsigned slot = 0; slot < MAX_PROCS; slot++) {
        if (!mm_table[slot].cr3) {
            mm = &mm_table[slot];
            break;
        }
    }
    if (!mm)
        return 0;
    mm->cr3 = page_alloc();
    mm->table_pages = 1;
    mm->nr_vmas = 0;
    mm->pages_mapped = 0;
    mm->mmap_next = USER_MMAP_BASE;
    uint64_t *pml4 = phys_to_virt(mm->cr3);
    pml4[KERNEL_PML4_DIRECT] = kernel_pml4[KERNEL_PML4_DIRECT];
    pml4[KERNEL_PML4_KERNEL] = kernel_pml4[KERNEL_PML4_KERNEL];
    /* The SYSCALL entry page and the command line, shared by every process. */
    mm_map_page(mm, USER_ENTRY_VA, kernel_to_phys(user_entry_page), PTE_PRESENT | PTE_USER | PTE_ACCESSED);
    mm_map_page(mm, USER_ARGS_VA, boot_info->cmdline_gpa & PTE_ADDRESS,
                PTE_PRESENT | PTE_USER | PTE_ACCESSED | PTE_NX);
    mm_add_vma(mm, USER_ARGS_VA, USER_TOP, 0);
    mm_add_vma(mm, USER_STACK_TOP - USER_STACK_SIZE, USER_STACK_TOP, VMA_WRITE);
    return mm;
}

bool mm_map_page(struct mm *mm, uint64_t va, uint64_t phys, uint64_t flags)
{
    return mm_map_range(mm, va, phys, 1, flags);
}

bool mm_map_range(struct mm *mm, uint64_t va, uint64_t phys, uint64_t pages, uint64_t flags)
{
    uint64_t *entry = 0;
    for (uint64_t page = 0; page < pages; page++, va += PAGE_SIZE) {
        if (!entry || !(va & (HUGE_SIZE - 1))) { /* one walk per page table */
            entry = walk(mm, va, 12, true);
            if (!entry)
                return false;
        }
        *entry++ = (phys + page * PAGE_SIZE) | flags;
    }
    return true;
}

bool mm_add_vma(struct mm *mm, uint64_t start, uint64_t end, uint32_t flags)
{
    if (mm->nr_vmas == MAX_VMAS)
        return false;
    mm->vmas[mm->nr_vmas++] = (struct vma){start, end, flags, 0};
    return true;
}

void mm_map_owned(struct mm *mm, uint64_t va, uint64_t phys, uint64_t pages)
{
    mm_map_range(mm, va, phys, pages, DATA_FLAGS);
    mm->pages_mapped += pages;
}

bool mm_handle_fault(struct mm *mm, uint64_t address, uint64_t error_code)
{
    if (error_code & 1) /* a protection fault on a present page */
        return false;
    const struct vma *vma = 0;
    for (uint32_t index = 0; index < mm->nr_vmas; index++) {
        if (address >= mm->vmas[index].start && address < mm->vmas[index].end) {
            vma = &mm->vmas[index];
            break;
        }
    }
    if (!vma || !(vma->flags & VMA_WRITE))
        return false;
    if (vma->flags & VMA_HUGE) {
        uint64_t *entry = walk(mm, address, 21, true);
        if (!entry)
            return false;
        if (!(*entry & PTE_PRESENT)) { /* else another vCPU got there first */
            *entry = huge_alloc() | DATA_FLAGS | PTE_HUGE;
            mm->pages_mapped += 512;
        }
    } else {
        uint64_t *entry = walk(mm, address, 12, true);
        if (!entry)
            return false;
        /* Fault-around: map the following pages of the same region and page table too, while they are
           unmapped. Each costs a few emulated instructions; a fault costs hundreds of microseconds. */
        uint64_t page = address & ~(PAGE_SIZE - 1);
        uint64_t last = page + (os_options.faultaround - 1) * PAGE_SIZE;
        uint64_t table_end = (page | (HUGE_SIZE - 1)) - (PAGE_SIZE - 1);
        if (last > vma->end - PAGE_SIZE)
            last = vma->end - PAGE_SIZE;
        if (last > table_end)
            last = table_end;
        uint64_t wanted = 0;
        while (page + wanted * PAGE_SIZE <= last && !(entry[wanted] & PTE_PRESENT))
            wanted++;
        while (wanted) {
            uint64_t count, phys = page_alloc_run(wanted, &count);
            mm->pages_mapped += count;
            wanted -= count;
            for (uint64_t *stop = entry + count; entry < stop; entry++, phys += PAGE_SIZE)
                *entry = phys | DATA_FLAGS;
        }
    }
    invlpg(address);
    return true;
}

/* Frees what an address space owns, walking only its regions: leaf pages marked PTE_OWNED, then the
   page tables themselves. The caller makes sure no vCPU has this CR3 loaded. */
void mm_release(struct mm *mm)
{
    for (uint32_t index = 0; index < mm->nr_vmas; index++) {
        const struct vma *vma = &mm->vmas[index];
        for (uint64_t slot = vma->start & ~(HUGE_SIZE - 1); slot < vma->end; slot += HUGE_SIZE) {
            uint64_t *pde = walk(mm, slot, 21, false);
            if (!pde || !(*pde & PTE_PRESENT))
                continue;
            if (*pde & PTE_HUGE) {
                if (*pde & PTE_OWNED)
                    release_pages(*pde & PTE_ADDRESS, 512);
                *pde = 0;
                continue;
            }
            uint64_t *pt = phys_to_virt(*pde & PTE_ADDRESS);
            uint64_t first = slot < vma->start ? (vma->start >> 12) & 511 : 0;
            uint64_t last = slot + HUGE_SIZE > vma->end ? ((vma->end - 1) >> 12) & 511 : 511;
            for (uint64_t pte = first; pte <= last; pte++) {
                if ((pt[pte] & (PTE_PRESENT | PTE_OWNED)) == (PTE_PRESENT | PTE_OWNED))
                    release_pages(pt[pte] & PTE_ADDRESS, 1);
            }
        }
    }
    /* The tables: page tables, then directories, then PDPTs, each once (regions may share them). */
    for (unsigned stop = 21; stop <= 39; stop += 9) {
        for (uint32_t index = 0; index < mm->nr_vmas; index++) {
            const struct vma *vma = &mm->vmas[index];
            uint64_t step = 1ull << stop;
            for (uint64_t slot = vma->start & ~(step - 1); slot < vma->end; slot += step) {
                uint64_t *entry = walk(mm, slot, stop, false);
                if (entry && (*entry & PTE_PRESENT)) {
                    release_pages(*entry & PTE_ADDRESS, 1);
                    *entry = 0;
                }
            }
        }
    }
    release_pages(mm->cr3, 1);
    discard_flush();
    mm->cr3 = 0;
    mm->nr_vmas = 0;
}
