"""The targets TVM compiles for, by the names onnxforge uses: `cpu`, `cuda[:sm_NN]`, `aarch64`."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass

import tvm

from onnxforge.errors import BackendError

TARGET_NAMES = ("cpu", "cuda", "aarch64")
DEFAULT_CUDA_ARCH = "sm_90"  # the lent GPU machine's H100; `cuda:sm_80` for an A100
# Limits that every NVIDIA GPU since Volta shares; MetaSchedule's CUDA rules and checks need them in the target.
CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152, "registers_per_block": 65536}
AARCH64_COMPILER = "aarch64-linux-gnu-gcc"  # Debian's gcc-aarch64-linux-gnu


@dataclass(frozen=True)
class TvmTarget:
    """A TVM target with what it takes to build and run for it.

    `device` is the TVM device kind the compiled model runs on; `machine` the CPU architecture that runs it
    (its host code); `compiler` the C compiler that links an exported library (None: TVM's default, the host's).
    """

    name: str
    target: tvm.target.Target
    device: str
    machine: str
    compiler: str | None = None

    def runs_here(self) -> bool:
        """Whether this machine can load and run what is compiled for this target."""
        if self.machine != platform.machine():
            return False
        return self.device == "cpu" or tvm.cuda(0).exist

    def why_not_here(self) -> str:
        """One line saying why a model compiled for this target cannot run on this machine, and what to do."""
        if self.machine != platform.machine():
            where = f"built for {self.machine}, and this machine is {platform.machine()}"
        else:
            where = "this machine has no CUDA GPU"
        return f"target {self.name}: {where}; export it (--compile-only --artifact) and run it there, or use --rpc"


def resolve_target(name: str, threads: int | None = None) -> TvmTarget:
    """The TvmTarget for `name` (`cpu`, `cuda`, `cuda:sm_80`, `aarch64`); `threads` cores for CPU targets."""
    kind, _, detail = name.partition(":")
    cores = threads or os.cpu_count() or 1
    if kind == "cpu" and not detail:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        llvm = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": cores})
        return TvmTarget(name, llvm, device="cpu", machine=platform.machine())
    if kind == "cuda":
        arch = detail or DEFAULT_CUDA_ARCH
        if not arch.startswith("sm_") or not arch[3:].isdigit():
            raise BackendError(f"unknown CUDA architecture {arch!r}; write it like cuda:sm_90")
        cuda = tvm.target.Target({"kind": "cuda", "arch": arch, **CUDA_LIMITS}, host={"kind": "llvm"})
        return TvmTarget(name, cuda, device="cuda", machine=platform.machine())
    if kind == "aarch64" and not detail:
        arm = tvm.target.Target(
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": cores}
        )
        compiler = None if platform.machine() == "aarch64" else AARCH64_COMPILER
        return TvmTarget(name, arm, device="cpu", machine="aarch64", compiler=compiler)
    raise BackendError(f"backend 'tvm' has no target {name!r}; choose one of: cpu, cuda, cuda:sm_NN, aarch64")


def check_compiler(target: TvmTarget) -> None:
    """BackendError unless the C compiler that links `target`'s libraries is installed."""
    if target.compiler and shutil.which(target.compiler) is None:
        raise BackendError(
            f"exporting for {target.name} needs the cross compiler {target.compiler} "
            "(Debian: apt-get install gcc-aarch64-linux-gnu)"
        )
