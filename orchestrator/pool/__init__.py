"""Ray: joining a cluster within a timeout, the pool of named worker actors that pulls tasks
(actors), its fault events, and the Jobs API for --detach. Imports lake/ and workers/, never
sweep/, reports/ or the features above.
"""

# Seconds `--address` waits for the cluster (orchestrator/pool/connect.py).
DEFAULT_CONNECT_TIMEOUT = 30.0
# Defaults of the pool's options (here, so the CLI's --help reads them without importing Ray or torch).
DEFAULT_MAX_RETRIES = 3
# Seconds Ray has to place an actor (at the start, or again after a loss) before it leaves the pool.
DEFAULT_ACTOR_TIMEOUT = 120.0
