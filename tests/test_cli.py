"""The ``te-fx`` command: ``check``, ``explain`` and argument errors (CPU, in-process through ``te_fx_cli.main``).

``explain``'s per-layer decisions are checked against an independent run: the tiny model itself (not explain's
shrunk copy, at another batch size and length) injected with the reference executor, and compiled with te_attn,
layer by layer; and against what the config says (which layers slide, by how much).
"""

from __future__ import annotations

import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import te_fx
import te_fx_cli as cli
from te_fx.core.reasons import REASONS
from te_fx.tools.tiny_models import FAMILIES, SLIDING_WINDOW, tiny_config, tiny_model

EXPLAIN_FAMILIES = ["llama_gqa", "mistral", "qwen2", "gemma3", "deepseek_v3", "phi3", "falcon"]
ORACLE_BATCH, ORACLE_SEQ = 3, 20  # unlike explain's 2 x 16; still longer than the tiny sliding window
COMPILE_OPTIONS = {"executor": "reference", "inner": "eager"}

# A Llama-3-8B config.json as published, written out by hand (not through transformers)
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


@pytest.fixture(autouse=True)
def _cpu_view_of_te(monkeypatch):
    """explain applies TransformerEngine's backend check where CUDA and TE are there, which turns TE decisions the
    GPU's TE rejects into SDPA; the oracles here run the reference executor, so explain must not either."""
    from te_fx.tools import explain

    monkeypatch.setattr(explain, "_te_checker", lambda: (None, "not run (tests)"))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _explain_json(capsys, model: str, *extra: str) -> dict:
    code, out, err = _run(capsys, "explain", model, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def _write_config(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


# --------------------------------------------------------------------------------------------- check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_check_without_gpu_or_te_says_what_is_missing(capsys):
    code, out, err = _run(capsys, "check")
    assert code == 1, out + err
    for field in ("python:", "torch:", "transformers:", "te_fx:", "CUDA:", "cuDNN:"):
        assert field in out
    if importlib.util.find_spec("transformer_engine") is None:
        assert "TransformerEngine: not installed" in out
        assert "pip install --no-build-isolation 'transformer_engine[pytorch]'" in out
    else:  # installed without a GPU: it may import or fail; either way its version line is there
        assert "TransformerEngine: not installed" not in out
    assert "a CUDA GPU" in out
    assert "executor='reference'" in out

    code, out, _ = _run(capsys, "check", "--json")
    assert code == 1
    result = json.loads(out)
    assert result["ok"] is False and result["cuda_available"] is False
    assert result["torch"] == torch.__version__
    assert any(what == "a CUDA GPU" for what, _ in result["missing"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the demo of a machine without a GPU")
def test_demo_without_te_says_which_executor_ran(capsys):
    """Without TE the demo's calls run on the reference executor: the report says so and never claims TE."""
    code, out, err = _run(capsys, "demo", "llama_gqa")
    assert code == 0, out + err
    assert "executor 'reference'" in out and "TransformerEngine does not run here" in out
    layer_lines = [line for line in out.splitlines() if "self_attn:" in line]
    assert len(layer_lines) == 2 * 2 * 2  # two ways in, two batches, two layers
    assert all(line.endswith(": reference executor x1") for line in layer_lines), layer_lines


class _FakeCudaDevice:
    def __init__(self, index):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)


def _fake_te(shape_reason=None):
    """A stand-in for te_fx's TE executor module: what check.py reads from it (the backend TE selects, te_fx's
    shape check)."""
    seen = {}

    def selected_backend(*args):
        seen["selected_backend"] = args
        return "FusedAttention (F16_arbitrary_seqlen)"

    def shape_unsupported_reason(*args):
        seen["shape_unsupported_reason"] = args
        return shape_reason

    return types.SimpleNamespace(
        selected_backend=selected_backend, shape_unsupported_reason=shape_unsupported_reason, seen=seen
    )


def test_check_with_gpu_and_te(monkeypatch, capsys):
    """The report's logic where CUDA and TE are there (both stood in for: this is no GPU test)."""
    from te_fx.tools import check

    _fake_gpu(monkeypatch)
    fake = _fake_te()
    monkeypatch.setattr(check, "_te_installed", lambda: True)
    monkeypatch.setattr(check, "_load_te", lambda: (fake, None))
    code, out, err = _run(capsys, "check")
    assert code == 0, out + err
    assert "cuda:0 Fake GPU (compute capability 9.0)" in out
    assert "FusedAttention (F16_arbitrary_seqlen) for bf16, batch 2, length 4096" in out
    assert "te_fx path:        FusedAttention (F16_arbitrary_seqlen) supported" in out
    assert "ok: the default executor 'te'" in out and "missing" not in out
    for asked in ("selected_backend", "shape_unsupported_reason"):  # the same typical call, asked once each
        assert fake.seen[asked][:4] == (torch.bfloat16, (2, 32, 8, 4096, 4096, 128, 128), "causal", (-1, 0)), asked

    monkeypatch.setattr(check, "_load_te", lambda: (_fake_te("fallback_shape"), None))
    code, out, _ = _run(capsys, "check")
    assert code == 1
    assert "not supported: fallback_shape" in out and "TE fused attention for the typical shape" in out


def test_check_te_that_fails_to_import(monkeypatch, capsys):
    from te_fx import executors
    from te_fx.tools import check

    def broken():
        try:
            raise ImportError("libcudnn_graph.so.9: cannot open shared object file\nmore detail")
        except ImportError as error:
            raise executors.TEUnavailableError("te_fx's 'te' executor needs TransformerEngine") from error

    _fake_gpu(monkeypatch)
    monkeypatch.setattr(check, "_te_installed", lambda: True)
    monkeypatch.setattr(executors, "load_te_executor", broken)
    code, out, _ = _run(capsys, "check")
    assert code == 1
    assert "fails to import: ImportError: libcudnn_graph.so.9: cannot open shared object file" in out
    assert "more detail" not in out
    assert "a working TransformerEngine" in out
    assert "pip install --no-build-isolation 'transformer_engine[pytorch]'" in out


def test_explain_applies_te_backend_check(monkeypatch, capsys):
    """Where TE's backend check runs (stood in for here), TE decisions it rejects become SDPA with its reason."""
    from te_fx.tools import explain

    def check(layer, dtype, mask_type, window, q_len, kv_len, training):
        assert dtype == torch.bfloat16 and kv_len == 256  # tiny configs: max_position_embeddings 256
        return "fallback_shape" if mask_type == "padding_causal" else None

    monkeypatch.setattr(explain, "_te_checker", lambda: (check, "run on Fake GPU at batch 2, length {seq}"))
    report = _explain_json(capsys, "llama_gqa")
    assert report["te_backend_check"] == "run on Fake GPU at batch 2, length 256"
    for layer in report["layers"]:
        assert layer["compile"]["attention_mask"] == {
            "runs": "sdpa", "mask_type": None, "window_size": None,
            "reason": "fallback_shape: TE's backend check at length 256",
        }  # fmt: skip
        assert layer["compile"]["no_attention_mask"]["runs"] == "te"
        assert layer["eager"]["no_padding"]["runs"] == "te"


# --------------------------------------------------------------------------------------------- explain: the oracle


def _sliding(config, layer: int) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None


def _oracle_eager(family: str) -> dict[str, list[dict]]:
    """Per scenario, per layer: the te_fx counters one forward of the injected tiny model added, and the mask type
    and window its TE module was called with."""
    torch.manual_seed(0)
    model = tiny_model(family)
    te_fx.inject_te_attention(model, executor="reference")
    attention = [
        module for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("self_attn", "self_attention")
    ]  # fmt: skip
    assert len(attention) == model.config.num_hidden_layers
    ids = torch.randint(3, 128, (ORACLE_BATCH, ORACLE_SEQ))
    padded = torch.ones_like(ids)
    padded[0, -3:] = 0
    results = {}
    for scenario, mask in (("no_padding", torch.ones_like(ids)), ("padding", padded)):
        per_layer = [{"counts": {}, "calls": []} for _ in attention]
        handles = []
        for record, module in zip(per_layer, attention):

            def before(_m, _a, record=record):
                record["start"] = te_fx.get_te_attention_stats()

            def after(_m, _a, _o, record=record):
                now, start = te_fx.get_te_attention_stats(), record.pop("start")
                record["counts"] = {k: now[k] - start[k] for k in now if now[k] != start[k]}

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
            if hasattr(module, "attn_module"):
                run = module.attn_module.run

                def recorded(q, k, v, plan, run=run, record=record):
                    record["calls"].append((plan.kind, tuple(plan.window_size)))
                    return run(q, k, v, plan)

                module.attn_module.run = recorded
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for handle in handles:
            handle.remove()
        for module in attention:
            vars(getattr(module, "attn_module", module)).pop("run", None)
        results[scenario] = per_layer
    return results


def _oracle_compile(family: str) -> dict[str, list[dict]]:
    """Per scenario: te_attn's report entries for the tiny model, one per layer."""
    results = {}
    ids = torch.randint(3, 128, (ORACLE_BATCH, ORACLE_SEQ))
    for scenario, mask in (("no_attention_mask", None), ("attention_mask", torch.ones_like(ids))):
        torch.manual_seed(0)
        torch._dynamo.reset()
        te_fx.reset_compile_report()
        compiled = torch.compile(tiny_model(family), backend="te_attn", options=dict(COMPILE_OPTIONS))
        compiled(input_ids=ids, attention_mask=mask)  # with autograd on, as a training step
        results[scenario] = te_fx.compile_report()
    torch._dynamo.reset()
    return results


@pytest.mark.parametrize("family", EXPLAIN_FAMILIES)
def test_explain_family_matches_what_runs(capsys, family):
    config = tiny_config(family)
    report = _explain_json(capsys, family)
    layers = report["layers"]
    num_layers = config.num_hidden_layers
    assert report["num_layers"] == num_layers == len(layers)
    assert [layer["index"] for layer in layers] == list(range(num_layers))
    assert report["errors"] == []
    supported = FAMILIES[family].supported

    eager = _oracle_eager(family)
    for i, layer in enumerate(layers):
        where = f"{family} layer {i}: {layer}"
        # attn_implementation="te" takes every layer of a model whose attention uses transformers' interface, all
        # four batches included (right padding keeps its rows; a decode step is bottom-right causal); Falcon's does not
        backend_runs = "sdpa" if family == "falcon" else "te"
        assert {scenario: d["runs"] for scenario, d in layer["backend"].items()} == dict.fromkeys(
            ("no_attention_mask", "no_padding", "padding", "decode"), backend_runs
        ), where
        assert layer["injected"] == supported, where
        assert layer["num_heads"] == config.num_attention_heads, where
        window = SLIDING_WINDOW if _sliding(config, i) else None
        assert layer["sliding_window"] == window, where
        expected_window = [SLIDING_WINDOW - 1, 0] if window else [-1, 0]
        unpadded, padded = eager["no_padding"][i], eager["padding"][i]
        if supported:
            assert layer["not_injected_reason"] is None, where
            assert unpadded["counts"] == {"te_hits": 1}, where
            assert unpadded["calls"] == [("causal", tuple(expected_window))], where
            # right padding: TE's padding_causal on the rows as they are, with the layer's window
            assert padded["counts"] == {"te_hits": 1}, where
            assert padded["calls"] == [("padding_causal", tuple(expected_window))], where
            for scenario in ("no_attention_mask", "no_padding"):
                decision = layer["eager"][scenario]
                got = (decision["runs"], decision["mask_type"], decision["window_size"])
                assert got == ("te", "causal", expected_window), where
            decision = layer["eager"]["padding"]
            got = (decision["runs"], decision["mask_type"], decision["window_size"])
            assert got == ("te", "padding_causal", expected_window), where
            assert layer["eager"]["decode"]["runs"] == "te", where
        else:
            assert unpadded["counts"] == padded["counts"] == {}, where  # te_fx never sees these calls
            assert "fused q/k/v" in layer["not_injected_reason"], where
            for decision in layer["eager"].values():
                assert decision["runs"] == "sdpa" and decision["reason"].startswith("not injected"), where

    compiled = _oracle_compile(family)
    for scenario, entries in compiled.items():
        assert len(entries) == num_layers, entries
        for i, (layer, entry) in enumerate(zip(layers, entries)):
            decision = layer["compile"][scenario]
            where = f"{family} layer {i} compile {scenario}: {decision} vs {entry}"
            assert decision["runs"] == entry["decision"], where
            if entry["decision"] == "te":
                assert decision["mask_type"] == entry["mask_kind"], where
                assert decision["window_size"] == list(entry["window_size"]), where
            else:
                assert entry["reason"] in REASONS, where
                assert decision["reason"] == f"{entry['reason']}: {entry['detail']}", where
            # what the design says, independently of the report: padding masks run te_fx's op, which reads their
            # layout at run time, with or without a window
            if scenario == "attention_mask":
                assert (decision["runs"], decision["mask_type"]) == ("te", "padding_causal"), where


def test_explain_text_report(capsys):
    code, out, err = _run(capsys, "explain", "gemma3")
    assert code == 0, err
    assert "gemma3_text (Gemma3ForCausalLM), 4 layers" in out
    assert "injects 4 of 4 attention layers" in out
    assert 'backend (attn_implementation="te"): every attention layer goes through te_fx' in out
    assert "  backend  every call:                    TE\n" in out
    assert "layer 0 (sliding_attention, window 8):" in out
    assert "layer 1 (full_attention):" in out
    assert "TE causal window (7, 0)" in out and "TE padding_causal window (7, 0)" in out
    # compile, sliding layers with an attention_mask: te_fx's op with the layer's window
    sliding = out.split("layer 0 (sliding_attention, window 8):")[1].split("layer 1")[0].splitlines()
    with_mask = next(line for line in sliding if "attention_mask (any values):" in line)
    assert with_mask.split("attention_mask (any values):")[1].strip() == "TE padding_causal window (7, 0)"
    assert "TE dtype: float32 (not set in the config): cast the model to bf16/fp16" in out

    code, out, _ = _run(capsys, "explain", "phi3", "--no-compile")
    assert code == 0
    assert "injects 0 of 2 attention layers" in out
    assert "not injected: fused q/k/v projection 'qkv_proj'" in out
    assert "compile" not in out.split("\n\n")[1]  # no compile lines in the per-layer part


# --------------------------------------------------------------------------------------------- explain: local configs


def test_explain_config_file_and_checkpoint_folder(capsys, tmp_path):
    by_family = _explain_json(capsys, "mistral", "--no-compile")
    folder = tmp_path / "ckpt"
    tiny_config("mistral").save_pretrained(folder)  # a checkpoint folder without weights: explain never reads them
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")
    file = tmp_path / "mistral.json"
    file.write_text((folder / "config.json").read_text())
    for model in (str(folder), str(file)):
        report = _explain_json(capsys, model, "--no-compile")
        assert report["model_type"] == "mistral" and report["source"].endswith(".json")
        strip = lambda layers: [{k: v for k, v in layer.items()} for layer in layers]  # noqa: E731
        assert strip(report["layers"]) == strip(by_family["layers"])


def test_explain_real_size_config_without_allocating_it(capsys, tmp_path):
    folder = _write_config(tmp_path / "llama3-8b", LLAMA3_8B)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = _explain_json(capsys, str(folder))
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 2**20  # ru_maxrss is KiB
    assert grown_gib < 2, f"peak memory grew by {grown_gib:.1f} GiB (an 8B model in fp32 is 30 GiB)"
    assert report["dtype"] == "bfloat16" and report["dtype_note"] is None
    assert report["architecture"] == "LlamaForCausalLM" and report["num_layers"] == 32
    assert len(report["layers"]) == 32 and report["errors"] == []
    for layer in report["layers"]:
        assert layer["injected"] and layer["te_limit"] is None
        assert (layer["num_heads"], layer["num_kv_heads"], layer["head_dim"], layer["v_head_dim"]) == (32, 8, 128, 128)
        assert layer["softmax_scale"] == pytest.approx(128**-0.5)
        expected = {"runs": "te", "mask_type": "causal", "window_size": [-1, 0], "reason": None}
        assert layer["eager"]["no_padding"] == expected
        assert layer["eager"]["padding"] == {**expected, "mask_type": "padding_causal"}
        assert layer["compile"]["no_attention_mask"]["mask_type"] == "causal"
        assert layer["compile"]["attention_mask"]["mask_type"] == "padding_causal"
    code, out, _ = _run(capsys, "explain", str(folder), "--no-compile")
    assert code == 0 and "layers 0-31:" in out and "32 heads, 8 KV heads, head dim 128" in out


def test_explain_real_size_sliding_window_head_dim_and_dtype(capsys, tmp_path):
    """Real widths, few layers: a 4096 sliding window (shrunk for the trace) is reported at its real size; a head
    dim TE cannot take turns every TE decision into SDPA; an fp32 config gets the cast hint."""
    mistral = {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2,
        "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096, "vocab_size": 32000,
        "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
    }  # fmt: skip
    report = _explain_json(capsys, str(_write_config(tmp_path / "mistral", mistral)))
    assert any("sliding_window 4096 -> 4" in note for note in report["notes"])
    assert any("sliding window is read from the mask subgraph" in note for note in report["notes"])
    for layer in report["layers"]:
        assert layer["sliding_window"] == 4096
        assert layer["eager"]["no_padding"]["window_size"] == [4095, 0]
        assert layer["compile"]["no_attention_mask"]["window_size"] == [4095, 0]
        assert layer["compile"]["attention_mask"]["window_size"] == [4095, 0]

    odd = {
        "model_type": "llama", "hidden_size": 1600, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 1000, "torch_dtype": "float32",
    }  # fmt: skip
    report = _explain_json(capsys, str(_write_config(tmp_path / "odd", odd)))
    assert "float32" in report["dtype_note"] and "cast" in report["dtype_note"]
    for layer in report["layers"]:
        assert layer["head_dim"] == 100 and layer["injected"]
        assert "fallback_head_dim" in layer["te_limit"]
        for decision in [*layer["eager"].values(), *layer["compile"].values()]:
            assert decision["runs"] == "sdpa", decision


def test_explain_model_transformers_builds_without_sdpa(capsys, tmp_path):
    """Gemma2 (attention softcapping) has no SDPA path in transformers: explain says what each way in does instead of
    failing, and its attn_implementation="te" decisions are what a run of the model counts."""
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)  # fmt: skip
    config.save_pretrained(tmp_path / "gemma2")
    report = _explain_json(capsys, str(tmp_path / "gemma2"))
    assert report["errors"] == [] and report["backend_refused"] is None
    assert any("Gemma2ForCausalLM with its eager attention only" in note for note in report["notes"])
    for layer in report["layers"]:
        assert not layer["injected"]
        assert {d["runs"] for d in layer["backend"].values()} == {"eager"}
        assert all(d["reason"].startswith("fallback_argument:") for d in layer["backend"].values())
        assert {d["runs"] for path in ("eager", "compile") for d in layer[path].values()} == {"eager"}

    model = AutoModelForCausalLM.from_config(config, attn_implementation="te")
    te_fx.reset_te_attention_stats()
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 12)))
    stats = te_fx.get_te_attention_stats()
    assert (stats["fallback_argument"], stats["te_hits"]) == (config.num_hidden_layers, 0)


