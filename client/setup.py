import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(os.path.dirname(HERE), "piccolo_twisted", "cli")

with open(os.path.join(os.path.dirname(HERE), "piccolo_twisted", "__init__.py")) as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="piccolo3-cli",
    version=VERSION,
    package_dir={"piccolo3_cli": os.path.relpath(CLI, HERE)},
    packages=["piccolo3_cli"],
    install_requires=["aiocoap>=0.4.7", "tqdm>=4.60", "matplotlib>=3.6"],
    entry_points={"console_scripts": ["piccolo3 = piccolo3_cli.main:main"]},
)
