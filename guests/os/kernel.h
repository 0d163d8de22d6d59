/* The pyrovisor OS kernel: shared definitions (the structures the host reads through the profile live here). */
#ifndef OS_KERNEL_H
#define OS_KERNEL_H


#define MAX_CPUS 16
#define MAX_PROCS 32
#define MAX_VMAS 8
#define MAX_VIRTIO 16
#define PROC_NAME_MAX 16
#define KSTACK_SIZE 8192
#define IDLE_STACK_SIZE 8192
#define PAGE_SIZE 4096ull
#define HUGE_SIZE (2ull << 20)
#define KERNEL_MAP_BASE 0xFFFFFFFF80000000ull
#define DIRECT_MAP_BASE 0xFFFF888000000000ull
#define LAPIC_GPA 0xFEE00000ull

#define VECTOR_PAGE_FAULT 14
#define VECTOR_GENERAL_PROTECTION 13
#define VECTOR_TIMER 0x40
#define VECTOR_WAKEUP 0x41 /* the IPI that releases waiting vCPUs at boot */
#define VECTOR_VIRTIO_BASE 0x50 /* 0x50 + device index: the virtio-mmio interrupts (MAX_VIRTIO vectors) */
#define VECTOR_SPURIOUS 0xFF
#define VECTOR_SYSCALL 0x100 /* pseudo vector: a SYSCALL that arrived at CPL0 (VMX/SVM hosts) */

#define KERNEL_CS 0x08
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define RFLAGS_USER_MASK 0xCD5ull /* CF PF AF ZF SF DF OF: what a user may keep across a system call */

/* Exit codes the kernel stops the VM with. */
#define OS_EXIT_OK 0         /* every process exited with 0 */
#define OS_EXIT_FAILURES 1   /* some process exited with another value */
#define OS_EXIT_EXCEPTION 2  /* a kernel exception or an unhandled user fault */
#define OS_EXIT_PANIC 3      /* the kernel gave up (bad command line, no archive, out of memory) */

/* Offsets into struct cpu used by entry.S. */
#define CPU_SYSCALL_ENTRY 0
#define CPU_USER_RSP 8
#define CPU_KSTACK_TOP 16

#ifndef __ASSEMBLER__

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <os/abi.h>
#include <pyrovisor/boot_info.h>
#include <pyrovisor/cpu.h>
#include <pyrovisor/tss.h>

/* Saved by the entry stubs, lowest address first: the layout of every kernel entry. */
struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

enum proc_state {
    PROC_FREE = 0,
    PROC_RUNNABLE = 1,
    PROC_RUNNING = 2,
    PROC_SLEEPING = 3,
    PROC_EXITED = 4,
};

#define VMA_WRITE 1u
#define VMA_HUGE 2u
#define VMA_CACHE 4u /* SYS_MMAP with MAP_CACHE: reclaimable "page cache" (mm.c, section 11 of guest-os.md) */

struct vma {
    uint64_t start, end;
    uint32_t flags;
    uint32_t reserved;
};

/* An address space, shared by a process and its threads. */
struct mm {
    uint64_t cr3;          /* physical address of the PML4 */
    uint32_t users;        /* processes and threads using it; freed when it drops to 0 */
    uint32_t nr_vmas;
    uint64_t mmap_next;    /* next SYS_MMAP address */
    uint64_t pages_mapped; /* in 4 KiB units (a 2 MiB page counts 512) */
    uint64_t table_pages;  /* page-table pages */
    struct vma vmas[MAX_VMAS];
};

/* One entry of the process table (threads are processes sharing an mm). */
struct process {
    uint32_t pid;            /* 0: free slot */
    uint32_t state;          /* enum proc_state */
    char name[PROC_NAME_MAX];
    uint64_t cr3;
    uint32_t parent;         /* pid, 0 for processes the kernel started */
    uint32_t cpu;            /* vCPU it runs on or last ran on */
    int32_t affinity;        /* -1: any vCPU */
    int32_t exit_code;
    uint64_t syscalls;
    uint64_t page_faults;
    uint64_t switches;       /* times it was switched to */
    uint64_t ticks;          /* timer ticks it was running for */
    uint64_t cpus_ran;       /* bit n: it ran on vCPU n */
    uint64_t wake_tick;
    uint64_t start_tick;
    uint64_t exit_tick;
    uint32_t args_offset;    /* its arguments: offset and length in the command line */
    uint32_t args_len;
    uint16_t io_first;       /* ports it may use (SYS_IOPERM) */
    uint16_t io_count;
    uint32_t program;        /* archive index */
    struct mm *mm;
};

