"""Whether this host can run an incoming guest: the CPU features it saw (CPUID) and its TSC frequency."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pyrovisor.arch.x86_64.cpuid import CpuidEntry, for_vcpu
from pyrovisor.errors import KvmError, MigrationError
from pyrovisor.kvm import Kvm, VcpuFd

REGISTERS = ("eax", "ebx", "ecx", "edx")
MAX_TSC_KHZ = 0x7FFFFFFF  # KVM_SET_TSC_KHZ takes a signed int

# The CPUID registers that hold feature flags: (leaf, subleaf, register). Other registers hold sizes,
# topology or identification, which may differ between hosts without harm.
FEATURE_REGISTERS: tuple[tuple[int, int, str], ...] = (
    (0x1, 0, "ecx"), (0x1, 0, "edx"), (0x6, 0, "eax"),
    (0x7, 0, "ebx"), (0x7, 0, "ecx"), (0x7, 0, "edx"), (0x7, 1, "eax"), (0x7, 1, "edx"),
    (0xD, 0, "eax"), (0xD, 0, "edx"), (0xD, 1, "eax"),
    (0x40000001, 0, "eax"),
    (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"), (0x80000007, 0, "edx"), (0x80000008, 0, "ebx"),
)
# Bits KVM sets from the vCPU's state rather than the host's abilities (CR4.OSXSAVE, CR4.PKE, the APIC's
# enable bit): a guest that turned them on sees them, and the destination recreates them from that state.
DYNAMIC_BITS = {(0x1, 0, "ecx"): 1 << 27, (0x1, 0, "edx"): 1 << 9, (0x7, 0, "ecx"): 1 << 4}


def _names(text: str) -> dict[int, str]:
    """'0:fpu 1:vme ...' as {bit: name}."""
    return {int(bit): name for bit, name in (item.split(":") for item in text.split())}


_LEAF1_EDX = _names("0:fpu 1:vme 2:de 3:pse 4:tsc 5:msr 6:pae 7:mce 8:cx8 9:apic 11:sep 12:mtrr 13:pge 14:mca "
                    "15:cmov 16:pat 17:pse36 18:pn 19:clflush 21:ds 22:acpi 23:mmx 24:fxsr 25:sse 26:sse2 27:ss "
                    "28:ht 29:tm 30:ia64 31:pbe")
FEATURE_NAMES: dict[tuple[int, int, str], dict[int, str]] = {
    (0x1, 0, "ecx"): _names("0:sse3 1:pclmulqdq 2:dtes64 3:monitor 4:ds_cpl 5:vmx 6:smx 7:est 8:tm2 9:ssse3 "
                            "10:cnxt_id 11:sdbg 12:fma 13:cx16 14:xtpr 15:pdcm 17:pcid 18:dca 19:sse4_1 20:sse4_2 "
                            "21:x2apic 22:movbe 23:popcnt 24:tsc_deadline_timer 25:aes 26:xsave 27:osxsave 28:avx "
                            "29:f16c 30:rdrand 31:hypervisor"),
    (0x1, 0, "edx"): _LEAF1_EDX,
    (0x7, 0, "ebx"): _names("0:fsgsbase 1:tsc_adjust 2:sgx 3:bmi1 4:hle 5:avx2 6:fdp_excptn_only 7:smep 8:bmi2 "
                            "9:erms 10:invpcid 11:rtm 12:pqm 13:zero_fcs_fds 14:mpx 15:rdt_a 16:avx512f "
                            "17:avx512dq 18:rdseed 19:adx 20:smap 21:avx512ifma 23:clflushopt 24:clwb "
                            "25:intel_pt 26:avx512pf 27:avx512er 28:avx512cd 29:sha_ni 30:avx512bw 31:avx512vl"),
    (0x7, 0, "ecx"): _names("0:prefetchwt1 1:avx512vbmi 2:umip 3:pku 4:ospke 5:waitpkg 6:avx512_vbmi2 7:cet_ss "
                            "8:gfni 9:vaes 10:vpclmulqdq 11:avx512_vnni 12:avx512_bitalg 13:tme 14:avx512_vpopcntdq "
                            "16:la57 22:rdpid 23:kl 24:bus_lock_detect 25:cldemote 27:movdiri 28:movdir64b "
                            "29:enqcmd 30:sgx_lc 31:pks"),
    (0x7, 0, "edx"): _names("2:avx512_4vnniw 3:avx512_4fmaps 4:fsrm 5:uintr 8:avx512_vp2intersect 9:srbds_ctrl "
                            "10:md_clear 11:rtm_always_abort 13:tsx_force_abort 14:serialize 15:hybrid 16:tsxldtrk "
                            "18:pconfig 19:arch_lbr 20:ibt 22:amx_bf16 23:avx512_fp16 24:amx_tile 25:amx_int8 "
                            "26:spec_ctrl 27:intel_stibp 28:flush_l1d 29:arch_capabilities 30:core_capabilities "
                            "31:spec_ctrl_ssbd"),
    (0x80000001, 0, "ecx"): _names("0:lahf_lm 1:cmp_legacy 2:svm 3:extapic 4:cr8_legacy 5:abm 6:sse4a "
                                   "7:misalignsse 8:3dnowprefetch 9:osvw 10:ibs 11:xop 12:skinit 13:wdt 15:lwp "
                                   "16:fma4 17:tce 19:nodeid_msr 21:tbm 22:topoext 23:perfctr_core 24:perfctr_nb "
                                   "26:bpext 27:ptsc 28:perfctr_llc 29:mwaitx"),
    # AMD repeats most of leaf 1's EDX here, under the same names.
    (0x80000001, 0, "edx"): {**{bit: name for bit, name in _LEAF1_EDX.items() if bit in (
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 23, 24)},
        **_names("11:syscall 19:mp 20:nx 22:mmxext 25:fxsr_opt 26:pdpe1gb 27:rdtscp 29:lm 30:3dnowext 31:3dnow")},
}


def _feature_table(entries: Iterable[CpuidEntry]) -> dict[tuple[int, int, str], int]:
    table: dict[tuple[int, int, str], int] = {}
    wanted = {(leaf, subleaf) for leaf, subleaf, _ in FEATURE_REGISTERS}
    for entry in entries:
        if (entry.function, entry.index) in wanted:
            for register in REGISTERS:
                key = (entry.function, entry.index, register)
                table[key] = table.get(key, 0) | getattr(entry, register)
    return table


def missing_features(guest: Iterable[CpuidEntry], *host: Iterable[CpuidEntry]) -> list[tuple[int, int, str, int]]:
    """(leaf, subleaf, register, bit) of every feature flag set in `guest` and in none of the `host` tables."""
    seen = _feature_table(guest)
    offered: dict[tuple[int, int, str], int] = {}
    for entries in host:
        for key, bits in _feature_table(entries).items():
            offered[key] = offered.get(key, 0) | bits
    missing = []
    for key in FEATURE_REGISTERS:
        lacking = seen.get(key, 0) & ~offered.get(key, 0) & ~DYNAMIC_BITS.get(key, 0)
        missing += [(*key, bit) for bit in range(32) if lacking >> bit & 1]
    return missing


def describe_features(missing: Sequence[tuple[int, int, str, int]]) -> str:
    """'avx2, sse4_2, CPUID 0x7.1 EAX bit 5': names where known, leaf/register/bit otherwise."""
    return ", ".join(FEATURE_NAMES.get((leaf, subleaf, register), {}).get(bit)
                     or f"CPUID {leaf:#x}{f'.{subleaf}' if subleaf else ''} {register.upper()} bit {bit}"
                     for leaf, subleaf, register, bit in missing)


def check_host(cpuid: Sequence[CpuidEntry], tsc_khz: int) -> None:
    """Refuse (MigrationError) a guest that saw CPU features this host's KVM cannot offer, or whose TSC
    frequency this host cannot give it. A scratch VM's vCPU is configured as this host configures guests: what
    it then presents counts besides KVM_GET_SUPPORTED_CPUID (on kvm_pvm, KVM_GET_CPUID2 reports the host's
    features whatever was set), and its TSC rate is tried."""
    with Kvm() as kvm:
        supported = kvm.get_supported_cpuid()
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                vcpu.set_cpuid2(for_vcpu(supported, 0))
                missing = missing_features(cpuid, supported, vcpu.get_cpuid2())
                if missing:
                    raise MigrationError("handshake", "this host's CPU lacks features the guest saw: "
                                         f"{describe_features(missing)}")
                _check_tsc(vcpu, tsc_khz)
            finally:
                vcpu.close()
        finally:
            vm.close()


def _check_tsc(vcpu: VcpuFd, tsc_khz: int) -> None:
    try:
        here = vcpu.get_tsc_khz()
    except KvmError:
        return  # this host does not report a TSC rate: nothing to compare (restore behaves the same)
    if not tsc_khz or tsc_khz == here:
        return
    reason = f"the guest's TSC runs at {tsc_khz} kHz; this host's runs at {here} kHz and KVM cannot give it that rate"
    if not 0 < tsc_khz <= MAX_TSC_KHZ:
        raise MigrationError("handshake", reason)
    try:
        vcpu.set_tsc_khz(tsc_khz)
    except KvmError as exc:
        raise MigrationError("handshake", f"{reason} ({exc})") from None
