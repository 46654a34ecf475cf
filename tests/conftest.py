import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The tests run tiny tensors, for which intra-op threads cost far more than they save on a 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_te_fx_state():
    """Each test starts with zeroed counters and a deterministic seed."""
    import te_fx

    te_fx.reset_te_attention_stats()
    torch.manual_seed(0)
    yield
