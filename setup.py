from setuptools import find_packages, setup

setup(
    name="regproxy",
    version="0.1.0",
    description="A streaming Docker/OCI registry proxy on Twisted.",
    long_description=open("README.rst", encoding="utf-8").read(),
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "benchmarks.*"])
    + ["twisted.plugins"],
    package_data={"twisted": ["plugins/regproxy_plugin.py"]},
    install_requires=["twisted>=24.7", "treq>=23.11", "service-identity", "pyopenssl", "prometheus_client>=0.17"],
    extras_require={
        "test": ["pytest", "pytest-twisted", "cryptography", "pyjwt", "hypothesis", "pyyaml"],
        "lint": ["mypy", "mypy-zope", "ruff"],
    },
)
