"""The wheel carries conf/ (the recipes and build settings) as voxtral_coreml/conf/: the installed CLI reads the
same configuration as the pipeline (voxtral_coreml/pipeline/conf.py). Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install reads the checkout's conf/ itself
            conf = Path(__file__).resolve().parent / "conf"
            shutil.copytree(conf, Path(self.build_lib) / "voxtral_coreml" / "conf", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConf})
