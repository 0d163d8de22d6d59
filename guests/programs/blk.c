/* blk: a user-mode virtio-blk driver and its checks and benchmark. Arguments:
     mode=M[,M...]  what to do, in order (default id): write, read, verify, flush, id, bench
     dev=N          the Nth block device (0)
     start=S sectors=N  the range, in 512-byte sectors (0, 2048)
     seed=E         the pattern's seed (1); sector s holds 64 words pattern_word(E, s, 0..63)
     bs=SIZE        bytes per request: 512..1m, a multiple of 512, k/m suffixes (4k)
     qd=N           requests in flight (1)
     rw=read|write access=rand|seq ops=N seconds=S   for bench (read, rand, 1000 ops unless seconds=)
     wait=poll|irq  completions by polling the used ring, or by SYS_VIRTIO_WAIT (poll)
     timeout_ms=T   longest wait for a completion (10000)
   On a read-only device (VIRTIO_BLK_F_RO) mode=write sends one write and expects the device to refuse it. */
#include <pyrovisor/cmdline.h>

#include <ulib.h>
#include <virtio.h>

const char program_name[] = "blk";

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define STATUS_NONE 0xFF /* what we put in the status byte: a device that answers overwrites it */
#define SECTOR 512u
#define WORDS_PER_SECTOR (SECTOR / 8)
#define MAX_QD 128
#define ID_BYTES 20

struct blk_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct slot {
    struct blk_header *header;
    uint8_t *status;
    uint8_t *data;
    uint64_t sector;
    uint32_t bytes;
    uint64_t submitted; /* TSC */
};

static struct virtio_dev dev;
static struct virtq vq;
static struct slot slots[MAX_QD];
static unsigned qd;
static uint64_t bs, seed, timeout_ms, capacity;
static bool read_only;

static const char *status_name(unsigned status)
{
    switch (status) {
    case VIRTIO_BLK_S_OK: return "OK";
    case VIRTIO_BLK_S_IOERR: return "IOERR";
    case VIRTIO_BLK_S_UNSUPP: return "UNSUPP";
    case STATUS_NONE: return "not written by the device";
    default: return "unknown";
    }
}

/* The test pattern: splitmix64 of (sector, word index, seed). tests/guests/test_os_virtio_qemu.py computes
   the same in Python. */
