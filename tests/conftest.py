import os
import subprocess

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    # CUDA tests skip cleanly where ONNX Runtime cannot run a CUDA session (CI never has a GPU).
    from itae_export.runtime import cuda_usable

    usable, why = cuda_usable()
    if not usable:
        skip = pytest.mark.skip(reason=f"no usable CUDA: {why}")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _embedding_cache(tmp_path_factory):  # never the user's real cache (itae_export.data.store.cache_dir)
    os.environ["ITAE_CACHE_DIR"] = str(tmp_path_factory.mktemp("itae-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """One tiny exported DINOv2 model (56x56 input) shared by the itae-cluster and report tests."""
    import imagefolders

    return imagefolders.tiny_onnx(tmp_path_factory.getbasetemp() / "models", resolution=56)


@pytest.fixture(scope="session")
def collection(tmp_path_factory, tiny_model):
    """An itae-cluster output folder (tiny model, 24 Fashion-MNIST images of 4 classes) for the itae-search tests."""
    from click.testing import CliRunner

    import imagefolders
    from itae_export.cli.cluster import main as cluster_cli

    base = tmp_path_factory.mktemp("search")
    root = base / "photos"
    imagefolders.fashion_folder(root, per_class=6, classes=4)
    out = base / "out"
    res = CliRunner().invoke(cluster_cli, [str(root), "--k", "4", "--onnx", str(tiny_model), "--out", str(out),
                                           "--quiet", "--workers", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny head problems on a shared 2-core machine: a second torch thread only adds contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mount_tmpfs(mnt, size: str = "1m"):
    """Mount a small tmpfs at ``mnt`` (a real full disk, a real read-only filesystem); skip where this
    machine cannot (needs root and CAP_SYS_ADMIN). Returns the unmount function."""
    mnt.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    return lambda: subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (see :func:`mount_tmpfs`); a module needing another size overrides this fixture."""
    unmount = mount_tmpfs(tmp_path / "mnt")
    yield tmp_path / "mnt"
    unmount()
