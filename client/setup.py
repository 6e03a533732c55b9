import atexit
import os
import re
import shutil
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(os.path.dirname(HERE), "piccolo_twisted", "cli")

with open(os.path.join(os.path.dirname(HERE), "piccolo_twisted", "__init__.py")) as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

# every build in an empty build directory of its own: a module deleted from
# piccolo_twisted/cli is never installed from an earlier build's build/lib,
# and a build as root leaves nothing root-owned in the checkout
BUILD = tempfile.mkdtemp(prefix="piccolo3-cli-build-")
atexit.register(shutil.rmtree, BUILD, True)

setup(
    name="piccolo3-cli",
    version=VERSION,
    package_dir={"piccolo3_cli": os.path.relpath(CLI, HERE)},
    packages=["piccolo3_cli"],
    install_requires=["aiocoap>=0.4.7", "tqdm>=4.60", "matplotlib>=3.6"],
    entry_points={"console_scripts": ["piccolo3 = piccolo3_cli.main:main"]},
    options={"build": {"build_base": BUILD}, "egg_info": {"egg_base": BUILD}},
)