static inline uint64_t pattern_word(uint64_t sector, unsigned index)
{
    uint64_t z = sector * WORDS_PER_SECTOR + index + (seed + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill_pattern(const struct slot *slot)
{
    uint64_t *words = (uint64_t *)slot->data;
    for (uint32_t sector = 0; sector < slot->bytes / SECTOR; sector++)
        for (unsigned index = 0; index < WORDS_PER_SECTOR; index++)
            *words++ = pattern_word(slot->sector + sector, index);
}

static void submit(struct slot *slot, uint32_t type, uint64_t sector, uint32_t bytes)
{
    slot->header->type = type;
    slot->header->reserved = 0;
    slot->header->sector = sector;
    *slot->status = STATUS_NONE;
    slot->sector = sector;
    slot->bytes = bytes;
    struct virtq_buf bufs[3];
    unsigned count = 0;
    bufs[count++] = (struct virtq_buf){virtio_phys(&dev, slot->header), sizeof *slot->header, false};
    if (bytes)
        bufs[count++] = (struct virtq_buf){virtio_phys(&dev, slot->data), bytes, type != VIRTIO_BLK_T_OUT};
    bufs[count++] = (struct virtq_buf){virtio_phys(&dev, slot->status), 1, true};
    slot->submitted = rdtsc();
    virtq_add(&vq, bufs, count, (uint64_t)(slot - slots)); /* cannot fail: qd fits the ring */
}

/* One request, waited for: flush and get-id. Returns the status, or -1 if the device never answered. */
static int single(uint32_t type, uint32_t bytes)
{
    submit(&slots[0], type, 0, bytes);
    virtq_kick(&vq);
    uint64_t token;
    int waited;
    while ((waited = virtq_wait(&vq, timeout_ms)) == VIRTIO_OK)
        while (virtq_get(&vq, &token, 0))
            if (token == 0) /* not a request an earlier, failed mode left behind */
                return *slots[0].status;
    printf("blk %u: no answer within %lu ms (%s)\n", env.pid, timeout_ms,
           waited == VIRTIO_NEEDS_RESET ? "the device needs a reset" : "timeout");
    return -1;
}

/* Reads or writes: `ops` requests of bs bytes over [first, first + count) sectors, sequential or random,
   qd at a time, until ops are done or the deadline (TSC, 0: none) passes. */
struct transfer {
    uint32_t type;
    uint64_t first, count, ops, deadline;
    bool random, fill, verify, sum;
    /* results */
    uint64_t done, bytes, errors, bad_sectors, first_bad, first_error_sector, checksum;
    uint64_t latency_total, latency_max; /* TSC cycles */
    unsigned first_error_status;
    int waited;
    uint64_t cycles;
};

static void complete(struct transfer *job, struct slot *slot)
{
    uint64_t latency = rdtsc() - slot->submitted;
    job->latency_total += latency;
    if (latency > job->latency_max)
        job->latency_max = latency;
    job->done++;
    if (*slot->status != VIRTIO_BLK_S_OK) {
        if (!job->errors++) {
            job->first_error_sector = slot->sector;
            job->first_error_status = *slot->status;
        }
        return;
    }
    job->bytes += slot->bytes;
    const uint64_t *words = (const uint64_t *)slot->data;
    if (job->sum)
        for (uint32_t index = 0; index < slot->bytes / 8; index++)
            job->checksum += words[index];
    if (job->verify) {
        for (uint32_t sector = 0; sector < slot->bytes / SECTOR; sector++, words += WORDS_PER_SECTOR) {
            for (unsigned index = 0; index < WORDS_PER_SECTOR; index++) {
                if (words[index] != pattern_word(slot->sector + sector, index)) {
                    if (!job->bad_sectors++ || slot->sector + sector < job->first_bad)
                        job->first_bad = slot->sector + sector;
                    break;
                }
            }
        }
    }
}

static void run(struct transfer *job)
{
    unsigned free_slots[MAX_QD], nr_free = qd, in_flight = 0;
    for (unsigned index = 0; index < qd; index++)
        free_slots[index] = qd - 1 - index;
    uint64_t issued = 0, cursor = 0, random_state = seed * 0x2545F4914F6CDD1Dull + 1;
    uint64_t bs_sectors = bs / SECTOR, positions = job->count / bs_sectors ? job->count / bs_sectors : 1;
    uint64_t started = rdtsc();
    job->waited = VIRTIO_OK;
    for (;;) {
        while (nr_free && issued < job->ops && !(job->deadline && rdtsc() > job->deadline)) {
            uint64_t sector, sectors = bs_sectors;
            if (job->random) {
                sector = job->first + next_random(&random_state) % positions * bs_sectors;
            } else {
                sector = job->first + cursor;
                cursor += bs_sectors;
                if (cursor >= job->count)
                    cursor = 0;
            }
            if (sector + sectors > job->first + job->count)
                sectors = job->first + job->count - sector;
            struct slot *slot = &slots[free_slots[--nr_free]];
            slot->sector = sector;
            slot->bytes = (uint32_t)(sectors * SECTOR);
            if (job->fill)
                fill_pattern(slot);
            submit(slot, job->type, sector, (uint32_t)(sectors * SECTOR));
            issued++;
            in_flight++;
        }
        virtq_kick(&vq);
        if (!in_flight)
            break;
        job->waited = virtq_wait(&vq, timeout_ms);
        if (job->waited != VIRTIO_OK)
            break;
        uint64_t token;
        while (virtq_get(&vq, &token, 0)) {
            complete(job, &slots[token]);
            free_slots[nr_free++] = (unsigned)token;
            in_flight--;
        }
    }
    job->cycles = rdtsc() - started;
}

static bool range_ok(uint64_t first, uint64_t count)
{
    if (count && first < capacity && count <= capacity - first)
        return true;
    report(false, "sectors %lu..%lu are not on the device (capacity %lu sectors)", first, first + count, capacity);
    return false;
}

static const char *wait_problem(int waited)
{
    return waited == VIRTIO_NEEDS_RESET ? "the device needs a reset" : "a request timed out";
}

static void mode_write(uint64_t first, uint64_t count)
{
    if (read_only) {
        /* The device says it refuses writes: check that it does, with the status it gives. */
        struct transfer job = {.type = VIRTIO_BLK_T_OUT, .first = first, .count = count, .fill = true, .ops = 1};
        run(&job);
        int status = job.waited != VIRTIO_OK ? -1 : job.errors ? (int)job.first_error_status : VIRTIO_BLK_S_OK;
        bool refused = status == VIRTIO_BLK_S_IOERR || status == VIRTIO_BLK_S_UNSUPP;
        report(refused, "%s with status %d (%s)",
               refused ? "write to the read-only device refused" : "the read-only device answered a write", status,
               status < 0 ? "no answer" : status_name((unsigned)status));
        return;
    }
    struct transfer job = {.type = VIRTIO_BLK_T_OUT, .first = first, .count = count, .fill = true};
    job.ops = (count * SECTOR + bs - 1) / bs;
    run(&job);
    if (job.waited != VIRTIO_OK)
        report(false, "write stopped after %lu of %lu requests: %s", job.done, job.ops, wait_problem(job.waited));
    else if (job.errors)
        report(false, "write: %lu of %lu requests failed, the first at sector %lu with status %u (%s)", job.errors,
               job.ops, job.first_error_sector, job.first_error_status, status_name(job.first_error_status));
    else
        report(true, "wrote %lu sectors from sector %lu with seed %lu in %lu requests (bs %lu, qd %u) in %lu us",
               count, first, seed, job.done, bs, qd, cycles_to_ns(job.cycles) / 1000);
}

static void mode_read(uint64_t first, uint64_t count, bool verify)
{
    struct transfer job = {.type = VIRTIO_BLK_T_IN, .first = first, .count = count, .verify = verify, .sum = !verify};
    job.ops = (count * SECTOR + bs - 1) / bs;
    run(&job);
    const char *what = verify ? "verify" : "read";
    if (job.waited != VIRTIO_OK) {
        report(false, "%s stopped after %lu of %lu requests: %s", what, job.done, job.ops, wait_problem(job.waited));
    } else if (job.errors) {
        report(false, "%s: %lu of %lu requests failed, the first at sector %lu with status %u (%s)", what, job.errors,
               job.ops, job.first_error_sector, job.first_error_status, status_name(job.first_error_status));
    } else if (verify) {
        if (job.bad_sectors)
            report(false, "verify: %lu of %lu sectors from sector %lu differ from seed %lu's pattern, the first is "
                   "sector %lu", job.bad_sectors, count, first, seed, job.first_bad);
        else
            report(true, "verified %lu sectors from sector %lu with seed %lu: all match", count, first, seed);
    } else {
        printf("blk %u: read %lu sectors from sector %lu: sum of 64-bit words 0x%016lx\n", env.pid, count, first,
               job.checksum);
        report(true, "read %lu sectors from sector %lu in %lu requests (bs %lu, qd %u) in %lu us", count, first,
               job.done, bs, qd, cycles_to_ns(job.cycles) / 1000);
    }
}

static void mode_flush(void)
{
    if (!(dev.features & VIRTIO_BIT(VIRTIO_BLK_F_FLUSH))) {
        printf("blk %u: the device does not offer VIRTIO_BLK_F_FLUSH (it writes through): nothing to flush\n", env.pid);
        return;
    }
    int status = single(VIRTIO_BLK_T_FLUSH, 0);
    report(status == VIRTIO_BLK_S_OK, "flush completed with status %d (%s)", status,
           status < 0 ? "no answer" : status_name((unsigned)status));
}

static void mode_id(void)
{
    memset(slots[0].data, 0, ID_BYTES);
    int status = single(VIRTIO_BLK_T_GET_ID, ID_BYTES);
    if (status == VIRTIO_BLK_S_UNSUPP) {
        printf("blk %u: get-id not supported by the device (status 2, UNSUPP)\n", env.pid);
        return;
    }
    char serial[ID_BYTES + 1];
    unsigned length = 0;
    while (length < ID_BYTES && slots[0].data[length]) {
        char c = (char)slots[0].data[length];
        serial[length++] = c >= 0x20 && c < 0x7F && c != '\'' ? c : '?';
    }
    serial[length] = '\0';
    if (status == VIRTIO_BLK_S_OK)
        printf("blk %u: serial '%s'\n", env.pid, serial);
    report(status == VIRTIO_BLK_S_OK, "get-id completed with status %d (%s)", status,
           status < 0 ? "no answer" : status_name((unsigned)status));
}

static void mode_bench(uint64_t first, uint64_t count)
{
    char rw[8], access[8];
    arg_str("rw", rw, sizeof rw, "read");
    arg_str("access", access, sizeof access, "rand");
    bool writing = !strcmp(rw, "write"), random = strcmp(access, "seq") != 0;
    uint64_t seconds = arg_u64("seconds", 0), ops = arg_u64("ops", seconds ? ~0ull : 1000);
    struct transfer job = {.type = writing ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, .first = first, .count = count,
                           .ops = ops, .random = random};
    if (seconds)
        job.deadline = rdtsc() + seconds * 1000 * tsc_khz();
    run(&job);
    uint64_t us = cycles_to_ns(job.cycles) / 1000;
    if (!us)
        us = 1;
    uint64_t iops = job.done * 1000000 / us, mb_x10 = job.bytes * 10 / us;
    uint64_t mean_us = job.done ? cycles_to_ns(job.latency_total / job.done) / 1000 : 0;
    printf("blk %u: bench rw=%s access=%s bs=%lu qd=%u wait=%s: %lu ops in %lu us: %lu IOPS, %lu.%lu MB/s, "
           "latency mean %lu us max %lu us, %lu notifies, %lu interrupts\n",
           env.pid, writing ? "write" : "read", random ? "rand" : "seq", bs, qd, dev.irq_mode ? "irq" : "poll",
           job.done, us, iops, mb_x10 / 10, mb_x10 % 10, mean_us, cycles_to_ns(job.latency_max) / 1000, dev.notifies,
           dev.interrupts);
    if (job.waited != VIRTIO_OK)
        report(false, "bench stopped after %lu ops: %s", job.done, wait_problem(job.waited));
    else
        report(!job.errors && job.done, "bench finished %lu ops, %lu errors", job.done, job.errors);
}

static uint64_t arg_size(const char *key, uint64_t fallback)
{
    char text[24];
    if (!arg_str(key, text, sizeof text, ""))
        return fallback;
    const char *end;
    uint64_t value;
    if (!parse_u64(text, &end, &value)) {
        printf("blk %u: ignoring %s=%s (not a size)\n", env.pid, key, text);
        return fallback;
    }
    if (*end == 'k' || *end == 'K')
        value <<= 10;
    else if (*end == 'm' || *end == 'M')
        value <<= 20;
    return value;
}

int main(void)
{
    char modes[64];
    arg_str("mode", modes, sizeof modes, "id");
    unsigned nth = (unsigned)arg_u64("dev", 0);
    uint64_t first = arg_u64("start", 0), count = arg_u64("sectors", 2048);
    seed = arg_u64("seed", 1);
    bs = arg_size("bs", 4096);
    timeout_ms = arg_u64("timeout_ms", 10000);
    uint64_t wanted_qd = arg_u64("qd", 1);
    bool irq = virtio_arg_irq();
    if (bs < SECTOR || bs > (1u << 20) || bs % SECTOR || !wanted_qd || wanted_qd > MAX_QD) {
        report(false, "bs=%lu qd=%lu: bs must be a multiple of 512 up to 1m, qd 1..%u", bs, wanted_qd, MAX_QD);
        return (int)failures();
    }
    qd = (unsigned)wanted_qd;
    uint64_t dma = 128 * 1024 + qd * (bs + 64);
    if (virtio_open(&dev, VIRTIO_ID_BLOCK, nth, dma, irq) ||
        virtio_start(&dev, VIRTIO_BIT(VIRTIO_BLK_F_RO) | VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE) |
                               VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) | VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX) |
                               VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX)) ||
        virtq_setup(&dev, &vq, 0, MAX_QD) || !virtio_ready(&dev)) {
        report(false, "no usable virtio block device #%u", nth);
        return (int)failures();
    }
    unsigned per_request = vq.indirect ? 1 : 3;
    if (qd * per_request > vq.size) {
        qd = vq.size / per_request;
        printf("blk %u: qd lowered to %u to fit the queue of %u\n", env.pid, qd, vq.size);
    }
    virtio_config_read(&dev, 0, &capacity, 8);
    uint32_t blk_size = SECTOR, size_max = 0;
    if (dev.features & VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE))
        virtio_config_read(&dev, 20, &blk_size, 4);
    if (dev.features & VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX))
        virtio_config_read(&dev, 8, &size_max, 4);
    read_only = dev.features & VIRTIO_BIT(VIRTIO_BLK_F_RO);
    printf("blk %u: virtio %u (irq %u): capacity %lu sectors (%lu MiB), blk_size %u, %s, flush %s, features %#lx, "
           "queue size %u%s, wait %s\n",
           env.pid, dev.index, dev.irq, capacity, capacity >> 11, blk_size, read_only ? "read-only" : "read-write",
           dev.features & VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) ? "yes" : "no", dev.features, vq.size,
           vq.indirect ? " (indirect)" : "", irq ? "irq" : "poll");
    if (size_max && bs > size_max) {
        report(false, "bs=%lu is above the device's size_max %u", bs, size_max);
        return (int)failures();
    }
    for (unsigned index = 0; index < qd; index++) {
        slots[index].header = virtio_alloc(&dev, sizeof(struct blk_header), 16);
        slots[index].status = virtio_alloc(&dev, 1, 1);
        slots[index].data = virtio_alloc(&dev, bs, bs >= 4096 ? 4096 : SECTOR);
        if (!slots[index].data) {
            report(false, "DMA area too small");
            return (int)failures();
        }
    }

    for (char *mode = modes; *mode;) {
        char *end = mode;
        while (*end && *end != ',')
            end++;
        char separator = *end;
        *end = '\0';
        if (!strcmp(mode, "write") && range_ok(first, count))
            mode_write(first, count);
        else if (!strcmp(mode, "read") && range_ok(first, count))
            mode_read(first, count, false);
        else if (!strcmp(mode, "verify") && range_ok(first, count))
            mode_read(first, count, true);
        else if (!strcmp(mode, "flush"))
            mode_flush();
        else if (!strcmp(mode, "id"))
            mode_id();
        else if (!strcmp(mode, "bench") && range_ok(first, count))
            mode_bench(first, count);
        else if (strcmp(mode, "write") && strcmp(mode, "read") && strcmp(mode, "verify") && strcmp(mode, "bench"))
            report(false, "unknown mode '%s' (write, read, verify, flush, id, bench)", mode);
        mode = separator ? end + 1 : end;
    }
    printf("blk %u: %lu notifies, %lu waits, %lu interrupts\n", env.pid, dev.notifies, dev.waits, dev.interrupts);
    return (int)failures();
}
