/* tpm: the TPM 2.0 behind the CRB interface at 0xFED40000 (pyrovisor run os --tpm), from user mode.
   Arguments:
     op=OP[,OP...]  what to do, in order (info): info, random, extend, pcrread, quote, log, selftest
     pcr=N          extend: the PCR (16)
     text=WORD      extend: SHA-256(WORD) is extended (hello)
     digest=HEX     extend: this SHA-256 digest (64 hex digits) instead of text=
     pcrs=A,B,...   pcrread and quote: the PCRs, 0..23 (8,9)
     nonce=HEX      quote: the qualifying data, 1..64 bytes (default: 32 bytes from TPM2_GetRandom)
     handle=H       quote: the signing key (0x81010002, the attestation key the VMM made)
     repeat=N       quote: after the first quote, N more in a row, timed together ("tpm: N quotes in T us")
     bytes=N        random: how many bytes, 1..64 (32)
     timeout_ms=T   longest wait for one command (10000)
     turn_ms=T      longest wait for the tpm processes before this one on the command line (120000)
   Machine-readable lines start "tpm: " (tpm: pcr8=HEX, tpm: quote attest=HEX, ...; docs/vtpm.md), comments
   "tpm P: ", checks "PASS: tpm P: " or "FAIL: tpm P: "; the exit code is the number of FAILs.
   Locality 0 has no arbitration, so tpm processes take turns in command-line order: the Nth tpm segment waits
   until the one before it wrote turn N into the last word of the CRB data buffer (a convention of this
   program, see take_turn), so "tpm op=info; tpm op=pcrread" is safe even on several vCPUs. */
#include <tpm.h>
#include <ulib.h>

const char program_name[] = "tpm";

#define DEFAULT_AK_HANDLE 0x81010002u
#define LOG_BYTES_PER_LINE 64u
#define LINE_MAX (2 * TPM_BUFFER_MAX + 64)

static struct tpm_dev tpm;
static bool opened;
static uint64_t timeout_ms;
static char line[LINE_MAX];

/* --- output --- */

static size_t append(size_t length, const char *text)
{
    while (*text && length < sizeof line - 1)
        line[length++] = *text++;
    return length;
}

static size_t append_hex(size_t length, const uint8_t *data, size_t size)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t index = 0; index < size && length + 2 < sizeof line; index++) {
        line[length++] = digits[data[index] >> 4];
        line[length++] = digits[data[index] & 0xF];
    }
    return length;
}

static void emit(size_t length)
{
    line[length++] = '\n';
    for (size_t done = 0; done < length;) { /* SYS_WRITE takes at most 4096 bytes a call */
        long wrote = sys_write(line + done, length - done);
        if (wrote <= 0)
            return;
        done += (size_t)wrote;
    }
}

/* "tpm: <label><hex>" as one line, however long. */
static void print_hex(const char *label, const uint8_t *data, size_t size)
{
    size_t length = append(append(0, "tpm: "), label);
    emit(append_hex(length, data, size));
}

/* --- arguments --- */

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Hex text (an optional 0x) into bytes; the byte count, or -1 if it is not whole bytes of hex or too long. */
static long parse_hex(const char *text, uint8_t *out, size_t capacity)
{
    if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X'))
        text += 2;
    size_t length = strlen(text);
    if (length % 2 || length / 2 > capacity)
        return -1;
    for (size_t index = 0; index < length / 2; index++) {
        int high = hex_digit(text[2 * index]), low = hex_digit(text[2 * index + 1]);
        if (high < 0 || low < 0)
            return -1;
        out[index] = (uint8_t)(high << 4 | low);
    }
    return (long)(length / 2);
}

/* pcrs=A,B,... as a mask (bit n: PCR n); 0 after a FAIL line if malformed. */
static uint32_t pcr_mask(void)
{
    char text[96];
    arg_str("pcrs", text, sizeof text, "8,9");
    uint32_t mask = 0, value = 0;
    bool digits = false;
    for (const char *cursor = text;; cursor++) {
        if (*cursor >= '0' && *cursor <= '9' && value < 100) {
            value = value * 10 + (uint32_t)(*cursor - '0');
            digits = true;
        } else if ((*cursor == ',' || !*cursor) && digits && value < TPM_PCR_COUNT) {
            mask |= 1u << value;
            value = 0;
            digits = false;
            if (!*cursor)
                return mask;
        } else {
            report(false, "pcrs=%s: want PCR numbers 0..%u separated by commas", text, TPM_PCR_COUNT - 1);
            return 0;
        }
    }
}

