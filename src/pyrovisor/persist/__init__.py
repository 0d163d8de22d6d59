"""Persistence shared by snapshots, migration and the sandbox: the state types, their codec, bounded JSON."""
