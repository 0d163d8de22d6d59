/* Baseline for benchmarks/exit_latency.py: the same guest image, run by a bare KVM_RUN loop in C.
   Usage: exit_loop MEMORY_FILE SREGS_FILE REGS_FILE
   Port 0x511 writes are timing markers (1: port loop starts, 2: MMIO loop starts, 3: done); port 0xf4
   ends the run; every other exit is answered with all ones (reads) or ignored (writes). */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void load(const char *path, void *into, size_t size)
{
    FILE *file = fopen(path, "rb");
    if (!file || fread(into, 1, size, file) != size) {
        perror(path);
        exit(2);
    }
    fclose(file);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s MEMORY SREGS REGS\n", argv[0]);
        return 2;
    }
    struct stat info;
    if (stat(argv[1], &info)) {
        perror(argv[1]);
        return 2;
    }
    size_t size = (size_t)info.st_size;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (kvm < 0 || vm < 0 || ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) {
        perror("kvm");
        return 2;
    }
    void *memory = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    load(argv[1], memory, size);
    struct kvm_userspace_memory_region region = {0, 0, 0, size, (unsigned long)memory};
    ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs sregs;
    struct kvm_regs regs;
    load(argv[2], &sregs, sizeof sregs);
    load(argv[3], &regs, sizeof regs);
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) || ioctl(vcpu, KVM_SET_REGS, &regs)) {
        perror("set registers");
        return 2;
    }
    double marks[4] = {0};
    long exits_at[4] = {0};
    long exits = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            perror("KVM_RUN");
            return 2;
        }
        exits++;
        if (run->exit_reason == KVM_EXIT_IO) {
            unsigned char *data = (unsigned char *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_IN) {
                memset(data, 0xff, run->io.size * run->io.count);
            } else if (run->io.port == 0x511 && data[0] >= 1 && data[0] <= 3) {
                marks[data[0]] = now();
                exits_at[data[0]] = exits;
            } else if (run->io.port == 0xf4) {
                break;
            }
        } else if (run->exit_reason != KVM_EXIT_MMIO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 2;
        }
    }
    printf("pio_seconds=%.9f pio_exits=%ld mmio_seconds=%.9f mmio_exits=%ld\n", marks[2] - marks[1],
           exits_at[2] - exits_at[1], marks[3] - marks[2], exits_at[3] - exits_at[2]);
    return 0;
}
