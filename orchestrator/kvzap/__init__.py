"""`kvorch kvzap train`: KVzip+ target extraction on the pool, the surrogate fit (on the driver)
and its report. Imports pool/ and lake/.
"""
