/* User-mode TPM 2.0 over the CRB interface (TCG PC Client Platform TPM Profile, locality 0), TPM 2.0
   command marshalling, and SHA-256 (FIPS 180-4). Every MMIO access below is an exit to the VMM: the
   driver counts them (tpm->reads, tpm->writes) and keeps them few. */
#include <tpm.h>

#define SPINS_PER_CLOCK_CHECK 16
#define RETRIES 4
#define TPM_RC_FAILURE 0x101u
#define TPM_RC_YIELDED 0x908u
#define TPM_RC_TESTING 0x90Au
#define TPM_RC_RETRY 0x922u

/* --- MMIO --- */

static uint32_t read32(struct tpm_dev *tpm, unsigned offset)
{
    tpm->reads++;
    return *(volatile uint32_t *)(tpm->window + offset);
}

static uint64_t read64(struct tpm_dev *tpm, unsigned offset)
{
    tpm->reads++;
    return *(volatile uint64_t *)(tpm->window + offset);
}

static void write32(struct tpm_dev *tpm, unsigned offset, uint32_t value)
{
    tpm->writes++;
    *(volatile uint32_t *)(tpm->window + offset) = value;
}

static void write64(struct tpm_dev *tpm, unsigned offset, uint64_t value)
{
    tpm->writes++;
    *(volatile uint64_t *)(tpm->window + offset) = value;
}

/* Polls a register until (value & mask) == want, for at most tpm->timeout_ms. */
static bool wait_for(struct tpm_dev *tpm, unsigned offset, uint32_t mask, uint32_t want)
{
    uint64_t deadline = 0;
    for (unsigned spins = 0;; spins++) {
        if ((read32(tpm, offset) & mask) == want)
            return true;
        if (spins % SPINS_PER_CLOCK_CHECK == 0) {
            uint64_t now = now_ns();
            if (!deadline)
                deadline = now + tpm->timeout_ms * 1000000ull;
            else if (now > deadline)
                return false;
        }
        __asm__ volatile("pause");
    }
}

static uint32_t be32(const uint8_t *bytes)
{
    return (uint32_t)bytes[0] << 24 | (uint32_t)bytes[1] << 16 | (uint32_t)bytes[2] << 8 | bytes[3];
}

/* --- the CRB interface --- */

volatile uint8_t *tpm_map(void)
{
    static volatile uint8_t *window;
    if (window)
        return window;
    long mapped = sys_mapio(TPM_CRB_BASE, TPM_WINDOW_SIZE);
    if (is_error(mapped)) {
        printf("%s %u: cannot map the TPM window at %#llx: error %ld\n", program_name, env.pid, TPM_CRB_BASE, mapped);
        return 0;
    }
    window = (volatile uint8_t *)mapped;
    return window;
}