static void print_pcrs(uint32_t mask, uint8_t values[TPM_PCR_COUNT][TPM_SHA256_SIZE])
{
    for (unsigned pcr = 0; pcr < TPM_PCR_COUNT; pcr++) {
        if (!(mask & (1u << pcr)))
            continue;
        char label[16];
        snprintf(label, sizeof label, "pcr%u=", pcr);
        print_hex(label, values[pcr], TPM_SHA256_SIZE);
    }
}

/* --- taking turns --- */

/* The last 8 bytes of the data buffer: TURN_MAGIC in the upper half, the number of tpm processes that have
   finished in the lower. A response zeroes it (the device clears the buffer past a response), which only makes
   later processes wait longer: only the process whose turn it is sends commands, and it writes the next turn
   after its last one. */
#define TURN_OFFSET (TPM_CRB_DATA_BUFFER + 0xF78)
#define TURN_MAGIC 0x5450544Eull /* "TPTN" */
#define TURN_POLL_MS 5

/* How many tpm segments come before this process's on the boot command line (0 for a spawned process). */
static unsigned tpm_rank(void)
{
    const char *page = (const char *)USER_ARGS_VA, *mine = env.args;
    if (mine < page || mine >= page + 4096)
        return 0;
    const char *end = page;
    while (end < mine && *end)
        end++;
    if (end < mine)
        return 0; /* after the boot line's NUL: a line SYS_SPAWN added */
    unsigned rank = 0;
    for (const char *segment = page;;) {
        const char *stop = segment;
        while (stop < mine && *stop != ';')
            stop++;
        if (stop >= mine)
            return rank; /* the segment holding this process's arguments */
        while (segment < stop && (*segment == ' ' || *segment == '\t'))
            segment++;
        if (stop - segment >= 3 && !strncmp(segment, "tpm", 3) &&
            (stop - segment == 3 || segment[3] == ' ' || segment[3] == '\t'))
            rank++;
        segment = stop + 1;
    }
}

static unsigned rank;

static void take_turn(void)
{
    rank = tpm_rank();
    if (!rank)
        return;
    volatile uint8_t *window = tpm_map();
    if (!window)
        return;
    uint64_t limit_ms = arg_u64("turn_ms", 120000), started = now_ns();
    bool said = false;
    for (;;) {
        uint64_t turn = *(volatile uint64_t *)(window + TURN_OFFSET);
        if (turn == ~0ull || (turn >> 32 == TURN_MAGIC && (uint32_t)turn >= rank))
            return; /* no device (all ones): nothing to wait for */
        uint64_t waited_ms = (now_ns() - started) / 1000000;
        if (waited_ms >= limit_ms) {
            printf("tpm %u: the %u tpm process(es) before this one did not finish within %lu ms: going ahead\n",
                   env.pid, rank, limit_ms);
            return;
        }
        if (!said)
            printf("tpm %u: waiting for the %u tpm process(es) before this one\n", env.pid, rank);
        said = true;
        sys_sleep(TURN_POLL_MS);
    }
}

static void pass_turn(void)
{
    volatile uint8_t *window = tpm_map();
    if (window)
        *(volatile uint64_t *)(window + TURN_OFFSET) = TURN_MAGIC << 32 | (rank + 1);
}

/* --- operations --- */

/* Opens the TPM on first use; false after a FAIL line. */
static bool need_tpm(void)
{
    if (opened)
        return true;
    int result = tpm_open(&tpm, timeout_ms);
    if (result == TPM_E_ABSENT) {
        report(false, "no TPM: nothing answers at %#llx (run the VM with --tpm)", TPM_CRB_BASE);
        return false;
    }
    if (result != TPM_OK) {
        report(false, "the TPM at %#llx cannot be used", TPM_CRB_BASE);
        return false;
    }
    opened = true;
    long started = tpm2_startup_if_needed(&tpm);
    if (started == 1)
        printf("tpm %u: sent TPM2_Startup: no firmware had (nothing was measured)\n", env.pid);
    else if (started != 0)
        printf("tpm %u: TPM2_Startup failed: %#lx\n", env.pid, started);
    return true;
}

