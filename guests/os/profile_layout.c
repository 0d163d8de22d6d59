/* Compiled to assembly only (never linked): the layout of the structures the host inspects, as marker
   lines that tools/mkprofile.py turns into the kernel profile (the "asm-offsets" technique). */
#include "kernel.h"

#define MARK(text) __asm__ volatile("\n.ascii \"@@ " text "\"")
#define STRUCT(s) __asm__ volatile("\n.ascii \"@@ struct " #s " %c0\"" : : "i"(sizeof(struct s)))
#define FIELD(s, f, type)                                                                                        \
    __asm__ volatile("\n.ascii \"@@ field " #s " " #f " %c0 %c1 " type "\""                                      \
                     :                                                                                           \
                     : "i"(offsetof(struct s, f)), "i"(sizeof(((struct s *)0)->f)))
#define CONSTANT(name) __asm__ volatile("\n.ascii \"@@ const " #name " %c0\"" : : "i"((long)(name)))
/* Immediates must fit 32 bits: wide constants go in two halves. */
#define CONSTANT64(name)                                                                                         \
    __asm__ volatile("\n.ascii \"@@ const64 " #name " %c0 %c1\""                                                 \
                     :                                                                                           \
                     : "i"((long)((uint64_t)(name) >> 32)), "i"((long)(int32_t)(uint32_t)(uint64_t)(name)))
#define ENUM(kind, name, value) __asm__ volatile("\n.ascii \"@@ enum " kind " " name " %c0\"" : : "i"((long)(value)))

void profile_layout(void);

