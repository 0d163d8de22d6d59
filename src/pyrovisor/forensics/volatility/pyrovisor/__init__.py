"""volatility3 plugins for the pyrovisor OS guest (`vol pyrovisor.pslist`)."""
