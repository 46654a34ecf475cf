"""``te-fx check``: what this machine has for te_fx, what is missing, and how to get it.

Versions of Python, PyTorch, transformers, te_fx and TransformerEngine; the CUDA devices and cuDNN; and, where a GPU
and TransformerEngine are both there, which backend TE selects for a typical shape and whether te_fx's path (TE's
F16 fused attention) accepts it, both asked of te_fx's TE executor (``selected_backend``, ``shape_unsupported_reason``),
reached only through :func:`te_fx.executors.load_te_executor` (``te_fx/executors/te.py`` stays the only module
importing TransformerEngine).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..executors import TE_INSTALL
from .model_config import first_line

__all__ = ["CheckResult", "TYPICAL_SHAPE", "run_check", "format_check"]

# TE's PyTorch extension ships as source: built against the installed torch (CUDA toolkit and cuDNN needed)
# (batch, heads, kv_heads, q_len, kv_len, head_dim_qk, head_dim_v): a Llama-3-8B-like layer at 4k context
TYPICAL_SHAPE = (2, 32, 8, 4096, 4096, 128, 128)
TYPICAL_TEXT = "bf16, batch 2, length 4096, 32 heads, 8 KV heads, head dim 128, causal"


@dataclass
class CheckResult:
    """What ``te-fx check`` found. ``missing`` lists (what, how to fix it); ``ok`` is True when the default executor
    ("te") can run TE's fused attention here."""

    python: str
    torch: str
    torch_cuda: str | None
    transformers: str | None
    te_fx: str
    te_installed: bool
    te_version: str | None
    te_error: str | None
    cuda_available: bool
    devices: list[dict[str, Any]] = field(default_factory=list)
    cudnn: str | None = None
    te_backend: str | None = None  # what TE itself selects for TYPICAL_SHAPE
    te_fx_backend: str | None = None  # whether te_fx's path (F16 fused attention) takes TYPICAL_SHAPE
    missing: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _te_installed() -> bool:
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def _load_te() -> tuple[Any, str | None]:
    """(te_fx's TE executor module, None) or (None, the first line of the import error)."""
    from ..executors import load_te_executor

    try:
        return load_te_executor(), None
    except Exception as error:  # noqa: BLE001 - a broken TE install may raise more than ImportError
        return None, first_line(error.__cause__ or error)


def _te_selection(te_executor: Any) -> str:
    """Which backend TE's own selection picks for TYPICAL_SHAPE (asked through the TE executor)."""
    try:
        return te_executor.selected_backend(torch.bfloat16, TYPICAL_SHAPE, "causal", (-1, 0), 0.0, True, 0)
    except Exception as error:  # noqa: BLE001 - TE's internal API moves between versions
        return f"unknown (TE's backend selection failed: {first_line(error)})"


def run_check() -> CheckResult:
    """Inspect this machine (imports TE when it is installed; starts CUDA when a GPU is there)."""
    from .. import __version__

    result = CheckResult(
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        transformers=_version("transformers"),
        te_fx=_version("te-fx") or __version__,
        te_installed=_te_installed(),
        te_version=_version("transformer-engine", "transformer-engine-torch"),
        te_error=None,
        cuda_available=torch.cuda.is_available(),
    )
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    result.cudnn = str(cudnn) if cudnn else None
    if result.cuda_available:
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            name = torch.cuda.get_device_name(index)
            result.devices.append({"index": index, "name": name, "capability": f"{major}.{minor}"})
    elif result.torch_cuda is None:
        result.missing.append((
            "a CUDA GPU",
            f"torch {torch.__version__} is a CPU-only build: install a CUDA build of PyTorch "
            "(https://pytorch.org/get-started/locally/) on a machine with an NVIDIA GPU",
        ))  # fmt: skip
    else:
        result.missing.append((
            "a CUDA GPU",
            f"torch {torch.__version__} (CUDA {result.torch_cuda}) sees no CUDA device: check `nvidia-smi`, the "
            "driver and CUDA_VISIBLE_DEVICES",
        ))  # fmt: skip

    te_executor = None
    if not result.te_installed:
        result.missing.append(("TransformerEngine", f"{TE_INSTALL}; needs CUDA"))
    else:
        te_executor, result.te_error = _load_te()
        if te_executor is None:
            result.missing.append(("a working TransformerEngine",
                                   f"it fails to import ({result.te_error}); reinstall it for this torch and CUDA: "
                                   f"{TE_INSTALL}"))  # fmt: skip

    if result.cuda_available and te_executor is not None:
        result.te_backend = _te_selection(te_executor)
        try:
            reason = te_executor.shape_unsupported_reason(
                torch.bfloat16, TYPICAL_SHAPE, "causal", (-1, 0), 0.0, True, 0
            )
        except Exception as error:  # noqa: BLE001
            reason = f"the check failed ({first_line(error)})"
        if reason is None:
            result.te_fx_backend = "FusedAttention (F16_arbitrary_seqlen) supported"
        else:
            result.te_fx_backend = f"not supported: {reason}"
            result.missing.append(("TE fused attention for the typical shape",
                                   f"TE's F16 fused backend rejects it ({reason}) on this GPU / cuDNN; te_fx would "
                                   "fall back to SDPA (a GPU of compute capability 8.0 or newer and a recent cuDNN "
                                   "are needed)"))  # fmt: skip
    return result


def format_check(result: CheckResult) -> str:
    """The report ``te-fx check`` prints."""

    def row(name: str, value: str) -> str:
        return f"  {name + ':':<18} {value}"

    if result.te_installed and result.te_error is None:
        te = result.te_version or "installed (version unknown)"
    elif result.te_installed:
        te = f"{result.te_version or 'installed'}, fails to import: {result.te_error}"
    else:
        te = "not installed"
    cuda = "not available"
    if result.cuda_available:
        cuda = "; ".join(
            f"cuda:{d['index']} {d['name']} (compute capability {d['capability']})" for d in result.devices
        )
    lines = [
        "te-fx check",
        row("python", result.python),
        row("torch", f"{result.torch} (CUDA build {result.torch_cuda or 'none'})"),
        row("transformers", result.transformers or "not installed"),
        row("te_fx", result.te_fx),
        row("TransformerEngine", te),
        row("CUDA", cuda),
        row("cuDNN", result.cudnn or "-"),
    ]
    if result.te_backend is not None:
        lines.append(row("TE backend", f"{result.te_backend} for {TYPICAL_TEXT}"))
        lines.append(row("te_fx path", result.te_fx_backend or "-"))
    else:
        lines.append(row("TE backend", "not checked (needs a CUDA GPU and TransformerEngine)"))
    if result.ok:
        lines += ["", "ok: the default executor 'te' runs TransformerEngine's fused attention here"]
    else:
        lines += ["", "missing:"]
        lines += [f"  - {what}: {fix}" for what, fix in result.missing]
        lines += [
            "",
            "The default executor 'te' cannot run here. executor='reference' (or TE_FX_EXECUTOR=reference) works "
            "without a GPU or TransformerEngine: the same decisions in plain PyTorch (te-fx demo and te-fx explain "
            "use it).",
        ]
    return "\n".join(lines)
