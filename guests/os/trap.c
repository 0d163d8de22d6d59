/* The IDT and the one C entry point for every trap: timer ticks, system calls (both paths), demand-zero
   page faults, and reports of kernel exceptions and unhandled user faults (which stop the VM). */
#include <pyrovisor/console.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/gate.h>

#include "kernel.h"

static struct idt_gate idt[IDT_ENTRIES] __attribute__((aligned(16)));
volatile uint32_t kernel_lock; /* 0: free, else 1 + the holding vCPU */

#define VECTOR_INVALID_OPCODE 6
#define RFLAGS_DF (1ull << 10)

/* The zeroing upcall: a demand-zero fault served with pages of unknown content sends the process, before it
   retries the faulting instruction, through `user_zero_stub` in the entry page, which clears the new pages
   natively at CPL3 (rep stosq) and ends in ud2; the #UD brings back the registers saved here. On hosts where
   CPL0 is emulated this is about a thousand times cheaper than clearing them in the kernel. */
struct zero_upcall {
    uint64_t rip, rflags, rax, rcx, rdi, pages;
    bool active;
};
static struct zero_upcall upcalls[MAX_PROCS];

static void zero_in_user_mode(struct process *process, struct trap_frame *frame, uint64_t va, uint64_t bytes)
{
    struct zero_upcall *upcall = &upcalls[process - proc_table];
    if (upcall->active) { /* (a page it is clearing was reclaimed meanwhile and faulted back in) */
        mm_zero_cpl0(va, bytes);
        return;
    }
    *upcall = (struct zero_upcall){frame->rip, frame->rflags, frame->rax, frame->rcx, frame->rdi,
                                   bytes / PAGE_SIZE, true};
    frame->rip = USER_ENTRY_VA + (uint64_t)(user_zero_stub - user_entry_page);
    frame->rflags &= ~RFLAGS_DF;
    frame->rdi = va;
    frame->rcx = bytes / 8;
    frame->rax = 0;
}

static bool zero_upcall_done(struct process *process, struct trap_frame *frame)
{
    struct zero_upcall *upcall = &upcalls[process - proc_table];
    if (!upcall->active || frame->rip != USER_ENTRY_VA + (uint64_t)(user_zero_done - user_entry_page))
        return false;
    frame->rip = upcall->rip;
    frame->rflags = upcall->rflags;
    frame->rax = upcall->rax;
    frame->rcx = upcall->rcx;
    frame->rdi = upcall->rdi;
    upcall->active = false;
    mm_counts.zeroed_user += upcall->pages;
    return true;
}

static const char *vector_name(uint64_t vector)
{
    return vector == VECTOR_TIMER ? "timer" : exception_name((unsigned)vector);
}

static bool is_virtio_vector(uint64_t vector) { return vector - VECTOR_VIRTIO_BASE < MAX_VIRTIO; }

static void set_gate(unsigned vector, uint64_t handler) { idt[vector] = interrupt_gate(handler, 0); }

void idt_setup(void)
{
    for (unsigned vector = 0; vector < EXCEPTION_VECTORS; vector++)
        set_gate(vector, vector_stubs[vector]);
    set_gate(VECTOR_TIMER, vector_stubs[EXCEPTION_VECTORS]);
    set_gate(VECTOR_WAKEUP, vector_stubs[EXCEPTION_VECTORS + 1]);
    for (unsigned index = 0; index < MAX_VIRTIO; index++)
        set_gate(VECTOR_VIRTIO_BASE + index, vector_stubs[EXCEPTION_VECTORS + 2 + index]);
    set_gate(VECTOR_SPURIOUS, (uint64_t)spurious_entry);
    idt_load();
}

void idt_load(void)
{
    struct descriptor_pointer pointer = {sizeof idt - 1, (uint64_t)idt};
    load_idt(&pointer);
}

