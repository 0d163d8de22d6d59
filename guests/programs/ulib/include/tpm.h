/* A user-mode TPM 2.0 driver for the CRB interface (TCG PC Client Platform TPM Profile, locality 0) at
   0xFED40000: the window mapped uncached with SYS_MAPIO, commands written into the CRB data buffer and
   started, completion polled. Every register or buffer access is an exit to the VMM, so the driver uses
   8-byte accesses, reads the response's header before the rest, stays ready (cmdReady) across commands
   and goes idle only in tpm_close. The VMM's window also serves the boot's event log (at 0x10000).
   Also here: TPM 2.0 wire-format marshalling (big-endian) for the commands the tpm program uses, and
   SHA-256 (FIPS 180-4). One process at a time may use the TPM (locality 0 has no arbitration). */
#ifndef ULIB_TPM_H
#define ULIB_TPM_H

#include <ulib.h>

#define TPM_CRB_BASE 0xFED40000ull
#define TPM_WINDOW_SIZE 0x20000ull

/* CRB registers of locality 0 (offsets into the window). */
#define TPM_LOC_STATE 0x00
#define TPM_LOC_CTRL 0x08
#define TPM_LOC_STS 0x0C
#define TPM_CRB_INTF_ID 0x30 /* 64 bits */
#define TPM_CRB_CTRL_REQ 0x40
#define TPM_CRB_CTRL_STS 0x44
#define TPM_CRB_CTRL_CANCEL 0x48
#define TPM_CRB_CTRL_START 0x4C
#define TPM_CRB_CTRL_CMD_SIZE 0x58 /* then CMD_LADDR at 0x5C */
#define TPM_CRB_CTRL_CMD_HADDR 0x60 /* then RSP_SIZE at 0x64 */
#define TPM_CRB_CTRL_RSP_ADDR 0x68 /* 64 bits */
#define TPM_CRB_DATA_BUFFER 0x80

#define TPM_LOC_STATE_ASSIGNED (1u << 1)
#define TPM_LOC_STATE_REG_VALID (1u << 7)
#define TPM_LOC_CTRL_REQUEST_ACCESS (1u << 0)
#define TPM_LOC_CTRL_RELINQUISH (1u << 1)
#define TPM_LOC_STS_GRANTED (1u << 0)
#define TPM_CTRL_REQ_CMD_READY (1u << 0)
#define TPM_CTRL_REQ_GO_IDLE (1u << 1)
#define TPM_CTRL_STS_ERROR (1u << 0)
#define TPM_CTRL_STS_IDLE (1u << 1)
#define TPM_CTRL_START (1u << 0)

/* The event-log window (pyrovisor's, not the TCG's): a 32-bit length, then the log from 0x10010. */
#define TPM_LOG_LENGTH 0x10000
#define TPM_LOG_DATA 0x10010
#define TPM_LOG_MAX 0xFFF0u

/* TPM 2.0 constants (TPM 2.0 Library, Part 2). */
#define TPM_ST_NO_SESSIONS 0x8001
#define TPM_ST_SESSIONS 0x8002
#define TPM_ST_ATTEST_QUOTE 0x8018
#define TPM_GENERATED_VALUE 0xFF544347u
#define TPM_RS_PW 0x40000009u
#define TPM_ALG_SHA256 0x000B
#define TPM_ALG_NULL 0x0010
#define TPM_CC_QUOTE 0x158
#define TPM_CC_STARTUP 0x144
#define TPM_CC_GET_CAPABILITY 0x17A
#define TPM_CC_GET_RANDOM 0x17B
#define TPM_CC_PCR_READ 0x17E
#define TPM_CC_PCR_EXTEND 0x182
#define TPM_CAP_TPM_PROPERTIES 6u
#define TPM_RC_SUCCESS 0
#define TPM_RC_INITIALIZE 0x100
#define TPM_HEADER_SIZE 10u
#define TPM_PCR_COUNT 24u
#define TPM_PCR_SELECT_BYTES 3u
#define TPM_SHA256_SIZE 32u
#define TPM_BUFFER_MAX 4096u
#define TPM_NONCE_MAX 64u

/* Results of the driver's calls besides TPM response codes (which are positive). */
#define TPM_OK 0
#define TPM_E_ABSENT (-1)  /* nothing at the address: the window reads all ones */
#define TPM_E_DRIVER (-2)  /* not a usable CRB, a timeout, a malformed response: printed already */

struct tpm_dev {
    volatile uint8_t *window;
    uint64_t interface_id;  /* TPM_CRB_INTF_ID_0 */
    uint32_t buffer_size;   /* the data buffer's bytes (CMD_SIZE, RSP_SIZE) */
    uint64_t timeout_ms;    /* longest wait for one command */
    bool ready;             /* cmdReady granted and not yet idle */
    uint64_t reads, writes; /* MMIO accesses, each an exit */
    uint64_t commands;
};

/* The window, mapped uncached (once per process: SYS_MAPIO regions are few); 0 after printing why. */
volatile uint8_t *tpm_map(void);
/* Maps the window, checks it is a CRB interface whose buffer lies in it, takes locality 0. TPM_OK,
   TPM_E_ABSENT (quietly: the caller says so) or TPM_E_DRIVER (after printing why). */