/* Per-vCPU state; KERNEL_GS_BASE points here (the SYSCALL path uses the first three fields). */
struct cpu {
    uint64_t syscall_entry;
    uint64_t user_rsp;
    uint64_t kstack_top;
    struct process *current;
    uint32_t index;
    uint32_t online;
    uint64_t cr3;            /* loaded now */
    uint64_t ticks;
    uint64_t idle_ticks;
    uint64_t switches;
    uint64_t syscalls;
    uint64_t syscalls_direct; /* of which arrived at CPL0 through SYSCALL itself (VMX/SVM, TCG) */
    uint32_t slice_left;
    uint16_t io_first;       /* ports open in this vCPU's TSS bitmap */
    uint16_t io_count;
} __attribute__((aligned(64)));

/* Global facts about the running kernel, at a symbol the host finds through the profile. */
struct os_info {
    uint32_t magic;          /* OS_INFO_MAGIC once the kernel has set up */
    uint32_t nr_cpus;
    uint64_t jiffies;        /* timer ticks of vCPU 0 since boot */
    uint32_t hz;
    uint32_t live;           /* processes not yet exited */
    uint32_t next_pid;
    uint32_t failures;       /* processes that exited with a non-zero code */
    uint64_t tsc_khz;
    uint64_t boot_tsc;
    uint64_t tick_tsc;       /* TSC at vCPU 0's last tick: SYS_TIME interpolates from there */
    uint64_t last_time;      /* the latest SYS_TIME answer: time never goes back */
    uint64_t free_next;      /* bump allocator: next never-used 4 KiB page */
    uint64_t huge_next;      /* bump allocator: lowest 2 MiB chunk handed out (grows down) */
    uint64_t pages_reused;
    uint64_t pages_discarded;
};
#define OS_INFO_MAGIC 0x534F5950u /* "PYOS" */

/* A virtio-mmio device found at boot (virtio.c); `virtio_devices[index]`, index as printed at boot. */
struct virtio_device {
    uint64_t base;           /* physical address of its registers */
    uint32_t size;
    uint32_t irq;            /* GSI */
    uint32_t device_id;
    uint32_t vendor_id;
    uint32_t vector;         /* the vector its IOAPIC pin delivers, 0 while masked */
    uint32_t cpu;            /* the vCPU it is routed to */
    uint64_t interrupts;     /* since boot */
    uint64_t pending;        /* interrupts not yet collected by SYS_VIRTIO_WAIT */
    struct mm *owner;        /* the address space it is lent to, 0 when free */
    struct process *waiter;  /* asleep in SYS_VIRTIO_WAIT */
    uint64_t dma_phys;       /* the owner's DMA area */
    uint64_t dma_size;
    uint32_t owner_pid;      /* the process that opened it */
    uint32_t bound;          /* 1: driven by a kernel driver (the balloon), never lent to a process */
};

/* Kernel options from the `kernel` segment of the command line. */
struct os_options {
    uint32_t hz;
    uint32_t slice;    /* ticks per time slice */
    uint32_t bootmark; /* port written just before the first user instruction (0: none) */
    uint32_t quiet;    /* no per-process lines */
    uint32_t faultaround; /* pages a 4 KiB demand-zero fault maps at once (1: only the faulting page) */
    uint32_t keepmm;   /* exited processes keep their address spaces, for the host to inspect (sandbox) */
    uint32_t balloon_lie; /* balloon_report=lie: MEMFREE and AVAIL reported 4x too high (capped at MEMTOT) */
};

extern struct process proc_table[MAX_PROCS];
extern struct mm mm_table[MAX_PROCS];
extern struct cpu cpus[MAX_CPUS];
extern struct os_info os_info;
extern struct os_options os_options;
extern struct virtio_device virtio_devices[MAX_VIRTIO];
extern uint32_t nr_virtio_devices;
extern uint64_t kernel_pml4[512];
extern const struct pyrovisor_boot_info *boot_info;
extern const struct archive_entry *archive_entries;
extern uint32_t archive_count;
extern uint64_t archive_phys;
typedef long (*syscall_fn)(struct trap_frame *frame);
extern syscall_fn syscall_table[SYS_COUNT];

