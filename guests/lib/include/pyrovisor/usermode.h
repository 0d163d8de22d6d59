/* Running a function in user mode (CPL3) and coming back through SYSCALL. */
#ifndef PYROVISOR_USERMODE_H
#define PYROVISOR_USERMODE_H

#include <stdint.h>

#include <pyrovisor/boot_info.h>

#define SYS_WRITE 1
#define SYS_EXIT 60

/* Programs SYSCALL (STAR, LSTAR, FMASK), this vCPU's TSS and the exception hook that brings
   SYS_EXIT back to CPL0 on hosts where the SYSCALL target runs with user privilege (kvm_pvm). */
void usermode_init(const struct pyrovisor_boot_info *boot, unsigned cpu);

/* Sets the user bit on the boot page-table entries that map [start, end). */
void user_mode_accessible(const void *start, const void *end);

/* Runs entry() at CPL3 on the given stack until it calls SYS_EXIT; returns the exit value. */
long run_user(void (*entry)(void), void *user_stack_top);

/* Privilege the SYSCALL handler last ran at: 0 on VMX/SVM hosts, 3 under kvm_pvm. */
extern volatile unsigned syscall_handler_privilege;

/* Called in user mode. */
static inline long user_syscall(long number, long arg0, long arg1, long arg2)
{
    long result;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(number), "D"(arg0), "S"(arg1), "d"(arg2)
                     : "rcx", "r11", "memory");
    return result;
}

#endif
