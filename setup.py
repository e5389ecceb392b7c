"""Build pyxl: the pure-Python package plus three native artefacts.

setuptools links no programs, so the programs are ``Extension`` subclasses that a
``build_ext`` subclass knows how to link:

* ``pyxl/pyxl-save-helper``  the helper: main.c + Cython _helper.pyx, embedding
  libpython, linked against Debian's Xen 4.17 libxenctrl/libxenguest/libxentoollog
  (never libxl).
* ``pyxl/libfakexen.so``     the simulated hypervisor, LD_PRELOADed under libxenctrl.
* ``pyxl/pyxl-sim-vcpu``     the simulated guest's vCPU process.

The helper is also installed on PATH as ``pyxl-save-helper`` (build_scripts).
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from distutils.command.build_scripts import build_scripts  # after setuptools: it provides distutils

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = "pyxl-save-helper"


class Program(Extension):
    """An executable linked from C sources (and optionally one Cython module)."""

    def __init__(self, name, sources, pyx=None, embed_python=False, **kw):
        super().__init__(name, sources, **kw)
        self.pyx = pyx
        self.embed_python = embed_python


class SharedLib(Extension):
    """A plain C shared library (no Python module init)."""


def python_embed_flags():
    """sysconfig's equivalent of ``python3-config --embed --ldflags``."""
    cv = sysconfig.get_config_var
    libdir = cv("LIBDIR")
    ver = cv("LDVERSION") or cv("VERSION")
    libs = [f"python{ver}"] + [a[2:] for a in (cv("LIBS") or "").split() + (cv("SYSLIBS") or "").split()
                               if a.startswith("-l")]
    dirs, rpath, extra = [libdir], [], []
    if cv("Py_ENABLE_SHARED"):
        rpath = [libdir]  # pyenv's libpython is not on ld.so's path
    else:
        dirs.append(cv("LIBPL"))
        extra = (cv("LINKFORSHARED") or "").split()  # -export-dynamic for lib-dynload
    return libs, dirs, rpath, extra


class BuildNative(build_ext):
    def get_ext_filename(self, fullname):
        ext = self.ext_map.get(fullname)
        if isinstance(ext, (Program, SharedLib)):
            # No EXT_SUFFIX: these are not Python modules.
            return os.path.join(*fullname.split(".")) + (".so" if isinstance(ext, SharedLib) else "")
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if isinstance(ext, Program):
            return self.build_program(ext)
        if isinstance(ext, SharedLib):
            return self.build_shared(ext)
        return super().build_extension(ext)

    def _output(self, ext):
        path = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def build_shared(self, ext):
        out = self._output(ext)
        objs = self.compiler.compile(ext.sources, output_dir=self.build_temp,
                                     extra_postargs=["-fPIC", "-O2", "-Wall"] + ext.extra_compile_args,
                                     include_dirs=ext.include_dirs)
        self.compiler.link_shared_object(objs, out, libraries=ext.libraries,
                                         extra_postargs=ext.extra_link_args)

    def build_program(self, ext):
        out = self._output(ext)
        sources = list(ext.sources)
        include_dirs = list(ext.include_dirs)
        libraries, library_dirs, rpath, extra_link = list(ext.libraries), [], [], list(ext.extra_link_args)
        macros = list(ext.define_macros)
        if ext.pyx:
            gen_dir = os.path.join(self.build_temp, "cython")
            os.makedirs(gen_dir, exist_ok=True)
            generate_pxi(gen_dir)
            from Cython.Build import cythonize
            # A separate Extension so the module is named after the .pyx
            # (PyInit__helper), matching main.c's PyImport_AppendInittab.
            mod = Extension(os.path.splitext(os.path.basename(ext.pyx))[0], [ext.pyx])
            mod = cythonize([mod], build_dir=gen_dir, include_path=[gen_dir, os.path.dirname(ext.pyx)],
                      compiler_directives={"language_level": 3}, quiet=True,
                      force=self.force)[0]
            sources += mod.sources
            include_dirs += [os.path.dirname(s) for s in mod.sources]
        if ext.embed_python:
            py_libs, py_dirs, py_rpath, py_extra = python_embed_flags()
            include_dirs.append(sysconfig.get_paths()["include"])
            libraries = py_libs + libraries
            library_dirs += py_dirs
            rpath += py_rpath
            extra_link += py_extra
            macros.append(("PYXL_PYTHON_HOME", '"%s"' % sys.base_prefix))
        objs = self.compiler.compile(sources, output_dir=self.build_temp, macros=macros,
                                     include_dirs=include_dirs,
                                     extra_postargs=["-O2", "-Wall"] + ext.extra_compile_args)
        self.compiler.link_executable(objs, os.path.basename(out), output_dir=os.path.dirname(out),
                                      libraries=libraries, library_dirs=library_dirs,
                                      runtime_library_dirs=rpath, extra_postargs=extra_link)


def generate_pxi(out_dir):
    """Run the message-table generator for the helper's Cython stubs."""
    gen = os.path.join(HERE, "libxl_helper", "genmsgs.py")
    pxi = subprocess.run([sys.executable, gen, "pxi"], check=True, capture_output=True, text=True).stdout
    path = os.path.join(out_dir, "_messages.pxi")
    old = open(path).read() if os.path.exists(path) else None
    if old != pxi:
        with open(path, "w") as f:
            f.write(pxi)
    # The host tables are generated too; the committed copy must match (tested).
    wire = subprocess.run([sys.executable, gen, "wire"], check=True, capture_output=True, text=True).stdout
    wire_path = os.path.join(HERE, "pyxl", "wire", "_generated.py")
    if open(wire_path).read() != wire:
        with open(wire_path, "w") as f:
            f.write(wire)


class BuildScripts(build_scripts):
    """Install the built helper on PATH too (a copy, as pip does for scripts)."""

    def run(self):
        self.mkpath(self.build_dir)
        build = self.get_finalized_command("build_ext")
        src = build.get_ext_fullpath(f"pyxl.{HELPER}")
        if not os.path.exists(src):
            self.run_command("build_ext")
        shutil.copy2(src, os.path.join(self.build_dir, HELPER))

    def get_source_files(self):
        return []


setup(
    ext_modules=[
        # The generated callback stubs must match libxc's prototypes exactly:
        # a mismatch is a build error, not a warning.
        Program(f"pyxl.{HELPER}", ["libxl_helper/main.c"], pyx="libxl_helper/_helper.pyx",
                embed_python=True, libraries=["xenctrl", "xenguest", "xentoollog"],
                extra_compile_args=["-Werror=incompatible-pointer-types"]),
        SharedLib("pyxl.libfakexen", ["fakexen/fakexen.c"], libraries=["pthread"],
                  depends=["fakexen/simctl.h"]),
        Program("pyxl.pyxl-sim-vcpu", ["fakexen/vcpu.c"], depends=["fakexen/simctl.h"]),
    ],
    scripts=[HELPER],
    cmdclass={"build_ext": BuildNative, "build_scripts": BuildScripts},
)
