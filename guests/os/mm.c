/* Memory: a bump allocator over never-used (hence zero) RAM; free lists of zeroed pages (freed pages the
   host zeroed through the page-discard port) and of pages whose content is unknown ("not-zero": pages the
   balloon gave back, reclaimed cache, freed pages without the discard device), which are cleared when they are
   used again (by the discard device, in user mode by the faulting process, or at CPL0 as a last resort);
   per-process page tables sharing the kernel half, demand-zero faults, reclaimable cache regions, and tearing
   an address space down. Nothing here clears memory at (emulated) CPL0 unless nothing else can. */
#include <pyrovisor/io.h>

#include "kernel.h"

#define DISCARD_PORT 0x518
#define DISCARD_SIGNATURE 0x43534944u /* "DISC" */
#define DISCARD_BATCH 32
#define FREE_RUNS 256
#define MAX_CHUNKS 8192     /* 2 MiB chunks a free list holds: 16 GiB */
#define CHUNK_PAGES 512
#define BALLOON_RESERVE 512 /* free pages the balloon never takes (page tables, small allocations) */
#define REPORT_MIN_RUN 256  /* free runs of at least 1 MiB are reported, besides whole chunks */
#define TABLE_FLAGS (PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED)
#define DATA_FLAGS (PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_NX | PTE_OWNED)
#define KERNEL_PML4_DIRECT 273 /* the direct map: 0xffff888000000000 */
#define KERNEL_PML4_KERNEL 511 /* the kernel map: 0xffffffff80000000 */

struct mm mm_table[MAX_PROCS];
struct mm_counts mm_counts;

/* What the page-discard device reads: ranges of pages the guest no longer needs; it zeroes them. */
struct discard_request {
    uint32_t count;
    uint32_t reserved;
    struct {
        uint64_t gpa;
        uint64_t pages;
    } ranges[DISCARD_BATCH];
};

/* Free memory comes in two kinds, each as whole 2 MiB chunks (a stack) and as runs of 4 KiB pages. A chunk
   stack keeps the chunks already reported to the balloon device below `reported`, so that reporting goes
   through each free chunk once and allocations take unreported (host-backed) chunks first. */
enum { CLEAN = 0, DIRTY = 1 };

struct chunk_stack {
    uint32_t count;
    uint32_t reported;
    uint32_t items[MAX_CHUNKS]; /* physical address >> 21 */
};

struct page_run {
    uint64_t phys;
    uint32_t pages;
    uint32_t reported;
};

struct run_list {
    uint32_t count;
    struct page_run runs[FREE_RUNS];
};

static struct discard_request discard;
static struct chunk_stack chunks[2];
static struct run_list runs[2];
static uint64_t list_pages[2];    /* pages on each kind's lists */
static uint64_t reporting_pages;  /* free pages off the lists while the balloon device looks at them */
static int discard_present = -1;  /* unknown until first needed */
static uint64_t ram_low, ram_high; /* the allocatable range */

static bool reclaim(uint64_t wanted, bool chunk);
static uint64_t cache_reclaim(uint64_t wanted, bool chunks_only);

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
    for (uint32_t index = 0; index < boot->nr_ram_ranges; index++)
        mm_counts.ram_pages += boot->ram[index].size / PAGE_SIZE;
}

void mm_ram_range(uint64_t *low, uint64_t *high)
{
    *low = ram_low;
    *high = ram_high;
}

static uint64_t gap_pages(void) { return (os_info.huge_next - os_info.free_next) / PAGE_SIZE; }

uint64_t mm_free_pages(void) { return gap_pages() + list_pages[CLEAN] + list_pages[DIRTY] + reporting_pages; }

bool mm_discard_present(void)
{
    if (discard_present < 0)
        discard_present = inl(DISCARD_PORT) == DISCARD_SIGNATURE;
    return discard_present;
}

static void __attribute__((noreturn)) out_of_memory(void)
{
    kprintf("os: out of memory (%lu KiB left between the 4 KiB and 2 MiB allocators, %lu KiB free in all)\n",
            (os_info.huge_next - os_info.free_next) >> 10, mm_free_pages() * 4);
    kernel_stop(OS_EXIT_PANIC);
}

