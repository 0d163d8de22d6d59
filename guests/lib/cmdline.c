/* key=value lookups on the command line the VMM placed in guest memory. */
#include <pyrovisor/cmdline.h>
#include <pyrovisor/string.h>

const char *cmdline_text(const struct pyrovisor_boot_info *boot)
{
    if (!boot->cmdline_gpa)
        return "";
    return (const char *)boot->cmdline_gpa;
}

bool parse_u64(const char *text, const char **end, uint64_t *value)
{
    unsigned base = 10;
    if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
        base = 16;
        text += 2;
    }
    uint64_t result = 0;
    const char *start = text;
    for (;; text++) {
        unsigned digit;
        if (*text >= '0' && *text <= '9')
            digit = (unsigned)(*text - '0');
        else if (base == 16 && *text >= 'a' && *text <= 'f')
            digit = (unsigned)(*text - 'a' + 10);
        else if (base == 16 && *text >= 'A' && *text <= 'F')
            digit = (unsigned)(*text - 'A' + 10);
        else
            break;
        result = result * base + digit;
    }
    if (end)
        *end = text;
    if (text == start)
        return false;
    *value = result;
    return true;
}

uint64_t cmdline_u64(const struct pyrovisor_boot_info *boot, const char *key, uint64_t fallback)
{
    size_t key_length = strlen(key);
    const char *text = cmdline_text(boot);
    while (*text) {
        while (*text == ' ')
            text++;
        if (!strncmp(text, key, key_length) && text[key_length] == '=') {
            uint64_t value;
            const char *end;
            if (parse_u64(text + key_length + 1, &end, &value) && (*end == ' ' || *end == '\0'))
                return value;
            return fallback;
        }
        while (*text && *text != ' ')
            text++;
    }
    return fallback;
}
