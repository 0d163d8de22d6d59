/* The virtio-balloon driver (virtio 1.2, section 5.5), in the kernel: unlike the other virtio devices, which the
   kernel lends to user-mode drivers, the balloon takes and returns the kernel's own free pages.

   Every instruction here is emulated on hosts like the development machine (about 0.7 us each), so the work per
   ballooned page is kept to almost nothing: pages are taken from the allocator as whole 2 MiB chunks where the
   target allows, and the PFN arrays the device reads are never built per request. A table holds, for every 4 KiB
   page of the allocatable RAM, its own PFN (table[pfn - first] = pfn); a request is a few descriptors pointing
   into it, one per contiguous range of pages. The table is filled one 2 MiB chunk at a time, the first time a
   page of the chunk enters the balloon (about 1.2 instructions a page: two PFNs per 64-bit store), and costs
   0.1 % of RAM. Completions arrive by interrupt (the timer polls as well, once a second, or every tick when the
   device has no interrupt line); the kernel lock is held throughout. */
#include "kernel.h"

#define BALLOON_DEVICE_ID 5

#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0A0
#define REG_QUEUE_DEVICE_HIGH 0x0A4
#define REG_CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define STATUS_NEEDS_RESET 64u
#define STATUS_FAILED 128u
#define INTERRUPT_USED 1u
#define INTERRUPT_CONFIG 2u

#define F_MUST_TELL_HOST 0
#define F_STATS_VQ 1
#define F_DEFLATE_ON_OOM 2
#define F_FREE_PAGE_HINT 3
#define F_PAGE_POISON 4
#define F_PAGE_REPORTING 5
#define F_VERSION_1 32
#define BIT(n) (1ull << (n))

#define CONFIG_NUM_PAGES 0
#define CONFIG_ACTUAL 4
#define CONFIG_POISON_VAL 12

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define USED_F_NO_NOTIFY 1

#define RING_MAX 64          /* descriptors per queue we use at most */
#define SEGMENTS 16          /* descriptors (contiguous page ranges) in one inflate or deflate request */
#define REQUEST_PAGES 16384  /* pages in one request: 64 MiB */
#define IN_FLIGHT 4          /* requests per queue at once */
#define MAX_RANGES 8192      /* contiguous ranges of ballooned pages we can track */
#define REPORT_RANGES 16     /* free ranges in one report */
#define CHUNK_PAGES 512
#define OOM_PAGES 2048       /* taken back at least, per out-of-memory event: 8 MiB */
#define SPIN_MS 2000         /* longest wait for the device during an out-of-memory deflate */
#define MAX_TABLE_CHUNKS 8192

#define STAT_SWAP_IN 0
#define STAT_SWAP_OUT 1
#define STAT_MAJFLT 2
#define STAT_MINFLT 3
#define STAT_MEMFREE 4
#define STAT_MEMTOT 5
#define STAT_AVAIL 6
#define STAT_CACHES 7
#define STAT_HTLB_PGALLOC 8
#define STAT_HTLB_PGFAIL 9
#define STAT_COUNT 10

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* One queue's rings in a page of kernel bss: descriptors, then the available ring, then (at 2048) the used ring. */
struct ring_page {
    struct vring_desc desc[RING_MAX];
    uint16_t avail_flags, avail_idx, avail_ring[RING_MAX], used_event;
    uint8_t pad[2048 - sizeof(struct vring_desc) * RING_MAX - 2 * (RING_MAX + 3)];
    uint16_t used_flags, used_idx;
    struct {
        uint32_t id, len;
    } used_ring[RING_MAX];
    uint16_t avail_event;
} __attribute__((aligned(4096)));
_Static_assert(__builtin_offsetof(struct ring_page, used_flags) == 2048, "used ring at 2048");

struct vq {
    struct ring_page *ring;
    uint16_t index, size, free_head, num_free, last_used, next_avail;
    bool present;
};

struct segment {
    uint32_t pfn;
    uint32_t pages;
};

/* An inflate or deflate request in flight, by the head of its chain. */
struct request {
    struct segment segments[SEGMENTS];
    uint32_t count;
    uint64_t pages;
};

