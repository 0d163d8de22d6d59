"""`pyrovisor host`: many VMs in one process under one memory budget, ballooned by a working-set-driven policy."""
