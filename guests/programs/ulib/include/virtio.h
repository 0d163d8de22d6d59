/* User-mode virtio 1.x drivers over virtio-mmio (version 2 registers) with split virtqueues: the device
   comes from SYS_VIRTIO_OPEN (its registers and a DMA area mapped into the process), everything else
   happens here, in user mode. Completions are polled from memory (wait=poll: no system call per I/O) or
   waited for with SYS_VIRTIO_WAIT (wait=irq). See docs/guest-os.md, section 10. */
#ifndef ULIB_VIRTIO_H
#define ULIB_VIRTIO_H

#include <ulib.h>

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_ENTROPY 4
#define VIRTIO_ID_VSOCK 19

#define VIRTIO_BIT(n) (1ull << (n))
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE 1u
#define VIRTIO_STATUS_DRIVER 2u
#define VIRTIO_STATUS_DRIVER_OK 4u
#define VIRTIO_STATUS_FEATURES_OK 8u
#define VIRTIO_STATUS_NEEDS_RESET 64u
#define VIRTIO_STATUS_FAILED 128u

/* virtio-mmio registers (version 2). */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00C
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0A0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0A4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0FC
#define VIRTIO_MMIO_CONFIG 0x100
#define VIRTIO_INTERRUPT_USED 1u
#define VIRTIO_INTERRUPT_CONFIG 2u

/* Split virtqueue layout (all little-endian, as x86 is). */
struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

/* Results of virtio_wait. */
#define VIRTIO_OK 0
#define VIRTIO_TIMEOUT (-1)
#define VIRTIO_NEEDS_RESET (-2)

#define VIRTQ_INDIRECT_MAX 8 /* buffers per chain when indirect descriptors are used */

struct virtio_dev {
    volatile uint8_t *regs;
    uint8_t *dma;          /* the DMA area: zeroed, physically contiguous */
    uint64_t dma_phys;
    uint64_t dma_size;
    uint64_t dma_used;     /* virtio_alloc's bump pointer */
    uint32_t index;        /* the kernel's device index */
    uint32_t device_id;
    uint32_t irq;
    bool irq_mode;         /* wait=irq: completions by SYS_VIRTIO_WAIT, else polled */
    uint64_t device_features;
    uint64_t features;     /* negotiated */
    uint64_t notifies;     /* QueueNotify writes */
    uint64_t waits;        /* SYS_VIRTIO_WAIT calls */
    uint64_t interrupts;   /* interrupts those calls reported */
};

struct virtq_buf {
    uint64_t phys;
    uint32_t len;
    bool device_writes;    /* device-writable (VIRTQ_DESC_F_WRITE) */
};

struct virtq {
    struct virtio_dev *dev;
    uint16_t index;
    uint16_t size;
    struct virtq_desc *desc;
    volatile uint16_t *avail_flags, *avail_idx, *avail_ring, *used_event;
    volatile uint16_t *used_flags, *used_idx, *avail_event;
    volatile struct virtq_used_elem *used_ring;
    struct virtq_desc *indirect;  /* VIRTQ_INDIRECT_MAX descriptors per head, when negotiated */
    uint64_t indirect_phys;
    uint64_t *tokens;             /* per head: the caller's token */
    uint16_t *chain;              /* per head: descriptors it takes in the ring */
    uint16_t free_head, num_free;
    uint16_t next_avail;          /* avail idx not yet published */
    uint16_t kicked;              /* avail idx at the last kick */
    uint16_t last_used;           /* next used entry to take */
    bool event_idx;
};

/* wait=poll|irq from the program's arguments (poll by default). */
bool virtio_arg_irq(void);
/* Takes the nth device (0-based) with this device id and a DMA area of dma_bytes. Prints why on failure. */
int virtio_open(struct virtio_dev *dev, uint32_t device_id, unsigned nth, uint64_t dma_bytes, bool irq_mode);
/* Carves zeroed memory out of the DMA area (0 when it is full). */
void *virtio_alloc(struct virtio_dev *dev, uint64_t size, uint64_t align);
static inline uint64_t virtio_phys(const struct virtio_dev *dev, const void *pointer)
{
    return dev->dma_phys + (uint64_t)((const uint8_t *)pointer - dev->dma);
}

static inline uint32_t virtio_read(const struct virtio_dev *dev, unsigned offset)
{
    return *(volatile uint32_t *)(dev->regs + offset);
}
static inline void virtio_write(const struct virtio_dev *dev, unsigned offset, uint32_t value)
{
    *(volatile uint32_t *)(dev->regs + offset) = value;
}

/* Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 required; EVENT_IDX and INDIRECT_DESC taken when offered,
   plus those of `wanted` the device offers), FEATURES_OK. 0, or -1 after printing why. */
int virtio_start(struct virtio_dev *dev, uint64_t wanted);
/* Queue `index` with at most max_size entries (QueueNumMax permitting). 0, or -1 after printing why. */
int virtq_setup(struct virtio_dev *dev, struct virtq *vq, unsigned index, unsigned max_size);
/* DRIVER_OK. Returns false (after printing why) if the device failed or needs a reset. */
bool virtio_ready(struct virtio_dev *dev);
void virtio_reset(struct virtio_dev *dev);
bool virtio_needs_reset(const struct virtio_dev *dev);
/* Device-specific configuration, read consistently (ConfigGeneration). */
void virtio_config_read(const struct virtio_dev *dev, unsigned offset, void *out, unsigned size);

/* Adds a chain (device-readable buffers first); returns the head, or -1 when the ring is full. Not
   visible to the device until virtq_kick. */
int virtq_add(struct virtq *vq, const struct virtq_buf *bufs, unsigned count, uint64_t token);
/* Publishes what was added and notifies the device if it asked for it (EVENT_IDX / NO_NOTIFY). Returns
   whether it notified. */
bool virtq_kick(struct virtq *vq);
static inline bool virtq_has_used(const struct virtq *vq)
{
    return __atomic_load_n(vq->used_idx, __ATOMIC_ACQUIRE) != vq->last_used;
}
/* Takes one completed chain: its token and the bytes the device wrote. False if none is ready. */
bool virtq_get(struct virtq *vq, uint64_t *token, uint32_t *length);
/* Waits until one of the queues (all of the same device) has a completion: polling, or sleeping in
   SYS_VIRTIO_WAIT with used_event set. VIRTIO_OK, VIRTIO_TIMEOUT or VIRTIO_NEEDS_RESET. */
int virtio_wait(struct virtio_dev *dev, struct virtq *const *vqs, unsigned count, uint64_t timeout_ms);
static inline int virtq_wait(struct virtq *vq, uint64_t timeout_ms) { return virtio_wait(vq->dev, &vq, 1, timeout_ms); }

#endif
