/* vmdetect: the checks evasive malware runs to tell a virtual machine from a real one, each named after what it
   reads, with one machine-parsable verdict line per check:
       vmdetect: <check>: detected|not-detected|unavailable (<evidence>)
   then "vmdetect: summary: D detected, N not-detected, U unavailable". CPUID is executed here (CPL3) and, through
   SYS_CPUID, by the kernel (CPL0); on kvm_pvm the two differ (docs/introspection.md section 3).
   Arguments: samples=N (timing checks, default 200) drift_ms=M (timer drift interval, default 500). */
#include <ulib.h>

const char program_name[] = "vmdetect";

#define LEAF_HYPERVISOR 0x40000000u
#define HYPERVISOR_BIT (1u << 31)
#define CPUID_THRESHOLD_CYCLES 1000 /* pafish's and al-khaser's: bare-metal CPUID takes a few hundred cycles */
#define EXIT_THRESHOLD_NS 10000     /* an ISA port read on real hardware takes 1-2 us; an exit to a VMM more */
#define DRIFT_LIMIT_PPM 20000       /* 2 %: timer ticks against the TSC */
#define POST_PORT 0x80              /* the POST code port: harmless to read, no device behind it here */
#define FW_CFG_SELECTOR 0x510       /* QEMU's fw_cfg: select key 0, read "QEMU" */
#define FW_CFG_DATA 0x511
#define VIRTIO_VENDOR 0x0C
#define VIRTIO_CONFIG 0x100
#define VIRTIO_ID_NET 1
#define MAX_VIRTIO 16

static unsigned counts[3];
static const char *const verdict_names[3] = {"detected", "not-detected", "unavailable"};
enum verdict { DETECTED, NOT_DETECTED, UNAVAILABLE };

static void verdict(const char *check, enum verdict result, const char *evidence)
{
    counts[result]++;
    printf("vmdetect: %s: %s (%s)\n", check, verdict_names[result], evidence);
}

struct regs {
    uint32_t eax, ebx, ecx, edx;
};

static struct regs cpuid_user(uint32_t leaf, uint32_t subleaf)
{
    struct regs r;
    __asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx) : "a"(leaf), "c"(subleaf));
    return r;
}

static bool kernel_cpuid_works = true;

static struct regs cpuid_kernel(uint32_t leaf, uint32_t subleaf)
{
    volatile uint32_t out[4] = {0, 0, 0, 0}; /* touched here, so the kernel's store finds the page present */
    long result = syscall5(SYS_CPUID, leaf, subleaf, (long)out, 0, 0);
    if (is_error(result))
        kernel_cpuid_works = false;
    struct regs r = {out[0], out[1], out[2], out[3]};
    return r;
}

typedef struct regs (*cpuid_fn)(uint32_t, uint32_t);

static bool contains_word(const char *text, size_t length, const char *word)
{
    size_t word_length = strlen(word);
    for (size_t start = 0; start + word_length <= length; start++) {
        size_t index = 0;
        while (index < word_length) {
            char c = text[start + index], w = word[index];
            if (c >= 'A' && c <= 'Z')
                c = (char)(c - 'A' + 'a');
            if (c != w)
                break;
            index++;
        }
        if (index == word_length)
            return true;
    }
    return false;
}

/* Lower-case words that name a hypervisor or its devices in strings a guest can read. */
static const char *const vm_words[] = {"pyrovisor", "pyro", "qemu", "kvm", "vmware", "vbox", "virtualbox", "bochs",
                                       "xen", "hyper-v", "virtual", "virtio", "parallels", "tcg"};

static const char *vm_word_in(const char *text, size_t length)
{
    for (size_t index = 0; index < sizeof vm_words / sizeof vm_words[0]; index++)
        if (contains_word(text, length, vm_words[index]))
            return vm_words[index];
    return 0;
}

