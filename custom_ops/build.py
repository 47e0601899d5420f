"""Build the fused CPU op: `python -m custom_ops.build` (what `make custom_ops` runs).

Compiles csrc/ against the installed torch into build/libproxynorm_cpu.so. The kernel file
is compiled once per instruction set (DEFAULT, and AVX2/AVX512 on x86-64) with the flags
ATen uses for its own kernel copies; the op runs the copy matching ATen's choice at run
time, so the library never needs -march=native and runs on any x86-64 CPU. A no-op when
the library is newer than its sources and the installed torch.
"""
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from custom_ops.cpu import LIBRARY

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
BUILD_DIR = os.path.dirname(LIBRARY)

KERNEL = "proxynorm_kernel.cpp"
OPERATOR = "proxynorm.cpp"
CAPABILITY_FLAGS = {  # ATen's per-copy flags (cmake/Codegen.cmake)
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


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
    return compile_flags, link_flags, torch.__file__


def is_up_to_date(dependencies):
    if not os.path.exists(LIBRARY):
        return False
    built = os.path.getmtime(LIBRARY)
    return all(os.path.getmtime(path) < built for path in dependencies)


def run(command):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
        raise SystemExit(f"custom_ops: compiling the CPU op failed (command above)")


def main():
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"custom_ops: no C++ compiler '{compiler}' (set CXX); the CPU op is not built "
              f"and Proxy Norm layers use the eager path")
        return
    import torch

    if not hasattr(torch.library, "register_fake"):
        print(f"custom_ops: CPU op skipped (needs torch >= 2.4, this is {torch.__version__}); "
              f"Proxy Norm layers use the eager path on CPU")
        return
    compile_flags, link_flags, torch_file = torch_flags()
    sources = [os.path.join(SOURCE_DIR, name) for name in sorted(os.listdir(SOURCE_DIR))]
    if is_up_to_date(sources + [torch_file, __file__]):
        print(f"custom_ops: {os.path.relpath(LIBRARY)} is up to date")
        return
    os.makedirs(BUILD_DIR, exist_ok=True)
    capabilities = list(CAPABILITY_FLAGS) if is_x86() else ["DEFAULT"]
    jobs = [[compiler, *compile_flags, "-c", os.path.join(SOURCE_DIR, OPERATOR),
             "-o", os.path.join(BUILD_DIR, "proxynorm.o")]]
    for capability in capabilities:
        jobs.append([compiler, *compile_flags, *CAPABILITY_FLAGS[capability],
                     f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
                     "-c", os.path.join(SOURCE_DIR, KERNEL),
                     "-o", os.path.join(BUILD_DIR, f"kernel_{capability}.o")])
    print(f"custom_ops: compiling the CPU op ({', '.join(capabilities)} kernels)", flush=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(run, jobs))
    objects = [job[-1] for job in jobs]
    temporary = LIBRARY + ".tmp"
    run([compiler, "-shared", *objects, "-o", temporary, *link_flags])
    os.replace(temporary, LIBRARY)  # never a half-written library under the real name
    print(f"custom_ops: built {os.path.relpath(LIBRARY)}")


if __name__ == "__main__":
    main()
