"""credanno.runtime: devices, the distributed environment, autocast, threads, generators."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from credanno import runtime
from credanno.errors import CredannoError

PACKAGE = Path(__file__).resolve().parents[1] / "credanno"
NO_GPU = not torch.cuda.is_available()


def _one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# -- devices -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tpu", "mps", "gpu", "cuda:", "cuda:x", "cpu:0", ""])
def test_unknown_device_is_one_line(name):
    for check in (runtime.check_device, runtime.resolve_device, runtime.torch_device):
        with pytest.raises(CredannoError) as info:
            check(name)
        assert _one_line(info) == (f"--device {name!r} is not a device; "
                                   "use cpu, cuda or cuda:N")


def test_option_name_in_the_message():
    with pytest.raises(CredannoError, match="^--cnn-device 'tpu' is not a device"):
        runtime.check_device("tpu", "--cnn-device")


def test_device_names_are_normalised():
    assert runtime.check_device(None) is None
    assert runtime.check_device("auto") is None and runtime.check_device(" Auto ") is None
    assert runtime.check_device(" CUDA:1 ") == "cuda:1"
    assert runtime.resolve_device("CPU") == "cpu"
    assert runtime.torch_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_line(name):
    for check in (runtime.resolve_device, runtime.torch_device, runtime.init_distributed):
        with pytest.raises(CredannoError) as info:
            check(name)
        assert _one_line(info) == (f"--device {name} requested but torch sees no GPU; "
                                   "pass --device cpu")


def test_default_device_rule(monkeypatch):
    """None and "auto" mean cuda exactly when torch sees a GPU, everywhere."""
    from credanno.pretrain.config import default_preset

    for available, device, preset in ((True, "cuda", "paper"), (False, "cpu", "cpu-tiny")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        monkeypatch.setattr(torch.cuda, "device_count", lambda a=available: int(a))
        assert runtime.default_device() == device
        assert runtime.resolve_device(None) == runtime.resolve_device("auto") == device
        assert default_preset() == preset


def test_gpu_index_checked_against_the_gpus_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(CredannoError) as info:
        runtime.resolve_device("cuda:2")
    assert _one_line(info) == "--device cuda:2: torch sees 2 GPU(s) (cuda:0 to cuda:1)"
    # a bare cuda is this process's GPU under torchrun; a named one with several local
    # processes would put them all on one GPU (NCCL refuses): one line instead
    assert runtime.torch_device("cuda", local_rank=1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(CredannoError, match="pass --device cuda"):
        runtime.torch_device("cuda:1", local_rank=1)


def test_faiss_gpu_decision_reads_the_device_like_everything_else():
    from credanno.eval.knn import _gpu_index

    class CpuFaiss:  # a faiss wheel without GPU support
        pass

    class TwoGpuFaiss:  # a faiss-gpu wheel on a machine with two GPUs
        StandardGpuResources = object

        @staticmethod
        def get_num_gpus() -> int:
            return 2

    assert _gpu_index(CpuFaiss, "cpu") is None and _gpu_index(CpuFaiss, " CPU ") is None
    assert _gpu_index(CpuFaiss, None) is None and _gpu_index(CpuFaiss, "auto") is None
    with pytest.raises(CredannoError, match="faiss sees no GPU"):
        _gpu_index(CpuFaiss, "CUDA:0")
    with pytest.raises(CredannoError, match="is not a device"):
        _gpu_index(CpuFaiss, "tpu")
    # the index goes to the GPU the device names, not always GPU 0
    assert _gpu_index(TwoGpuFaiss, None) == 0 and _gpu_index(TwoGpuFaiss, "cuda") == 0
    assert _gpu_index(TwoGpuFaiss, "cuda:1") == 1 and _gpu_index(TwoGpuFaiss, "cpu") is None
    with pytest.raises(CredannoError, match=r"--device cuda:2: faiss sees 2 GPU\(s\)"):
        _gpu_index(TwoGpuFaiss, "cuda:2")


# -- processes -----------------------------------------------------------------------------
def test_dist_env_single_process_defaults(monkeypatch):
    env = runtime.DistEnv()
    assert (env.rank, env.world_size, env.local_rank, env.owns_group) == (0, 1, 0, False)
    assert env.device == torch.device("cpu") and env.is_main and not env.distributed
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    joined = runtime.init_distributed("cpu")
    assert joined == env and not torch.distributed.is_initialized()
    runtime.cleanup(joined)  # nothing to leave


def test_collectives_are_identities_in_one_process():
    env = runtime.DistEnv()
    x = torch.arange(6.0)
    assert runtime.all_reduce_mean(x, env) is x
    assert runtime.all_gather(x, env) == [x]
    assert runtime.broadcast_object({"a": 1}, env) == {"a": 1}
    assert torch.equal(runtime.shard(torch.arange(8), env), torch.arange(8))
    runtime.barrier(env)
    two = runtime.DistEnv(rank=1, world_size=2)
    assert torch.equal(runtime.shard(torch.arange(8), two), torch.arange(4, 8))
    with pytest.raises(CredannoError, match="not divisible by 2 processes"):
        runtime.shard(torch.arange(7), two)


# -- precision -----------------------------------------------------------------------------
@pytest.mark.parametrize("amp, device, bf16, expected", [
    ("auto", "cpu", None, None),
    ("auto", "cuda", True, torch.bfloat16),
    ("auto", "cuda", False, None),
    ("bf16", "cpu", None, torch.bfloat16),
    ("bf16", "cuda", True, torch.bfloat16),
    ("fp16", "cuda", True, torch.float16),
    ("fp16", "cuda", False, torch.float16),
    ("none", "cpu", None, None),
    ("none", "cuda", True, None),
])
def test_autocast_policy(amp, device, bf16, expected):
    assert runtime.autocast_dtype(amp, device, bf16_supported=bf16) is expected


@pytest.mark.parametrize("amp, device, bf16, match", [
    ("fp16", "cpu", None, "fp16 autocast needs a GPU"),
    ("bf16", "cuda", False, "this GPU has no bf16 support"),
    ("fp32", "cpu", None, "unknown amp mode 'fp32'; choose auto, bf16, fp16 or none"),
])
def test_autocast_policy_refusals_are_one_line(amp, device, bf16, match):
    with pytest.raises(CredannoError, match=match) as info:
        runtime.autocast_dtype(amp, device, bf16_supported=bf16)
    _one_line(info)


def test_autocast_context_and_provenance_label():
    a = torch.randn(4, 4)
    with runtime.autocast("cpu", None):
        assert (a @ a).dtype is torch.float32
    with runtime.autocast("cpu", torch.bfloat16):
        assert (a @ a).dtype is torch.bfloat16
    assert runtime.precision_label(None) == "fp32"
    assert runtime.precision_label(torch.bfloat16) == "bf16-autocast"
    assert runtime.precision_label(torch.float16) == "fp16-autocast"


# -- threads -------------------------------------------------------------------------------
def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info()]


def test_cpu_threads_restores_the_counts():
    import numpy as np

    np.ones((2, 2)) @ np.ones((2, 2))  # BLAS loaded, so its pool is visible
    before_torch, before_blas = torch.get_num_threads(), _blas_threads()
    target = 1 if before_torch > 1 else 2
    with runtime.cpu_threads(target):
        assert torch.get_num_threads() == target
        assert all(n == target for n in _blas_threads())
    assert torch.get_num_threads() == before_torch and _blas_threads() == before_blas
    with pytest.raises(RuntimeError, match="boom"), runtime.cpu_threads(target):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before_torch and _blas_threads() == before_blas
    with runtime.cpu_threads(None):
        assert torch.get_num_threads() == before_torch


# -- random numbers ------------------------------------------------------------------------
def test_generator_is_explicit_and_leaves_the_global_state_alone():
    state = torch.get_rng_state()
    a = torch.randn(5, generator=runtime.generator(7))
    b = torch.randn(5, generator=runtime.generator(7, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, torch.randn(5, generator=runtime.generator(8)))
    assert torch.equal(torch.get_rng_state(), state)
    assert runtime.generator(0).device == torch.device("cpu")


# -- one home ------------------------------------------------------------------------------
def _calls(path: Path) -> set[str]:
    """Dotted names called or referenced anywhere in ``path`` (``torch.cuda.is_available``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            parts, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                names.add(".".join([cur.id, *reversed(parts)]))
    return names


def test_runtime_decisions_live_only_in_runtime():
    """Device choice, process groups, autocast and thread counts are decided in one module."""
    owned = ("cuda.is_available", "init_process_group", "destroy_process_group",
             "set_num_threads", "torch.autocast")
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel == "runtime.py" or rel == "bench/perf.py":  # perf only describes the host
            continue
        found = sorted(n for n in _calls(path) if n.endswith(owned))
        if found:
            offenders[rel] = found
    assert offenders == {}
    assert not (PACKAGE / "devices.py").exists()
    assert not (PACKAGE / "pretrain" / "distributed.py").exists()