static void printable(char *out, const void *data, size_t length)
{
    const uint8_t *bytes = data;
    for (size_t index = 0; index < length; index++)
        out[index] = bytes[index] >= 0x20 && bytes[index] < 0x7F ? (char)bytes[index] : '.';
    out[length] = 0;
}

static void cpuid_checks(const char *where, cpuid_fn cpuid)
{
    char check[64], evidence[160];
    struct regs leaf1 = cpuid(1, 0);
    snprintf(check, sizeof check, "cpuid-hypervisor-bit-%s", where);
    snprintf(evidence, sizeof evidence, "CPUID.1:ECX[31]=%u, ECX=%#x", leaf1.ecx >> 31, leaf1.ecx);
    verdict(check, leaf1.ecx & HYPERVISOR_BIT ? DETECTED : NOT_DETECTED, evidence);

    struct regs vendor = cpuid(LEAF_HYPERVISOR, 0);
    uint32_t signature_words[3] = {vendor.ebx, vendor.ecx, vendor.edx};
    char signature[13];
    printable(signature, signature_words, 12);
    bool in_range = vendor.eax >= LEAF_HYPERVISOR && vendor.eax < 0x50000000u;
    bool named = false;
    for (unsigned index = 0; index < 12; index++)
        named |= signature[index] != '.';
    snprintf(check, sizeof check, "cpuid-hypervisor-leaves-%s", where);
    snprintf(evidence, sizeof evidence, "CPUID.0x40000000: max leaf %#x, signature \"%s\"", vendor.eax, signature);
    verdict(check, in_range && named ? DETECTED : NOT_DETECTED, evidence);

    uint32_t brand_words[12];
    for (uint32_t leaf = 0; leaf < 3; leaf++) {
        struct regs r = cpuid(0x80000002u + leaf, 0);
        brand_words[leaf * 4] = r.eax, brand_words[leaf * 4 + 1] = r.ebx;
        brand_words[leaf * 4 + 2] = r.ecx, brand_words[leaf * 4 + 3] = r.edx;
    }
    char brand[49];
    size_t brand_length = 0;
    while (brand_length < 48 && ((const char *)brand_words)[brand_length])
        brand_length++;
    printable(brand, brand_words, brand_length);
    const char *word = vm_word_in(brand, brand_length);
    snprintf(check, sizeof check, "cpuid-brand-string-%s", where);
    snprintf(evidence, sizeof evidence, "CPUID.0x80000002-4: \"%s\"%s%s", brand, word ? ", names " : "", word ? word : "");
    verdict(check, word ? DETECTED : NOT_DETECTED, evidence);
}

static inline uint64_t fenced_rdtsc(void)
{
    uint32_t low, high;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(low), "=d"(high) : : "memory");
    return ((uint64_t)high << 32) | low;
}

static uint64_t median(uint64_t *values, unsigned count)
{
    for (unsigned i = 1; i < count; i++)
        for (unsigned j = i; j > 0 && values[j - 1] > values[j]; j--) {
            uint64_t t = values[j];
            values[j] = values[j - 1];
            values[j - 1] = t;
        }
    return values[count / 2];
}

#define MAX_SAMPLES 1000
static uint64_t samples[MAX_SAMPLES];

