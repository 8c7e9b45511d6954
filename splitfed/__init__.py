"""splitfed: the shared core of splitfed-edge.

The model split, the wire protocol, the algorithms and the data pipeline live here; the apps
(`edge_agent`, `aggregator`, `export`) are thin programs on top of it.
"""

__version__ = "0.1.0"
