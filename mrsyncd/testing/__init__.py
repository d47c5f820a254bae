"""
The lab, shipped with the package as Flocker ships its test tools: a LAN of
network namespaces (`lan`), a cluster of real daemons with real certificates
on it (`cluster`) and tree comparisons (`trees`).  It imports nothing that
only the tests install (no pytest, no hypothesis), so that the demo and the
benchmark run on a machine that has only the package's own dependencies.
Building a LAN needs root and ``ip``.
"""
