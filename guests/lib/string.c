/* memset/memcpy/memmove/memcmp/strlen for a freestanding guest (gcc may emit calls to them). */
#include <pyrovisor/string.h>

#include <stdint.h>

void *memset(void *dest, int value, size_t count)
{
    unsigned char *out = dest;
    while (count--)
        *out++ = (unsigned char)value;
    return dest;
}

void *memcpy(void *dest, const void *src, size_t count)
{
    unsigned char *out = dest;
    const unsigned char *in = src;
    while (count--)
        *out++ = *in++;
    return dest;
}

void *memmove(void *dest, const void *src, size_t count)
{
    unsigned char *out = dest;
    const unsigned char *in = src;
    if (out < in) {
        while (count--)
            *out++ = *in++;
    } else {
        while (count--)
            out[count] = in[count];
    }
    return dest;
}

int memcmp(const void *a, const void *b, size_t count)
{
    const unsigned char *x = a, *y = b;
    for (; count; count--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *text)
{
    size_t length = 0;
    while (text[length])
        length++;
    return length;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t count)
{
    for (; count; count--, a++, b++) {
        if (*a != *b || !*a)
            return (unsigned char)*a - (unsigned char)*b;
    }
    return 0;
}