int tpm_open(struct tpm_dev *tpm, uint64_t timeout_ms)
{
    memset(tpm, 0, sizeof *tpm);
    tpm->timeout_ms = timeout_ms;
    tpm->window = tpm_map();
    if (!tpm->window)
        return TPM_E_DRIVER;
    uint64_t id = read64(tpm, TPM_CRB_INTF_ID);
    tpm->interface_id = id;
    if (id == ~0ull)
        return TPM_E_ABSENT;
    unsigned type = id & 0xF, cap_crb = (id >> 14) & 1, selector = (id >> 17) & 3;
    if (type != 1 || !cap_crb || selector != 1) {
        printf("%s %u: not an active CRB interface: interface id %#lx (type %u, CapCRB %u, selector %u)\n",
               program_name, env.pid, id, type, cap_crb, selector);
        return TPM_E_DRIVER;
    }
    /* Where the command and response buffers are: this driver takes them only inside the window, shared. */
    uint64_t size_low = read64(tpm, TPM_CRB_CTRL_CMD_SIZE);   /* CMD_SIZE, CMD_LADDR */
    uint64_t high_size = read64(tpm, TPM_CRB_CTRL_CMD_HADDR); /* CMD_HADDR, RSP_SIZE */
    uint64_t response = read64(tpm, TPM_CRB_CTRL_RSP_ADDR);
    uint32_t command_size = (uint32_t)size_low, response_size = (uint32_t)(high_size >> 32);
    uint64_t command = (size_low >> 32) | (high_size & 0xFFFFFFFFull) << 32;
    uint64_t buffer = TPM_CRB_BASE + TPM_CRB_DATA_BUFFER;
    if (command != buffer || response != buffer || command_size != response_size || command_size < 64 ||
        command_size > 0x1000 - TPM_CRB_DATA_BUFFER) {
        printf("%s %u: unsupported CRB buffers: command %u bytes at %#lx, response %u bytes at %#lx (want one "
               "buffer at %#lx)\n", program_name, env.pid, command_size, command, response_size, response, buffer);
        return TPM_E_DRIVER;
    }
    tpm->buffer_size = command_size & ~7u;
    write32(tpm, TPM_LOC_CTRL, TPM_LOC_CTRL_REQUEST_ACCESS);
    if (!wait_for(tpm, TPM_LOC_STS, TPM_LOC_STS_GRANTED, TPM_LOC_STS_GRANTED)) {
        printf("%s %u: locality 0 was not granted within %lu ms\n", program_name, env.pid, timeout_ms);
        return TPM_E_DRIVER;
    }
    return TPM_OK;
}

void tpm_close(struct tpm_dev *tpm)
{
    if (tpm->ready)
        write32(tpm, TPM_CRB_CTRL_REQ, TPM_CTRL_REQ_GO_IDLE);
    tpm->ready = false;
    write32(tpm, TPM_LOC_CTRL, TPM_LOC_CTRL_RELINQUISH);
}

static long transmit_once(struct tpm_dev *tpm, const uint8_t *command, uint32_t length, uint8_t *response,
                          uint32_t capacity)
{
    if (!tpm->ready) {
        write32(tpm, TPM_CRB_CTRL_REQ, TPM_CTRL_REQ_CMD_READY);
        if (!wait_for(tpm, TPM_CRB_CTRL_STS, TPM_CTRL_STS_IDLE, 0)) {
            printf("%s %u: the TPM did not leave idle within %lu ms\n", program_name, env.pid, tpm->timeout_ms);
            return TPM_E_DRIVER;
        }
        tpm->ready = true;
    }
    for (uint32_t offset = 0; offset < length; offset += 8) { /* the last word's padding stays in the buffer */
        uint64_t word = 0;
        memcpy(&word, command + offset, length - offset < 8 ? length - offset : 8);
        write64(tpm, TPM_CRB_DATA_BUFFER + offset, word);
    }
    tpm->commands++;
    write32(tpm, TPM_CRB_CTRL_START, TPM_CTRL_START);
    if (!wait_for(tpm, TPM_CRB_CTRL_START, TPM_CTRL_START, 0)) {
        printf("%s %u: command %#x: no response within %lu ms\n", program_name, env.pid, be32(command + 6),
               tpm->timeout_ms);
        tpm->ready = false;
        return TPM_E_DRIVER;
    }
    uint64_t head = read64(tpm, TPM_CRB_DATA_BUFFER);
    uint8_t bytes[8];
    memcpy(bytes, &head, sizeof bytes);
    uint32_t size = be32(bytes + 2);
    if (size < TPM_HEADER_SIZE || size > tpm->buffer_size || size > capacity) {
        printf("%s %u: command %#x: a response of %u bytes (the buffer holds %u, the caller %u)\n", program_name,
               env.pid, be32(command + 6), size, tpm->buffer_size, capacity);
        return TPM_E_DRIVER;
    }
    memcpy(response, bytes, sizeof bytes);
    for (uint32_t offset = 8; offset < size; offset += 8) {
        uint64_t word = read64(tpm, TPM_CRB_DATA_BUFFER + offset);
        memcpy(response + offset, &word, size - offset < 8 ? size - offset : 8);
    }
    return size;
}

