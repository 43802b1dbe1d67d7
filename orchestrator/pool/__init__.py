"""Ray: joining a cluster within a timeout, the pool of named worker actors that pulls tasks
(actors), its fault events, and the Jobs API for --detach. Imports lake/ and workers/, never
sweep/, reports/ or the features above.
"""
