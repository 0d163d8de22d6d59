/* fault: touches an address nothing maps, to show the kernel's fault report and the VM stopping with
   the failure code. Arguments: addr=A mode=write|read|exec|syscall (syscall: the kernel touches it). */
#include <ulib.h>

const char program_name[] = "fault";

int main(void)
{
    uint64_t address = arg_u64("addr", 0xDEAD0000);
    char mode[8];
    arg_str("mode", mode, sizeof mode, "write");
    printf("fault %u: about to %s %#lx\n", env.pid, mode, address);
    if (!strcmp(mode, "read"))
        (void)*(volatile uint64_t *)address;
    else if (!strcmp(mode, "exec"))
        ((void (*)(void))address)();
    else if (!strcmp(mode, "syscall"))
        sys_write((const void *)address, 16);
    else
        *(volatile uint64_t *)address = 1;
    report(false, "still running after touching %#lx", address);
    return 1;
}
