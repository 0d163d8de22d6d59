/* The process table, a round-robin run queue shared by every vCPU, context switches (a switch is just
   returning to another process's trap frame), timer ticks, sleeping, and exits. */
#include <pyrovisor/io.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/string.h>

#include "kernel.h"

struct process proc_table[MAX_PROCS];
struct cpu cpus[MAX_CPUS];
struct os_info os_info;

/* One kernel stack per process slot; its top holds the process's trap frame (TSS.RSP0 points there). */
static uint8_t kstacks[MAX_PROCS][KSTACK_SIZE] __attribute__((aligned(4096)));
static uint8_t run_queue[MAX_PROCS];
static unsigned run_head, run_count, sleepers;
static uint64_t next_wake = ~0ull;
static bool user_mode_reached;

_Static_assert(IDLE_STACK_SIZE == 1 << 13, "entry.S computes idle stacks with a shift by 13");
_Static_assert(offsetof(struct cpu, syscall_entry) == CPU_SYSCALL_ENTRY, "entry.S offsets");
_Static_assert(offsetof(struct cpu, user_rsp) == CPU_USER_RSP, "entry.S offsets");
_Static_assert(offsetof(struct cpu, kstack_top) == CPU_KSTACK_TOP, "entry.S offsets");
_Static_assert(sizeof(struct trap_frame) % 16 == 0, "trap frames keep the stack 16-byte aligned");

static uint64_t kstack_top(const struct process *process)
{
    return (uint64_t)kstacks[process - proc_table] + KSTACK_SIZE;
}

struct trap_frame *process_frame(const struct process *process)
{
    return (struct trap_frame *)(kstack_top(process) - sizeof(struct trap_frame));
}

struct process *current_process(unsigned cpu) { return cpus[cpu].current; }

struct process *process_create(const char *name, size_t name_length, struct mm *mm, uint32_t parent)
{
    struct process *process = 0;
    for (unsigned slot = 0; slot < MAX_PROCS; slot++) {
        if (proc_table[slot].state == PROC_FREE) {
            process = &proc_table[slot];
            break;
        }
    }
    if (!process)
        return 0;
    if (name_length >= PROC_NAME_MAX)
        name_length = PROC_NAME_MAX - 1;
    memcpy(process->name, name, name_length);
    process->name[name_length] = '\0';
    process->pid = os_info.next_pid++;
    process->state = PROC_RUNNABLE; /* the caller queues it (make_runnable) or puts it to sleep */
    process->cr3 = mm->cr3;
    process->parent = parent;
    process->affinity = -1;
    process->start_tick = os_info.jiffies;
    process->mm = mm;
    mm->users++;
    os_info.live++;
    return process;
}

void process_start(struct process *process, uint64_t rip, uint64_t rsp, uint64_t arg0, uint64_t arg1, uint64_t arg2,
                   uint64_t arg3, uint64_t arg4)
{
    /* Slots are used once, so the frame is still zero from the loader: set only what differs. */
    struct trap_frame *frame = process_frame(process);
    frame->rip = rip;
    frame->cs = USER_CS;
    frame->rflags = RFLAGS_IF | 2;
    frame->rsp = rsp;
    frame->ss = USER_DS;
    frame->rdi = arg0;
    frame->rsi = arg1;
    frame->rdx = arg2;
    frame->rcx = arg3;
    frame->r8 = arg4;
}

void make_runnable(struct process *process)
{
    process->state = PROC_RUNNABLE;
    run_queue[(run_head + run_count) % MAX_PROCS] = (uint8_t)(process - proc_table);
    run_count++;
}

/* The first queued process allowed on this vCPU, taken off the queue; others keep their order. */
static struct process *pick_next(unsigned cpu)
{
    for (unsigned tries = run_count; tries; tries--) {
        struct process *process = &proc_table[run_queue[run_head]];
        run_head = (run_head + 1) % MAX_PROCS;
        run_count--;
        if (process->affinity < 0 || (unsigned)process->affinity == cpu)
            return process;
        run_queue[(run_head + run_count) % MAX_PROCS] = (uint8_t)(process - proc_table);
        run_count++;
    }
    return 0;
}

static void __attribute__((noreturn)) switch_to(unsigned cpu, struct process *next)
{
    struct cpu *here = &cpus[cpu];
    here->current = next;
    here->switches++;
    here->slice_left = os_options.slice;
    next->state = PROC_RUNNING;
    next->cpu = cpu;
    next->switches++;
    next->cpus_ran |= 1ull << cpu;
    uint64_t top = kstack_top(next);
    here->kstack_top = top;
    tss_set_rsp0(cpu, top);
    if (here->cr3 != next->cr3) {
        write_cr3(next->cr3);
        here->cr3 = next->cr3;
    }
    if (here->io_first != next->io_first || here->io_count != next->io_count) {
        tss_deny_ports(cpu, here->io_first, here->io_count);
        tss_allow_ports(cpu, next->io_first, next->io_count);
        here->io_first = next->io_first;
        here->io_count = next->io_count;
    }
    if (!user_mode_reached) {
        user_mode_reached = true;
        if (os_options.bootmark)
            outb((uint16_t)os_options.bootmark, 1); /* the next instruction is IRETQ to the first process */
    }
    resume_frame(process_frame(next));
}

void cpu_enter_idle(unsigned cpu)
{
    struct cpu *here = &cpus[cpu];
    here->current = 0;
    uint64_t kernel_cr3 = kernel_to_phys(kernel_pml4);
    if (here->cr3 != kernel_cr3) {
        write_cr3(kernel_cr3);
        here->cr3 = kernel_cr3;
    }
    idle_on_stack((uint64_t)idle_stacks[cpu] + IDLE_STACK_SIZE);
}

