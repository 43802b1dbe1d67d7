"""kvorch's DuckDB queries, one ``<name>.sql`` file each, shipped as package data.

The CLI runs these files by name; it never assembles SQL from user strings.
"""
