"""File-descriptor events: eventfds (doorbells and interrupts shared with KVM) and the VM's I/O thread."""