void schedule(unsigned cpu, struct trap_frame *frame)
{
    (void)frame;
    struct process *next = pick_next(cpu);
    if (next)
        switch_to(cpu, next);
    cpu_enter_idle(cpu);
}

static void wake_sleepers(void)
{
    uint64_t now = os_info.jiffies, earliest = ~0ull;
    for (unsigned slot = 0; slot < MAX_PROCS; slot++) {
        struct process *process = &proc_table[slot];
        if (process->state != PROC_SLEEPING || !process->pid)
            continue;
        if (process->wake_tick <= now) {
            sleepers--;
            make_runnable(process);
            virtio_wait_timed_out(process);
        } else if (process->wake_tick < earliest) {
            earliest = process->wake_tick;
        }
    }
    next_wake = earliest;
}

void sleep_until(struct process *process, uint64_t tick)
{
    process->state = PROC_SLEEPING;
    process->wake_tick = tick;
    sleepers++;
    if (tick < next_wake)
        next_wake = tick;
}

void wake_process(struct process *process)
{
    if (process->state != PROC_SLEEPING)
        return;
    sleepers--;
    make_runnable(process); /* next_wake may now be early: wake_sleepers recomputes it */
}

void timer_tick(unsigned cpu, struct trap_frame *frame)
{
    struct cpu *here = &cpus[cpu];
    here->ticks++;
    if (cpu == 0) {
        os_info.jiffies++;
        os_info.tick_tsc = rdtsc();
        if (sleepers && os_info.jiffies >= next_wake)
            wake_sleepers();
        balloon_tick();
    }
    struct process *process = here->current;
    if (!process) {
        here->idle_ticks++;
        if (run_count)
            schedule(cpu, frame); /* returns only through another frame, or back to idle */
        return;
    }
    process->ticks++;
    if (--here->slice_left)
        return;
    here->slice_left = os_options.slice;
    struct process *next = pick_next(cpu);
    if (next) {
        make_runnable(process);
        switch_to(cpu, next);
    }
}

static unsigned processes_on(unsigned cpu)
{
    unsigned count = 0;
    for (unsigned slot = 0; slot < MAX_PROCS; slot++)
        if (proc_table[slot].pid && (proc_table[slot].cpus_ran >> cpu) & 1)
            count++;
    return count;
}

static void __attribute__((noreturn)) all_exited(void)
{
    uint64_t elapsed_ms = os_info.jiffies * 1000 / os_options.hz;
    kprintf("os: all %u processes exited, %u failed, after %lu ms\n", os_info.next_pid - 1, os_info.failures,
            elapsed_ms);
    for (unsigned cpu = 0; cpu < os_info.nr_cpus; cpu++)
        kprintf("os: vCPU %u ran %u processes: %lu switches, %lu system calls (%lu through #GP, %lu direct), "
                "%lu ticks (%lu idle)\n",
                cpu, processes_on(cpu), cpus[cpu].switches, cpus[cpu].syscalls,
                cpus[cpu].syscalls - cpus[cpu].syscalls_direct, cpus[cpu].syscalls_direct, cpus[cpu].ticks,
                cpus[cpu].idle_ticks);
    kprintf("os: %lu pages reused after the host discarded them\n", os_info.pages_reused);
    if (mm_counts.cache_reclaimed || mm_counts.zeroed_user || mm_counts.zeroed_kernel || mm_counts.lost_pages)
        kprintf("os: memory: %lu cache pages reclaimed, %lu not-zero pages cleared in user mode and %lu at CPL0, "
                "%lu freed pages lost\n", mm_counts.cache_reclaimed, mm_counts.zeroed_user, mm_counts.zeroed_kernel,
                mm_counts.lost_pages);
    virtio_summary();
    balloon_summary();
    kernel_stop(os_info.failures ? OS_EXIT_FAILURES : OS_EXIT_OK);
}

void process_exit(struct process *process, int code)
{
    unsigned cpu = this_cpu();
    process->state = PROC_EXITED;
    process->exit_code = code;
    process->exit_tick = os_info.jiffies;
    os_info.live--;
    if (code)
        os_info.failures++;
    cpus[cpu].current = 0;
    if (!os_options.quiet) {
        char ran[3 * MAX_CPUS + 1];
        size_t length = 0;
        for (unsigned index = 0; index < os_info.nr_cpus; index++)
            if ((process->cpus_ran >> index) & 1)
                length += (size_t)snprintf(ran + length, sizeof ran - length, length ? "+%u" : "%u", index);
        ran[length] = '\0';
        kprintf("os: pid %u (%s) exited with %d: %lu system calls, %lu page faults, %lu switches, vCPUs %s\n",
                process->pid, process->name, code, process->syscalls, process->page_faults, process->switches, ran);
    }
    struct mm *mm = process->mm;
    if (mm->users == 1)
        virtio_release(mm); /* also with keepmm: a device must not keep writing into a dead process */
    if (--mm->users == 0 && !os_options.keepmm) {
        uint64_t kernel_cr3 = kernel_to_phys(kernel_pml4);
        if (cpus[cpu].cr3 != kernel_cr3) { /* never free the tables this vCPU stands on */
            write_cr3(kernel_cr3);
            cpus[cpu].cr3 = kernel_cr3;
        }
        mm_release(mm);
    }
    if (!os_info.live)
        all_exited();
}