long tpm_transmit(struct tpm_dev *tpm, const uint8_t *command, uint32_t length, uint8_t *response,
                  uint32_t capacity)
{
    if (length < TPM_HEADER_SIZE || length > tpm->buffer_size || be32(command + 2) != length) {
        printf("%s %u: a command of %u bytes does not fit the TPM's buffer of %u\n", program_name, env.pid, length,
               tpm->buffer_size);
        return TPM_E_DRIVER;
    }
    for (unsigned attempt = 0;; attempt++) {
        long size = transmit_once(tpm, command, length, response, capacity);
        if (size < 0)
            return size;
        uint32_t code = tpm_response_code(response);
        if (code == TPM_RC_FAILURE && read32(tpm, TPM_CRB_CTRL_STS) & TPM_CTRL_STS_ERROR)
            printf("%s %u: the CRB reports an error (tpmSts): the VMM could not reach its TPM\n", program_name,
                   env.pid);
        if ((code != TPM_RC_RETRY && code != TPM_RC_TESTING && code != TPM_RC_YIELDED) || attempt + 1 >= RETRIES)
            return size;
        printf("%s %u: command %#x: %s, sending it again\n", program_name, env.pid, be32(command + 6),
               tpm_rc_text(code));
        if (attempt)
            sys_sleep(1); /* TPM_RC_RETRY usually clears at once; a self-test takes longer */
    }
}

long tpm_log_length(struct tpm_dev *tpm)
{
    uint32_t length = read32(tpm, TPM_LOG_LENGTH);
    if (length > TPM_LOG_MAX) {
        printf("%s %u: the event-log window claims %u bytes (at most %u)\n", program_name, env.pid, length,
               TPM_LOG_MAX);
        return TPM_E_DRIVER;
    }
    return length;
}

void tpm_log_read(struct tpm_dev *tpm, uint32_t offset, uint8_t *out, uint32_t length)
{
    uint32_t end = offset + length;
    for (uint32_t word_at = offset & ~7u; word_at < end; word_at += 8) {
        uint64_t word = read64(tpm, TPM_LOG_DATA + word_at);
        uint8_t bytes[8];
        memcpy(bytes, &word, sizeof bytes);
        for (uint32_t index = 0; index < 8; index++)
            if (word_at + index >= offset && word_at + index < end)
                out[word_at + index - offset] = bytes[index];
    }
}

/* --- marshalling --- */

void tpm_cmd_begin(struct tpm_cmd *cmd, uint16_t tag, uint32_t code)
{
    cmd->length = 0;
    cmd->overflow = false;
    tpm_put_u16(cmd, tag);
    tpm_put_u32(cmd, 0); /* size, patched by tpm_cmd_end */
    tpm_put_u32(cmd, code);
}

void tpm_put_bytes(struct tpm_cmd *cmd, const void *data, uint32_t length)
{
    if (cmd->overflow || length > sizeof cmd->data - cmd->length) {
        cmd->overflow = true;
        return;
    }
    memcpy(cmd->data + cmd->length, data, length);
    cmd->length += length;
}

void tpm_put_u8(struct tpm_cmd *cmd, uint8_t value) { tpm_put_bytes(cmd, &value, 1); }

void tpm_put_u16(struct tpm_cmd *cmd, uint16_t value)
{
    uint8_t bytes[2] = {(uint8_t)(value >> 8), (uint8_t)value};
    tpm_put_bytes(cmd, bytes, sizeof bytes);
}

void tpm_put_u32(struct tpm_cmd *cmd, uint32_t value)
{
    uint8_t bytes[4] = {(uint8_t)(value >> 24), (uint8_t)(value >> 16), (uint8_t)(value >> 8), (uint8_t)value};
    tpm_put_bytes(cmd, bytes, sizeof bytes);
}

void tpm_put_tpm2b(struct tpm_cmd *cmd, const void *data, uint16_t length)
{
    tpm_put_u16(cmd, length);
    tpm_put_bytes(cmd, data, length);
}

