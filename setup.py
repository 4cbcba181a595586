"""Build hook for aegis (metadata, dependencies and package data are in pyproject.toml).

When an MPI compiler wrapper and CMake are found, the compiled broadcast tool
(`csrc/`, built with the top-level CMakeLists.txt) is built and shipped as
`aegis/_bin/aegis-stage`; otherwise aegis falls back to its mpi4py version.
Set AEGIS_BUILD_STAGE=0 to skip the build, =1 to make a failed build fatal.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithStage(build_py):
    """build_py that also compiles csrc/ with CMake when MPI is available."""

    def run(self):
        super().run()
        want = os.environ.get("AEGIS_BUILD_STAGE", "auto")
        if want == "0":
            return
        cmake, mpicc = shutil.which("cmake"), shutil.which("mpicc")
        if not (cmake and mpicc and os.path.exists(os.path.join(HERE, "CMakeLists.txt"))):
            msg = "aegis: cmake/mpicc not found, skipping the compiled stage tool (mpi4py fallback)"
            if want == "1":
                raise SystemExit(msg)
            print(msg, file=sys.stderr)
            return
        build_dir = tempfile.mkdtemp(prefix="aegis-cmake-")
        try:
            subprocess.run([cmake, "-S", HERE, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release"], check=True)
            subprocess.run([cmake, "--build", build_dir, "-j", "2"], check=True)
            exe = os.path.join(build_dir, "aegis-stage")
            dest = os.path.join(self.build_lib, "aegis", "_bin")
            os.makedirs(dest, exist_ok=True)
            shutil.copy2(exe, os.path.join(dest, "aegis-stage"))
        except (subprocess.CalledProcessError, OSError) as exc:
            if want == "1":
                raise
            print(f"aegis: building the compiled stage tool failed ({exc}); using the mpi4py fallback",
                  file=sys.stderr)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)


setup(cmdclass={"build_py": BuildPyWithStage})
