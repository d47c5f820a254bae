from twisted.application.service import ServiceMaker

mrsyncd = ServiceMaker(
    "mrsyncd",
    "mrsyncd.daemon.tap",
    "Reliable multicast file distribution: the mrsyncd master and node daemons.",
    "mrsyncd",
)
