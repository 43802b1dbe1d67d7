"""kvorch in a notebook: a result lake's report tables and read-only SQL, as Arrow tables.

```python
import kvorch

with kvorch.open_lake("./kvorch-lake") as lake:
    lake.runs                        # run ids, oldest first: lake.runs[-1] is what run=None reads
    df = lake.compare().to_pandas()  # pandas is optional: pip install 'kvorch[notebook]'
    lake.sql("SELECT config, sum(n_tokens) FROM chunks WHERE run_id = $run GROUP BY 1", params={"run": lake.runs[-1]})
```

The tables are those of ``kvorch report --table NAME`` and ``lake.sql`` runs what ``kvorch sql``
runs, on the same read-only views. Importing this package loads DuckDB and pyarrow, never torch,
transformers or Ray.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from kvorch.notebook import LakeReader, open_lake
from orchestrator.errors import KvorchError

__all__ = ["KvorchError", "LakeReader", "open_lake"]

PANDAS_MISSING = (
    "No module named 'pandas': kvorch's tables are pyarrow Tables, and .to_pandas() needs pandas; "
    "install it with pip install 'kvorch[notebook]' (from a clone: pip install -e '.[notebook]')"
)


class _PandasHint(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``, so it speaks only when no finder has pandas: pyarrow's own
    ``ModuleNotFoundError`` from ``Table.to_pandas()`` then says what to install."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas":
            raise ModuleNotFoundError(PANDAS_MISSING, name="pandas")
        return None


if importlib.util.find_spec("pandas") is None and not any(isinstance(f, _PandasHint) for f in sys.meta_path):
    sys.meta_path.append(_PandasHint())
