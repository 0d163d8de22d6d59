"""Memory forensics of saved guests: volatility3's symbol table and plugin for the OS guest (pyrovisor[forensics])."""