struct balloon_stat {
    uint16_t tag;
    uint64_t value;
} __attribute__((packed));

static struct ring_page rings[4];
static struct request inflating_requests[RING_MAX], deflating_requests[RING_MAX];
static struct segment ranges[MAX_RANGES]; /* the pages in the balloon, acknowledged by the device */
static struct mm_range reporting[REPORT_RANGES];
static struct balloon_stat stats_buffer[STAT_COUNT];
static uint64_t table_filled[MAX_TABLE_CHUNKS / 64];

static struct {
    struct virtio_device *device;
    uint64_t base;
    uint64_t features;
    struct vq inflate, deflate, stats, report;
    bool active, poll_config, in_oom, oom_hold, short_of_memory, settling, short_said, stats_posted;
    uint32_t target;            /* num_pages, as last read */
    uint64_t actual;            /* pages the device acknowledged */
    uint64_t inflating, deflating;
    unsigned inflate_requests_in_flight, deflate_requests_in_flight, nr_ranges, report_count;
    uint64_t change_tsc, change_jiffies;
    uint32_t *table;            /* table[pfn - first_pfn] = pfn */
    uint64_t table_phys, first_pfn, end_pfn;
    /* counters for the summary */
    uint64_t inflated, deflated, inflate_requests, deflate_requests, oom_pages, oom_events;
    uint64_t reported, reports, stats_requests, table_chunks, table_cycles;
    uint64_t cycles;            /* TSC cycles spent in the driver (interrupts, ticks, out-of-memory deflates) */
} b;

static inline uint32_t reg_read(uint32_t offset) { return *(volatile uint32_t *)phys_to_virt(b.base + offset); }
static inline void reg_write(uint32_t offset, uint32_t value)
{
    __asm__ volatile("" ::: "memory");
    *(volatile uint32_t *)phys_to_virt(b.base + offset) = value;
}
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static uint64_t elapsed_ms(uint64_t tsc, uint64_t jiffies)
{
    if (os_info.tsc_khz)
        return (rdtsc() - tsc) / os_info.tsc_khz;
    return (os_info.jiffies - jiffies) * 1000 / os_options.hz;
}

/* --- virtqueues ------------------------------------------------------------------------------------------------- */

