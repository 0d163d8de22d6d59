/* runner: waits for one command from the host, runs it as a child process, and exits with its status.
   The sandbox boots the OS with it, snapshots it while it waits, and on every run writes the command
   into its mailbox: the first SYS_MMAP region (at USER_MMAP_BASE), a magic word, then the line, then
   its length, which the runner polls. Arguments: poll_ms=M (default 10). */
#include <ulib.h>

const char program_name[] = "runner";

#define RUNNER_MAGIC 0x524E5552u /* "RUNR" */
#define LINE_MAX 1024

struct mailbox {
    volatile uint32_t magic;
    volatile uint32_t length; /* written last by the host: nonzero once the line is complete */
    char line[LINE_MAX];
};

int main(void)
{
    uint64_t poll_ms = arg_u64("poll_ms", 10);
    long address = sys_mmap(sizeof(struct mailbox), 0);
    if (is_error(address) || (uint64_t)address != USER_MMAP_BASE) {
        report(false, "the mailbox must be the first mapping, at %#llx (got %#lx)", USER_MMAP_BASE, address);
        return 1;
    }
    struct mailbox *mailbox = (struct mailbox *)address;
    mailbox->magic = RUNNER_MAGIC;
    printf("runner %u: waiting for a command in the mailbox at %#lx\n", env.pid, address);
    uint32_t length;
    while (!(length = mailbox->length))
        sys_sleep(poll_ms);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (length > LINE_MAX) {
        printf("runner %u: command of %u bytes is longer than %u\n", env.pid, length, LINE_MAX);
        return 3;
    }
    long pid = sys_spawn(mailbox->line, length);
    if (is_error(pid)) {
        printf("runner %u: cannot start '%.*s' (error %ld)\n", env.pid, (int)length, mailbox->line, pid);
        return 3;
    }
    long status;
    while ((status = sys_wait(pid)) == -E_AGAIN)
        sys_sleep(poll_ms);
    printf("runner %u: pid %ld exited with %ld\n", env.pid, pid, status);
    return (int)status;
}
