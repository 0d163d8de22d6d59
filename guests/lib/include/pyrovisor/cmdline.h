/* Reading key=value settings from the kernel command line the VMM passes. */
#ifndef PYROVISOR_CMDLINE_H
#define PYROVISOR_CMDLINE_H

#include <stdbool.h>
#include <stdint.h>

#include <pyrovisor/boot_info.h>

/* The command line as a NUL-terminated string ("" when there is none). */
const char *cmdline_text(const struct pyrovisor_boot_info *boot);
/* Value of `key=NUMBER` (decimal or 0x hex) among the space-separated words, or `fallback`. */
uint64_t cmdline_u64(const struct pyrovisor_boot_info *boot, const char *key, uint64_t fallback);
/* Parses a decimal or 0x-prefixed number at `text`; returns false if there is none. */
bool parse_u64(const char *text, const char **end, uint64_t *value);

#endif
