"""Build hooks that setup.cfg cannot declare (the metadata is in setup.cfg).

- The sample configs live in the top-level ``pdata/`` (the project's
  layout) and ship inside the package as ``piccolo_twisted/pdata/``: they
  are copied there at build time, not linked (a symlink does not survive a
  copy made on Windows, a FAT stick or a zip: the package was built
  without its samples). A checkout, and the editable install of the
  README's first command, read them from ``pdata/`` itself
  (``piccolo_twisted.config.shipped_file``).
- Every build starts from an empty build directory of its own, in a
  temporary place: a module deleted from the tree is never installed from
  an earlier build's ``build/lib``, and ``sudo pip install .`` leaves no
  root-owned ``build/`` in the user's checkout.
"""

import atexit
import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = "pdata"
SAMPLE_SUFFIXES = (".cfg", ".config", ".service")


def temporary_build_base():
    base = tempfile.mkdtemp(prefix="piccolo-build-")
    atexit.register(shutil.rmtree, base, True)
    return base


class BuildWithSamples(build_py):
    """build_py, plus the top-level pdata/ as piccolo_twisted/pdata/."""

    def samples(self):
        source = os.path.join(HERE, SAMPLES)
        names = sorted(n for n in os.listdir(source) if n.endswith(SAMPLE_SUFFIXES))
        if not names:
            raise RuntimeError(f"no sample configs in {source}")
        target = os.path.join(self.build_lib, "piccolo_twisted", "pdata")
        return [(os.path.join(source, n), os.path.join(target, n)) for n in names]

    def run(self):
        super().run()
        for source, target in self.samples():
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target, preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [t for _, t in self.samples()]


BUILD = temporary_build_base()
setup(cmdclass={"build_py": BuildWithSamples},
      options={"build": {"build_base": BUILD}, "egg_info": {"egg_base": BUILD}})
