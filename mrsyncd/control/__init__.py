"""
The control plane's contract with the engine (`contract`), the AMP commands
that carry it between hosts (`commands`), and the two ends of that AMP
connection (`peers`).  Bulk data never travels here.
"""