void tpm_put_password_session(struct tpm_cmd *cmd)
{
    tpm_put_u32(cmd, 4 + 2 + 1 + 2); /* authorizationSize */
    tpm_put_u32(cmd, TPM_RS_PW);     /* sessionHandle */
    tpm_put_u16(cmd, 0);             /* nonceCaller: empty */
    tpm_put_u8(cmd, 0);              /* sessionAttributes */
    tpm_put_u16(cmd, 0);             /* hmac: the password, empty */
}

void tpm_put_pcr_selection(struct tpm_cmd *cmd, uint32_t mask)
{
    tpm_put_u32(cmd, 1); /* one bank */
    tpm_put_u16(cmd, TPM_ALG_SHA256);
    tpm_put_u8(cmd, TPM_PCR_SELECT_BYTES);
    for (unsigned index = 0; index < TPM_PCR_SELECT_BYTES; index++)
        tpm_put_u8(cmd, (uint8_t)(mask >> (8 * index)));
}

bool tpm_cmd_end(struct tpm_cmd *cmd)
{
    if (cmd->overflow)
        return false;
    for (unsigned index = 0; index < 4; index++)
        cmd->data[2 + index] = (uint8_t)(cmd->length >> (24 - 8 * index));
    return true;
}

void tpm_reply_init(struct tpm_reply *reply, const uint8_t *data, uint32_t length)
{
    reply->data = data;
    reply->length = length;
    reply->position = 0;
    reply->error = false;
}

const uint8_t *tpm_get_bytes(struct tpm_reply *reply, uint32_t length)
{
    if (reply->error || length > reply->length - reply->position) {
        reply->error = true;
        return 0;
    }
    const uint8_t *bytes = reply->data + reply->position;
    reply->position += length;
    return bytes;
}

uint8_t tpm_get_u8(struct tpm_reply *reply)
{
    const uint8_t *bytes = tpm_get_bytes(reply, 1);
    return bytes ? bytes[0] : 0;
}

uint16_t tpm_get_u16(struct tpm_reply *reply)
{
    const uint8_t *bytes = tpm_get_bytes(reply, 2);
    return bytes ? (uint16_t)(bytes[0] << 8 | bytes[1]) : 0;
}

uint32_t tpm_get_u32(struct tpm_reply *reply)
{
    const uint8_t *bytes = tpm_get_bytes(reply, 4);
    return bytes ? be32(bytes) : 0;
}

uint32_t tpm_response_code(const uint8_t *response) { return be32(response + 6); }

struct rc_name {
    uint32_t code;
    const char *name;
};

/* Format-zero codes and warnings, compared whole. */
static const struct rc_name rc_names[] = {
    {0x100, "TPM_RC_INITIALIZE"}, {0x101, "TPM_RC_FAILURE"},    {0x125, "TPM_RC_AUTH_MISSING"},
    {0x127, "TPM_RC_PCR"},        {0x142, "TPM_RC_COMMAND_SIZE"}, {0x143, "TPM_RC_COMMAND_CODE"},
    {0x144, "TPM_RC_AUTHSIZE"},   {0x907, "TPM_RC_LOCALITY"},   {0x908, "TPM_RC_YIELDED"},
    {0x90A, "TPM_RC_TESTING"},    {0x921, "TPM_RC_LOCKOUT"},    {0x922, "TPM_RC_RETRY"},
};
/* Format-one errors (bit 7 set): the low 6 bits, plus the handle, parameter or session they concern. */
static const struct rc_name fmt1_names[] = {
    {0x04, "TPM_RC_VALUE"},     {0x0A, "TPM_RC_TYPE"},      {0x0B, "TPM_RC_HANDLE"},   {0x0D, "TPM_RC_RANGE"},
    {0x0E, "TPM_RC_AUTH_FAIL"}, {0x12, "TPM_RC_SCHEME"},    {0x15, "TPM_RC_SIZE"},     {0x17, "TPM_RC_TAG"},
    {0x18, "TPM_RC_SELECTOR"},  {0x1C, "TPM_RC_KEY"},       {0x22, "TPM_RC_BAD_AUTH"}, {0x02, "TPM_RC_ATTRIBUTES"},
    {0x03, "TPM_RC_HASH"},      {0x1A, "TPM_RC_INSUFFICIENT"},
};

