"""Live VM state: the VM with its memslots, and vCPU threads with their run loops."""
