"""
The control plane's contract with the engine (`contract`), the AMP commands
that carry it between hosts (`commands`), the two ends of that AMP
connection (`peers`), and the operator's side of it without Twisted
(`boxes`).  Bulk data never travels here.
"""
