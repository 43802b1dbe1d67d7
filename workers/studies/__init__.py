"""Measurements that are not the sweep: per-head statistics (``head_stats``, for ``kvorch heads``)
and KVzap's training targets (``kvzap_targets``, for ``kvorch kvzap``). They run inside actors
beside the engine and are driven by their own commands.
"""
