"""GPU tests: run on a CUDA machine with TransformerEngine installed; skipped everywhere else."""

import pytest
import torch


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or TE's extension failing to load its CUDA libraries
        return False
    return True


HAVE_GPU_TE = torch.cuda.is_available() and _te_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and TransformerEngine")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not HAVE_GPU_TE:
                item.add_marker(skip)


@pytest.fixture
def rel_error():
    """‖out − ref‖ / ‖ref‖ in float64."""

    def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
        out, ref = out.double(), ref.double()
        return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()

    return _rel_error
