import os

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """One tiny exported DINOv2 model (56x56 input) shared by the itae-cluster and report tests."""
    import imagefolders

    return imagefolders.tiny_onnx(tmp_path_factory.getbasetemp() / "models", resolution=56)
