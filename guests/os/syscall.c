/* System calls. The table is kernel data in a page of its own, so that a rootkit (the kwriter program)
   can patch it through SYS_KWRITE and a host can watch exactly that page. */
#include <pyrovisor/io.h>
#include <pyrovisor/string.h>

#include "kernel.h"

#define KERNEL_PORTS_FIRST 0xF4 /* debug exit: a user must not stop the VM */
#define CONSOLE_FIRST 0x3F8
#define CONSOLE_LAST 0x3FF
#define DISCARD_FIRST 0x518
#define DISCARD_LAST 0x51F
#define PORT_LIMIT 0x1000
#define IOPERM_MAX 64
#define WRITE_MAX 4096
#define MAPIO_MAX (1ull << 20)

extern char __kernel_start[], __kernel_end[], __data_start[];

static struct process *caller(void) { return cpus[this_cpu()].current; }

static bool user_range(uint64_t address, uint64_t length)
{
    return address < USER_TOP && length <= USER_TOP - address;
}

static long sys_exit(struct trap_frame *frame)
{
    unsigned cpu = this_cpu();
    process_exit(cpus[cpu].current, (int)frame->rdi);
    schedule(cpu, frame);
}

static long sys_write(struct trap_frame *frame)
{
    uint64_t buffer = frame->rdi, length = frame->rsi;
    if (length > WRITE_MAX)
        length = WRITE_MAX;
    if (!user_range(buffer, length))
        return -E_FAULT;
    kputs((const char *)buffer, length);
    return (long)length;
}

static long sys_yield(struct trap_frame *frame)
{
    unsigned cpu = this_cpu();
    frame->rax = 0;
    make_runnable(cpus[cpu].current);
    schedule(cpu, frame);
}

static long sys_getpid(struct trap_frame *frame)
{
    (void)frame;
    return caller()->pid;
}

static long sys_sleep(struct trap_frame *frame)
{
    unsigned cpu = this_cpu();
    uint64_t ticks = (frame->rdi * os_options.hz + 999) / 1000;
    frame->rax = 0;
    if (!ticks)
        make_runnable(cpus[cpu].current);
    else
        sleep_until(cpus[cpu].current, os_info.jiffies + ticks);
    schedule(cpu, frame);
}

/* Nanoseconds since boot: timer ticks, plus the TSC's count since the last tick (at most one tick's
   worth). Only short TSC differences are used, so a TSC that jumps (a restored snapshot, another host)
   costs at most a tick of accuracy; and the answer never goes back. */
static long sys_time(struct trap_frame *frame)
{
    (void)frame;
    uint64_t tick_ns = 1000000000u / os_options.hz, now = os_info.jiffies * tick_ns, since = 0;
    if (os_info.tsc_khz) {
        uint64_t cycles = rdtsc() - os_info.tick_tsc;
        since = cycles < os_info.tsc_khz * 1000 ? cycles * 1000000u / os_info.tsc_khz : tick_ns;
        if (since > tick_ns)
            since = tick_ns;
    }
    now += since;
    if (now < os_info.last_time)
        now = os_info.last_time;
    os_info.last_time = now;
    return (long)now;
}

static long sys_mmap(struct trap_frame *frame)
{
    struct mm *mm = caller()->mm;
    uint64_t length = frame->rdi, flags = frame->rsi;
    uint64_t start = (mm->mmap_next + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1);
    uint64_t granule = flags & MAP_HUGE ? HUGE_SIZE : PAGE_SIZE;
    length = (length + granule - 1) & ~(granule - 1);
    if (!length || length > USER_MMAP_END - start)
        return -E_NOMEM;
    uint32_t vma_flags = VMA_WRITE | (flags & MAP_HUGE ? VMA_HUGE : 0) | (flags & MAP_CACHE ? VMA_CACHE : 0);
    if (!mm_add_vma(mm, start, start + length, vma_flags))
        return -E_NOMEM;
    mm->mmap_next = start + length;
    return (long)start;
}

