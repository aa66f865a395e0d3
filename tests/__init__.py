"""Tessera test suite (real Blender, real files, real processes)."""
