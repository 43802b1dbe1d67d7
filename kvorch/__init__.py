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

from kvorch.notebook import LakeReader, open_lake
from orchestrator.errors import KvorchError

__all__ = ["KvorchError", "LakeReader", "open_lake"]
