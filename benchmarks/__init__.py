"""Benchmarks: scripts that time Tessera's hot paths, print a table and write JSON."""