int tpm_open(struct tpm_dev *tpm, uint64_t timeout_ms);
/* goIdle and relinquish the locality. */
void tpm_close(struct tpm_dev *tpm);
/* One command (its header's size is `length`); the response (at most `capacity` bytes) in `response`.
   Returns the response's length or TPM_E_DRIVER. Retries a few times on TPM_RC_RETRY, TESTING, YIELDED. */
long tpm_transmit(struct tpm_dev *tpm, const uint8_t *command, uint32_t length, uint8_t *response,
                  uint32_t capacity);
/* The event-log window: its length (TPM_E_DRIVER if over TPM_LOG_MAX) and bytes. */
long tpm_log_length(struct tpm_dev *tpm);
void tpm_log_read(struct tpm_dev *tpm, uint32_t offset, uint8_t *out, uint32_t length);

/* Marshalling (big-endian). A command under construction; overflow sticks. */
struct tpm_cmd {
    uint8_t data[TPM_BUFFER_MAX];
    uint32_t length;
    bool overflow;
};
void tpm_cmd_begin(struct tpm_cmd *cmd, uint16_t tag, uint32_t code);
void tpm_put_u8(struct tpm_cmd *cmd, uint8_t value);
void tpm_put_u16(struct tpm_cmd *cmd, uint16_t value);
void tpm_put_u32(struct tpm_cmd *cmd, uint32_t value);
void tpm_put_bytes(struct tpm_cmd *cmd, const void *data, uint32_t length);
void tpm_put_tpm2b(struct tpm_cmd *cmd, const void *data, uint16_t length);
/* The authorization area with one password session (TPM_RS_PW) and an empty password. */
void tpm_put_password_session(struct tpm_cmd *cmd);
/* TPML_PCR_SELECTION: the SHA-256 bank, PCRs of `mask` (bit n: PCR n). */
void tpm_put_pcr_selection(struct tpm_cmd *cmd, uint32_t mask);
/* Patches the header's size; false if the command overflowed. */
bool tpm_cmd_end(struct tpm_cmd *cmd);

/* Unmarshalling a response; any read past its end sets `error` and yields zeros. */
struct tpm_reply {
    const uint8_t *data;
    uint32_t length;
    uint32_t position;
    bool error;
};
void tpm_reply_init(struct tpm_reply *reply, const uint8_t *data, uint32_t length);
uint8_t tpm_get_u8(struct tpm_reply *reply);
uint16_t tpm_get_u16(struct tpm_reply *reply);
uint32_t tpm_get_u32(struct tpm_reply *reply);
const uint8_t *tpm_get_bytes(struct tpm_reply *reply, uint32_t length); /* 0 past the end */
uint32_t tpm_response_code(const uint8_t *response);
/* A response code in words (TPM_RC_..., with the handle, parameter or session it names); a static buffer. */
const char *tpm_rc_text(uint32_t code);

/* Commands. Each returns TPM_OK, a TPM response code (> 0, printed with the command's name), or
   TPM_E_DRIVER. */
/* TPM2_Startup(CLEAR) when no firmware has sent it, as Linux's driver does: 1 if it was needed and done, 0 if the
   TPM was already started (TPM_RC_INITIALIZE), else a negative driver error or the TPM's response code. */
long tpm2_startup_if_needed(struct tpm_dev *tpm);
long tpm2_get_random(struct tpm_dev *tpm, uint8_t *out, uint16_t count, uint16_t *got);
long tpm2_pcr_extend(struct tpm_dev *tpm, unsigned pcr, const uint8_t digest[TPM_SHA256_SIZE]);
/* The SHA-256 values of the PCRs of `mask` (as many PCR_Read commands as it takes; 8 per command). */
long tpm2_pcr_read(struct tpm_dev *tpm, uint32_t mask, uint8_t values[TPM_PCR_COUNT][TPM_SHA256_SIZE]);
/* TPM2_Quote by the key at sign_handle (empty password), inScheme NULL, over the SHA-256 PCRs of `mask`,
   with `nonce` as qualifyingData. `attest`: the TPM2B_ATTEST's contents (without its size); `signature`:
   the TPMT_SIGNATURE as marshalled. Both buffers of TPM_BUFFER_MAX bytes. */
long tpm2_quote(struct tpm_dev *tpm, uint32_t sign_handle, const uint8_t *nonce, uint16_t nonce_size,
                uint32_t mask, uint8_t *attest, uint32_t *attest_size, uint8_t *signature,
                uint32_t *signature_size);
/* TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES): up to `count` (property, value) pairs from `first`. */
long tpm2_get_properties(struct tpm_dev *tpm, uint32_t first, uint32_t count, uint32_t *properties,
                         uint32_t *values, uint32_t *got);

/* SHA-256. */
struct sha256 {
    uint32_t state[8];
    uint64_t bytes;
    uint8_t block[64];
    uint32_t used;
};
void sha256_init(struct sha256 *context);
void sha256_update(struct sha256 *context, const void *data, size_t length);
void sha256_final(struct sha256 *context, uint8_t digest[TPM_SHA256_SIZE]);
void sha256(const void *data, size_t length, uint8_t digest[TPM_SHA256_SIZE]);

#endif
