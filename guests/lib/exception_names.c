/* The names of the architectural exception vectors, for fault reports. */
#include <pyrovisor/gate.h>

static const char *const names[EXCEPTION_VECTORS] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
    "#UD invalid opcode", "#NM device not available", "#DF double fault", "coprocessor segment overrun",
    "#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check", "#MC machine check",
    "#XM SIMD error", "#VE virtualization", "#CP control protection",
};

const char *exception_name(unsigned vector)
{
    if (vector < sizeof names / sizeof names[0] && names[vector])
        return names[vector];
    return "reserved";
}
