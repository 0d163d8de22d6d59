"""Architecture-specific pure code (no KVM, no I/O)."""