void klock(unsigned cpu)
{
    for (;;) {
        uint32_t expected = 0;
        if (__atomic_compare_exchange_n(&kernel_lock, &expected, cpu + 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return;
        while (kernel_lock)
            cpu_relax();
    }
}

void kunlock(void) { __atomic_store_n(&kernel_lock, 0, __ATOMIC_RELEASE); }

bool klock_held_by(unsigned cpu) { return kernel_lock == cpu + 1; }

static void __attribute__((noreturn)) kernel_exception(const struct trap_frame *frame, unsigned cpu)
{
    uint64_t cr2 = read_cr2();
    console_reset();
    kprintf("KERNEL EXCEPTION: vector %lu (%s) error %#lx rip %#lx cr2 %#lx cs %#lx on vCPU %u\n", frame->vector,
            vector_name(frame->vector), frame->error_code, frame->rip, cr2, frame->cs, cpu);
    kernel_stop(OS_EXIT_EXCEPTION);
}

void fatal_user_fault(struct trap_frame *frame, struct process *process, const char *why)
{
    uint64_t cr2 = read_cr2();
    console_reset();
    kprintf("USER FAULT: pid %u (%s) vector %lu (%s) error %#lx rip %#lx cr2 %#lx rsp %#lx%s%s\n", process->pid,
            process->name, frame->vector, vector_name(frame->vector), frame->error_code, frame->rip, cr2, frame->rsp,
            why ? ": " : "", why ? why : "");
    kprintf("os: stopping the VM: unhandled fault in pid %u\n", process->pid);
    kernel_stop(OS_EXIT_EXCEPTION);
}

void trap_handler(struct trap_frame *frame);

void trap_handler(struct trap_frame *frame)
{
    unsigned cpu = this_cpu();
    uint64_t vector = frame->vector;
    if (vector == VECTOR_WAKEUP) { /* only wakes a vCPU out of HLT */
        lapic_eoi();
        return;
    }
    if (!(frame->cs & 3)) {
        if (klock_held_by(cpu)) {
            /* A fault inside the kernel, typically a system call touching user memory: map it if it is
               demand-zero memory of the current process, otherwise the process passed a bad address. */
            struct process *process = cpus[cpu].current;
            uint64_t address = read_cr2();
            if (vector == VECTOR_PAGE_FAULT && process && address < USER_TOP) {
                if (mm_handle_fault(process->mm, address, frame->error_code, 0, 0))
                    return;
                fatal_user_fault(frame, process, "bad address passed to a system call");
            }
            kernel_exception(frame, cpu);
        }
        if (vector != VECTOR_TIMER && !is_virtio_vector(vector))
            kernel_exception(frame, cpu);
        klock(cpu); /* an interrupt while idle */
        lapic_eoi();
        if (vector == VECTOR_TIMER)
            timer_tick(cpu, frame);
        else
            virtio_interrupt(cpu, (unsigned)(vector - VECTOR_VIRTIO_BASE), frame);
        kunlock();
        return;
    }

    klock(cpu);
    struct process *process = cpus[cpu].current;
    switch (vector) {
    case VECTOR_TIMER:
        lapic_eoi();
        timer_tick(cpu, frame);
        break;
    case VECTOR_SYSCALL:
        cpus[cpu].syscalls_direct++;
        syscall_dispatch(cpu, process, frame);
        break;
    case VECTOR_GENERAL_PROTECTION:
        if (frame->rip == USER_ENTRY_VA) {
            /* kvm_pvm: the SYSCALL target ran with user privilege and its SWAPGS trapped. Continue as if
               SYSCALL had entered CPL0: return to RCX with the flags SYSCALL saved in R11. */
            frame->rip = frame->rcx;
            frame->rflags = frame->r11;
            frame->cs = USER_CS;
            frame->ss = USER_DS;
            syscall_dispatch(cpu, process, frame);
            break;
        }
        fatal_user_fault(frame, process, 0);
    case VECTOR_PAGE_FAULT: {
        process->page_faults++;
        mm_counts.page_faults++;
        uint64_t zero_va = 0, zero_bytes = 0;
        if (!mm_handle_fault(process->mm, read_cr2(), frame->error_code, &zero_va, &zero_bytes))
            fatal_user_fault(frame, process, 0);
        if (zero_bytes)
            zero_in_user_mode(process, frame, zero_va, zero_bytes);
        break;
    }
    case VECTOR_INVALID_OPCODE:
        if (zero_upcall_done(process, frame))
            break;
        fatal_user_fault(frame, process, 0);
    default:
        if (is_virtio_vector(vector)) {
            lapic_eoi();
            virtio_interrupt(cpu, (unsigned)(vector - VECTOR_VIRTIO_BASE), frame);
            break;
        }
        fatal_user_fault(frame, process, 0);
    }
    kunlock();
}
