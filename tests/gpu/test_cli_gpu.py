"""`te-fx check` and `te-fx explain` on a real GPU with TE: TE's own backend selection, and te_fx's backend check
applied to a real-size config."""

import json

import torch

import te_fx_cli as cli

LLAMA_3_8B_2_LAYERS = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}  # fmt: skip


def test_check_names_the_gpu_and_te_fused_attention(capsys):
    code = cli.main(["check"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert torch.cuda.get_device_name(0) in out
    assert "te_fx path:        FusedAttention (F16_arbitrary_seqlen) supported" in out
    backend_line = next(line for line in out.splitlines() if line.strip().startswith("TE backend:"))
    assert "Attention" in backend_line and "unknown" not in backend_line, backend_line  # executors.te.selected_backend
    assert "missing" not in out


def test_explain_runs_te_backend_check(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B_2_LAYERS))
    code = cli.main(["explain", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["te_backend_check"].startswith(f"run on {torch.cuda.get_device_name(0)}")
    for layer in report["layers"]:
        runs = {f"{path} {scenario}": d["runs"] for path in ("eager", "compile") for scenario, d in layer[path].items()}
        assert runs == {
            "eager no_attention_mask": "te",
            "eager no_padding": "te",
            "eager padding": "te",
            "eager decode": "te",
            "compile no_attention_mask": "te",
            "compile attention_mask": "te",
        }, runs
