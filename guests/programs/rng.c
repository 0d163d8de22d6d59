/* rng: reads bytes from a virtio entropy device (virtio-rng) in user mode and checks they look random: not
   constant, and a byte histogram whose chi-square is plausible for uniform bytes. Arguments: bytes=N (16384),
   chunk=C bytes per request (512), dev=N (0: the Nth entropy device), wait=poll|irq, timeout_ms=T (5000). */
#include <ulib.h>
#include <virtio.h>

const char program_name[] = "rng";

#define IN_FLIGHT 16
#define HISTOGRAM_MIN_BYTES 2560 /* 10 expected per value */

int main(void)
{
    uint64_t total = arg_u64("bytes", 16384), chunk = arg_u64("chunk", 512);
    uint64_t timeout_ms = arg_u64("timeout_ms", 5000);
    unsigned nth = (unsigned)arg_u64("dev", 0);
    bool irq = virtio_arg_irq();
    if (!total || !chunk || chunk > 65536) {
        report(false, "bytes=%lu chunk=%lu: need bytes > 0 and 0 < chunk <= 65536", total, chunk);
        return (int)failures();
    }
    struct virtio_dev dev;
    struct virtq vq;
    if (virtio_open(&dev, VIRTIO_ID_ENTROPY, nth, 65536 + IN_FLIGHT * chunk, irq) || virtio_start(&dev, 0) ||
        virtq_setup(&dev, &vq, 0, 64) || !virtio_ready(&dev)) {
        report(false, "no usable virtio entropy device #%u", nth);
        return (int)failures();
    }
    unsigned depth = vq.size < IN_FLIGHT ? vq.size : IN_FLIGHT;
    uint8_t *buffers = virtio_alloc(&dev, depth * chunk, 64);
    printf("rng %u: virtio %u (irq %u): features %#lx, queue size %u, wait %s\n", env.pid, dev.index, dev.irq,
           dev.features, vq.size, irq ? "irq" : "poll");

    static uint64_t histogram[256];
    uint8_t first[16];
    uint64_t got = 0, requests = 0, in_flight = 0, empty = 0;
    uint64_t started = rdtsc();
    while (got < total) {
        while (in_flight < depth && got + in_flight * chunk < total) {
            uint64_t slot = requests++ % depth;
            struct virtq_buf buf = {virtio_phys(&dev, buffers + slot * chunk), (uint32_t)chunk, true};
            if (virtq_add(&vq, &buf, 1, slot) < 0)
                break;
            in_flight++;
        }
        virtq_kick(&vq);
        int waited = virtq_wait(&vq, timeout_ms);
        if (waited != VIRTIO_OK) {
            report(false, "no entropy after %lu ms (%s), %lu of %lu bytes read", timeout_ms,
                   waited == VIRTIO_NEEDS_RESET ? "device needs reset" : "timeout", got, total);
            return (int)failures();
        }
        uint64_t slot;
        uint32_t length;
        while (virtq_get(&vq, &slot, &length)) {
            in_flight--;
            if (length > chunk)
                length = (uint32_t)chunk;
            if (!length)
                empty++;
            const uint8_t *bytes = buffers + slot * chunk;
            for (uint32_t index = 0; index < length && got < total; index++, got++) {
                if (got < sizeof first)
                    first[got] = bytes[index];
                histogram[bytes[index]]++;
            }
        }
    }
    uint64_t elapsed_us = cycles_to_ns(rdtsc() - started) / 1000;

    unsigned distinct = 0;
    uint64_t lowest = ~0ull, highest = 0, sum_squares = 0;
    for (unsigned value = 0; value < 256; value++) {
        uint64_t count = histogram[value];
        distinct += count != 0;
        lowest = count < lowest ? count : lowest;
        highest = count > highest ? count : highest;
        int64_t deviation = (int64_t)(256 * count) - (int64_t)total;
        sum_squares += (uint64_t)(deviation * deviation);
    }
    /* chi-square = sum (count - total/256)^2 / (total/256) = sum (256 count - total)^2 / (256 total) */
    uint64_t chi_square_x100 = (uint64_t)((unsigned __int128)sum_squares * 100 / (256 * total));
    printf("rng %u: read %lu bytes in %lu requests of %lu in %lu us (%lu empty), %lu interrupts, %lu notifies\n",
           env.pid, got, requests, chunk, elapsed_us, empty, dev.interrupts, dev.notifies);
    printf("rng %u: first bytes", env.pid);
    for (unsigned index = 0; index < sizeof first && index < got; index++)
        printf(" %02x", first[index]);
    printf("\n");
    printf("rng %u: histogram: %u distinct values, counts %lu..%lu, chi-square %lu.%02lu (255 degrees of freedom)\n",
           env.pid, distinct, lowest, highest, chi_square_x100 / 100, chi_square_x100 % 100);
    report(distinct > 1, "%lu bytes are not all the same (%u distinct values)", got, distinct);
    if (total >= HISTOGRAM_MIN_BYTES)
        report(chi_square_x100 > 15000 && chi_square_x100 < 40000,
               "byte histogram is plausible: chi-square %lu.%02lu within 150..400", chi_square_x100 / 100,
               chi_square_x100 % 100);
    else
        printf("rng %u: too few bytes for the histogram check (it needs %u)\n", env.pid, HISTOGRAM_MIN_BYTES);
    return (int)failures();
}