/* Kernel lock: one for the whole kernel, taken on entry from user mode or idle. */
void klock(unsigned cpu);
void kunlock(void);
bool klock_held_by(unsigned cpu);

/* Addresses. */
static inline void *phys_to_virt(uint64_t phys) { return (void *)(DIRECT_MAP_BASE + phys); }
static inline uint64_t kernel_to_phys(const void *address) { return (uint64_t)address - KERNEL_MAP_BASE; }

/* CPU helpers. */
static inline unsigned this_cpu(void)
{
    uint16_t selector;
    __asm__ volatile("str %0" : "=r"(selector));
    return (unsigned)(selector - 0x28) / 16;
}
static inline void invlpg(uint64_t address) { __asm__ volatile("invlpg (%0)" : : "r"(address) : "memory"); }
static inline uint64_t rdtsc(void)
{
    uint32_t low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((uint64_t)high << 32) | low;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* console.c */
struct kline {
    size_t length;
    char text[200];
};
void kline_str(struct kline *line, const char *text);
void kline_mem(struct kline *line, const char *text, size_t length);
void kline_dec(struct kline *line, uint64_t value);
void kline_end(struct kline *line);
void kputs(const char *text, size_t length);
int kprintf(const char *format, ...) __attribute__((format(printf, 1, 2)));
void kernel_stop(int code) __attribute__((noreturn));

/* trap.c */
void idt_setup(void);
void idt_load(void);
void fatal_user_fault(struct trap_frame *frame, struct process *process, const char *why) __attribute__((noreturn));

/* mm.c */
void mm_init(void);
uint64_t page_alloc(void); /* one zeroed 4 KiB page for the kernel (page tables); stops the VM when memory is out */
long spawn_command(const char *line, size_t length, uint32_t parent); /* SYS_SPAWN */
struct mm *mm_create(void);
bool mm_map_page(struct mm *mm, uint64_t va, uint64_t phys, uint64_t flags);
bool mm_map_range(struct mm *mm, uint64_t va, uint64_t phys, uint64_t pages, uint64_t flags);
bool mm_add_vma(struct mm *mm, uint64_t start, uint64_t end, uint32_t flags);
/* A demand-zero fault. When the pages it mapped came from memory of unknown content, zero_va and zero_bytes
   name the range still to be cleared (the caller has it cleared in user mode); with zero_va == 0 the
   kernel clears it itself, at CPL0. */
bool mm_handle_fault(struct mm *mm, uint64_t address, uint64_t error_code, uint64_t *zero_va, uint64_t *zero_bytes);
void mm_release(struct mm *mm);
uint64_t page_alloc_contiguous(uint64_t pages); /* zeroed and physically contiguous; 0 if there is no such run */
void mm_map_owned(struct mm *mm, uint64_t va, uint64_t phys, uint64_t pages); /* data pages, freed with the mm */
bool mm_is_ram(uint64_t phys, uint64_t length);
void mm_zero_cpl0(uint64_t va, uint64_t bytes); /* clears memory at (emulated) CPL0: about 0.33 ms per 4 KiB here */

/* What the allocator holds, in 4 KiB pages (for the balloon's statistics and the summary). */
struct mm_counts {
    uint64_t ram_pages;        /* RAM the boot info describes */
    uint64_t free_pages;       /* free: never used, zeroed and not-zero lists, pages being reported */
    uint64_t dirty_pages;      /* of which their content is unknown (cleared on reuse) */
    uint64_t cache_pages;      /* mapped in MAP_CACHE regions: reclaimable */
    uint64_t cache_reclaimed;  /* cache pages taken back since boot */
    uint64_t zeroed_user;      /* not-zero pages cleared in user mode (the zeroing upcall) */
    uint64_t zeroed_kernel;    /* ... and at CPL0 */
    uint64_t huge_allocs;      /* 2 MiB pages handed to processes */
    uint64_t lost_pages;       /* freed pages that did not fit the free lists and are never reused */
    uint64_t page_faults;      /* user page faults since boot */
};
extern struct mm_counts mm_counts;
uint64_t mm_free_pages(void);
/* The balloon's side of the allocator: free pages taken for the balloon (one contiguous range, whole
   2 MiB chunks when `wanted` allows; at most `wanted`, 0 when no free memory is left beyond a small
   reserve, after trying to reclaim cache), and pages given back (their content unknown). */
uint64_t mm_balloon_take(uint64_t wanted, uint64_t *phys);
void mm_balloon_give(uint64_t phys, uint64_t pages);
void mm_ram_range(uint64_t *low, uint64_t *high);
/* Free page reporting: free ranges not reported yet are taken off the lists while the device looks at
   them (clean ones only if `clean_too`), then put back, zeroed (`stay_clean`) or not. */
struct mm_range {
    uint64_t phys;
    uint64_t pages;
    uint32_t dirty;
    uint32_t chunk;
};
unsigned mm_report_take(struct mm_range *ranges, unsigned capacity, bool clean_too);
void mm_report_return(const struct mm_range *ranges, unsigned count, bool stay_clean);
bool mm_discard_present(void);

/* balloon.c: the virtio-balloon driver (DeviceID 5), bound by the kernel itself. */
void balloon_init(void);
void balloon_interrupt(void);
void balloon_tick(void);
bool balloon_oom(uint64_t wanted, bool chunk); /* deflates for an allocation that would fail */
void balloon_summary(void);
#define PTE_PRESENT (1ull << 0)
#define PTE_WRITE (1ull << 1)
#define PTE_USER (1ull << 2)
#define PTE_PWT (1ull << 3)
#define PTE_PCD (1ull << 4)
#define PTE_ACCESSED (1ull << 5)
#define PTE_DIRTY (1ull << 6)
#define PTE_HUGE (1ull << 7)
#define PTE_OWNED (1ull << 9) /* software bit: the page belongs to the process, free it on exit */
#define PTE_NX (1ull << 63)
#define PTE_ADDRESS 0x000FFFFFFFFFF000ull

/* boot.c */
void kernel_main(uint64_t boot_phys, unsigned cpu);
void ap_main(unsigned cpu);

/* sched.c */
struct process *process_create(const char *name, size_t name_length, struct mm *mm, uint32_t parent);
void process_start(struct process *process, uint64_t rip, uint64_t rsp, uint64_t arg0, uint64_t arg1,
                   uint64_t arg2, uint64_t arg3, uint64_t arg4);
void make_runnable(struct process *process);
void schedule(unsigned cpu, struct trap_frame *frame) __attribute__((noreturn));
void timer_tick(unsigned cpu, struct trap_frame *frame);
void process_exit(struct process *process, int code);
void sleep_until(struct process *process, uint64_t tick);
void wake_process(struct process *process); /* a sleeper becomes runnable before its time */
struct trap_frame *process_frame(const struct process *process);
struct process *current_process(unsigned cpu);
void cpu_enter_idle(unsigned cpu) __attribute__((noreturn));

/* syscall.c */
void syscall_dispatch(unsigned cpu, struct process *process, struct trap_frame *frame);

/* virtio.c */
void virtio_discover(const struct pyrovisor_boot_info *boot, char *cmdline);
void virtio_probe(void);
long virtio_open(unsigned cpu, struct process *process, uint64_t device_id, uint64_t nth, uint64_t dma_bytes,
                 struct virtio_open_info *info, uint64_t flags);
long virtio_wait(unsigned cpu, struct process *process, struct trap_frame *frame, uint64_t index,
                 uint64_t timeout_ms);
void virtio_interrupt(unsigned cpu, unsigned index, struct trap_frame *frame);
void virtio_wait_timed_out(const struct process *process);
void virtio_release(const struct mm *mm);
void virtio_summary(void);
struct virtio_device *virtio_bind_kernel(uint32_t device_id, unsigned cpu); /* the first such device, routed to cpu */

/* lapic.c */
void lapic_timer_start(uint32_t hz);
void lapic_enable(void);
void lapic_eoi(void);
void lapic_wake_others(void);

/* entry.S */
extern char user_entry_page[];
extern char user_zero_stub[], user_zero_done[]; /* in the entry page: clears RCX qwords at RDI, then ud2 */
void syscall_entry_cpl0(void);
void resume_frame(struct trap_frame *frame) __attribute__((noreturn));      /* releases the kernel lock */
void idle_on_stack(uint64_t stack_top) __attribute__((noreturn));         /* releases the kernel lock */
extern const uint64_t vector_stubs[34 + MAX_VIRTIO]; /* exceptions, timer, wake-up, then the virtio vectors */
void spurious_entry(void);
extern uint8_t idle_stacks[MAX_CPUS][IDLE_STACK_SIZE];

#endif /* __ASSEMBLER__ */
#endif
