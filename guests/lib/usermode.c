/* User-mode support: SYSCALL set-up, the system calls of the test guests, and the way back to CPL0. */
#include <pyrovisor/console.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/idt.h>
#include <pyrovisor/tss.h>
#include <pyrovisor/usermode.h>

#define STAR_KERNEL_BASE ((uint64_t)KERNEL_CS << 32)
#define STAR_USER_BASE ((uint64_t)(KERNEL_DS) << 48) /* SYSRET: CS = base + 16, SS = base + 8 */
#define FMASK_BITS ((1u << 8) | (1u << 9) | (1u << 10) | (1u << 18)) /* TF IF DF AC */
#define PTE_USER (1ull << 2)
#define PTE_HUGE (1ull << 7)
#define PTE_ADDRESS 0x000FFFFFFFFFF000ull

extern void syscall_entry(void);
extern void return_to_kernel_trap(void);
extern void __attribute__((noreturn)) return_to_kernel(long value);
extern void __attribute__((noreturn)) resume_kernel(void);

volatile unsigned syscall_handler_privilege;
static uint8_t exception_stack[8192] __attribute__((aligned(16)));

static bool trap_back_to_kernel(struct exception_frame *frame)
{
    if (frame->rip != (uint64_t)return_to_kernel_trap)
        return false;
    resume_kernel();
}

void usermode_init(const struct pyrovisor_boot_info *boot, unsigned cpu)
{
    wrmsr(MSR_STAR, STAR_KERNEL_BASE | STAR_USER_BASE);
    wrmsr(MSR_LSTAR, (uint64_t)syscall_entry);
    wrmsr(MSR_FMASK, FMASK_BITS);
    tss_init(boot, cpu, (uint64_t)(exception_stack + sizeof exception_stack));
    /* The SYSCALL handler prints: under kvm_pvm it runs with user privilege and needs the port. */
    tss_allow_ports(cpu, boot->console_port, 8);
    idt_set_hook(VECTOR_GENERAL_PROTECTION, trap_back_to_kernel);
}

void user_mode_accessible(const void *start, const void *end)
{
    uint64_t address = (uint64_t)start & ~0xFFFull;
    while (address < (uint64_t)end) {
        uint64_t *table = (uint64_t *)(read_cr3() & PTE_ADDRESS);
        uint64_t page_size = 0x1000;
        for (int shift = 39; shift >= 12; shift -= 9) {
            uint64_t *entry = &table[(address >> shift) & 511];
            *entry |= PTE_USER;
            if (shift == 12 || (shift <= 30 && (*entry & PTE_HUGE))) {
                page_size = 1ull << shift;
                break;
            }
            table = (uint64_t *)(*entry & PTE_ADDRESS);
        }
        address = (address & ~(page_size - 1)) + page_size;
    }
    write_cr3(read_cr3());
}

long syscall_dispatch(long arg0, long arg1, long arg2, long number);

long syscall_dispatch(long arg0, long arg1, long arg2, long number)
{
    (void)arg2;
    syscall_handler_privilege = current_privilege();
    switch (number) {
    case SYS_WRITE:
        console_write((const char *)arg0, (size_t)arg1);
        return arg1;
    case SYS_EXIT:
        return_to_kernel(arg0);
    default:
        return -38; /* ENOSYS */
    }
}
