"""
The data plane: one transfer's sender (pacing, repairs, rate control) and
each receiver's parts (intake, block ledger, parities, delay and loss
meter, storage), joined by the multicast channel.  It knows nothing of jobs,
certificates or the daemons: it is driven through `mrsyncd.control.contract`.
"""