def test_explain_model_with_its_own_attention_code(capsys, tmp_path):
    """Bloom has neither SDPA nor transformers' attention interface: explain says that no way in reaches it, and
    attn_implementation="te" refuses the model at its first forward."""
    from transformers import BloomConfig

    config = BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    config.save_pretrained(tmp_path / "bloom")
    report = _explain_json(capsys, str(tmp_path / "bloom"))
    assert report["errors"] == [] and report["backend_refused"].startswith("refused")
    for layer in report["layers"]:
        assert layer["backend"] == {} and not layer["injected"]
        assert {d["runs"] for path in ("eager", "compile") for d in layer[path].values()} == {"eager"}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="te")
    with pytest.raises(ValueError, match="AttentionInterface"):  # at its first forward
        model(torch.randint(3, 128, (1, 8)))


# --------------------------------------------------------------------------------------------- errors


def _assert_usage_error(capsys, argv: list[str], *fragments: str) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    assert out == ""
    assert err.strip() and "\n" not in err.strip(), err
    for fragment in fragments:
        assert fragment in err, err


def test_explain_bad_input(capsys, tmp_path):
    _assert_usage_error(capsys, ["explain", "gpt5"], "unknown model 'gpt5'", "llama_gqa")
    _assert_usage_error(capsys, ["explain", "meta-llama/Llama-3-8B"], "no such file or directory", "never downloads")
    missing = str(tmp_path / "missing" / "config.json")
    _assert_usage_error(capsys, ["explain", missing], f"{missing}: no such file or directory")
    (tmp_path / "empty").mkdir()
    _assert_usage_error(capsys, ["explain", str(tmp_path / "empty")], "has no config.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_type": "llama", "hidden_size": 64,')
    _assert_usage_error(capsys, ["explain", str(broken)], "malformed JSON")
    _assert_usage_error(capsys, ["explain", str(_write_config(tmp_path / "alien", {"model_type": "alien_lm"}))],
                        "unknown model_type 'alien_lm'")  # fmt: skip
    _assert_usage_error(capsys, ["explain", str(_write_config(tmp_path / "untyped", {"hidden_size": 64}))],
                        "no model_type")  # fmt: skip
    (tmp_path / "list.json").write_text("[1, 2]")
    _assert_usage_error(capsys, ["explain", str(tmp_path / "list.json")], "JSON object")
    uneven = {"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 5, "hidden_size": 4096}
    _assert_usage_error(capsys, ["explain", str(_write_config(tmp_path / "uneven", uneven))],
                        "num_attention_heads 32 is not a multiple of num_key_value_heads 5")  # fmt: skip


def _parser_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_demo_and_parser_errors(capsys):
    _assert_usage_error(capsys, ["demo", "gpt5"], "unknown family gpt5")
    assert "the following arguments are required: model" in _parser_error(capsys, ["explain"])
    assert "invalid choice: 'frobnicate'" in _parser_error(capsys, ["frobnicate"])
    assert "unrecognized arguments: --bogus" in _parser_error(capsys, ["--bogus"])
    assert "unrecognized arguments: --bogus" in _parser_error(capsys, ["check", "--bogus"])
    assert "choose a command: demo, check, explain or bench" in _parser_error(capsys, [])


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [(["check"], False), (["-v", "check"], True), (["check", "-v"], True), (["check", "--verbose"], True),
     (["--verbose", "explain", "llama", "--no-compile"], True), (["explain", "llama", "--verbose"], True)],
)  # fmt: skip
def test_verbose_before_or_after_the_command(argv, verbose):
    args = cli.build_parser().parse_args(argv)
    assert getattr(args, "verbose", False) is verbose


def test_parsing_imports_no_torch():
    """``te-fx --help`` and usage errors answer before torch, transformers or te_fx are imported (seconds)."""
    code = (
        "import sys, te_fx_cli\n"
        "for argv in (['--help'], ['bench', '--help'], ['--bogus'], ['explain']):\n"
        "    try:\n"
        "        te_fx_cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(name for name in ('torch', 'transformers', 'te_fx') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_console_script_entry_point():
    script = Path(sys.executable).with_name("te-fx")
    command = str(script) if script.exists() else shutil.which("te-fx")
    assert command, "the te-fx console script is not installed (pip install -e .)"
    done = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("demo", "check", "explain", "bench"):
        assert name in done.stdout