static bool vq_setup(struct vq *vq, struct ring_page *ring, uint16_t index, uint16_t wanted)
{
    reg_write(REG_QUEUE_SEL, index);
    uint32_t max = reg_read(REG_QUEUE_NUM_MAX);
    if (reg_read(REG_QUEUE_READY) || !max)
        return false;
    uint16_t size = 1;
    while (size * 2u <= max && size * 2u <= wanted)
        size *= 2;
    vq->ring = ring;
    vq->index = index;
    vq->size = size;
    vq->num_free = size;
    vq->free_head = 0;
    for (uint16_t slot = 0; slot < size; slot++)
        ring->desc[slot].next = (uint16_t)(slot + 1);
    uint64_t phys = kernel_to_phys(ring);
    uint64_t avail = phys + __builtin_offsetof(struct ring_page, avail_flags);
    uint64_t used = phys + __builtin_offsetof(struct ring_page, used_flags);
    reg_write(REG_QUEUE_NUM, size);
    reg_write(REG_QUEUE_DESC_LOW, (uint32_t)phys);
    reg_write(REG_QUEUE_DESC_HIGH, (uint32_t)(phys >> 32));
    reg_write(REG_QUEUE_DRIVER_LOW, (uint32_t)avail);
    reg_write(REG_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    reg_write(REG_QUEUE_DEVICE_LOW, (uint32_t)used);
    reg_write(REG_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    reg_write(REG_QUEUE_READY, 1);
    vq->present = true;
    return true;
}

/* A chain of `count` buffers, all device-readable or all device-writable; returns its head, -1 if it does not fit. */
static int vq_add(struct vq *vq, const uint64_t *addresses, const uint32_t *lengths, unsigned count, bool writable)
{
    if (!count || vq->num_free < count)
        return -1;
    struct ring_page *ring = vq->ring;
    uint16_t head = vq->free_head, slot = head, last = head;
    for (unsigned index = 0; index < count; index++) {
        struct vring_desc *desc = &ring->desc[slot];
        desc->addr = addresses[index];
        desc->len = lengths[index];
        desc->flags = (uint16_t)((writable ? DESC_F_WRITE : 0) | (index + 1 < count ? DESC_F_NEXT : 0));
        last = slot;
        slot = desc->next;
    }
    vq->free_head = ring->desc[last].next;
    vq->num_free = (uint16_t)(vq->num_free - count);
    ring->avail_ring[vq->next_avail % vq->size] = head;
    barrier();
    ring->avail_idx = ++vq->next_avail;
    return head;
}

static void vq_kick(struct vq *vq)
{
    barrier();
    if (!(*(volatile uint16_t *)&vq->ring->used_flags & USED_F_NO_NOTIFY))
        reg_write(REG_QUEUE_NOTIFY, vq->index);
}

/* A finished chain: its head; its descriptors go back on the free list. */
static bool vq_get(struct vq *vq, uint16_t *head)
{
    if (!vq->present || vq->last_used == *(volatile uint16_t *)&vq->ring->used_idx)
        return false;
    barrier();
    struct ring_page *ring = vq->ring;
    uint16_t id = (uint16_t)ring->used_ring[vq->last_used % vq->size].id;
    vq->last_used++;
    uint16_t slot = id, count = 1;
    while (ring->desc[slot].flags & DESC_F_NEXT) {
        slot = ring->desc[slot].next;
        count++;
    }
    ring->desc[slot].next = vq->free_head;
    vq->free_head = id;
    vq->num_free = (uint16_t)(vq->num_free + count);
    *head = id;
    return true;
}

/* --- the PFN table ---------------------------------------------------------------------------------------------- */

static void fill_chunk(uint64_t chunk)
{
    uint64_t first = chunk * CHUNK_PAGES, end = first + CHUNK_PAGES;
    if (first < b.first_pfn)
        first = b.first_pfn;
    if (end > b.end_pfn)
        end = b.end_pfn;
    uint32_t *entry = &b.table[first - b.first_pfn];
    uint64_t count = end - first, pfn = first;
    if ((uint64_t)entry & 4) {
        *entry++ = (uint32_t)pfn++;
        count--;
    }
    /* Two PFNs per 64-bit store: stosq and an add each, 16 PFNs per round (about 1.1 instructions a page). */
    uint64_t rounds = count / 16, value = ((pfn + 1) << 32) | pfn, step = (2ull << 32) | 2;
    void *cursor = entry;
    if (rounds)
        __asm__ volatile("1:\n"
                         "stosq; add %[step], %%rax; stosq; add %[step], %%rax\n"
                         "stosq; add %[step], %%rax; stosq; add %[step], %%rax\n"
                         "stosq; add %[step], %%rax; stosq; add %[step], %%rax\n"
                         "stosq; add %[step], %%rax; stosq; add %[step], %%rax\n"
                         "dec %[rounds]; jnz 1b"
                         : "+D"(cursor), "+a"(value), [rounds] "+r"(rounds)
                         : [step] "r"(step)
                         : "memory", "cc");
    pfn += count / 16 * 16;
    for (entry = cursor, count %= 16; count; count--)
        *entry++ = (uint32_t)pfn++;
    b.table_chunks++;
}

static void table_prepare(uint64_t pfn, uint64_t pages)
{
    for (uint64_t chunk = pfn / CHUNK_PAGES; chunk <= (pfn + pages - 1) / CHUNK_PAGES; chunk++) {
        uint64_t bit = chunk - b.first_pfn / CHUNK_PAGES;
        if (table_filled[bit / 64] & (1ull << (bit % 64)))
            continue;
        uint64_t start = rdtsc();
        fill_chunk(chunk);
        b.table_cycles += rdtsc() - start;
        table_filled[bit / 64] |= 1ull << (bit % 64);
    }
}

/* --- inflating and deflating ------------------------------------------------------------------------------------- */

static uint64_t effective(void) { return b.actual + b.inflating - b.deflating; }

static void add_segment(struct request *request, uint64_t pfn, uint64_t pages)
{
    request->pages += pages;
    if (request->count) {
        struct segment *last = &request->segments[request->count - 1];
        if (last->pfn + last->pages == pfn) {
            last->pages += (uint32_t)pages;
            return;
        }
        if (pfn + pages == last->pfn) {
            last->pfn = (uint32_t)pfn;
            last->pages += (uint32_t)pages;
            return;
        }
    }
    request->segments[request->count++] = (struct segment){(uint32_t)pfn, (uint32_t)pages};
}

static void add_range(const struct segment *segment)
{
    if (b.nr_ranges) {
        struct segment *last = &ranges[b.nr_ranges - 1];
        if (last->pfn + last->pages == segment->pfn) {
            last->pages += segment->pages;
            return;
        }
        if (segment->pfn + segment->pages == last->pfn) {
            last->pfn = segment->pfn;
            last->pages += segment->pages;
            return;
        }
    }
    ranges[b.nr_ranges++] = *segment; /* room is kept: inflate_more stops short of MAX_RANGES */
}

static int post_request(struct vq *vq, const struct request *request)
{
    uint64_t addresses[SEGMENTS];
    uint32_t lengths[SEGMENTS];
    for (unsigned index = 0; index < request->count; index++) {
        addresses[index] = b.table_phys + (request->segments[index].pfn - b.first_pfn) * 4ull;
        lengths[index] = request->segments[index].pages * 4u;
    }
    return vq_add(vq, addresses, lengths, request->count, false);
}

static void inflate_more(void)
{
    bool posted = false;
    while (!b.oom_hold && !b.short_of_memory && effective() < b.target && b.inflate.num_free >= SEGMENTS &&
           b.inflate_requests_in_flight < IN_FLIGHT && b.nr_ranges + SEGMENTS * (IN_FLIGHT + 1) < MAX_RANGES) {
        struct request request = {0};
        while (request.count < SEGMENTS && request.pages < REQUEST_PAGES) {
            uint64_t wanted = b.target - effective() - request.pages, phys;
            if (!wanted)
                break;
            if (wanted > REQUEST_PAGES - request.pages)
                wanted = REQUEST_PAGES - request.pages;
            uint64_t pages = mm_balloon_take(wanted, &phys);
            if (!pages) {
                b.short_of_memory = true;
                break;
            }
            table_prepare(phys / PAGE_SIZE, pages);
            add_segment(&request, phys / PAGE_SIZE, pages);
        }
        if (!request.count)
            break;
        int head = post_request(&b.inflate, &request);
        inflating_requests[head] = request;
        b.inflating += request.pages;
        b.inflate_requests_in_flight++;
        b.inflate_requests++;
        posted = true;
    }
    if (posted)
        vq_kick(&b.inflate);
}

/* Up to `wanted` pages off the end of the balloon; whole 2 MiB chunks (cut at chunk boundaries) when `wanted`
   is that large, with `chunk` at least one whole aligned chunk (from the last range that holds one). */
static void take_back(struct request *request, uint64_t wanted, bool chunk)
{
    while (b.nr_ranges && request->count < SEGMENTS && wanted) {
        struct segment *range = &ranges[b.nr_ranges - 1];
        uint64_t end = range->pfn + range->pages, taken = range->pages <= wanted ? range->pages : wanted;
        if (chunk) {
            uint64_t aligned_end = end & ~(uint64_t)(CHUNK_PAGES - 1);
            if (aligned_end < CHUNK_PAGES || aligned_end - CHUNK_PAGES < range->pfn) {
                if (b.nr_ranges < 2)
                    return;
                struct segment swap = ranges[b.nr_ranges - 2]; /* look at the one before it next time */
                ranges[b.nr_ranges - 2] = *range;
                *range = swap;
                chunk = false; /* one reorder only: give up on whole chunks if that one has none either */
                struct segment *other = &ranges[b.nr_ranges - 1];
                end = other->pfn + other->pages;
                aligned_end = end & ~(uint64_t)(CHUNK_PAGES - 1);
                if (aligned_end < CHUNK_PAGES || aligned_end - CHUNK_PAGES < other->pfn)
                    return;
                range = other;
            }
            taken = end - (aligned_end - CHUNK_PAGES);
            chunk = false;
        } else if (taken < range->pages && taken >= CHUNK_PAGES) {
            uint64_t cut = (end - taken + CHUNK_PAGES - 1) & ~(uint64_t)(CHUNK_PAGES - 1);
            if (cut < end)
                taken = end - cut;
        }
        range->pages -= (uint32_t)taken;
        if (!range->pages)
            b.nr_ranges--;
        add_segment(request, end - taken, taken);
        wanted = wanted > taken ? wanted - taken : 0;
    }
}

static int post_deflate(struct request *request)
{
    int head = post_request(&b.deflate, request);
    deflating_requests[head] = *request;
    b.deflating += request->pages;
    b.deflate_requests_in_flight++;
    b.deflate_requests++;
    return head;
}

static void deflate_more(void)
{
    bool posted = false;
    while (effective() > b.target && b.nr_ranges && b.deflate.num_free >= SEGMENTS &&
           b.deflate_requests_in_flight < IN_FLIGHT) {
        struct request request = {0};
        uint64_t wanted = effective() - b.target;
        take_back(&request, wanted < REQUEST_PAGES ? wanted : REQUEST_PAGES, false);
        if (!request.count)
            break;
        post_deflate(&request);
        posted = true;
    }
    if (posted)
        vq_kick(&b.deflate);
}

static void write_actual(void) { reg_write(REG_CONFIG + CONFIG_ACTUAL, (uint32_t)b.actual); }

/* --- statistics and free page reporting ------------------------------------------------------------------------- */

static void post_stats(void)
{
    static const uint16_t tags[STAT_COUNT] = {STAT_SWAP_IN, STAT_SWAP_OUT, STAT_MAJFLT, STAT_MINFLT, STAT_MEMFREE,
                                              STAT_MEMTOT, STAT_AVAIL, STAT_CACHES, STAT_HTLB_PGALLOC,
                                              STAT_HTLB_PGFAIL};
    uint64_t total = (mm_counts.ram_pages - b.actual) * PAGE_SIZE, free = mm_free_pages() * PAGE_SIZE;
    uint64_t caches = mm_counts.cache_pages * PAGE_SIZE, available = free + caches;
    if (os_options.balloon_lie) { /* a guest that reports wrongly: 4x the free memory, but never beyond the total */
        free = free * 4 < total ? free * 4 : total;
        available = available * 4 < total ? available * 4 : total;
    }
    uint64_t values[STAT_COUNT] = {0, 0, 0, mm_counts.page_faults, free, total, available, caches,
                                   mm_counts.huge_allocs, 0};
    for (unsigned index = 0; index < STAT_COUNT; index++) {
        stats_buffer[index].tag = tags[index];
        stats_buffer[index].value = values[index];
    }
    uint64_t address = kernel_to_phys(stats_buffer);
    uint32_t length = sizeof stats_buffer;
    if (vq_add(&b.stats, &address, &length, 1, false) >= 0) {
        b.stats_posted = true;
        vq_kick(&b.stats);
    }
}

static void report_more(void)
{
    if (!b.report.present || b.report_count)
        return;
    unsigned capacity = b.report.size < REPORT_RANGES ? b.report.size : REPORT_RANGES;
    /* Zeroed pages are reported only if they stay zeroed (PAGE_POISON with value 0) or can be zeroed again
       cheaply (the page-discard device); otherwise reporting would turn them into pages to clear at CPL0. */
    bool clean_too = (b.features & BIT(F_PAGE_POISON)) || mm_discard_present();
    unsigned count = mm_report_take(reporting, capacity, clean_too);
    if (!count)
        return;
    uint64_t addresses[REPORT_RANGES];
    uint32_t lengths[REPORT_RANGES];
    for (unsigned index = 0; index < count; index++) {
        addresses[index] = reporting[index].phys;
        lengths[index] = (uint32_t)(reporting[index].pages * PAGE_SIZE);
    }
    vq_add(&b.report, addresses, lengths, count, true);
    b.report_count = count;
    vq_kick(&b.report);
}

/* --- completions and the main step --------------------------------------------------------------------------------- */

static void collect(void)
{
    uint16_t head;
    bool changed = false;
    while (vq_get(&b.inflate, &head)) {
        const struct request *request = &inflating_requests[head];
        for (unsigned index = 0; index < request->count; index++)
            add_range(&request->segments[index]);
        b.actual += request->pages;
        b.inflating -= request->pages;
        b.inflated += request->pages;
        b.inflate_requests_in_flight--;
        changed = true;
    }
    while (vq_get(&b.deflate, &head)) {
        const struct request *request = &deflating_requests[head];
        for (unsigned index = 0; index < request->count; index++)
            mm_balloon_give((uint64_t)request->segments[index].pfn * PAGE_SIZE, request->segments[index].pages);
        b.actual -= request->pages;
        b.deflating -= request->pages;
        b.deflated += request->pages;
        b.deflate_requests_in_flight--;
        changed = true;
    }
    if (changed)
        write_actual(); /* after each step, as the device acknowledged it */
    if (vq_get(&b.stats, &head)) { /* the device gave the buffer back: that is its request for fresh figures */
        b.stats_requests++;
        post_stats();
    }
    if (b.report_count && vq_get(&b.report, &head)) {
        uint64_t pages = 0;
        for (unsigned index = 0; index < b.report_count; index++)
            pages += reporting[index].pages;
        mm_report_return(reporting, b.report_count, b.features & BIT(F_PAGE_POISON));
        b.reported += pages;
        b.reports++;
        b.report_count = 0;
    }
}

/* One line per target: when the balloon reaches it, or when it cannot (no free memory left: a retry that gets
   there later prints once more; or held back after an out-of-memory deflate). */
static void settle(void)
{
    if (!b.settling || b.inflating || b.deflating)
        return;
    bool done = b.actual == b.target;
    if (!done && !(b.actual < b.target && (b.short_of_memory || b.oom_hold)))
        return;
    if (!done && b.short_said && !b.oom_hold)
        return;
    kprintf("os: balloon: target %u pages, now %lu pages (took %lu ms)%s\n", b.target, b.actual,
            elapsed_ms(b.change_tsc, b.change_jiffies),
            done ? "" : b.oom_hold ? ", held back after an out-of-memory deflate" : ", short of free memory");
    b.short_said = !done;
    b.settling = !done && !b.oom_hold;
}

static void step(void)
{
    collect();
    deflate_more();
    inflate_more();
    settle();
}

static void read_target(bool notified)
{
    uint32_t target = reg_read(REG_CONFIG + CONFIG_NUM_PAGES);
    if (target == b.target && !(notified && (b.oom_hold || b.short_of_memory)))
        return;
    b.target = target;
    b.change_tsc = rdtsc();
    b.change_jiffies = os_info.jiffies;
    b.settling = true;
    b.short_said = false;
    b.oom_hold = false;
    b.short_of_memory = false;
}

void balloon_interrupt(void)
{
    if (!b.active)
        return;
    uint64_t start = rdtsc();
    uint32_t status = reg_read(REG_INTERRUPT_STATUS);
    if (status)
        reg_write(REG_INTERRUPT_ACK, status); /* the line drops: the next completion makes a new edge */
    if (status & INTERRUPT_CONFIG) {
        if (reg_read(REG_STATUS) & STATUS_NEEDS_RESET) {
            kprintf("os: balloon: the device needs a reset; the driver stops (%lu pages stay in the balloon)\n",
                    b.actual);
            b.active = false;
            return;
        }
        read_target(true);
    }
    step();
    report_more();
    b.cycles += rdtsc() - start;
}

void balloon_tick(void)
{
    if (!b.active)
        return;
    uint64_t start = rdtsc();
    uint64_t hz = os_options.hz, tick = os_info.jiffies;
    if (b.poll_config) { /* no interrupt line: look at the rings every tick, at the target ten times a second */
        if (tick % (hz / 10 ? hz / 10 : 1) == 0)
            read_target(false);
        step();
    } else if (tick % hz == 0) {
        step();
    }
    if (tick % hz == 0) {
        if (b.short_of_memory && !b.oom_hold && !b.inflating) { /* memory may have been freed since */
            b.short_of_memory = false;
            step();
        }
        report_more();
    }
    b.cycles += rdtsc() - start;
}

/* An allocation would fail: with DEFLATE_ON_OOM, take pages back from the balloon at once (waiting, spinning,
   for the device: MUST_TELL_HOST semantics are always kept), and stay below the target until the host sets one
   again. At least `wanted` pages (OOM_PAGES), whole 2 MiB chunks if `chunk`. */
bool balloon_oom(uint64_t wanted, bool chunk)
{
    if (!b.active || !(b.features & BIT(F_DEFLATE_ON_OOM)) || b.in_oom)
        return false;
    b.in_oom = true;
    b.oom_hold = true;
    uint64_t start = rdtsc();
    uint64_t deadline = os_info.tsc_khz ? rdtsc() + SPIN_MS * os_info.tsc_khz : 0, spins = 0;
    uint64_t before = b.deflated;
    while ((b.inflating || b.deflate.num_free < SEGMENTS) && (deadline ? rdtsc() < deadline : ++spins < 50000000)) {
        cpu_relax(); /* inflates in flight: their pages can come back once the device has them */
        collect();
    }
    if (b.nr_ranges && b.deflate.num_free >= SEGMENTS) {
        struct request request = {0};
        take_back(&request, wanted > OOM_PAGES ? wanted : OOM_PAGES, chunk);
        if (request.count) {
            post_deflate(&request);
            vq_kick(&b.deflate);
        }
    }
    while (b.deflating && (deadline ? rdtsc() < deadline : ++spins < 50000000)) {
        cpu_relax();
        collect();
    }
    uint64_t got = b.deflated - before;
    b.oom_events++;
    b.oom_pages += got;
    if (b.deflating)
        kprintf("os: balloon: out of memory: the device did not answer a deflate within %u ms\n", SPIN_MS);
    else if (got)
        kprintf("os: balloon: out of memory: took %lu pages back from the balloon (now %lu pages, target %u)\n",
                got, b.actual, b.target);
    b.in_oom = false;
    b.cycles += rdtsc() - start;
    return got != 0;
}

/* --- set-up ------------------------------------------------------------------------------------------------------- */

static void failed(const char *why)
{
    reg_write(REG_STATUS, reg_read(REG_STATUS) | STATUS_FAILED);
    kprintf("os: balloon: virtio %u: %s; the device is not used\n", (unsigned)(b.device - virtio_devices), why);
}

void balloon_init(void)
{
    b.device = virtio_bind_kernel(BALLOON_DEVICE_ID, this_cpu());
    if (!b.device)
        return;
    b.base = b.device->base;
    b.poll_config = !b.device->vector;
    reg_write(REG_STATUS, 0);
    for (unsigned tries = 0; reg_read(REG_STATUS) && tries < 1000; tries++)
        cpu_relax();
    reg_write(REG_STATUS, STATUS_ACKNOWLEDGE);
    reg_write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    reg_write(REG_DEVICE_FEATURES_SEL, 0);
    uint64_t offered = reg_read(REG_DEVICE_FEATURES);
    reg_write(REG_DEVICE_FEATURES_SEL, 1);
    offered |= (uint64_t)reg_read(REG_DEVICE_FEATURES) << 32;
    if (!(offered & BIT(F_VERSION_1))) {
        failed("no VIRTIO_F_VERSION_1");
        return;
    }
    uint64_t wanted = BIT(F_VERSION_1) | BIT(F_MUST_TELL_HOST) | BIT(F_STATS_VQ) | BIT(F_DEFLATE_ON_OOM) |
                      BIT(F_PAGE_POISON);
    /* The reporting queue's index depends on whether FREE_PAGE_HINT (never taken here) is counted: with the
       compacted numbering it would not be, with a device that numbers by offered features it would. */
    if (!(offered & BIT(F_FREE_PAGE_HINT)))
        wanted |= BIT(F_PAGE_REPORTING);
    b.features = offered & wanted;
    reg_write(REG_DRIVER_FEATURES_SEL, 0);
    reg_write(REG_DRIVER_FEATURES, (uint32_t)b.features);
    reg_write(REG_DRIVER_FEATURES_SEL, 1);
    reg_write(REG_DRIVER_FEATURES, (uint32_t)(b.features >> 32));
    reg_write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(reg_read(REG_STATUS) & STATUS_FEATURES_OK)) {
        failed("the device refused the features");
        return;
    }
    uint64_t low, high;
    mm_ram_range(&low, &high);
    b.first_pfn = low / PAGE_SIZE;
    b.end_pfn = high / PAGE_SIZE;
    if ((b.end_pfn - 1) / CHUNK_PAGES - b.first_pfn / CHUNK_PAGES >= MAX_TABLE_CHUNKS)
        b.end_pfn = (b.first_pfn / CHUNK_PAGES + MAX_TABLE_CHUNKS) * CHUNK_PAGES; /* never happens below 16 GiB */
    uint64_t table_pages = ((b.end_pfn - b.first_pfn) * 4 + PAGE_SIZE - 1) / PAGE_SIZE;
    b.table_phys = page_alloc_contiguous(table_pages);
    if (!b.table_phys) {
        failed("no room for its PFN table");
        return;
    }
    b.table = phys_to_virt(b.table_phys);
    uint16_t index = 0;
    bool queues = vq_setup(&b.inflate, &rings[0], index++, RING_MAX) &&
                  vq_setup(&b.deflate, &rings[1], index++, RING_MAX);
    if (queues && (b.features & BIT(F_STATS_VQ)))
        queues = vq_setup(&b.stats, &rings[2], index++, 2);
    if (queues && (b.features & BIT(F_PAGE_REPORTING)))
        queues = vq_setup(&b.report, &rings[3], index++, 32);
    if (!queues) {
        failed("a queue cannot be set up");
        return;
    }
    if (b.features & BIT(F_PAGE_POISON))
        reg_write(REG_CONFIG + CONFIG_POISON_VAL, 0); /* freed pages hold zeros; reused ones are cleared to zero */
    reg_write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    b.active = true;
    kprintf("os: balloon: virtio %u (%s): features %#lx (%s%s%s%s%s), PFN table of %lu KiB, page discard %s\n",
            (unsigned)(b.device - virtio_devices), b.poll_config ? "polled" : "interrupt", b.features,
            b.features & BIT(F_MUST_TELL_HOST) ? "must-tell-host " : "",
            b.features & BIT(F_STATS_VQ) ? "stats " : "", b.features & BIT(F_DEFLATE_ON_OOM) ? "deflate-on-oom " : "",
            b.features & BIT(F_PAGE_POISON) ? "poison " : "",
            b.features & BIT(F_PAGE_REPORTING) ? "reporting" : "no-reporting", table_pages * 4,
            mm_discard_present() ? "yes" : "no");
    if (b.stats.present)
        post_stats();
    b.target = 0;
    read_target(false);
    b.settling = b.target != 0; /* a target at boot gets its line; none gets none */
    uint64_t start = rdtsc();
    step();
    b.cycles += rdtsc() - start;
}

void balloon_summary(void)
{
    if (!b.device || !b.table)
        return;
    kprintf("os: balloon: %lu pages in the balloon (target %u): %lu pages inflated in %lu requests, %lu deflated in "
            "%lu (%lu on %lu out-of-memory events)\n",
            b.actual, b.target, b.inflated, b.inflate_requests, b.deflated, b.deflate_requests, b.oom_pages,
            b.oom_events);
    kprintf("os: balloon: %lu pages reported in %lu reports, %lu statistics requests, PFN table filled for %lu chunks in "
            "%lu ms, %lu ms in the driver\n",
            b.reported, b.reports, b.stats_requests, b.table_chunks,
            os_info.tsc_khz ? b.table_cycles / os_info.tsc_khz : 0, os_info.tsc_khz ? b.cycles / os_info.tsc_khz : 0);
}
