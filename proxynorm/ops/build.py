"""Build the fused CPU op: `python -m proxynorm.ops.build` (what `make custom_ops` runs;
otherwise proxynorm.ops.cpu builds it on first use).

Compiles csrc/ against the installed torch into library_path(): a folder of the user's
cache named after the torch version and a hash of the sources, so an installed package
never writes into site-packages, a torch upgrade or a source change gets a fresh build, and
a checkout and an installed copy of the same sources share one. The kernel file is compiled
once per instruction set (DEFAULT, and AVX2/AVX512 on x86-64) with the flags ATen uses for
its own kernel copies; the op runs the copy matching ATen's choice at run time, so the
library never needs -march=native and runs on any x86-64 CPU. Processes that build at once
(torchrun workers, a study's jobs) take turns on a file lock; the library appears under its
name only when whole.
"""
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import fcntl
import tempfile

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
KERNEL = "proxynorm_kernel.cpp"
OPERATOR = "proxynorm.cpp"
CAPABILITY_FLAGS = {  # ATen's per-copy flags (cmake/Codegen.cmake)
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cache_dir():
    """Where built ops live: $PROXYNORM_CACHE, else proxynorm/ in the user's cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("PROXYNORM_CACHE") or os.path.join(base, "proxynorm")


def library_path():
    """The CPU op's library for this torch and these sources (and this file's build flags)."""
    import torch

    digest = hashlib.sha256()
    for path in [os.path.join(SOURCE_DIR, name) for name in sorted(os.listdir(SOURCE_DIR))] \
            + [os.path.abspath(__file__)]:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    folder = f"cpu-torch{torch.__version__}-{digest.hexdigest()[:16]}"
    return os.path.join(cache_dir(), folder, "libproxynorm_cpu.so")


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64")


def cxx_standard(torch):
    """The C++ standard torch was built with (2.11: C++17, 2.14: C++20), as cpp_extension
    picks it: torch's headers are only tested under their own standard."""
    match = re.search(r"C\+\+ Version: (\d{4})", torch.__config__.show())
    year = int(match.group(1)) if match else 2017
    return "c++20" if year >= 2020 else "c++17"


def torch_flags():
    """Compile and link flags for the installed torch (what cpp_extension would pass)."""
    import torch

    root = os.path.dirname(torch.__file__)
    lib = os.path.join(root, "lib")
    compile_flags = [
        f"-I{os.path.join(root, 'include')}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-std={cxx_standard(torch)}", "-O3", "-fPIC", "-DNDEBUG", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    if is_x86():
        compile_flags.append("-DPROXYNORM_X86")
    link_flags = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
    if sys.platform == "linux" and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is inline: without -fopenmp it runs serially in this library.
        # With GCC the OpenMP runtime is libgomp.so.1, the one torch has already loaded,
        # so the op shares torch's threads and torch.set_num_threads (as Inductor's kernels do).
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return compile_flags, link_flags


class BuildError(Exception):
    """The CPU op cannot be built here; the message is one line."""


def run(command, log):
    result = subprocess.run(command, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}\n")
    if result.returncode:
        raise BuildError(f"compiling the CPU op failed (compiler output in {log})")


def build(quiet=False):
    """Build the CPU op unless it is built; returns its path. BuildError says why not."""
    library = library_path()
    if os.path.exists(library):
        return library
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler '{compiler}' (install g++ or set CXX)")
    import torch

    if not hasattr(torch.library, "register_fake"):
        raise BuildError(f"needs torch >= 2.4, this is {torch.__version__}")
    folder = os.path.dirname(library)
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, "build.lock"), "w")
    except OSError as error:
        raise BuildError(f"cannot write {folder}: {error.strerror} (set PROXYNORM_CACHE)") \
            from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it now
        if os.path.exists(library):
            return library
        if not quiet:
            print(f"proxynorm: compiling the fused CPU op into {folder} (once per torch "
                  f"version, about a minute)", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=folder) as work:
            _compile(compiler, work, library)
    return library


def _compile(compiler, work, library):
    compile_flags, link_flags = torch_flags()
    log = os.path.join(os.path.dirname(library), "build.log")
    capabilities = list(CAPABILITY_FLAGS) if is_x86() else ["DEFAULT"]
    jobs = [[compiler, *compile_flags, "-c", os.path.join(SOURCE_DIR, OPERATOR),
             "-o", os.path.join(work, "proxynorm.o")]]
    for capability in capabilities:
        jobs.append([compiler, *compile_flags, *CAPABILITY_FLAGS[capability],
                     f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
                     "-c", os.path.join(SOURCE_DIR, KERNEL),
                     "-o", os.path.join(work, f"kernel_{capability}.o")])
    open(log, "w").close()
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(lambda job: run(job, log), jobs))
    temporary = os.path.join(work, os.path.basename(library))
    run([compiler, "-shared", *[job[-1] for job in jobs], "-o", temporary, *link_flags], log)
    os.replace(temporary, library)  # never a half-written library under the real name


def main():
    try:
        library = build()
    except BuildError as error:
        print(f"proxynorm: the fused CPU op is not built ({error}); Proxy Norm layers use "
              f"the eager path on CPU")
        return
    print(f"proxynorm: fused CPU op {library}")


if __name__ == "__main__":
    main()
