/* The user-program library of the pyrovisor OS: system calls, arguments, time, output and reporting. */
#ifndef ULIB_H
#define ULIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <os/abi.h>
#include <pyrovisor/printf.h>
#include <pyrovisor/string.h>

/* What the kernel passed at entry. */
struct program_env {
    const char *args;
    size_t args_length;
    uint64_t tsc_khz;
    uint32_t pid;
    uint32_t nr_cpus;
};
extern struct program_env env;
extern const char program_name[]; /* each program defines it */
int main(void);                    /* each program defines it; its value is the exit code */

static inline long syscall5(long number, long a0, long a1, long a2, long a3, long a4)
{
    long result;
    register long r10 __asm__("r10") = a3;
    register long r8 __asm__("r8") = a4;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(number), "D"(a0), "S"(a1), "d"(a2), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return result;
}
static inline long syscall2(long number, long a0, long a1) { return syscall5(number, a0, a1, 0, 0, 0); }
static inline long syscall1(long number, long a0) { return syscall5(number, a0, 0, 0, 0, 0); }
static inline long syscall0(long number) { return syscall5(number, 0, 0, 0, 0, 0); }

void __attribute__((noreturn)) sys_exit(long code);
static inline long sys_write(const void *buffer, size_t length) { return syscall2(SYS_WRITE, (long)buffer, (long)length); }
static inline long sys_yield(void) { return syscall0(SYS_YIELD); }
static inline long sys_getpid(void) { return syscall0(SYS_GETPID); }
static inline long sys_sleep(uint64_t ms) { return syscall1(SYS_SLEEP, (long)ms); }
static inline long sys_time(void) { return syscall0(SYS_TIME); }
static inline long sys_mmap(uint64_t length, unsigned flags) { return syscall2(SYS_MMAP, (long)length, flags); }
static inline long sys_ioperm(unsigned first, unsigned count) { return syscall2(SYS_IOPERM, first, count); }
static inline long sys_mapio(uint64_t phys, uint64_t length) { return syscall2(SYS_MAPIO, (long)phys, (long)length); }
static inline long sys_getcpu(void) { return syscall0(SYS_GETCPU); }
static inline long sys_setcpu(long cpu) { return syscall1(SYS_SETCPU, cpu); }
static inline long sys_ksym(const char *name) { return syscall1(SYS_KSYM, (long)name); }
static inline long sys_kread(uint64_t address) { return syscall1(SYS_KREAD, (long)address); }
static inline long sys_kwrite(uint64_t address, uint64_t value) { return syscall2(SYS_KWRITE, (long)address, (long)value); }
static inline long sys_spawn(const char *line, size_t length) { return syscall2(SYS_SPAWN, (long)line, (long)length); }
static inline long sys_wait(long pid) { return syscall1(SYS_WAIT, pid); }
static inline long sys_virtio_open(uint32_t device_id, unsigned nth, uint64_t dma_bytes, struct virtio_open_info *info,
                                   unsigned flags)
{
    return syscall5(SYS_VIRTIO_OPEN, device_id, nth, (long)dma_bytes, (long)info, flags);
}
static inline long sys_virtio_wait(unsigned index, uint64_t timeout_ms)
{
    return syscall2(SYS_VIRTIO_WAIT, index, (long)timeout_ms);
}

/* System calls fail with -errno; kernel addresses are negative too, so only -4095..-1 are errors. */
static inline bool is_error(long value) { return value < 0 && value >= -4095; }

/* A thread running fn(arg) on its own stack in this address space, pinned to `cpu` (-1: any). */
long thread_create(long (*fn)(uint64_t), uint64_t arg, uint64_t stack_size, long cpu);

/* key=value arguments. */
uint64_t arg_u64(const char *key, uint64_t fallback);
/* Copies the value of key=WORD into buffer (NUL-terminated); returns false (and fallback) if absent. */
bool arg_str(const char *key, char *buffer, size_t size, const char *fallback);

/* Time from the TSC, read natively in user mode (the kernel's SYS_TIME when the frequency is unknown). */
static inline uint64_t rdtsc(void)
{
    uint32_t low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((uint64_t)high << 32) | low;
}
uint64_t now_ns(void);
uint64_t cycles_to_ns(uint64_t cycles);
/* The TSC frequency: the kernel's (boot info or CPUID), or, when it has none (QEMU without a timing leaf),
   measured once against the kernel's timer ticks over about 100 ms (and then stored in env.tsc_khz). */
uint64_t tsc_khz(void);

/* "PASS: name pid: ..." / "FAIL: ..." lines; failures() counts the FAILs. */
void report(bool condition, const char *format, ...) __attribute__((format(printf, 2, 3)));
unsigned failures(void);

/* Deterministic pseudo-random numbers (xorshift64*). */
static inline uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

#endif