const char *tpm_rc_text(uint32_t code)
{
    static char text[80];
    if (code & 0x80) {
        const char *name = "a format-one error";
        for (unsigned index = 0; index < sizeof fmt1_names / sizeof fmt1_names[0]; index++)
            if (fmt1_names[index].code == (code & 0x3F))
                name = fmt1_names[index].name;
        unsigned number = (code >> 8) & 0xF;
        if (code & 0x40)
            snprintf(text, sizeof text, "%s, parameter %u", name, number);
        else if (number & 0x8)
            snprintf(text, sizeof text, "%s, session %u", name, number & 7);
        else
            snprintf(text, sizeof text, "%s, handle %u", name, number);
        return text;
    }
    for (unsigned index = 0; index < sizeof rc_names / sizeof rc_names[0]; index++)
        if (rc_names[index].code == code)
            return rc_names[index].name;
    return "see TPM 2.0 Part 2, TPM_RC";
}

/* --- commands --- */

static uint8_t response_buffer[TPM_BUFFER_MAX];
static struct tpm_cmd command_buffer;

/* Sends `cmd`; on success `reply` reads the response after its header. */
static long run(struct tpm_dev *tpm, struct tpm_cmd *cmd, const char *name, struct tpm_reply *reply)
{
    if (!tpm_cmd_end(cmd)) {
        printf("%s %u: %s: the command does not fit %u bytes\n", program_name, env.pid, name, TPM_BUFFER_MAX);
        return TPM_E_DRIVER;
    }
    long length = tpm_transmit(tpm, cmd->data, cmd->length, response_buffer, sizeof response_buffer);
    if (length < 0)
        return length;
    uint32_t code = tpm_response_code(response_buffer);
    if (code != TPM_RC_SUCCESS) {
        printf("%s %u: %s failed: response code %#x (%s)\n", program_name, env.pid, name, code, tpm_rc_text(code));
        return code;
    }
    tpm_reply_init(reply, response_buffer, (uint32_t)length);
    reply->position = TPM_HEADER_SIZE;
    return TPM_OK;
}

static long malformed(const char *name)
{
    printf("%s %u: %s: a malformed response\n", program_name, env.pid, name);
    return TPM_E_DRIVER;
}

long tpm2_startup_if_needed(struct tpm_dev *tpm)
{
    struct tpm_cmd *cmd = &command_buffer;
    tpm_cmd_begin(cmd, TPM_ST_NO_SESSIONS, TPM_CC_STARTUP);
    tpm_put_u16(cmd, 0); /* TPM_SU_CLEAR */
    if (!tpm_cmd_end(cmd))
        return TPM_E_DRIVER;
    long length = tpm_transmit(tpm, cmd->data, cmd->length, response_buffer, sizeof response_buffer);
    if (length < 0)
        return length;
    uint32_t code = tpm_response_code(response_buffer);
    if (code == TPM_RC_INITIALIZE)
        return 0;
    return code == TPM_RC_SUCCESS ? 1 : (long)code;
}

long tpm2_get_random(struct tpm_dev *tpm, uint8_t *out, uint16_t count, uint16_t *got)
{
    struct tpm_cmd *cmd = &command_buffer;
    struct tpm_reply reply;
    tpm_cmd_begin(cmd, TPM_ST_NO_SESSIONS, TPM_CC_GET_RANDOM);
    tpm_put_u16(cmd, count);
    long result = run(tpm, cmd, "TPM2_GetRandom", &reply);
    if (result)
        return result;
    uint16_t size = tpm_get_u16(&reply);
    const uint8_t *bytes = tpm_get_bytes(&reply, size);
    if (!bytes || size > count)
        return malformed("TPM2_GetRandom");
    memcpy(out, bytes, size);
    *got = size;
    return TPM_OK;
}

