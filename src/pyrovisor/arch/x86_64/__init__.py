"""x86-64: physical layout, paging, descriptors, boot state, CPUID."""
