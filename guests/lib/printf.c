/* A small vsnprintf (flags 0 - #, width, l/ll/z) and a printf that writes through a replaceable sink. */
#include <pyrovisor/console.h>
#include <pyrovisor/printf.h>

#include <stdbool.h>
#include <stdint.h>

struct output {
    char *buffer;
    size_t size;
    size_t length;
};

static void emit(struct output *out, char c)
{
    if (out->length + 1 < out->size)
        out->buffer[out->length] = c;
    out->length++;
}

static void emit_number(struct output *out, uint64_t value, unsigned base, bool negative, bool upper, int width,
                        bool zero_pad, bool left)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char scratch[24];
    int count = 0;
    do {
        scratch[count++] = digits[value % base];
        value /= base;
    } while (value);
    int total = count + (negative ? 1 : 0);
    if (!left && !zero_pad)
        for (; total < width; width--)
            emit(out, ' ');
    if (negative)
        emit(out, '-');
    if (!left && zero_pad)
        for (; total < width; width--)
            emit(out, '0');
    while (count)
        emit(out, scratch[--count]);
    if (left)
        for (; total < width; width--)
            emit(out, ' ');
}

int vsnprintf(char *buffer, size_t size, const char *format, va_list args)
{
    struct output out = {buffer, size, 0};
    for (const char *p = format; *p; p++) {
        if (*p != '%') {
            emit(&out, *p);
            continue;
        }
        p++;
        bool zero_pad = false, left = false, alternate = false;
        for (;; p++) {
            if (*p == '0')
                zero_pad = true;
            else if (*p == '-')
                left = true;
            else if (*p == '#')
                alternate = true;
            else
                break;
        }
        int width = 0;
        while (*p >= '0' && *p <= '9')
            width = width * 10 + (*p++ - '0');
        int precision = -1; /* %.Ns and %.*s: at most N characters of the string */
        if (*p == '.') {
            p++;
            precision = 0;
            if (*p == '*') {
                precision = va_arg(args, int);
                p++;
            }
            while (*p >= '0' && *p <= '9')
                precision = precision * 10 + (*p++ - '0');
        }
        int longs = 0;
        while (*p == 'l' || *p == 'z') {
            longs++;
            p++;
        }
        switch (*p) {
        case 'd':
        case 'i': {
            int64_t value = longs ? va_arg(args, int64_t) : va_arg(args, int);
            uint64_t magnitude = value < 0 ? (uint64_t)0 - (uint64_t)value : (uint64_t)value;
            emit_number(&out, magnitude, 10, value < 0, false, width, zero_pad, left);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t value = longs ? va_arg(args, uint64_t) : va_arg(args, unsigned);
            if (alternate && *p != 'u') {
                emit(&out, '0');
                emit(&out, 'x');
            }
            emit_number(&out, value, *p == 'u' ? 10 : 16, false, *p == 'X', width, zero_pad, left);
            break;
        }
        case 'p':
            emit(&out, '0');
            emit(&out, 'x');
            emit_number(&out, (uint64_t)(uintptr_t)va_arg(args, void *), 16, false, false, width, zero_pad, left);
            break;
        case 's': {
            const char *text = va_arg(args, const char *);
            if (!text)
                text = "(null)";
            int length = 0;
            while ((precision < 0 || length < precision) && text[length])
                length++;
            if (!left)
                for (; length < width; width--)
                    emit(&out, ' ');
            for (int i = 0; i < length; i++)
                emit(&out, text[i]);
            if (left)
                for (; length < width; width--)
                    emit(&out, ' ');
            break;
        }
        case 'c':
            emit(&out, (char)va_arg(args, int));
            break;
        case '%':
            emit(&out, '%');
            break;
        case '\0':
            p--;
            break;
        default:
            emit(&out, '%');
            emit(&out, *p);
        }
    }
    if (size)
        buffer[out.length < size ? out.length : size - 1] = '\0';
    return (int)out.length;
}

int snprintf(char *buffer, size_t size, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    int length = vsnprintf(buffer, size, format, args);
    va_end(args);
    return length;
}

static void (*printf_sink)(const char *text, size_t length) = console_write;

void printf_set_sink(void (*sink)(const char *text, size_t length)) { printf_sink = sink; }

int printf(const char *format, ...)
{
    char buffer[256];
    va_list args;
    va_start(args, format);
    int length = vsnprintf(buffer, sizeof buffer, format, args);
    va_end(args);
    size_t shown = (size_t)length < sizeof buffer ? (size_t)length : sizeof buffer - 1;
    printf_sink(buffer, shown);
    return length;
}