long tpm2_pcr_extend(struct tpm_dev *tpm, unsigned pcr, const uint8_t digest[TPM_SHA256_SIZE])
{
    struct tpm_cmd *cmd = &command_buffer;
    struct tpm_reply reply;
    tpm_cmd_begin(cmd, TPM_ST_SESSIONS, TPM_CC_PCR_EXTEND);
    tpm_put_u32(cmd, pcr); /* pcrHandle: PCR n is handle n */
    tpm_put_password_session(cmd);
    tpm_put_u32(cmd, 1); /* TPML_DIGEST_VALUES: one TPMT_HA */
    tpm_put_u16(cmd, TPM_ALG_SHA256);
    tpm_put_bytes(cmd, digest, TPM_SHA256_SIZE);
    return run(tpm, cmd, "TPM2_PCR_Extend", &reply);
}

long tpm2_pcr_read(struct tpm_dev *tpm, uint32_t mask, uint8_t values[TPM_PCR_COUNT][TPM_SHA256_SIZE])
{
    uint32_t pending = mask & ((1u << TPM_PCR_COUNT) - 1);
    while (pending) {
        struct tpm_cmd *cmd = &command_buffer;
        struct tpm_reply reply;
        tpm_cmd_begin(cmd, TPM_ST_NO_SESSIONS, TPM_CC_PCR_READ);
        tpm_put_pcr_selection(cmd, pending);
        long result = run(tpm, cmd, "TPM2_PCR_Read", &reply);
        if (result)
            return result;
        tpm_get_u32(&reply); /* pcrUpdateCounter */
        uint32_t banks = tpm_get_u32(&reply), returned = 0;
        for (uint32_t bank = 0; bank < banks && !reply.error; bank++) {
            uint16_t algorithm = tpm_get_u16(&reply);
            uint8_t size = tpm_get_u8(&reply);
            const uint8_t *select = tpm_get_bytes(&reply, size);
            for (unsigned pcr = 0; select && pcr < 8u * size && pcr < TPM_PCR_COUNT; pcr++)
                if (algorithm == TPM_ALG_SHA256 && select[pcr / 8] & (1u << (pcr % 8)))
                    returned |= 1u << pcr;
        }
        uint32_t count = tpm_get_u32(&reply);
        if (reply.error || !returned || returned & ~pending || count != (uint32_t)__builtin_popcount(returned))
            return malformed("TPM2_PCR_Read");
        for (unsigned pcr = 0; pcr < TPM_PCR_COUNT; pcr++) {
            if (!(returned & (1u << pcr)))
                continue;
            uint16_t size = tpm_get_u16(&reply);
            const uint8_t *digest = tpm_get_bytes(&reply, size);
            if (!digest || size != TPM_SHA256_SIZE)
                return malformed("TPM2_PCR_Read");
            memcpy(values[pcr], digest, TPM_SHA256_SIZE);
        }
        pending &= ~returned;
    }
    return TPM_OK;
}

long tpm2_quote(struct tpm_dev *tpm, uint32_t sign_handle, const uint8_t *nonce, uint16_t nonce_size,
                uint32_t mask, uint8_t *attest, uint32_t *attest_size, uint8_t *signature,
                uint32_t *signature_size)
{
    struct tpm_cmd *cmd = &command_buffer;
    struct tpm_reply reply;
    tpm_cmd_begin(cmd, TPM_ST_SESSIONS, TPM_CC_QUOTE);
    tpm_put_u32(cmd, sign_handle);
    tpm_put_password_session(cmd);
    tpm_put_tpm2b(cmd, nonce, nonce_size); /* qualifyingData */
    tpm_put_u16(cmd, TPM_ALG_NULL);        /* inScheme: the key's own */
    tpm_put_pcr_selection(cmd, mask);
    long result = run(tpm, cmd, "TPM2_Quote", &reply);
    if (result)
        return result;
    uint32_t parameters = tpm_get_u32(&reply);
    if (reply.error || parameters > reply.length - reply.position)
        return malformed("TPM2_Quote");
    uint32_t end = reply.position + parameters;
    uint16_t size = tpm_get_u16(&reply);
    const uint8_t *quoted = tpm_get_bytes(&reply, size);
    if (!quoted || reply.position > end)
        return malformed("TPM2_Quote");
    uint32_t signature_length = end - reply.position;
    const uint8_t *signed_bytes = tpm_get_bytes(&reply, signature_length);
    if (!signed_bytes || signature_length < 2)
        return malformed("TPM2_Quote");
    memcpy(attest, quoted, size);
    *attest_size = size;
    memcpy(signature, signed_bytes, signature_length);
    *signature_size = signature_length;
    return TPM_OK;
}

