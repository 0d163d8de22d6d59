/* The ABI between the pyrovisor OS kernel and its user programs: system calls, address-space layout,
   process entry registers and the program archive the VMM passes as the initrd (docs/guest-os.md). */
#ifndef OS_ABI_H
#define OS_ABI_H

/* System calls: SYSCALL with the number in RAX and arguments in RDI, RSI, RDX, R10, R8; the result
   comes back in RAX (a negative errno on failure). RCX and R11 are clobbered, everything else kept. */
#define SYS_EXIT 0   /* (code): ends the calling process or thread */
#define SYS_WRITE 1  /* (buffer, length): to the console, one call = one unbroken piece of output */
#define SYS_YIELD 2  /* gives the vCPU to the next runnable process */
#define SYS_GETPID 3
#define SYS_SLEEP 4  /* (milliseconds), rounded up to timer ticks */
#define SYS_TIME 5   /* nanoseconds since boot */
#define SYS_MMAP 6   /* (length, flags: MAP_HUGE, MAP_CACHE): a new demand-zero region; returns its address */
#define SYS_THREAD 7 /* (start, stack top, arg0, arg1, cpu or -1): a thread in the caller's address space */
#define SYS_IOPERM 8 /* (first port, count): lets the caller use these ports (below 0x1000) */
#define SYS_MAPIO 9  /* (physical address, length, flags): maps device memory (outside RAM), uncached unless
                        MAPIO_CACHED */
#define SYS_GETCPU 10
#define SYS_SETCPU 11 /* (cpu or -1): pins the caller to a vCPU, or unpins it */
#define SYS_KSYM 12   /* (name): address of an exported kernel symbol (a tiny kallsyms) */
#define SYS_KREAD 13  /* (kernel address): the 8 bytes there */
#define SYS_KWRITE 14 /* (kernel address, value): writes 8 bytes in kernel data, as a rootkit would */
#define SYS_SPAWN 15  /* (line, length): starts "program k=v ..." from the archive as a child; returns its pid */
#define SYS_WAIT 16   /* (pid): a child's exit code (0-255) once it has exited, -E_AGAIN while it runs */
#define SYS_VIRTIO_OPEN 17 /* (device id or 0, nth, DMA bytes, struct virtio_open_info *, flags): takes a virtio-mmio
                              device: maps its registers and a zeroed, physically contiguous DMA area; returns its
                              index */
#define SYS_VIRTIO_WAIT 18 /* (device index, timeout ms): sleeps until the device's interrupt; returns how many
                              interrupts arrived since the last call (0: timed out) */
#define SYS_CPUID 19 /* (leaf, subleaf, uint32_t out[4]): CPUID executed by the kernel (CPL0), for programs that
                         compare it with their own (vmdetect: kvm_pvm emulates CPL0 and honours KVM_SET_CPUID2) */
#define SYS_COUNT 20

#define MAP_HUGE 1u /* back the region with 2 MiB pages (one fault per 2 MiB) */
#define MAP_CACHE 2u /* a "page cache" region: counted as CACHES in the balloon statistics, and taken back by the
                        kernel (unmapped; a later access gets fresh zeroed pages) before memory runs out */
#define MAPIO_CACHED 1u /* SYS_MAPIO flag: map write-back, for memory the VMM shares with the guest outside its RAM
                            (a polled register page); device registers stay uncached */
#define VIRTIO_OPEN_IRQ 1u /* SYS_VIRTIO_OPEN flag: route the device's interrupt to this vCPU for SYS_VIRTIO_WAIT */
#define VIRTIO_DMA_MAX (16ull << 20) /* largest DMA area SYS_VIRTIO_OPEN gives */

#define E_PERM 1
#define E_NOMEM 12
#define E_FAULT 14
#define E_INVAL 22
#define E_AGAIN 11
#define E_BUSY 16
#define E_NODEV 19
#define E_NOSYS 38

/* User address space (all below USER_TOP; the upper half is the kernel's). */
#define USER_IMAGE_BASE 0x400000ull        /* programs are linked here */
#define USER_MMAP_BASE 0x100000000ull      /* SYS_MMAP regions, 2 MiB aligned, growing up */
#define USER_MMAP_END 0x7f0000000000ull
#define USER_STACK_TOP 0x7fffffe00000ull   /* demand-zero stack below this */
#define USER_STACK_SIZE (1ull << 20)
#define USER_ARGS_VA 0x7fffffffe000ull     /* the kernel command line page, read-only */
#define USER_ENTRY_VA 0x7ffffffff000ull    /* the SYSCALL entry page (LSTAR), execute-only for users */
#define USER_TOP 0x800000000000ull

/* A process starts at its entry point with RSP = USER_STACK_TOP and
   RDI = its arguments (inside the USER_ARGS_VA page, not NUL-terminated), RSI = their length,
   RDX = TSC frequency in kHz (0 if unknown), RCX = its pid, R8 = the number of vCPUs. */

/* The program archive (initrd): a header and entries in the first page(s), then each program's
   image at a page-aligned offset. An image holds text, read-only data and the initial values of
   writable data; the kernel maps it read-only and shared, the program's start-up code copies the
   data to [rw_start, ...), which the kernel maps demand-zero up to rw_end (data + bss). */
#define ARCHIVE_MAGIC 0x41525950u /* "PYRA" */
#define ARCHIVE_VERSION 1u
#define ARCHIVE_NAME_MAX 16

#ifndef __ASSEMBLER__
#include <stdint.h>

struct archive_header {
    uint32_t magic;
    uint32_t version;
    uint32_t count;
    uint32_t entry_size;
};

/* What SYS_VIRTIO_OPEN writes for the caller. */
struct virtio_open_info {
    uint64_t regs;      /* user address of the register block (MagicValue at offset 0) */
    uint64_t dma;       /* user address of the DMA area (0 if none was asked for) */
    uint64_t dma_phys;  /* its guest-physical address, for descriptors */
    uint64_t dma_size;  /* bytes: the request rounded up to 4 KiB */
    uint64_t base;      /* guest-physical address of the registers */
    uint32_t size;      /* bytes of registers (0x200 on QEMU microvm) */
    uint32_t index;     /* the kernel's device index (os: virtio N: ... at boot) */
    uint32_t device_id; /* virtio device id: 1 net, 2 block, 4 entropy, 19 vsock, ... */
    uint32_t irq;       /* its interrupt line (GSI) */
    uint32_t vector;    /* the vector the kernel routed it to, 0 without VIRTIO_OPEN_IRQ */
    uint32_t reserved;
};

struct archive_entry {
    char name[ARCHIVE_NAME_MAX];
    uint64_t offset;     /* of the image from the start of the archive, page-aligned */
    uint64_t image_size; /* bytes, a whole number of pages */
    uint64_t load_va;    /* where the image is mapped */
    uint64_t entry;
    uint64_t rw_start;   /* writable, demand-zero region: data then bss */
    uint64_t rw_end;
};
#endif

#endif
