"""Ship the top-level `configs/` inside the installed package as `pgv25/.mim/configs` (OpenMMLab's layout).

`configs/` stays the one source that users read and edit in a checkout. A wheel (`pip install .`,
`pip install git+...`, a built wheel) copies it into the package, where `pgv25.config` finds it, so
`pgv25 list-cfg` and `pgv25 train <name>` work from any folder. An editable install reads the
checkout's `configs/` directly and copies nothing. Everything else is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_tree(str(HERE / "configs"), str(Path(self.build_lib) / "pgv25" / ".mim" / "configs"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
