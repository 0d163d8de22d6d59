"""The volatility3 plugin directory shipped with pyrovisor: pass it to `vol -p` (loaded by volatility, not by pyrovisor)."""
