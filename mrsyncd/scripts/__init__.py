"""
The command-line programs: ``mrsync`` (an operator's), ``mrsync-ca`` (the
certificate authority's) and ``mrsync-engine`` (the data plane alone, for
tests and the benchmark).
"""
