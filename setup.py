"""Installable definition of synapse-acme."""

from setuptools import find_packages, setup

setup(
    name="synapse-acme",
    version="0.1.0.dev0",
    description=(
        "Automatic TLS certificates (ACME v2, RFC 8555) for Matrix homeservers, "
        "with in-process challenge answering and hot-swapped TLS listeners."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The supported Synapse releases (MIN_SYNAPSE..TESTED_MAX_SYNAPSE in synapse_acme/synapse/
    # glue.py) run on Python 3.10 and later; 1.120-1.141 also on 3.9, which this code does not
    # support (3.9 reached its end of life in October 2025, and the code uses 3.10 features at
    # run time: `X | Y` unions, zip(strict=)). scripts/test-versions.sh runs the unit tests on the
    # oldest (3.10) and the newest (3.13) Python.
    python_requires=">=3.10",
    packages=find_packages(include=["synapse_acme", "synapse_acme.*"]),
    package_data={"synapse_acme": ["py.typed", "sample_acme.yaml"]},
    # Each lower bound is the oldest release with which the unit tests pass on every supported
    # Python, together with the other lower bounds; constraints/minimum.txt pins exactly these
    # and scripts/test-versions.sh installs and tests them (and checks that the two agree).
    # Why each one is where it is: constraints/minimum.txt.
    install_requires=[
        "twisted[tls]>=26.4.0",
        "treq>=24.9.0",
        "acme>=4.1.0",
        "josepy>=2.0.0",
        "cryptography>=45.0.7",
        "pyopenssl>=25.2.0",
        "service-identity>=24.1.0",
        "pyyaml>=6.0.1",
        "attrs>=23.1.0",
        "zope.interface>=6.4.post2",
        "prometheus-client>=0.4.0",
        "dnspython>=2.6.1",
    ],
    extras_require={
        "synapse": ["matrix-synapse>=1.120,<1.164"],
        # The PostgreSQL store (synapse_acme/pgstore.py): the driver Synapse itself uses on
        # PostgreSQL. Not in constraints/minimum.txt: the version matrix installs no extras.
        "postgres": ["psycopg2>=2.9"],
        "dev": [
            "pytest>=8",
            # scripts/test.sh runs the suite in 2 processes, a test file per process at a time
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.17,<0.18",
            "mypy>=2.4,<2.5",
            "mypy-zope>=1.0.17",
            "types-PyYAML",
            # Synapse's `redis` extra: a real Synapse worker (test_synapse_workers_shared_store.py)
            "txredisapi>=1.4.12,<1.6.0",
            "hiredis>=0.3",
        ],
    },
    entry_points={"console_scripts": ["synapse-acme = synapse_acme.cli:entry"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
        "Topic :: Security :: Cryptography",
    ],
)