static void op_info(void)
{
    if (!need_tpm())
        return;
    uint64_t id = tpm.interface_id;
    printf("tpm: CRB interface id=%#lx type=%lu version=%lu vid=%#lx did=%#lx rid=%#lx buffer=%u\n", id, id & 0xF,
           (id >> 4) & 0xF, (id >> 32) & 0xFFFF, id >> 48, (id >> 24) & 0xFF, tpm.buffer_size);
    report(true, "CRB interface at %#llx, locality 0 granted", TPM_CRB_BASE);
    uint32_t properties[8], values[8], got = 0;
    uint32_t manufacturer = 0, firmware[2] = {0, 0}, max_command = 0, max_response = 0;
    long result = tpm2_get_properties(&tpm, 0x105, 8, properties, values, &got); /* TPM_PT_MANUFACTURER.. */
    for (uint32_t index = 0; !result && index < got; index++) {
        if (properties[index] == 0x105)
            manufacturer = values[index];
        else if (properties[index] == 0x10B || properties[index] == 0x10C)
            firmware[properties[index] - 0x10B] = values[index];
    }
    if (!result)
        result = tpm2_get_properties(&tpm, 0x11E, 2, properties, values, &got); /* TPM_PT_MAX_COMMAND_SIZE.. */
    for (uint32_t index = 0; !result && index < got; index++) {
        if (properties[index] == 0x11E)
            max_command = values[index];
        else if (properties[index] == 0x11F)
            max_response = values[index];
    }
    if (result) {
        report(false, "TPM2_GetCapability failed");
        return;
    }
    char name[5] = {(char)(manufacturer >> 24), (char)(manufacturer >> 16), (char)(manufacturer >> 8),
                    (char)manufacturer, 0};
    for (unsigned index = 0; index < 4; index++)
        if (name[index] && (name[index] < ' ' || name[index] > '~'))
            name[index] = '?';
    printf("tpm: manufacturer=%s firmware=%08x.%08x max_command=%u max_response=%u\n", name, firmware[0],
           firmware[1], max_command, max_response);
    report(max_command <= tpm.buffer_size && max_response <= tpm.buffer_size,
           "the TPM's largest command (%u) and response (%u) fit the CRB buffer (%u)", max_command, max_response,
           tpm.buffer_size);
    uint8_t random[16];
    uint16_t count = 0;
    result = tpm2_get_random(&tpm, random, sizeof random, &count);
    report(!result && count == sizeof random, "TPM2_GetRandom returned %u of %u bytes", count,
           (unsigned)sizeof random);
}

static void op_random(void)
{
    uint64_t wanted = arg_u64("bytes", 32);
    if (!wanted || wanted > 64) {
        report(false, "bytes=%lu: want 1..64", wanted);
        return;
    }
    if (!need_tpm())
        return;
    uint8_t random[64];
    uint16_t count = 0;
    long result = tpm2_get_random(&tpm, random, (uint16_t)wanted, &count);
    if (result) {
        report(false, "TPM2_GetRandom failed");
        return;
    }
    print_hex("random=", random, count);
    report(count == wanted, "TPM2_GetRandom returned %u of %lu bytes", count, wanted);
}

static void op_extend(void)
{
    unsigned pcr = (unsigned)arg_u64("pcr", 16);
    uint8_t digest[TPM_SHA256_SIZE];
    char text[256];
    char what[64];
    if (arg_str("digest", text, sizeof text, "")) {
        if (parse_hex(text, digest, sizeof digest) != TPM_SHA256_SIZE) {
            report(false, "digest=%s: want %u bytes of hex", text, TPM_SHA256_SIZE);
            return;
        }
        snprintf(what, sizeof what, "a digest");
    } else {
        arg_str("text", text, sizeof text, "hello");
        sha256(text, strlen(text), digest);
        snprintf(what, sizeof what, "SHA-256 of %u bytes", (unsigned)strlen(text));
    }
    if (pcr >= TPM_PCR_COUNT) {
        report(false, "pcr=%u: want 0..%u", pcr, TPM_PCR_COUNT - 1);
        return;
    }
    if (!need_tpm())
        return;
    static uint8_t before[TPM_PCR_COUNT][TPM_SHA256_SIZE], after[TPM_PCR_COUNT][TPM_SHA256_SIZE];
    uint64_t reads = tpm.reads, writes = tpm.writes, started = rdtsc();
    if (tpm2_pcr_read(&tpm, 1u << pcr, before)) {
        report(false, "TPM2_PCR_Read of PCR %u failed", pcr);
        return;
    }
    uint64_t extend_reads = tpm.reads, extend_writes = tpm.writes, extend_started = rdtsc();
    long result = tpm2_pcr_extend(&tpm, pcr, digest);
    uint64_t extend_ns = cycles_to_ns(rdtsc() - extend_started);
    extend_reads = tpm.reads - extend_reads;
    extend_writes = tpm.writes - extend_writes;
    if (result) {
        report(false, "TPM2_PCR_Extend of PCR %u failed", pcr);
        return;
    }
    if (tpm2_pcr_read(&tpm, 1u << pcr, after)) {
        report(false, "TPM2_PCR_Read of PCR %u failed", pcr);
        return;
    }
    uint64_t total_ns = cycles_to_ns(rdtsc() - started);
    char label[16];
    snprintf(label, sizeof label, "pcr%u=", pcr);
    print_hex(label, after[pcr], TPM_SHA256_SIZE);
    uint8_t expected[TPM_SHA256_SIZE];
    struct sha256 context;
    sha256_init(&context);
    sha256_update(&context, before[pcr], TPM_SHA256_SIZE);
    sha256_update(&context, digest, TPM_SHA256_SIZE);
    sha256_final(&context, expected);
    printf("tpm %u: extend: %lu MMIO reads and %lu writes, %lu us (with both PCR reads: %lu, %lu, %lu us)\n",
           env.pid, extend_reads, extend_writes, extend_ns / 1000, tpm.reads - reads, tpm.writes - writes,
           total_ns / 1000);
    report(!memcmp(expected, after[pcr], TPM_SHA256_SIZE), "PCR %u extended with %s: new = SHA-256(old || digest)",
           pcr, what);
}