static long sys_thread(struct trap_frame *frame)
{
    struct process *parent = caller();
    uint64_t start = frame->rdi, stack = frame->rsi;
    int64_t cpu = (int64_t)frame->r8;
    if (!user_range(start, 1) || !user_range(stack - 1, 1) || cpu >= (int64_t)os_info.nr_cpus)
        return -E_INVAL;
    struct process *thread = process_create(parent->name, strlen(parent->name), parent->mm, parent->pid);
    if (!thread)
        return -E_AGAIN;
    thread->affinity = cpu < 0 ? -1 : (int32_t)cpu;
    thread->program = parent->program;
    thread->args_offset = parent->args_offset;
    thread->args_len = parent->args_len;
    thread->io_first = parent->io_first;
    thread->io_count = parent->io_count;
    process_start(thread, start, stack, frame->rdx, frame->r10, os_info.tsc_khz, thread->pid, os_info.nr_cpus);
    make_runnable(thread);
    return thread->pid;
}

static bool port_reserved(uint64_t first, uint64_t last)
{
    return (first <= KERNEL_PORTS_FIRST && KERNEL_PORTS_FIRST <= last) ||
           (first <= CONSOLE_LAST && CONSOLE_FIRST <= last) || (first <= DISCARD_LAST && DISCARD_FIRST <= last);
}

static long sys_ioperm(struct trap_frame *frame)
{
    unsigned cpu = this_cpu();
    struct process *process = cpus[cpu].current;
    uint64_t first = frame->rdi, count = frame->rsi;
    if (!count || count > IOPERM_MAX || first + count > PORT_LIMIT || port_reserved(first, first + count - 1))
        return -E_PERM;
    process->io_first = (uint16_t)first;
    process->io_count = (uint16_t)count;
    tss_deny_ports(cpu, cpus[cpu].io_first, cpus[cpu].io_count);
    tss_allow_ports(cpu, process->io_first, process->io_count);
    cpus[cpu].io_first = process->io_first;
    cpus[cpu].io_count = process->io_count;
    return 0;
}

