/* pagetouch: writes a chosen set of pages in a fresh region and prints exactly which, so that a host
   can compare them with what it saw change (the sandbox test). Arguments: pages=N (default 8),
   stride=S (default 3: every third page of an N*S-page region), value=V (default 0x5a). */
#include <ulib.h>

const char program_name[] = "pagetouch";

#define PAGE 4096u

int main(void)
{
    uint64_t pages = arg_u64("pages", 8), stride = arg_u64("stride", 3), value = arg_u64("value", 0x5a);
    if (!pages || !stride || pages * stride > 4096) {
        report(false, "pages=%lu stride=%lu: need 1 <= pages*stride <= 4096", pages, stride);
        return 1;
    }
    long base = sys_mmap(pages * stride * PAGE, 0);
    if (is_error(base)) {
        report(false, "no memory for %lu pages (error %ld)", pages * stride, base);
        return 1;
    }
    printf("pagetouch %u: wrote", env.pid);
    for (uint64_t index = 0; index < pages; index++) {
        volatile uint8_t *page = (volatile uint8_t *)(base + index * stride * PAGE);
        page[0] = (uint8_t)value;
        page[PAGE - 1] = (uint8_t)(value + index);
        printf(" %#lx", (uint64_t)page);
    }
    printf("\n");
    return 0;
}
