/* hello: prints a banner, runs a function in user mode that prints and comes back through SYSCALL, exits 0. */
#include <pyrovisor/boot_info.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/idt.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/report.h>
#include <pyrovisor/string.h>
#include <pyrovisor/usermode.h>

#define USER_MAGIC 42

extern char __image_start[], __image_end[];
static uint8_t user_stack[8192] __attribute__((aligned(16)));
static volatile unsigned user_privilege;

static unsigned privilege_now(void) { return current_privilege(); }

static void user_main(void)
{
    static const char line[] = "hello from user mode (CPL3)\n";
    user_privilege = privilege_now();
    long written = user_syscall(SYS_WRITE, (long)line, sizeof line - 1, 0);
    user_syscall(SYS_EXIT, written == (long)(sizeof line - 1) ? USER_MAGIC : -1, 0, 0);
    for (;;)
        ; /* SYS_EXIT does not return */
}

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu);

int kmain(struct pyrovisor_boot_info *boot, unsigned cpu)
{
    printf("pyrovisor hello guest: %lu MiB of RAM, %u vCPU(s), running on vCPU %u\n",
           (unsigned long)((boot->ram[0].size + (boot->nr_ram_ranges > 1 ? boot->ram[1].size : 0)) >> 20),
           boot->nr_vcpus, cpu);
    report(boot->magic == PYROVISOR_BOOT_MAGIC && boot->version == PYROVISOR_BOOT_VERSION,
           "boot info has magic %#x version %u", boot->magic, boot->version);
    report(current_privilege() == 0, "kernel entered at CPL0");

    idt_init();
    usermode_init(boot, cpu);
    user_mode_accessible(__image_start, __image_end);
    long value = run_user(user_main, user_stack + sizeof user_stack);

    report(user_privilege == 3, "user function ran at CPL%u", user_privilege);
    report(value == USER_MAGIC, "user function returned %ld through SYSCALL", value);
    report(current_privilege() == 0, "back in the kernel at CPL0");
    report_info("the SYSCALL handler ran with privilege %u (0 with VMX/SVM, 3 under kvm_pvm)",
                syscall_handler_privilege);
    return report_summary();
}
