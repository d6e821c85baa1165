"""Packaging for pydio-ws (the twistd plugin ships in twisted/plugins)."""

from setuptools import setup

setup(
    name="pydio-ws",
    version="0.1.0",
    description="Real-time WebSocket push server for Pydio, on Twisted and Autobahn",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="AGPL-3.0-or-later",
    python_requires=">=3.10",
    packages=["pydio_ws", "twisted.plugins"],
    package_data={"twisted.plugins": ["pydio_ws_plugin.py"]},
    install_requires=[
        "Twisted[tls]>=25.5",
        "autobahn>=23.6",
        "pyOpenSSL>=24.3",
        "service-identity>=23.1",
        "treq>=23.11",
        "PyJWT>=2.8",
        "defusedxml>=0.7.1",
        "cryptography>=42",
        "txredisapi>=1.6.0",
        "hiredis>=3.0",
    ],
    extras_require={
        "test": ["pytest>=7.4", "hypothesis>=6.90"],
        "bench": ["matplotlib>=3.7", "py-spy>=0.3.14"],
    },
    entry_points={"console_scripts": ["pydio-ws = pydio_ws.cli:main"]},
)