/* --- the free lists ------------------------------------------------------------------------------------------ */

static void run_push(int kind, uint64_t phys, uint64_t pages, bool reported)
{
    struct run_list *list = &runs[kind];
    if (list->count) {
        struct page_run *last = &list->runs[list->count - 1];
        if (!reported && !last->reported && last->phys + (uint64_t)last->pages * PAGE_SIZE == phys &&
            last->pages + pages < (1ull << 32)) {
            last->pages += (uint32_t)pages;
            list_pages[kind] += pages;
            return;
        }
    }
    if (list->count == FREE_RUNS || pages >= (1ull << 32)) {
        mm_counts.lost_pages += pages; /* never reused; the summary says how many */
        return;
    }
    list->runs[list->count++] = (struct page_run){phys, (uint32_t)pages, reported};
    list_pages[kind] += pages;
}

/* Up to `wanted` pages from the newest run of a kind; returns how many (0: none), their address in *phys. */
static uint64_t run_take(int kind, uint64_t wanted, uint64_t *phys)
{
    struct run_list *list = &runs[kind];
    if (!list->count)
        return 0;
    struct page_run *run = &list->runs[list->count - 1];
    uint64_t taken = run->pages < wanted ? run->pages : wanted;
    *phys = run->phys;
    run->phys += taken * PAGE_SIZE;
    run->pages -= (uint32_t)taken;
    if (!run->pages)
        list->count--;
    list_pages[kind] -= taken;
    return taken;
}

static void chunk_push(int kind, uint64_t phys, bool reported)
{
    struct chunk_stack *stack = &chunks[kind];
    if (stack->count == MAX_CHUNKS) {
        run_push(kind, phys, CHUNK_PAGES, reported);
        return;
    }
    uint32_t chunk = (uint32_t)(phys >> 21);
    if (reported) { /* below the mark: move the first unreported one to the top */
        stack->items[stack->count++] = stack->items[stack->reported];
        stack->items[stack->reported++] = chunk;
    } else {
        stack->items[stack->count++] = chunk;
    }
    list_pages[kind] += CHUNK_PAGES;
}

static bool chunk_pop(int kind, uint64_t *phys, bool *reported)
{
    struct chunk_stack *stack = &chunks[kind];
    if (!stack->count)
        return false;
    *phys = (uint64_t)stack->items[--stack->count] << 21;
    bool was_reported = stack->reported > stack->count;
    if (was_reported)
        stack->reported = stack->count;
    if (reported)
        *reported = was_reported;
    list_pages[kind] -= CHUNK_PAGES;
    return true;
}

/* A free range onto a kind's lists: its aligned 2 MiB chunks as chunks, the rest as runs. */
static void free_range(int kind, uint64_t phys, uint64_t pages, bool reported)
{
    uint64_t end = phys + pages * PAGE_SIZE;
    uint64_t first = (phys + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1), last = end & ~(HUGE_SIZE - 1);
    if (first >= last) {
        run_push(kind, phys, pages, reported);
        return;
    }
    if (phys < first)
        run_push(kind, phys, (first - phys) / PAGE_SIZE, reported);
    for (uint64_t chunk = first; chunk < last; chunk += HUGE_SIZE)
        chunk_push(kind, chunk, reported);
    if (last < end)
        run_push(kind, last, (end - last) / PAGE_SIZE, reported);
}

/* --- the page-discard device ---------------------------------------------------------------------------------- */

/* Pages go back on the zeroed lists only after the host zeroed them; without the device they go on the not-zero
   lists, to be cleared when used again (zeroing them here, at emulated CPL0, costs about 0.33 ms a page). */
static void discard_flush(void)
{
    if (!discard.count)
        return;
    bool present = mm_discard_present();
    if (present)
        outl(DISCARD_PORT, (uint32_t)kernel_to_phys(&discard));
    for (uint32_t index = 0; index < discard.count; index++) {
        uint64_t phys = discard.ranges[index].gpa, pages = discard.ranges[index].pages;
        if (present)
            os_info.pages_discarded += pages;
        free_range(present ? CLEAN : DIRTY, phys, pages, false);
    }
    discard.count = 0;
}

