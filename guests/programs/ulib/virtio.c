/* User-mode virtio: device initialisation (virtio 1.2, 3.1.1 and 4.2.3) and split virtqueues (2.7). Every
   register access is an exit to the VMM, so the hot path touches registers only to notify the device when
   it asked for it, and (wait=irq) to acknowledge an interrupt. */
#include <virtio.h>

#define SPINS_PER_CLOCK_CHECK 256

bool virtio_arg_irq(void)
{
    char mode[8];
    arg_str("wait", mode, sizeof mode, "poll");
    if (!strcmp(mode, "irq"))
        return true;
    if (strcmp(mode, "poll"))
        printf("%s %u: ignoring wait=%s (poll or irq), polling\n", program_name, env.pid, mode);
    return false;
}

static const char *open_error(long error)
{
    switch (-error) {
    case E_NODEV: return "no such device (E_NODEV)";
    case E_BUSY: return "another process has it (E_BUSY)";
    case E_NOMEM: return "no memory or address space left for it (E_NOMEM)";
    case E_INVAL: return "invalid request, or its interrupt cannot be routed (E_INVAL)";
    default: return "error";
    }
}

int virtio_open(struct virtio_dev *dev, uint32_t device_id, unsigned nth, uint64_t dma_bytes, bool irq_mode)
{
    struct virtio_open_info info;
    memset(dev, 0, sizeof *dev);
    long result = sys_virtio_open(device_id, nth, dma_bytes, &info, irq_mode ? VIRTIO_OPEN_IRQ : 0);
    if (is_error(result)) {
        printf("%s %u: cannot open virtio device %u #%u: %s (%ld)\n", program_name, env.pid, device_id, nth,
               open_error(result), result);
        return -1;
    }
    dev->regs = (volatile uint8_t *)info.regs;
    dev->dma = (uint8_t *)info.dma;
    dev->dma_phys = info.dma_phys;
    dev->dma_size = info.dma_size;
    dev->index = info.index;
    dev->device_id = info.device_id;
    dev->irq = info.irq;
    dev->irq_mode = irq_mode;
    tsc_khz(); /* for timeouts */
    return 0;
}

void *virtio_alloc(struct virtio_dev *dev, uint64_t size, uint64_t align)
{
    uint64_t start = (dev->dma_used + align - 1) & ~(align - 1);
    if (start + size > dev->dma_size)
        return 0;
    dev->dma_used = start + size;
    return dev->dma + start;
}

void virtio_reset(struct virtio_dev *dev)
{
    virtio_write(dev, VIRTIO_MMIO_STATUS, 0);
    for (unsigned spins = 0; virtio_read(dev, VIRTIO_MMIO_STATUS) && spins < 100000; spins++)
        __asm__ volatile("pause");
}