static long sys_mapio(struct trap_frame *frame)
{
    struct mm *mm = caller()->mm;
    uint64_t phys = frame->rdi & PTE_ADDRESS, offset = frame->rdi & (PAGE_SIZE - 1);
    uint64_t length = (offset + frame->rsi + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    if (!frame->rsi || length > MAPIO_MAX || phys >= (1ull << 46) || (frame->rdx & ~(uint64_t)MAPIO_CACHED))
        return -E_INVAL;
    if (mm_is_ram(phys, length))
        return -E_PERM;
    uint64_t start = (mm->mmap_next + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1);
    if (!mm_add_vma(mm, start, start + length, 0))
        return -E_NOMEM;
    uint64_t caching = frame->rdx & MAPIO_CACHED ? 0 : PTE_PWT | PTE_PCD;
    mm_map_range(mm, start, phys, length / PAGE_SIZE,
                 PTE_PRESENT | PTE_WRITE | PTE_USER | caching | PTE_ACCESSED | PTE_DIRTY | PTE_NX);
    mm->mmap_next = start + length;
    return (long)(start + offset);
}

static long sys_getcpu(struct trap_frame *frame)
{
    (void)frame;
    return this_cpu();
}

static long sys_setcpu(struct trap_frame *frame)
{
    unsigned cpu = this_cpu();
    struct process *process = cpus[cpu].current;
    int64_t wanted = (int64_t)frame->rdi;
    if (wanted >= (int64_t)os_info.nr_cpus)
        return -E_INVAL;
    process->affinity = wanted < 0 ? -1 : (int32_t)wanted;
    if (wanted < 0 || (unsigned)wanted == cpu)
        return 0;
    frame->rax = 0; /* move: another vCPU picks it up at its next tick */
    make_runnable(process);
    schedule(cpu, frame);
}

static long sys_cpuid(struct trap_frame *frame)
{
    uint32_t out[4];
    if (!user_range(frame->rdx, sizeof out))
        return -E_FAULT;
    __asm__ volatile("cpuid" : "=a"(out[0]), "=b"(out[1]), "=c"(out[2]), "=d"(out[3])
                     : "a"((uint32_t)frame->rdi), "c"((uint32_t)frame->rsi));
    memcpy((void *)frame->rdx, out, sizeof out);
    return 0;
}

struct exported_symbol {
    const char *name;
    const void *address;
};

static long sys_ksym(struct trap_frame *frame)
{
    static const struct exported_symbol exported[] = {
        {"syscall_table", syscall_table}, {"proc_table", proc_table}, {"os_info", &os_info},
        {"cpus", cpus}, {"mm_table", mm_table},
    };
    const char *name = (const char *)frame->rdi;
    if (!user_range(frame->rdi, 32))
        return -E_FAULT;
    for (size_t index = 0; index < sizeof exported / sizeof exported[0]; index++)
        if (!strncmp(name, exported[index].name, 32))
            return (long)exported[index].address;
    return -E_INVAL;
}

static long sys_kread(struct trap_frame *frame)
{
    uint64_t address = frame->rdi;
    if (address < (uint64_t)__kernel_start || address > (uint64_t)__kernel_end - 8 || address & 7)
        return -E_FAULT;
    return (long)*(const uint64_t *)address;
}

static long sys_kwrite(struct trap_frame *frame)
{
    uint64_t address = frame->rdi;
    if (address < (uint64_t)__data_start || address > (uint64_t)__kernel_end - 8 || address & 7)
        return -E_FAULT;
    *(volatile uint64_t *)address = frame->rsi;
    return 0;
}

static long sys_spawn(struct trap_frame *frame)
{
    uint64_t line = frame->rdi, length = frame->rsi;
    if (!user_range(line, length))
        return -E_FAULT;
    return spawn_command((const char *)line, length, caller()->pid);
}

static long sys_wait(struct trap_frame *frame)
{
    uint32_t parent = caller()->pid;
    for (unsigned slot = 0; slot < MAX_PROCS; slot++) {
        const struct process *child = &proc_table[slot];
        if (child->state != PROC_FREE && child->pid == frame->rdi && child->parent == parent)
            return child->state == PROC_EXITED ? (long)(child->exit_code & 0xFF) : -E_AGAIN;
    }
    return -E_INVAL;
}

static long sys_virtio_open(struct trap_frame *frame)
{
    if (!user_range(frame->r10, sizeof(struct virtio_open_info)) || frame->r10 & 7)
        return -E_FAULT;
    unsigned cpu = this_cpu();
    return virtio_open(cpu, cpus[cpu].current, frame->rdi, frame->rsi, frame->rdx,
                       (struct virtio_open_info *)frame->r10, frame->r8);
}

static long sys_virtio_wait(struct trap_frame *frame)
{
    unsigned cpu = this_cpu();
    return virtio_wait(cpu, cpus[cpu].current, frame, frame->rdi, frame->rsi);
}

syscall_fn syscall_table[SYS_COUNT] __attribute__((section(".data.syscall_table"), aligned(4096))) = {
    [SYS_EXIT] = sys_exit,     [SYS_WRITE] = sys_write,   [SYS_YIELD] = sys_yield,   [SYS_GETPID] = sys_getpid,
    [SYS_SLEEP] = sys_sleep,   [SYS_TIME] = sys_time,     [SYS_MMAP] = sys_mmap,     [SYS_THREAD] = sys_thread,
    [SYS_IOPERM] = sys_ioperm, [SYS_MAPIO] = sys_mapio,   [SYS_GETCPU] = sys_getcpu, [SYS_SETCPU] = sys_setcpu,
    [SYS_KSYM] = sys_ksym,     [SYS_KREAD] = sys_kread,   [SYS_KWRITE] = sys_kwrite, [SYS_SPAWN] = sys_spawn,
    [SYS_WAIT] = sys_wait,     [SYS_VIRTIO_OPEN] = sys_virtio_open, [SYS_VIRTIO_WAIT] = sys_virtio_wait,
    [SYS_CPUID] = sys_cpuid,
};

void syscall_dispatch(unsigned cpu, struct process *process, struct trap_frame *frame)
{
    frame->rflags = (frame->rflags & RFLAGS_USER_MASK) | RFLAGS_IF | 2;
    process->syscalls++;
    cpus[cpu].syscalls++;
    uint64_t number = frame->rax;
    if (number >= SYS_COUNT || !syscall_table[number]) {
        frame->rax = (uint64_t)-E_NOSYS;
        return;
    }
    frame->rax = (uint64_t)syscall_table[number](frame);
}
