"""Report tables over the lake (the sql/ queries, their parameters and rendering), plots, and
target densities. Imports lake/ only.
"""