bool virtio_needs_reset(const struct virtio_dev *dev)
{
    return virtio_read(dev, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET;
}

static void fail(struct virtio_dev *dev, const char *why)
{
    virtio_write(dev, VIRTIO_MMIO_STATUS, virtio_read(dev, VIRTIO_MMIO_STATUS) | VIRTIO_STATUS_FAILED);
    printf("%s %u: virtio %u: %s\n", program_name, env.pid, dev->index, why);
}

int virtio_start(struct virtio_dev *dev, uint64_t wanted)
{
    if (virtio_read(dev, VIRTIO_MMIO_MAGIC) != 0x74726976u || virtio_read(dev, VIRTIO_MMIO_VERSION) != 2) {
        printf("%s %u: virtio %u: not a version 2 virtio-mmio device\n", program_name, env.pid, dev->index);
        return -1;
    }
    virtio_reset(dev);
    virtio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    virtio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    virtio_write(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t low = virtio_read(dev, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_write(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    dev->device_features = low | (uint64_t)virtio_read(dev, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    uint64_t ours = wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_F_EVENT_IDX) |
                    VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
    dev->features = dev->device_features & ours;
    if (!(dev->features & VIRTIO_BIT(VIRTIO_F_VERSION_1))) {
        fail(dev, "the device does not offer VIRTIO_F_VERSION_1");
        return -1;
    }
    virtio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)dev->features);
    virtio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(dev->features >> 32));
    virtio_write(dev, VIRTIO_MMIO_STATUS,
                 VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(virtio_read(dev, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        fail(dev, "the device did not accept our features (FEATURES_OK cleared)");
        return -1;
    }
    return 0;
}

static void write_address(struct virtio_dev *dev, unsigned low_register, uint64_t address)
{
    virtio_write(dev, low_register, (uint32_t)address);
    virtio_write(dev, low_register + 4, (uint32_t)(address >> 32));
}

int virtq_setup(struct virtio_dev *dev, struct virtq *vq, unsigned index, unsigned max_size)
{
    memset(vq, 0, sizeof *vq);
    vq->dev = dev;
    vq->index = (uint16_t)index;
    virtio_write(dev, VIRTIO_MMIO_QUEUE_SEL, index);
    if (virtio_read(dev, VIRTIO_MMIO_QUEUE_READY)) {
        fail(dev, "queue already in use after a reset");
        return -1;
    }
    uint32_t most = virtio_read(dev, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (!most) {
        fail(dev, "queue not available (QueueNumMax 0)");
        return -1;
    }
    unsigned size = 1;
    while (size * 2 <= most && size * 2 <= max_size && size < 32768)
        size *= 2;
    vq->size = (uint16_t)size;
    vq->event_idx = dev->features & VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
    vq->desc = virtio_alloc(dev, 16ull * size, 16);
    uint8_t *avail = virtio_alloc(dev, 6 + 2ull * size, 2);
    uint8_t *used = virtio_alloc(dev, 6 + 8ull * size, 4);
    vq->tokens = virtio_alloc(dev, 8ull * size, 8);
    vq->chain = virtio_alloc(dev, 2ull * size, 2);
    if (dev->features & VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC)) {
        vq->indirect = virtio_alloc(dev, 16ull * VIRTQ_INDIRECT_MAX * size, 16);
        vq->indirect_phys = vq->indirect ? virtio_phys(dev, vq->indirect) : 0;
    }
    if (!vq->desc || !avail || !used || !vq->tokens || !vq->chain) {
        fail(dev, "DMA area too small for the queue");
        return -1;
    }
    vq->avail_flags = (volatile uint16_t *)avail;
    vq->avail_idx = (volatile uint16_t *)(avail + 2);
    vq->avail_ring = (volatile uint16_t *)(avail + 4);
    vq->used_event = (volatile uint16_t *)(avail + 4 + 2 * size);
    vq->used_flags = (volatile uint16_t *)used;
    vq->used_idx = (volatile uint16_t *)(used + 2);
    vq->used_ring = (volatile struct virtq_used_elem *)(used + 4);
    vq->avail_event = (volatile uint16_t *)(used + 4 + 8 * size);
    for (unsigned entry = 0; entry < size; entry++)
        vq->desc[entry].next = (uint16_t)(entry + 1);
    vq->num_free = (uint16_t)size;
    /* Polling drivers do not want interrupts; with EVENT_IDX that is said through used_event, which
       stays behind (interrupts are masked at the IOAPIC anyway when polling). */
    if (!dev->irq_mode && !vq->event_idx)
        *vq->avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    virtio_write(dev, VIRTIO_MMIO_QUEUE_NUM, size);
    write_address(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, virtio_phys(dev, vq->desc));
    write_address(dev, VIRTIO_MMIO_QUEUE_DRIVER_LOW, virtio_phys(dev, avail));
    write_address(dev, VIRTIO_MMIO_QUEUE_DEVICE_LOW, virtio_phys(dev, used));
    virtio_write(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    return 0;
}

bool virtio_ready(struct virtio_dev *dev)
{
    uint32_t status = virtio_read(dev, VIRTIO_MMIO_STATUS);
    virtio_write(dev, VIRTIO_MMIO_STATUS, status | VIRTIO_STATUS_DRIVER_OK);
    status = virtio_read(dev, VIRTIO_MMIO_STATUS);
    if (status & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED) || !(status & VIRTIO_STATUS_DRIVER_OK)) {
        printf("%s %u: virtio %u: device status %#x after DRIVER_OK\n", program_name, env.pid, dev->index, status);
        return false;
    }
    return true;
}

void virtio_config_read(const struct virtio_dev *dev, unsigned offset, void *out, unsigned size)
{
    uint8_t *bytes = out;
    uint32_t generation;
    do {
        generation = virtio_read(dev, VIRTIO_MMIO_CONFIG_GENERATION);
        for (unsigned done = 0; done < size;) {
            const volatile uint8_t *at = dev->regs + VIRTIO_MMIO_CONFIG + offset + done;
            if (size - done >= 4 && !((offset + done) & 3)) {
                uint32_t value = *(const volatile uint32_t *)at;
                memcpy(bytes + done, &value, 4);
                done += 4;
            } else if (size - done >= 2 && !((offset + done) & 1)) {
                uint16_t value = *(const volatile uint16_t *)at;
                memcpy(bytes + done, &value, 2);
                done += 2;
            } else {
                bytes[done++] = *at;
            }
        }
    } while (virtio_read(dev, VIRTIO_MMIO_CONFIG_GENERATION) != generation);
}

int virtq_add(struct virtq *vq, const struct virtq_buf *bufs, unsigned count, uint64_t token)
{
    if (!count || count > vq->size)
        return -1;
    uint16_t head = vq->free_head;
    if (vq->indirect && count > 1 && count <= VIRTQ_INDIRECT_MAX) {
        if (!vq->num_free)
            return -1;
        struct virtq_desc *table = &vq->indirect[(unsigned)head * VIRTQ_INDIRECT_MAX];
        for (unsigned index = 0; index < count; index++) {
            table[index].addr = bufs[index].phys;
            table[index].len = bufs[index].len;
            table[index].flags = (uint16_t)((bufs[index].device_writes ? VIRTQ_DESC_F_WRITE : 0) |
                                            (index + 1 < count ? VIRTQ_DESC_F_NEXT : 0));
            table[index].next = (uint16_t)(index + 1);
        }
        struct virtq_desc *desc = &vq->desc[head];
        vq->free_head = desc->next;
        desc->addr = vq->indirect_phys + (uint64_t)head * VIRTQ_INDIRECT_MAX * sizeof(struct virtq_desc);
        desc->len = count * (uint32_t)sizeof(struct virtq_desc);
        desc->flags = VIRTQ_DESC_F_INDIRECT;
        vq->num_free--;
        vq->chain[head] = 1;
    } else {
        if (vq->num_free < count)
            return -1;
        uint16_t at = head;
        for (unsigned index = 0; index < count; index++) {
            struct virtq_desc *desc = &vq->desc[at];
            desc->addr = bufs[index].phys;
            desc->len = bufs[index].len;
            desc->flags = (uint16_t)((bufs[index].device_writes ? VIRTQ_DESC_F_WRITE : 0) |
                                     (index + 1 < count ? VIRTQ_DESC_F_NEXT : 0));
            at = desc->next; /* free descriptors are already linked through next */
        }
        vq->free_head = at;
        vq->num_free = (uint16_t)(vq->num_free - count);
        vq->chain[head] = (uint16_t)count;
    }
    vq->tokens[head] = token;
    vq->avail_ring[vq->next_avail & (vq->size - 1)] = head;
    vq->next_avail++;
    return head;
}

/* 2.7.10: does the other side want to hear about index new_index, having last heard at old_index? */
static inline bool need_event(uint16_t event, uint16_t new_index, uint16_t old_index)
{
    return (uint16_t)(new_index - event - 1) < (uint16_t)(new_index - old_index);
}

bool virtq_kick(struct virtq *vq)
{
    uint16_t old_index = vq->kicked, new_index = vq->next_avail;
    if (old_index == new_index)
        return false;
    __atomic_store_n(vq->avail_idx, new_index, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the index must be visible before we read what the device wants */
    vq->kicked = new_index;
    bool notify = vq->event_idx ? need_event(*vq->avail_event, new_index, old_index)
                                : !(*vq->used_flags & VIRTQ_USED_F_NO_NOTIFY);
    if (notify) {
        virtio_write(vq->dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
        vq->dev->notifies++;
    }
    return notify;
}

bool virtq_get(struct virtq *vq, uint64_t *token, uint32_t *length)
{
    if (!virtq_has_used(vq))
        return false;
    volatile struct virtq_used_elem *element = &vq->used_ring[vq->last_used & (vq->size - 1)];
    uint16_t head = (uint16_t)element->id;
    if (length)
        *length = element->len;
    vq->last_used++;
    if (head >= vq->size)
        return false; /* a device bug: nothing of ours to free */
    if (token)
        *token = vq->tokens[head];
    uint16_t last = head;
    for (unsigned count = vq->chain[head]; count > 1; count--)
        last = vq->desc[last].next;
    vq->desc[last].next = vq->free_head; /* the chain goes back on the free list as it is */
    vq->free_head = head;
    vq->num_free = (uint16_t)(vq->num_free + vq->chain[head]);
    return true;
}

static bool any_used(struct virtq *const *vqs, unsigned count)
{
    for (unsigned index = 0; index < count; index++)
        if (virtq_has_used(vqs[index]))
            return true;
    return false;
}

int virtio_wait(struct virtio_dev *dev, struct virtq *const *vqs, unsigned count, uint64_t timeout_ms)
{
    uint64_t start = rdtsc(), limit = timeout_ms < (1ull << 32) ? timeout_ms * env.tsc_khz : ~0ull;
    if (!dev->irq_mode) {
        for (;;) {
            for (unsigned spin = 0; spin < SPINS_PER_CLOCK_CHECK; spin++) {
                if (any_used(vqs, count))
                    return VIRTIO_OK;
                __asm__ volatile("pause" ::: "memory");
            }
            if (rdtsc() - start > limit)
                return virtio_needs_reset(dev) ? VIRTIO_NEEDS_RESET : VIRTIO_TIMEOUT;
        }
    }
    for (;;) {
        if (any_used(vqs, count))
            return VIRTIO_OK;
        /* Ask for an interrupt at the next completion, then look again: it may have come meanwhile. */
        for (unsigned index = 0; index < count; index++) {
            if (vqs[index]->event_idx)
                *vqs[index]->used_event = vqs[index]->last_used;
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (any_used(vqs, count))
            return VIRTIO_OK;
        uint64_t elapsed = rdtsc() - start;
        if (elapsed > limit)
            return virtio_needs_reset(dev) ? VIRTIO_NEEDS_RESET : VIRTIO_TIMEOUT;
        uint64_t left_ms = limit == ~0ull ? ~0ull : (limit - elapsed) / env.tsc_khz + 1;
        long interrupts = sys_virtio_wait(dev->index, left_ms);
        dev->waits++;
        if (interrupts > 0)
            dev->interrupts += (uint64_t)interrupts;
        else if (is_error(interrupts)) {
            printf("%s %u: virtio %u: SYS_VIRTIO_WAIT failed (%ld)\n", program_name, env.pid, dev->index, interrupts);
            return VIRTIO_TIMEOUT;
        }
        /* Acknowledge, so that the line drops and the next completion raises a new edge. */
        uint32_t status = virtio_read(dev, VIRTIO_MMIO_INTERRUPT_STATUS);
        if (status)
            virtio_write(dev, VIRTIO_MMIO_INTERRUPT_ACK, status);
        if (status & VIRTIO_INTERRUPT_CONFIG && virtio_needs_reset(dev))
            return VIRTIO_NEEDS_RESET;
    }
}