static void release_pages(uint64_t phys, uint64_t pages)
{
    if (discard.count) {
        uint64_t *last_pages = &discard.ranges[discard.count - 1].pages;
        if (discard.ranges[discard.count - 1].gpa + *last_pages * PAGE_SIZE == phys) {
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

/* With the discard device: not-zero pages (at least `wanted`, whole chunks only if `chunk`) become zeroed ones. */
static bool clean_dirty(uint64_t wanted, bool chunk)
{
    uint64_t moved = 0, phys;
    while (moved < wanted) {
        if (chunk_pop(DIRTY, &phys, 0)) {
            release_pages(phys, CHUNK_PAGES);
            moved += CHUNK_PAGES;
            continue;
        }
        uint64_t count;
        if (chunk || !(count = run_take(DIRTY, ~0ull, &phys)))
            break;
        release_pages(phys, count);
        moved += count;
    }
    discard_flush();
    return moved != 0;
}

/* --- allocation ------------------------------------------------------------------------------------------------ */

void mm_zero_cpl0(uint64_t va, uint64_t bytes)
{
    uint64_t count = bytes / 8;
    void *destination = (void *)va;
    __asm__ volatile("rep stosq" : "+D"(destination), "+c"(count) : "a"(0ull) : "memory");
    mm_counts.zeroed_kernel += bytes / PAGE_SIZE;
}

/* Up to `wanted` contiguous free pages (at least 1): returns the first and sets *count; *dirty when their
   content is unknown (only without the discard device). Zeroed pages first, then never-used ones, then
   not-zero ones, then reclaimed cache, then pages the balloon gives back; stops the VM when there is none. */
static uint64_t alloc_run(uint64_t wanted, uint64_t *count, bool *dirty)
{
    for (;;) {
        uint64_t phys;
        bool reported;
        *dirty = false;
        if ((*count = run_take(CLEAN, wanted, &phys))) {
            os_info.pages_reused += *count;
            return phys;
        }
        uint64_t room = gap_pages();
        if (room) {
            phys = os_info.free_next;
            *count = room < wanted ? room : wanted;
            os_info.free_next += *count * PAGE_SIZE;
            return phys;
        }
        for (int kind = CLEAN; kind <= DIRTY; kind++) {
            if (kind == DIRTY && mm_discard_present())
                break;
            if ((*count = run_take(kind, wanted, &phys))) {
                *dirty = kind == DIRTY;
                return phys;
            }
            if (chunk_pop(kind, &phys, &reported)) {
                *count = wanted < CHUNK_PAGES ? wanted : CHUNK_PAGES;
                if (*count < CHUNK_PAGES)
                    run_push(kind, phys + *count * PAGE_SIZE, CHUNK_PAGES - *count, reported);
                if (kind == CLEAN)
                    os_info.pages_reused += *count;
                *dirty = kind == DIRTY;
                return phys;
            }
        }
        if (list_pages[DIRTY] && clean_dirty(wanted, false))
            continue;
        if (!reclaim(wanted, false))
            out_of_memory();
    }
}

/* One free 2 MiB chunk; *dirty as for alloc_run. */
static uint64_t alloc_chunk(bool *dirty)
{
    for (;;) {
        uint64_t phys;
        *dirty = false;
        if (chunk_pop(CLEAN, &phys, 0)) {
            os_info.pages_reused += CHUNK_PAGES;
            return phys;
        }
        if (os_info.huge_next >= os_info.free_next + HUGE_SIZE) {
            os_info.huge_next -= HUGE_SIZE;
            return os_info.huge_next;
        }
        if (chunks[DIRTY].count) {
            if (mm_discard_present()) {
                clean_dirty(CHUNK_PAGES, true);
                continue;
            }
            chunk_pop(DIRTY, &phys, 0);
            *dirty = true;
            return phys;
        }
        if (!reclaim(CHUNK_PAGES, true))
            out_of_memory();
    }
}

uint64_t page_alloc(void)
{
    uint64_t count;
    bool dirty;
    uint64_t phys = alloc_run(1, &count, &dirty);
    if (dirty)
        mm_zero_cpl0((uint64_t)phys_to_virt(phys), PAGE_SIZE);
    return phys;
}

uint64_t page_alloc_contiguous(uint64_t pages)
{
    struct run_list *list = &runs[CLEAN];
    for (unsigned index = 0; index < list->count; index++) {
        struct page_run *run = &list->runs[index];
        if (run->pages < pages)
            continue;
        uint64_t phys = run->phys;
        run->phys += pages * PAGE_SIZE;
        run->pages -= (uint32_t)pages;
        if (!run->pages)
            list->runs[index] = list->runs[--list->count];
        list_pages[CLEAN] -= pages;
        os_info.pages_reused += pages;
        return phys;
    }
    /* Fresh pages, leaving room for the page tables that will map them. */
    if (gap_pages() < pages + pages / 512 + 8)
        return 0;
    uint64_t phys = os_info.free_next;
    os_info.free_next += pages * PAGE_SIZE;
    return phys;
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

/* --- the balloon's side ----------------------------------------------------------------------------------------- */

/* Pages for the balloon, whatever their content: not-zero ones first (they cost nothing to give away), then
   zeroed ones, then never-used ones; whole chunks while `wanted` allows, else 4 KiB pages. */
uint64_t mm_balloon_take(uint64_t wanted, uint64_t *phys)
{
    uint64_t free = mm_free_pages() - reporting_pages;
    if (free <= BALLOON_RESERVE + (wanted < CHUNK_PAGES ? wanted : CHUNK_PAGES) &&
        mm_counts.cache_pages && cache_reclaim(CHUNK_PAGES, false)) /* like an allocation: cache goes first */
        free = mm_free_pages() - reporting_pages;
    if (free <= BALLOON_RESERVE)
        return 0;
    if (wanted > free - BALLOON_RESERVE)
        wanted = free - BALLOON_RESERVE;
    bool reported;
    if (wanted >= CHUNK_PAGES) {
        if (chunk_pop(DIRTY, phys, 0) || chunk_pop(CLEAN, phys, 0))
            return CHUNK_PAGES;
        if (os_info.huge_next >= os_info.free_next + HUGE_SIZE) {
            os_info.huge_next -= HUGE_SIZE;
            *phys = os_info.huge_next;
            return CHUNK_PAGES;
        }
    }
    uint64_t count;
    if ((count = run_take(DIRTY, wanted, phys)) || (count = run_take(CLEAN, wanted, phys)))
        return count;
    uint64_t room = gap_pages();
    if (room) {
        count = room < wanted ? room : wanted;
        *phys = os_info.free_next;
        os_info.free_next += count * PAGE_SIZE;
        return count;
    }
    for (int kind = DIRTY; kind >= CLEAN; kind--) {
        if (chunk_pop(kind, phys, &reported)) {
            count = wanted < CHUNK_PAGES ? wanted : CHUNK_PAGES;
            if (count < CHUNK_PAGES)
                run_push(kind, *phys + count * PAGE_SIZE, CHUNK_PAGES - count, reported);
            return count;
        }
    }
    return 0;
}

void mm_balloon_give(uint64_t phys, uint64_t pages) { free_range(DIRTY, phys, pages, false); }

/* --- free page reporting ------------------------------------------------------------------------------------------- */

unsigned mm_report_take(struct mm_range *ranges, unsigned capacity, bool clean_too)
{
    unsigned count = 0;
    for (int kind = DIRTY; kind >= (clean_too ? CLEAN : DIRTY); kind--) {
        struct chunk_stack *stack = &chunks[kind];
        while (count < capacity && stack->count > stack->reported) {
            uint64_t phys;
            chunk_pop(kind, &phys, 0);
            ranges[count++] = (struct mm_range){phys, CHUNK_PAGES, kind == DIRTY, 1};
            reporting_pages += CHUNK_PAGES;
        }
        struct run_list *list = &runs[kind];
        for (unsigned index = 0; index < list->count && count < capacity;) {
            struct page_run *run = &list->runs[index];
            if (run->reported || run->pages < REPORT_MIN_RUN || run->pages >= (1u << 19)) {
                index++;
                continue;
            }
            ranges[count++] = (struct mm_range){run->phys, run->pages, kind == DIRTY, 0};
            reporting_pages += run->pages;
            list_pages[kind] -= run->pages;
            *run = list->runs[--list->count];
        }
    }
    return count;
}

void mm_report_return(const struct mm_range *ranges, unsigned count, bool stay_clean)
{
    for (unsigned index = 0; index < count; index++) {
        const struct mm_range *range = &ranges[index];
        int kind = range->dirty || !stay_clean ? DIRTY : CLEAN;
        reporting_pages -= range->pages;
        if (range->chunk)
            chunk_push(kind, range->phys, true);
        else
            run_push(kind, range->phys, range->pages, true);
    }
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

bool mm_handle_fault(struct mm *mm, uint64_t address, uint64_t error_code, uint64_t *zero_va, uint64_t *zero_bytes)
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
    uint64_t first = 0, bytes = 0; /* what must still be cleared */
    if (vma->flags & VMA_HUGE) {
        uint64_t *entry = walk(mm, address, 21, true);
        if (!entry)
            return false;
        if (!(*entry & PTE_PRESENT)) { /* else another vCPU got there first */
            bool dirty;
            uint64_t phys = alloc_chunk(&dirty);
            *entry = phys | DATA_FLAGS | PTE_HUGE;
            mm->pages_mapped += CHUNK_PAGES;
            mm_counts.huge_allocs++;
            if (vma->flags & VMA_CACHE)
                mm_counts.cache_pages += CHUNK_PAGES;
            if (dirty) {
                first = address & ~(HUGE_SIZE - 1);
                bytes = HUGE_SIZE;
            }
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
        if (vma->flags & VMA_CACHE)
            mm_counts.cache_pages += wanted;
        mm->pages_mapped += wanted;
        for (uint64_t va = page; wanted;) {
            uint64_t count;
            bool dirty;
            uint64_t phys = alloc_run(wanted, &count, &dirty);
            if (dirty) { /* one range covers every not-zero part (zeroed pages cleared again cost little) */
                if (!bytes)
                    first = va;
                bytes = va + count * PAGE_SIZE - first;
            }
            wanted -= count;
            va += count * PAGE_SIZE;
            for (uint64_t *stop = entry + count; entry < stop; entry++, phys += PAGE_SIZE)
                *entry = phys | DATA_FLAGS;
        }
    }
    invlpg(address);
    if (bytes) {
        if (zero_va) {
            *zero_va = first;
            *zero_bytes = bytes;
        } else {
            mm_zero_cpl0(first, bytes); /* the kernel's own access: mapped in the current address space */
        }
    }
    return true;
}

/* --- cache ------------------------------------------------------------------------------------------------------- */

/* Takes back pages of MAP_CACHE regions, like a clean page cache: they are unmapped (a later access faults in
   a fresh zeroed page) and freed (through the discard device, else as not-zero pages). Address spaces a vCPU
   has loaded right now are skipped: their TLBs would need flushing, and a cache program cannot evict the pages
   it is filling. Pages of sleeping processes are on no vCPU's CR3 (idle vCPUs load the kernel's). At least `wanted`
   pages if there are; only whole 2 MiB pages with `chunks_only`. Returns the pages freed. */
static uint64_t cache_reclaim(uint64_t wanted, bool chunks_only)
{
    static uint64_t resume[MAX_PROCS]; /* per address space: below this, its cache was taken already */
    if (!mm_counts.cache_pages)
        return 0;
    if (wanted < CHUNK_PAGES)
        wanted = CHUNK_PAGES; /* a page table's worth at a time: reclaiming is not free either */
    uint64_t freed = 0;
    for (unsigned pass = 0; pass < 2 && freed < wanted; pass++) {
        for (unsigned slot = 0; slot < MAX_PROCS && freed < wanted; slot++) {
            struct mm *mm = &mm_table[slot];
            if (!mm->cr3)
                continue;
            bool loaded = false;
            for (unsigned cpu = 0; cpu < os_info.nr_cpus; cpu++)
                loaded |= cpus[cpu].cr3 == mm->cr3;
            if (loaded)
                continue;
            if (pass)
                resume[slot] = 0; /* the second pass looks again at what was refaulted below the mark */
            for (uint32_t index = 0; index < mm->nr_vmas && freed < wanted; index++) {
                const struct vma *vma = &mm->vmas[index];
                if (!(vma->flags & VMA_CACHE) || vma->end <= resume[slot])
                    continue;
                uint64_t from = vma->start > resume[slot] ? vma->start : resume[slot];
                for (uint64_t slot_va = from & ~(HUGE_SIZE - 1); slot_va < vma->end && freed < wanted;
                     slot_va += HUGE_SIZE) {
                    resume[slot] = slot_va;
                    uint64_t *pde = walk(mm, slot_va, 21, false);
                    if (!pde || !(*pde & PTE_PRESENT))
                        continue;
                    if (*pde & PTE_HUGE) {
                        if (!(*pde & PTE_OWNED))
                            continue;
                        release_pages(*pde & PTE_ADDRESS, CHUNK_PAGES);
                        *pde = 0;
                        mm->pages_mapped -= CHUNK_PAGES;
                        mm_counts.cache_pages -= CHUNK_PAGES;
                        freed += CHUNK_PAGES;
                        continue;
                    }
                    if (chunks_only)
                        continue;
                    uint64_t *pt = phys_to_virt(*pde & PTE_ADDRESS);
                    for (uint64_t pte = 0; pte < 512; pte++) {
                        uint64_t va = slot_va + pte * PAGE_SIZE;
                        if (va < vma->start || va >= vma->end ||
                            (pt[pte] & (PTE_PRESENT | PTE_OWNED)) != (PTE_PRESENT | PTE_OWNED))
                            continue;
                        release_pages(pt[pte] & PTE_ADDRESS, 1);
                        pt[pte] = 0;
                        mm->pages_mapped--;
                        mm_counts.cache_pages--;
                        freed++;
                    }
                }
            }
        }
    }
    discard_flush();
    mm_counts.cache_reclaimed += freed;
    return freed;
}

/* An allocation would fail: cache first, then the balloon (DEFLATE_ON_OOM). */
static bool reclaim(uint64_t wanted, bool chunk)
{
    return cache_reclaim(wanted, chunk) || balloon_oom(wanted, chunk);
}

/* Frees what an address space owns, walking only its regions: leaf pages marked PTE_OWNED, then the
   page tables themselves. The caller makes sure no vCPU has this CR3 loaded. */
void mm_release(struct mm *mm)
{
    for (uint32_t index = 0; index < mm->nr_vmas; index++) {
        const struct vma *vma = &mm->vmas[index];
        bool cache = vma->flags & VMA_CACHE;
        for (uint64_t slot = vma->start & ~(HUGE_SIZE - 1); slot < vma->end; slot += HUGE_SIZE) {
            uint64_t *pde = walk(mm, slot, 21, false);
            if (!pde || !(*pde & PTE_PRESENT))
                continue;
            if (*pde & PTE_HUGE) {
                if (*pde & PTE_OWNED) {
                    release_pages(*pde & PTE_ADDRESS, CHUNK_PAGES);
                    if (cache)
                        mm_counts.cache_pages -= CHUNK_PAGES;
                }
                *pde = 0;
                continue;
            }
            uint64_t *pt = phys_to_virt(*pde & PTE_ADDRESS);
            uint64_t first = slot < vma->start ? (vma->start >> 12) & 511 : 0;
            uint64_t last = slot + HUGE_SIZE > vma->end ? ((vma->end - 1) >> 12) & 511 : 511;
            for (uint64_t pte = first; pte <= last; pte++) {
                if ((pt[pte] & (PTE_PRESENT | PTE_OWNED)) == (PTE_PRESENT | PTE_OWNED)) {
                    release_pages(pt[pte] & PTE_ADDRESS, 1);
                    if (cache)
                        mm_counts.cache_pages--;
                }
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
