/* memwatch: spins reading a counter the host writes into a DMA page; reports values that went backwards. */
#include <ulib.h>
#include <virtio.h>

const char program_name[] = "memwatch";

int main(void)
{
    unsigned width = (unsigned)arg_u64("width", 2);
    uint64_t seconds = arg_u64("seconds", 2);
    struct virtio_dev dev;
    if (virtio_open(&dev, 4, 0, 65536, false)) {
        report(false, "no device");
        return (int)failures();
    }
    volatile uint8_t *page = virtio_alloc(&dev, 4096, 4096);
    printf("memwatch %u: phys %lx\n", env.pid, virtio_phys(&dev, (const void *)page));
    uint64_t until = rdtsc() + seconds * 1000 * tsc_khz(), reads = 0, backwards = 0, zeros = 0;
    uint64_t last = 0;
    while (rdtsc() < until) {
        uint64_t now = width == 2 ? *(volatile uint16_t *)(page + 0x90a) : *(volatile uint64_t *)(page + 0x908);
        reads++;
        if (now < last && !(width == 2 && last > 65000)) {
            if (backwards++ < 5)
                printf("memwatch: %lu after %lu\n", now, last);
            if (!now)
                zeros++;
        }
        last = now;
    }
    printf("memwatch %u: %lu reads, %lu went backwards (%lu to zero), last %lu\n", env.pid, reads, backwards, zeros, last);
    return 0;
}
