"""The installed layout: every package folder is listed for setuptools, kernels/ installs as mome.kernels."""

import pathlib

import mome.kernels
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "mome").rglob("__init__.py")} | {
        "mome.kernels",
        "mome.benchmarks",
    }
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"
    assert config["package-dir"]["mome.kernels"] == "kernels"


def test_kernels_folder_is_importable_as_mome_kernels():
    from mome.kernels import aot

    assert aot.__name__ == "mome.kernels.aot"
    assert pathlib.Path(mome.kernels.__file__).parent.name == "kernels"
