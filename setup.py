"""
The one thing setup.cfg cannot declare: the C modules of the data path, the
datagram's AEAD and read loop (`mrsyncd._crypto`) and the sums behind repair
parities (`mrsyncd._erasure`).

Optional: without a compiler or OpenSSL's headers the build goes on and
mrsyncd uses its pure-Python paths (`mrsyncd.wire.datagram`, `mrsyncd.wire.erasure`),
slower but the same on the wire.  ``MRSYNCD_REQUIRE_NATIVE=1`` (the Debian package, CI) makes a
failed build an error.
"""

import os

from setuptools import Extension, setup

optional = not os.environ.get("MRSYNCD_REQUIRE_NATIVE")

setup(
    ext_modules=[
        Extension(
            "mrsyncd._crypto",
            ["mrsyncd/_crypto.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall"],
            optional=optional,
        ),
        Extension(
            "mrsyncd._erasure",
            ["mrsyncd/_erasure.c"],
            extra_compile_args=["-O2", "-Wall"],
            optional=optional,
        ),
    ]
)
