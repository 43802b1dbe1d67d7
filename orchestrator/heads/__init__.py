"""`kvorch heads analyze` and the head-ablation preset: attention statistics per head on the
pool, their classification, and the preset's grid. Imports sweep/ (spec), pool/ and lake/.
"""