void profile_layout(void)
{
    STRUCT(process);
    FIELD(process, pid, "u32");
    FIELD(process, state, "enum:proc_state");
    FIELD(process, name, "char[16]");
    FIELD(process, cr3, "u64");
    FIELD(process, parent, "u32");
    FIELD(process, cpu, "u32");
    FIELD(process, affinity, "i32");
    FIELD(process, exit_code, "i32");
    FIELD(process, syscalls, "u64");
    FIELD(process, page_faults, "u64");
    FIELD(process, switches, "u64");
    FIELD(process, ticks, "u64");
    FIELD(process, cpus_ran, "u64");
    FIELD(process, wake_tick, "u64");
    FIELD(process, start_tick, "u64");
    FIELD(process, exit_tick, "u64");
    FIELD(process, args_offset, "u32");
    FIELD(process, args_len, "u32");
    FIELD(process, io_first, "u16");
    FIELD(process, io_count, "u16");
    FIELD(process, program, "u32");
    FIELD(process, mm, "ptr:mm");

    STRUCT(mm);
    FIELD(mm, cr3, "u64");
    FIELD(mm, users, "u32");
    FIELD(mm, nr_vmas, "u32");
    FIELD(mm, mmap_next, "u64");
    FIELD(mm, pages_mapped, "u64");
    FIELD(mm, table_pages, "u64");
    FIELD(mm, vmas, "struct:vma[8]");

    STRUCT(vma);
    FIELD(vma, start, "u64");
    FIELD(vma, end, "u64");
    FIELD(vma, flags, "u32");

    STRUCT(cpu);
    FIELD(cpu, kstack_top, "u64");
    FIELD(cpu, current, "ptr:process");
    FIELD(cpu, index, "u32");
    FIELD(cpu, online, "u32");
    FIELD(cpu, cr3, "u64");
    FIELD(cpu, ticks, "u64");
    FIELD(cpu, idle_ticks, "u64");
    FIELD(cpu, switches, "u64");
    FIELD(cpu, syscalls, "u64");
    FIELD(cpu, syscalls_direct, "u64");

    STRUCT(os_info);
    FIELD(os_info, magic, "u32");
    FIELD(os_info, nr_cpus, "u32");
    FIELD(os_info, jiffies, "u64");
    FIELD(os_info, hz, "u32");
    FIELD(os_info, live, "u32");
    FIELD(os_info, next_pid, "u32");
    FIELD(os_info, failures, "u32");
    FIELD(os_info, tsc_khz, "u64");
    FIELD(os_info, free_next, "u64");
    FIELD(os_info, huge_next, "u64");
    FIELD(os_info, pages_reused, "u64");
    FIELD(os_info, pages_discarded, "u64");

    STRUCT(virtio_device);
    FIELD(virtio_device, base, "u64");
    FIELD(virtio_device, size, "u32");
    FIELD(virtio_device, irq, "u32");
    FIELD(virtio_device, device_id, "u32");
    FIELD(virtio_device, vendor_id, "u32");
    FIELD(virtio_device, vector, "u32");
    FIELD(virtio_device, cpu, "u32");
    FIELD(virtio_device, interrupts, "u64");
    FIELD(virtio_device, pending, "u64");
    FIELD(virtio_device, owner, "ptr:mm");
    FIELD(virtio_device, waiter, "ptr:process");
    FIELD(virtio_device, dma_phys, "u64");
    FIELD(virtio_device, dma_size, "u64");
    FIELD(virtio_device, owner_pid, "u32");

    STRUCT(archive_entry);
    FIELD(archive_entry, name, "char[16]");
    FIELD(archive_entry, offset, "u64");
    FIELD(archive_entry, image_size, "u64");
    FIELD(archive_entry, load_va, "u64");
    FIELD(archive_entry, entry, "u64");

    CONSTANT(MAX_CPUS);
    CONSTANT(MAX_PROCS);
    CONSTANT(MAX_VMAS);
    CONSTANT(KSTACK_SIZE);
    CONSTANT(OS_INFO_MAGIC);
    CONSTANT(SYS_COUNT);
    CONSTANT(MAX_VIRTIO);
    CONSTANT64(USER_IMAGE_BASE);
    CONSTANT64(USER_STACK_TOP);
    CONSTANT64(USER_ARGS_VA);
    CONSTANT64(USER_ENTRY_VA);
    CONSTANT64(USER_TOP);
    CONSTANT64(USER_MMAP_BASE);
    CONSTANT(VMA_WRITE);
    CONSTANT(VMA_HUGE);
    CONSTANT(VMA_CACHE);

    ENUM("proc_state", "free", PROC_FREE);
    ENUM("proc_state", "runnable", PROC_RUNNABLE);
    ENUM("proc_state", "running", PROC_RUNNING);
    ENUM("proc_state", "sleeping", PROC_SLEEPING);
    ENUM("proc_state", "exited", PROC_EXITED);

    ENUM("syscall", "exit", SYS_EXIT);
    ENUM("syscall", "write", SYS_WRITE);
    ENUM("syscall", "yield", SYS_YIELD);
    ENUM("syscall", "getpid", SYS_GETPID);
    ENUM("syscall", "sleep", SYS_SLEEP);
    ENUM("syscall", "time", SYS_TIME);
    ENUM("syscall", "mmap", SYS_MMAP);
    ENUM("syscall", "thread", SYS_THREAD);
    ENUM("syscall", "ioperm", SYS_IOPERM);
    ENUM("syscall", "mapio", SYS_MAPIO);
    ENUM("syscall", "getcpu", SYS_GETCPU);
    ENUM("syscall", "setcpu", SYS_SETCPU);
    ENUM("syscall", "ksym", SYS_KSYM);
    ENUM("syscall", "kread", SYS_KREAD);
    ENUM("syscall", "kwrite", SYS_KWRITE);
    ENUM("syscall", "spawn", SYS_SPAWN);
    ENUM("syscall", "wait", SYS_WAIT);
    ENUM("syscall", "virtio_open", SYS_VIRTIO_OPEN);
    ENUM("syscall", "virtio_wait", SYS_VIRTIO_WAIT);
    ENUM("syscall", "cpuid", SYS_CPUID);
    MARK("end");
}
