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
    python_requires=">=3.10",
    packages=find_packages(include=["synapse_acme", "synapse_acme.*"]),
    package_data={"synapse_acme": ["py.typed", "sample_acme.yaml"]},
    install_requires=[
        "twisted[tls]>=23.8",
        "treq>=23.11",
        "acme>=2.11",
        "josepy>=1.14",
        "cryptography>=42",
        "pyopenssl>=24",
        "service-identity>=24.1",
        "pyyaml>=6",
        "attrs>=23.1",
    ],
    extras_require={
        "synapse": ["matrix-synapse>=1.120,<1.164"],
        "dev": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.17,<0.18",
            "mypy>=2.4,<2.5",
            "mypy-zope>=1.0.17",
            "types-PyYAML",
        ],
    },
    entry_points={"console_scripts": ["synapse-acme = synapse_acme.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
        "Topic :: Security :: Cryptography",
    ],
)