static void op_pcrread(void)
{
    uint32_t mask = pcr_mask();
    if (!mask || !need_tpm())
        return;
    static uint8_t values[TPM_PCR_COUNT][TPM_SHA256_SIZE];
    if (tpm2_pcr_read(&tpm, mask, values)) {
        report(false, "TPM2_PCR_Read failed");
        return;
    }
    print_pcrs(mask, values);
    report(true, "read %d PCRs of the SHA-256 bank", __builtin_popcount(mask));
}

static void op_quote(void)
{
    uint32_t mask = pcr_mask();
    uint32_t handle = (uint32_t)arg_u64("handle", DEFAULT_AK_HANDLE);
    if (!mask || !need_tpm())
        return;
    char text[2 * TPM_NONCE_MAX + 8];
    uint8_t nonce[TPM_NONCE_MAX];
    long nonce_size;
    if (arg_str("nonce", text, sizeof text, "")) {
        nonce_size = parse_hex(text, nonce, sizeof nonce);
        if (nonce_size <= 0) {
            report(false, "nonce=%s: want 1..%u bytes of hex", text, TPM_NONCE_MAX);
            return;
        }
    } else {
        uint16_t count = 0;
        if (tpm2_get_random(&tpm, nonce, 32, &count) || count != 32) {
            report(false, "no nonce given, and TPM2_GetRandom failed");
            return;
        }
        nonce_size = count;
    }
    print_hex("quote nonce=", nonce, (size_t)nonce_size);
    static uint8_t attest[TPM_BUFFER_MAX], signature[TPM_BUFFER_MAX];
    uint32_t attest_size = 0, signature_size = 0;
    uint64_t reads = tpm.reads, writes = tpm.writes, started = rdtsc();
    long result = tpm2_quote(&tpm, handle, nonce, (uint16_t)nonce_size, mask, attest, &attest_size, signature,
                             &signature_size);
    uint64_t elapsed_ns = cycles_to_ns(rdtsc() - started);
    if (result) {
        report(false, "TPM2_Quote by key %#x failed", handle);
        return;
    }
    print_hex("quote attest=", attest, attest_size);
    print_hex("quote signature=", signature, signature_size);
    printf("tpm %u: quote: %lu MMIO reads and %lu writes, %lu us\n", env.pid, tpm.reads - reads,
           tpm.writes - writes, elapsed_ns / 1000);
    /* TPMS_ATTEST: magic, type, qualifiedSigner (TPM2B_NAME), extraData (TPM2B_DATA: our nonce), ... */
    struct tpm_reply reply;
    tpm_reply_init(&reply, attest, attest_size);
    uint32_t magic = tpm_get_u32(&reply);
    uint16_t type = tpm_get_u16(&reply);
    tpm_get_bytes(&reply, tpm_get_u16(&reply));
    uint16_t extra_size = tpm_get_u16(&reply);
    const uint8_t *extra = tpm_get_bytes(&reply, extra_size);
    report(!reply.error && magic == TPM_GENERATED_VALUE && type == TPM_ST_ATTEST_QUOTE && extra &&
               extra_size == nonce_size && !memcmp(extra, nonce, extra_size),
           "quote by %#x over %d PCRs: TPM-generated, type QUOTE, carries the nonce (%u + %u bytes)", handle,
           __builtin_popcount(mask), attest_size, signature_size);
    uint64_t repeat = arg_u64("repeat", 0);
    if (!repeat)
        return;
    started = rdtsc();
    for (uint64_t round = 0; round < repeat; round++) {
        if (tpm2_quote(&tpm, handle, nonce, (uint16_t)nonce_size, mask, attest, &attest_size, signature,
                       &signature_size)) {
            report(false, "TPM2_Quote %lu of %lu failed", round + 1, repeat);
            return;
        }
    }
    printf("tpm: %lu quotes in %lu us\n", repeat, cycles_to_ns(rdtsc() - started) / 1000);
}

