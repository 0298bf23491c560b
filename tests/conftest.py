import os

# Tests never reach a model hub: timm/huggingface must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

from credanno.synthetic import synthetic_images, synthetic_table  # noqa: E402


@pytest.fixture
def tiny_table():
    return synthetic_table(n_nodules=40, per_nodule=3, seed=0)


@pytest.fixture
def tiny_patch_file(tmp_path, tiny_table):
    """A valid patch file of 120 synthetic 32 x 32 images (no pylidc needed)."""
    from credanno.data.patchfile import write_patch_file

    path = tmp_path / "patches.h5"
    write_patch_file(path, synthetic_images(tiny_table), tiny_table,
                     {"source": "synthetic", "seed": 0})
    return path


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread; on shared cores OpenMP spin-waiting costs 100x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
