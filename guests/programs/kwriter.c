/* kwriter: asks the kernel to patch its own system-call table, as a rootkit would: getpid's entry is
   pointed at the time handler, the hook is observed, then undone. The target for write monitoring.
   Arguments: count=N (rounds) period_ms=M (between rounds) keep=1 (leave the last patch in place). */
#include <ulib.h>

const char program_name[] = "kwriter";

int main(void)
{
    uint64_t rounds = arg_u64("count", 1), period_ms = arg_u64("period_ms", 0), keep = arg_u64("keep", 0);
    long table = sys_ksym("syscall_table");
    if (is_error(table)) {
        report(false, "the kernel did not export syscall_table (error %ld)", table);
        return 1;
    }
    uint64_t slot = (uint64_t)table + 8 * SYS_GETPID;
    uint64_t original = (uint64_t)sys_kread(slot), hook = (uint64_t)sys_kread((uint64_t)table + 8 * SYS_TIME);
    long pid = sys_getpid();
    bool hooked = true, restored = true;
    for (uint64_t round = 1; round <= rounds; round++) {
        long error = sys_kwrite(slot, hook);
        long seen = sys_getpid(); /* now answered by the time handler */
        hooked &= !is_error(error) && seen != pid;
        long after = -1;
        if (!keep || round < rounds) {
            error = sys_kwrite(slot, original);
            after = sys_getpid();
            restored &= !is_error(error) && after == pid;
        }
        printf("kwriter %u: round %lu: syscall_table[%d] at %#lx: %#lx -> %#lx, getpid gave %ld, then %ld\n", env.pid,
               round, SYS_GETPID, slot, original, hook, seen, after);
        if (period_ms)
            sys_sleep(period_ms);
    }
    report(hooked, "getpid was hooked through the patched table %lu times", rounds);
    if (!keep)
        report(restored, "the table entry was restored each time");
    return (int)failures();
}
