"""Puts ``vlm_dpo_plugins_autoload.pth`` at the root of site-packages (wheel and editable installs).

setuptools has no pyproject-only way to place a file in purelib's root, where ``site`` looks for
``.pth`` files; everything else about the build is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "vlm_dpo_plugins_autoload.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]

    def get_source_files(self):
        # sdist lists build_py's sources: without this, a wheel built from the sdist has no .pth to copy.
        return [*super().get_source_files(), PTH.name]


class editable_wheel_with_pth(editable_wheel):
    """An editable wheel holds links to the sources, not build_lib: the .pth is written into it directly.

    Every editable strategy (static path, top-level finder, strict link tree) is chosen in
    ``_select_strategy`` and writes its files through the returned object, so wrapping that object
    adds the .pth whichever strategy setuptools picks. setuptools' own ``__editable__.*.pth`` sorts
    before ours, so ``_vlm_dpo_plugins_autoload`` is importable when our line runs.
    """

    def _select_strategy(self, name, tag, build_lib):
        return _WithPth(super()._select_strategy(name, tag, build_lib))


class _WithPth:
    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH.name, PTH.read_bytes())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.strategy.__exit__(*exc_info)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
