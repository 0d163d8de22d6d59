"""The host side of the virtual TPM: swtpm processes, the VMM's own TPM commands, event logs, attestation."""
