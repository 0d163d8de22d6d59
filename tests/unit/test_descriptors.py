"""Boot GDT, TSS images and the long-mode entry state."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pyrovisor.arch.x86_64 import boot, descriptors, layout


def test_gdt_layout_matches_syscall_conventions() -> None:
    image = descriptors.boot_gdt([layout.tss_gpa(0), layout.tss_gpa(1)])
    assert len(image) == 5 * 8 + 2 * 16
    words = struct.unpack_from("<5Q", image)
    assert words[0] == 0
    kernel_code = descriptors.decode_descriptor(words[1])
    user_code = descriptors.decode_descriptor(words[4])
    user_data = descriptors.decode_descriptor(words[3])
    assert (kernel_code.l, kernel_code.dpl, kernel_code.type & 0x9) == (1, 0, 0x9)  # code, accessed
    assert (user_code.l, user_code.dpl) == (1, 3) and user_data.dpl == 3
    # SYSRET with STAR[63:48] = 0x10 loads CS = 0x20|3 and SS = 0x18|3.
    assert descriptors.USER_CS == 0x10 + 16 + 3 and descriptors.USER_DS == 0x10 + 8 + 3


@given(st.integers(0, 2**64 - 1), st.integers(0, 0xFFFFF))
def test_tss_descriptor_encodes_base_and_limit(base: int, limit: int) -> None:
    low, high = struct.unpack("<QQ", descriptors.tss_descriptor(base, limit))
    decoded_base = ((low >> 16) & 0xFFFFFF) | (((low >> 56) & 0xFF) << 24) | (high << 32)
    decoded_limit = (low & 0xFFFF) | (((low >> 48) & 0xF) << 16)
    assert (decoded_base, decoded_limit) == (base, limit)
    assert (low >> 40) & 0xFF == 0x89


def test_tss_image_has_no_io_bitmap() -> None:
    image = descriptors.tss_image(rsp0=0x1234)
    assert len(image) == 104
    assert struct.unpack_from("<Q", image, 4)[0] == 0x1234
    assert struct.unpack_from("<H", image, 102)[0] == 104


def test_entry_state_for_an_application_processor() -> None:
    state = boot.long_mode_entry(3, 0xFFFFFFFF80100000, 0x10000, 0x57, layout.BOOT_INFO_GPA)
    assert state.rsp == layout.BOOT_STACKS_GPA + 4 * layout.BOOT_STACK_SIZE
    assert state.rsi == 3 and state.rdi == layout.BOOT_INFO_GPA
    assert state.tr.selector == 0x28 + 3 * 16 and state.tr.base == layout.tss_gpa(3) and state.tr.type == 11
    assert state.efer & boot.EFER_LMA and state.cr0 & boot.CR0_PG and not state.rflags & boot.RFLAGS_IF
    assert state.idt.limit == 0
