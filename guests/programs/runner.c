/* runner: waits for one command from the host, runs it as a child process, and exits with its status.
   The sandbox boots the OS with it, snapshots it while it waits, and on every run writes the command
   into its mailbox: the first SYS_MMAP region (at USER_MMAP_BASE), a magic word, then the line, then
   its length, which the runner polls. When the command cannot start, its one console line says why
   (`runner P: cannot start 'LINE': REASON`); the sandbox puts REASON in its report. Arguments: poll_ms=M
   (default 10). */
#include <ulib.h>

const char program_name[] = "runner";

#define RUNNER_MAGIC 0x524E5552u /* "RUNR" */
#define LINE_MAX 1024

struct mailbox {
    volatile uint32_t magic;
    volatile uint32_t length; /* written last by the host: nonzero once the line is complete */
    char line[LINE_MAX];
};

/* SYS_SPAWN returns only an error code; say in words what it means for this line. */
static void explain_refusal(const char *line, uint32_t length, long error)
{
    uint32_t name_length = 0;
    while (name_length < length && line[name_length] != ' ' && line[name_length] != '\t')
        name_length++;
    printf("runner %u: cannot start '%.*s': ", env.pid, (int)length, line);
    if (error == -E_INVAL && name_length == 6 && !memcmp(line, "kernel", 6))
        printf("kernel options cannot be given to one program (E_INVAL)\n");
    else if (error == -E_INVAL)
        printf("no program '%.*s' in the archive, or no room left for its arguments (E_INVAL)\n",
               (int)name_length, line);
    else if (error == -E_AGAIN)
        printf("the process table is full (E_AGAIN)\n");
    else if (error == -E_FAULT)
        printf("the command is not in readable user memory (E_FAULT)\n");
    else
        printf("error %ld\n", error);
}

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
        printf("runner %u: cannot start the command: %u bytes, longer than %u\n", env.pid, length, LINE_MAX);
        return 3;
    }
    long pid = sys_spawn(mailbox->line, length);
    if (is_error(pid)) {
        explain_refusal(mailbox->line, length, pid);
        return 3;
    }
    long status;
    while ((status = sys_wait(pid)) == -E_AGAIN)
        sys_sleep(poll_ms);
    printf("runner %u: pid %ld exited with %ld\n", env.pid, pid, status);
    return (int)status;
}