static void timing_checks(unsigned count)
{
    char evidence[160];
    uint64_t total = 0;
    for (unsigned index = 0; index < count; index++) {
        uint64_t before = fenced_rdtsc();
        (void)cpuid_user(0, 0);
        samples[index] = fenced_rdtsc() - before;
        total += samples[index];
    }
    uint64_t mean = total / count, middle = median(samples, count);
    snprintf(evidence, sizeof evidence, "RDTSC around CPUID: mean %lu cycles, median %lu, threshold %u", mean, middle,
             CPUID_THRESHOLD_CYCLES);
    verdict("rdtsc-cpuid-delta", mean > CPUID_THRESHOLD_CYCLES ? DETECTED : NOT_DETECTED, evidence);

    if (is_error(sys_ioperm(POST_PORT, 1))) {
        verdict("rdtsc-exit-delta", UNAVAILABLE, "SYS_IOPERM refused port 0x80");
    } else {
        for (unsigned index = 0; index < count; index++) {
            uint64_t before = fenced_rdtsc();
            uint8_t value;
            __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"((uint16_t)POST_PORT));
            samples[index] = fenced_rdtsc() - before;
        }
        uint64_t ns = cycles_to_ns(median(samples, count));
        snprintf(evidence, sizeof evidence, "RDTSC around IN from port 0x80: median %lu ns, threshold %u ns", ns,
                 EXIT_THRESHOLD_NS);
        verdict("rdtsc-exit-delta", ns > EXIT_THRESHOLD_NS ? DETECTED : NOT_DETECTED, evidence);
    }
}

static void drift_check(uint64_t interval_ms)
{
    char evidence[160];
    uint64_t tsc_before = rdtsc(), time_before = (uint64_t)sys_time();
    sys_sleep(interval_ms);
    uint64_t tsc_ns = cycles_to_ns(rdtsc() - tsc_before), time_ns = (uint64_t)sys_time() - time_before;
    int64_t difference = (int64_t)tsc_ns - (int64_t)time_ns;
    uint64_t magnitude = (uint64_t)(difference < 0 ? -difference : difference);
    uint64_t ppm = time_ns ? magnitude * 1000000u / time_ns : 0;
    snprintf(evidence, sizeof evidence, "over a %lu ms sleep: TSC %lu us, timer ticks %lu us, drift %s%lu ppm, limit %u",
             interval_ms, tsc_ns / 1000, time_ns / 1000, difference < 0 ? "-" : "", ppm, DRIFT_LIMIT_PPM);
    verdict("timer-drift", ppm > DRIFT_LIMIT_PPM ? DETECTED : NOT_DETECTED, evidence);
}

static void port_checks(void)
{
    verdict("vmware-backdoor-port", UNAVAILABLE,
            "port 0x5658: SYS_IOPERM grants ports below 0x1000 only, an IN there would be #GP");
    if (is_error(sys_ioperm(FW_CFG_SELECTOR, 2))) {
        verdict("qemu-fw-cfg-port", UNAVAILABLE, "SYS_IOPERM refused ports 0x510-0x511");
        return;
    }
    __asm__ volatile("outw %0, %1" : : "a"((uint16_t)0), "Nd"((uint16_t)FW_CFG_SELECTOR));
    char signature[5];
    for (unsigned index = 0; index < 4; index++) {
        uint8_t value;
        __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"((uint16_t)FW_CFG_DATA));
        signature[index] = (char)value;
    }
    signature[4] = 0;
    char shown[5], evidence[96];
    printable(shown, signature, 4);
    snprintf(evidence, sizeof evidence, "fw_cfg signature at port 0x511: \"%s\"", shown);
    verdict("qemu-fw-cfg-port", !memcmp(signature, "QEMU", 4) ? DETECTED : NOT_DETECTED, evidence);
}

static void command_line_check(void)
{
    /* The page the kernel maps read-only for every process holds the whole kernel command line. */
    const char *page = (const char *)USER_ARGS_VA;
    size_t length = 0;
    while (length < 4096 && page[length])
        length++;
    const char *word = vm_word_in(page, length);
    char evidence[160];
    snprintf(evidence, sizeof evidence, "kernel command line \"%.80s\"%s%s", page, word ? ", names " : "",
             word ? word : "");
    verdict("cmdline-strings", word ? DETECTED : NOT_DETECTED, evidence);
}

