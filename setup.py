"""
The one thing setup.cfg cannot declare: the C module of the data path.

Optional: without a compiler or OpenSSL's headers the build goes on and
mrsyncd uses its pure-Python path (`mrsyncd.datagram`), slower but the same
on the wire.  ``MRSYNCD_REQUIRE_NATIVE=1`` (the Debian package, CI) makes a
failed build an error.
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mrsyncd._crypto",
            ["mrsyncd/_crypto.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall"],
            optional=not os.environ.get("MRSYNCD_REQUIRE_NATIVE"),
        )
    ]
)
