"""Device models (pure state machines) and the buses that route guest accesses to them."""