long tpm2_get_properties(struct tpm_dev *tpm, uint32_t first, uint32_t count, uint32_t *properties,
                         uint32_t *values, uint32_t *got)
{
    struct tpm_cmd *cmd = &command_buffer;
    struct tpm_reply reply;
    tpm_cmd_begin(cmd, TPM_ST_NO_SESSIONS, TPM_CC_GET_CAPABILITY);
    tpm_put_u32(cmd, TPM_CAP_TPM_PROPERTIES);
    tpm_put_u32(cmd, first);
    tpm_put_u32(cmd, count);
    long result = run(tpm, cmd, "TPM2_GetCapability", &reply);
    if (result)
        return result;
    tpm_get_u8(&reply); /* moreData */
    uint32_t capability = tpm_get_u32(&reply), returned = tpm_get_u32(&reply);
    if (reply.error || capability != TPM_CAP_TPM_PROPERTIES || returned > count)
        return malformed("TPM2_GetCapability");
    for (uint32_t index = 0; index < returned; index++) {
        properties[index] = tpm_get_u32(&reply);
        values[index] = tpm_get_u32(&reply);
    }
    if (reply.error)
        return malformed("TPM2_GetCapability");
    *got = returned;
    return TPM_OK;
}

/* --- SHA-256 (FIPS 180-4) --- */

static const uint32_t sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t rotr(uint32_t value, unsigned bits) { return value >> bits | value << (32 - bits); }

static void sha256_block(uint32_t state[8], const uint8_t block[64])
{
    uint32_t w[64];
    for (unsigned t = 0; t < 16; t++)
        w[t] = be32(block + 4 * t);
    for (unsigned t = 16; t < 64; t++) {
        uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (unsigned t = 0; t < 64; t++) {
        uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + sha256_k[t] + w[t];
        uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
}

void sha256_init(struct sha256 *context)
{
    static const uint32_t initial[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(context->state, initial, sizeof initial);
    context->bytes = 0;
    context->used = 0;
}

void sha256_update(struct sha256 *context, const void *data, size_t length)
{
    const uint8_t *bytes = data;
    context->bytes += length;
    while (length) {
        uint32_t take = 64 - context->used;
        if (take > length)
            take = (uint32_t)length;
        memcpy(context->block + context->used, bytes, take);
        context->used += take;
        bytes += take;
        length -= take;
        if (context->used == 64) {
            sha256_block(context->state, context->block);
            context->used = 0;
        }
    }
}

void sha256_final(struct sha256 *context, uint8_t digest[TPM_SHA256_SIZE])
{
    uint64_t bits = context->bytes * 8;
    uint8_t pad = 0x80;
    sha256_update(context, &pad, 1);
    pad = 0;
    while (context->used != 56)
        sha256_update(context, &pad, 1);
    uint8_t length[8];
    for (unsigned index = 0; index < 8; index++)
        length[index] = (uint8_t)(bits >> (56 - 8 * index));
    sha256_update(context, length, sizeof length);
    for (unsigned index = 0; index < 8; index++)
        for (unsigned byte = 0; byte < 4; byte++)
            digest[4 * index + byte] = (uint8_t)(context->state[index] >> (24 - 8 * byte));
}

void sha256(const void *data, size_t length, uint8_t digest[TPM_SHA256_SIZE])
{
    struct sha256 context;
    sha256_init(&context);
    sha256_update(&context, data, length);
    sha256_final(&context, digest);
}