static void op_log(void)
{
    if (!need_tpm())
        return;
    long length = tpm_log_length(&tpm);
    if (length < 0) {
        report(false, "the event log's length is malformed");
        return;
    }
    printf("tpm: log length=%ld\n", length);
    static uint8_t log[TPM_LOG_MAX];
    uint64_t reads = tpm.reads, started = rdtsc();
    tpm_log_read(&tpm, 0, log, (uint32_t)length);
    uint64_t elapsed_ns = cycles_to_ns(rdtsc() - started);
    for (uint32_t offset = 0; offset < (uint32_t)length; offset += LOG_BYTES_PER_LINE) {
        uint32_t count = (uint32_t)length - offset < LOG_BYTES_PER_LINE ? (uint32_t)length - offset
                                                                        : LOG_BYTES_PER_LINE;
        char label[24];
        snprintf(label, sizeof label, "log %u ", offset);
        print_hex(label, log + offset, count);
    }
    printf("tpm %u: log: %ld bytes in %lu MMIO reads, %lu us\n", env.pid, length, tpm.reads - reads,
           elapsed_ns / 1000);
    /* The first event: TCG_PCClientPCREvent (PCR, type, SHA-1 digest, size) holding "Spec ID Event03". */
    static const char signature[] = "Spec ID Event03";
    report(length >= 48 && !memcmp(log + 32, signature, sizeof signature),
           "the event log (%ld bytes) starts with a crypto-agile Spec ID Event03 header", length);
}

/* SHA-256 against FIPS 180-2's examples and an empty message; needs no TPM. */
static void op_selftest(void)
{
    static const struct {
        const char *message;
        unsigned repeat;
        const char *digest;
    } vectors[] = {
        {"", 1, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abc", 1, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", 1,
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
        {"a", 1000000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"},
        {"hello", 1, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
    };
    unsigned passed = 0, total = sizeof vectors / sizeof vectors[0];
    for (unsigned index = 0; index < total; index++) {
        struct sha256 context;
        uint8_t digest[TPM_SHA256_SIZE], expected[TPM_SHA256_SIZE];
        sha256_init(&context);
        for (unsigned round = 0; round < vectors[index].repeat; round++)
            sha256_update(&context, vectors[index].message, strlen(vectors[index].message));
        sha256_final(&context, digest);
        parse_hex(vectors[index].digest, expected, sizeof expected);
        if (!memcmp(digest, expected, sizeof digest))
            passed++;
        else
            print_hex("selftest sha256 wrong=", digest, sizeof digest);
    }
    report(passed == total, "SHA-256: %u of %u known answers", passed, total);
}

int main(void)
{
    timeout_ms = arg_u64("timeout_ms", 10000);
    take_turn();
    char ops[96];
    arg_str("op", ops, sizeof ops, "info");
    for (char *op = ops; *op;) {
        char *end = op;
        while (*end && *end != ',')
            end++;
        bool last = !*end;
        *end = '\0';
        if (!strcmp(op, "info"))
            op_info();
        else if (!strcmp(op, "random"))
            op_random();
        else if (!strcmp(op, "extend"))
            op_extend();
        else if (!strcmp(op, "pcrread"))
            op_pcrread();
        else if (!strcmp(op, "quote"))
            op_quote();
        else if (!strcmp(op, "log"))
            op_log();
        else if (!strcmp(op, "selftest"))
            op_selftest();
        else
            report(false, "op=%s: want info, random, extend, pcrread, quote, log or selftest", op);
        if (last)
            break;
        op = end + 1;
    }
    if (opened) {
        tpm_close(&tpm);
        printf("tpm %u: %lu commands, %lu MMIO reads, %lu MMIO writes\n", env.pid, tpm.commands, tpm.reads,
               tpm.writes);
    }
    pass_turn();
    return (int)failures();
}