static void virtio_checks(void)
{
    unsigned found = 0, named_vendors = 0, busy = 0;
    char vendors[96] = "", evidence[160];
    size_t used = 0;
    long mac_verdict = -1;
    char mac_evidence[96] = "";
    for (unsigned nth = 0; nth < MAX_VIRTIO; nth++) {
        struct virtio_open_info info;
        memset(&info, 0, sizeof info);
        long index = sys_virtio_open(0, nth, 0, &info, 0);
        if (index == -E_BUSY) { /* the kernel drives it (the balloon) or another process has it */
            busy++;
            continue;
        }
        if (is_error(index))
            break;
        found++;
        uint32_t vendor = *(volatile uint32_t *)(info.regs + VIRTIO_VENDOR);
        char name[5];
        printable(name, &vendor, 4);
        bool named = vendor != 0;
        for (unsigned byte = 0; byte < 4; byte++)
            named &= name[byte] != '.';
        named_vendors += named;
        if (used < sizeof vendors - 24)
            used += (size_t)snprintf(vendors + used, sizeof vendors - used, "%s%#x \"%s\"", found > 1 ? ", " : "",
                                     vendor, name);
        if (info.device_id == VIRTIO_ID_NET && mac_verdict < 0) {
            uint8_t mac[6];
            for (unsigned byte = 0; byte < 6; byte++)
                mac[byte] = *(volatile uint8_t *)(info.regs + VIRTIO_CONFIG + byte);
            static const uint8_t vm_prefixes[][3] = {{0x52, 0x54, 0x00}, {0x08, 0x00, 0x27}, {0x00, 0x0C, 0x29},
                                                     {0x00, 0x50, 0x56}, {0x00, 0x1C, 0x42}, {0x00, 0x16, 0x3E}};
            mac_verdict = NOT_DETECTED;
            for (unsigned p = 0; p < sizeof vm_prefixes / sizeof vm_prefixes[0]; p++)
                if (!memcmp(mac, vm_prefixes[p], 3))
                    mac_verdict = DETECTED;
            snprintf(mac_evidence, sizeof mac_evidence, "virtio-net MAC %02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1],
                     mac[2], mac[3], mac[4], mac[5]);
        }
    }
    snprintf(evidence, sizeof evidence, "%u virtio-mmio devices opened, %u held by the kernel", found, busy);
    verdict("virtio-devices", found + busy ? DETECTED : NOT_DETECTED, evidence);
    if (!found) {
        verdict("virtio-vendor-id", UNAVAILABLE, "no virtio-mmio device this program may open");
    } else {
        snprintf(evidence, sizeof evidence, "VendorID %s", vendors);
        verdict("virtio-vendor-id", named_vendors ? DETECTED : NOT_DETECTED, evidence);
    }
    if (mac_verdict < 0)
        verdict("mac-prefix", UNAVAILABLE, "no virtio-net device");
    else
        verdict("mac-prefix", (enum verdict)mac_verdict, mac_evidence);
}

int main(void)
{
    uint64_t count = arg_u64("samples", 200), drift_ms = arg_u64("drift_ms", 500);
    if (count < 3 || count > MAX_SAMPLES || drift_ms < 10 || drift_ms > 10000) {
        printf("vmdetect: error: samples must be 3..%u and drift_ms 10..10000\n", MAX_SAMPLES);
        return 2;
    }
    cpuid_checks("cpl3", cpuid_user);
    (void)cpuid_kernel(0, 0);
    if (kernel_cpuid_works)
        cpuid_checks("cpl0", cpuid_kernel);
    else
        verdict("cpuid-cpl0", UNAVAILABLE, "the kernel has no SYS_CPUID");
    timing_checks((unsigned)count);
    drift_check(drift_ms);
    port_checks();
    command_line_check();
    virtio_checks();
    verdict("acpi-oem-strings", UNAVAILABLE, "this kernel gets no ACPI tables; Multiboot machines do (unit-tested)");
    printf("vmdetect: summary: %u detected, %u not-detected, %u unavailable\n", counts[DETECTED], counts[NOT_DETECTED],
           counts[UNAVAILABLE]);
    return 0;
}
