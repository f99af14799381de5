"""Shared helpers (atomic I/O, seeding, optional imports)."""
