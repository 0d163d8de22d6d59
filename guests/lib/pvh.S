/* PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), so the same guest also boots under QEMU's -kernel:
   32-bit protected mode, paging off, EBX = struct hvm_start_info. Builds pyrovisor's boot page tables
   (docs/boot-protocol.md), enters long mode, and lets pvh_setup() recreate the rest of the boot state. */

#define PAGE_TABLES 0x10000
#define PML4 (PAGE_TABLES)
#define PDPT (PAGE_TABLES + 0x1000)
#define KERNEL_PDPT (PAGE_TABLES + 0x2000)
#define FIRST_PD (PAGE_TABLES + 0x3000)
#define TABLE_FLAGS 0x23  /* present, writable, accessed */
#define HUGE_FLAGS 0xE3   /* present, writable, accessed, dirty, 2 MiB */
#define HOLE_FLAGS 0xFB   /* the same, uncached (write-through, cache disabled) */
#define BOOT_STACK_TOP 0x84000

    .section .note.pvh, "a", @note
    .p2align 2
    .long 4, 4, 18   /* name size, descriptor size, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_entry

    .section .text.pvh, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    cld
    mov %ebx, %esi                        /* keep hvm_start_info */
    /* Four page directories: physical 0..4 GiB in 2 MiB pages, 3..4 GiB uncached. */
    mov $FIRST_PD, %edi
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    cmp $0x600, %ecx                      /* entry 0x600 = 3 GiB */
    jae 2f
    or $HUGE_FLAGS, %eax
    jmp 3f
2:  or $HOLE_FLAGS, %eax
3:  mov %eax, (%edi)
    movl $0, 4(%edi)
    add $8, %edi
    inc %ecx
    cmp $2048, %ecx
    jne 1b
    /* PDPT entries 0..3 → the directories; the kernel map's PDPT entry 510 → the first directory. */
    xor %ecx, %ecx
4:  mov %ecx, %eax
    shl $12, %eax
    add $(FIRST_PD | TABLE_FLAGS), %eax
    mov %eax, PDPT(,%ecx,8)
    movl $0, PDPT+4(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne 4b
    movl $(FIRST_PD | TABLE_FLAGS), KERNEL_PDPT + 8*510
    /* PML4: identity (0), direct map (273), kernel map (511). */
    movl $(PDPT | TABLE_FLAGS), PML4
    movl $(PDPT | TABLE_FLAGS), PML4 + 8*273
    movl $(KERNEL_PDPT | TABLE_FLAGS), PML4 + 8*511
    /* Long mode: PAE, EFER.LME|NXE|SCE, paging. */
    mov $PML4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax                       /* PAE, OSFXSR, OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x901, %eax
    wrmsr
    mov $0x80010033, %eax                 /* PG, WP, NE, ET, MP, PE */
    mov %eax, %cr0
    lgdt pvh_gdt_pointer
    ljmp $0x08, $pvh_long_mode

    .code64
pvh_long_mode:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $BOOT_STACK_TOP, %esp
    mov %esi, %edi                        /* pvh_setup(start_info) returns the boot info address */
    movabs $pvh_setup, %rax               /* absolute: the guest may be linked far from here (kernel map) */
    call *%rax
    mov %rax, %rdi
    xor %esi, %esi                        /* vCPU 0 */
    mov $BOOT_STACK_TOP, %esp
    movabs $_start, %rax
    jmp *%rax

    .section .rodata.pvh, "a"
    .p2align 3
pvh_gdt:
    .quad 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF
pvh_gdt_pointer:
    .word pvh_gdt_pointer - pvh_gdt - 1
    .long pvh_gdt

    .section .note.GNU-stack, "", @progbits
