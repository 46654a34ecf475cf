"""The benchmark's argument handling, report generation and target arithmetic on CPU (reference executor)."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.kernels import VARIANTS, Case, flops
from bench.models import full_models
from bench.report import evaluate_targets
from bench.run import build_parser, run
from te_fx.tools.model_config import shrink_config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = run(build_parser().parse_args(["--profile", "smoke", "--device", "cpu", "--out", str(out), "--reps", "2"]))
    return code, out


def test_smoke_profile_writes_every_output(smoke_run):
    code, out = smoke_run
    assert code == 0  # nothing measured against a target on CPU: no FAIL
    results = json.loads((out / "results.json").read_text())
    assert results["executor"] == "reference" and results["device"] == "cpu"
    cases = {row["case"] for row in results["kernels"]}
    assert len(cases) == 4
    for case in cases:
        for mode in ("fwd", "fwd+bwd"):
            variants = {r["variant"]: r for r in results["kernels"] if r["case"] == case and r["mode"] == mode}
            assert set(variants) == set(VARIANTS)
            assert variants["TE DotProductAttention"]["ms"] is None  # needs TE: reported as n/a, not faked
            assert variants["te_fx eager"]["ms"] > 0 and variants["te_fx op"]["ms"] > 0
            assert variants["te_fx eager fp8"]["ms"] is None  # FP8 needs TE and bf16
    for row in results["kernels"]:
        if row.get("error"):
            assert row["error"]["rel"] < 1e-5, row  # te_fx against the float64 reference
    assert set(results["models"]) == {"tiny llama_gqa", "tiny mistral"}
    llama = results["models"]["tiny llama_gqa"]
    assert llama["te_attn"]["te_fx_compile"]["rewritten"] == llama["te_attn"]["te_fx_compile"]["sdpa_nodes"] > 0
    assert llama["eager te_fx"]["te_fx_eager"]["te_hits"] > 0
    assert all(v["fwd_bwd_ms"] > 0 and v["step_ms"] > 0 for v in llama.values())
    report = (out / "report.md").read_text()
    assert "## Attention fwd+bwd" in report and "## Targets" in report and "NOT RUN" in report
    for plot in ("kernels_tflops.png", "speedup_vs_best.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--profile", "quick", "--device", "cpu"], ["--device", "cuda"]])
def test_gpu_profiles_refuse_to_run_on_cpu(argv, capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run(build_parser().parse_args([*argv, "--out", str(tmp_path)])) == 3
    assert "te-fx bench:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bad_arguments_exit_with_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--profile", "huge"])
    assert exit_info.value.code == 2


def test_flops_count_visible_pairs():
    causal = Case("t", "causal", 2, 4, 1, 1, 8)
    assert flops(causal, backward=False) == 4 * 8 * 2 * (1 + 2 + 3 + 4)
    sliding = Case("t", "sliding", 1, 5, 1, 1, 8, window=2)
    assert flops(sliding, backward=True) == 3.5 * 4 * 8 * (1 + 2 + 2 + 2 + 2)


def _row(case, mode, variant, ms, **fields):
    base = {
        "case": case,
        "mode": mode,
        "variant": variant,
        "ms": ms,
        "family": "llama3-8b",
        "kind": "causal",
        "seq": 4096,
        "heads": 32,
        "kv_heads": 8,
        "window": None,
        "peak_fraction": None,
        "dtype": "bfloat16",
    }
    return {**base, **fields}


def test_targets_pass_fail_and_miss_by():
    tiny = dict(family="tiny", seq=128, heads=8, kv_heads=8)
    sliding = dict(kind="sliding", window=1024, seq=8192)
    results = {
        "kernels": [
            _row("a", "fwd", "te_fx eager", 0.03, **tiny), _row("a", "fwd", "sdpa default", 0.01, **tiny),
            _row("b", "fwd+bwd", "te_fx eager", 2.0), _row("b", "fwd+bwd", "sdpa cudnn", 2.2),
            _row("b", "fwd+bwd", "sdpa HF compile mask", 9.0),
            _row("c", "fwd+bwd", "te_fx eager", 1.0, **sliding), _row("c", "fwd+bwd", "sdpa default", 4.0, **sliding),
            _row("d", "fwd", "te_fx eager", 1.0, peak_fraction=0.75),
            _row("a", "fwd", "te_fx eager", 0.01, dtype="float16", **tiny),  # fp16 rows never count for a target
            _row("b", "fwd+bwd", "sdpa flash", 0.5, dtype="float16"),
        ],
        "models": {"llama x": {"inductor": {"fwd_bwd_ms": 130.0, "step_ms": 150.0},
                               "te_attn": {"fwd_bwd_ms": 100.0, "step_ms": 120.0}}},
    }  # fmt: skip
    targets = evaluate_targets(results)
    assert [t["pass"] for t in targets] == [False, True, True, True, True]
    assert targets[0]["value"] == pytest.approx(3.0) and "missed by 100%" in targets[0]["detail"]
    assert targets[1]["value"] == pytest.approx(1.1)
    assert targets[2]["value"] == pytest.approx(4.0)
    assert targets[3]["value"] == pytest.approx(1.3)
    assert targets[4]["value"] == pytest.approx(75.0)
    assert all(t["pass"] is None for t in evaluate_targets({"kernels": [], "models": {}}))


def test_te_fx_bench_command_dispatches_to_the_benchmark(capsys):
    import torch

    from te_fx_cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--profile", "quick", "--device", "cpu"]) == 3
    assert "--profile smoke" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--only", "everything"])
    assert exit_info.value.code == 2


def test_merge_keeps_what_the_new_run_did_not_measure():
    from bench.run import merge_results

    old = {
        "device": "GPU",
        "profiles": ["full"],
        "models": {"m1": {"x": 1}, "m2": {"x": 2}},
        "matmul_peak_tflops": 800,
        "kernels": [
            _row("a", "fwd", "te_fx eager", 1.0, tflops=400.0),
            _row("a", "fwd", "te_fx eager", 3.0, dtype="float16", tflops=100.0),
        ],
    }
    new = {"device": "GPU", "profiles": ["quick"], "models": {"m2": {"x": 5}}, "matmul_peak_tflops": 780,
           "kernels": [_row("a", "fwd", "te_fx eager", 2.0, tflops=200.0)]}  # fmt: skip
    merged = merge_results(old, new)
    assert merged["profiles"] == ["full", "quick"]
    assert merged["models"] == {"m1": {"x": 1}, "m2": {"x": 5}}
    assert sorted((r["dtype"], r["ms"]) for r in merged["kernels"]) == [("bfloat16", 2.0), ("float16", 3.0)]
    assert merged["matmul_peak_tflops"] == 800  # one peak for every row: the higher measurement
    assert sorted(r["peak_fraction"] for r in merged["kernels"]) == [0.125, 0.25]


def test_a_run_in_parts_merges_into_the_folder(smoke_run, tmp_path):
    _, out = smoke_run
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    before = json.loads((tmp_path / "results.json").read_text())
    argv = ["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--reps", "2", "--only", "kernels",
            "--seq", "16", "--merge"]  # fmt: skip
    assert run(build_parser().parse_args(argv)) == 0
    after = json.loads((tmp_path / "results.json").read_text())
    assert after["models"] == before["models"]  # this part measured no model: the earlier ones stay
    key = lambda r: (r["case"], r["mode"], r["variant"], r["dtype"])  # noqa: E731
    assert sorted(map(key, after["kernels"])) == sorted(map(key, before["kernels"]))
    remeasured = {r["case"] for r in after["kernels"] if r not in before["kernels"]}
    assert remeasured and all(" S16 " in case for case in remeasured)
    assert "## Models" in (tmp_path / "report.md").read_text()


def test_a_run_cut_short_keeps_its_cases_and_resume_goes_on(tmp_path, monkeypatch):
    """results.json is saved after every case: a run stopped in its third case (a time limit) keeps the first two
    cases next to the earlier results, and --resume measures only the cases it lacks."""
    import bench.kernels

    smoke_case_names = [case.name for case in bench.kernels.smoke_cases()]
    argv = ["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--reps", "2", "--only", "kernels"]
    real_run_case, measured = bench.kernels.run_case, []

    def stopped_in_the_third_case(case, *args):
        if len(measured) == 2:
            raise KeyboardInterrupt
        measured.append(case.name)
        return real_run_case(case, *args)

    monkeypatch.setattr(bench.kernels, "run_case", stopped_in_the_third_case)
    with pytest.raises(KeyboardInterrupt):
        run(build_parser().parse_args(argv))
    kept = json.loads((tmp_path / "results.json").read_text())
    assert {row["case"] for row in kept["kernels"]} == set(smoke_case_names[:2])

    measured.clear()

    def recorded(case, *args):
        measured.append(case.name)
        return real_run_case(case, *args)

    monkeypatch.setattr(bench.kernels, "run_case", recorded)
    assert run(build_parser().parse_args([*argv, "--resume"])) == 0
    assert measured == smoke_case_names[2:]
    after = json.loads((tmp_path / "results.json").read_text())
    assert {row["case"] for row in after["kernels"]} == set(smoke_case_names)
    timings = lambda rows: sorted((r["case"], r["mode"], r["variant"], r["ms"] or 0.0) for r in rows)  # noqa: E731
    assert timings(r for r in after["kernels"] if r["case"] in smoke_case_names[:2]) == timings(kept["kernels"])


def test_merge_into_another_cards_results_is_refused(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"device": "some other card", "kernels": [], "models": {}}))
    argv = ["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--merge"]
    assert run(build_parser().parse_args(argv)) == 2
    assert "some other card" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["out_is_a_file", "corrupt_results", "list_results", "no_such_length"])
def test_arguments_that_cannot_work_fail_before_measuring(problem, tmp_path, capsys):
    argv = ["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--merge"]
    if problem == "out_is_a_file":
        (tmp_path / "file").write_text("")
        argv[argv.index("--out") + 1] = str(tmp_path / "file")
    elif problem == "corrupt_results":
        (tmp_path / "results.json").write_text("{not json")
    elif problem == "list_results":
        (tmp_path / "results.json").write_text("[]")
    else:
        argv += ["--seq", "99999"]
    assert run(build_parser().parse_args(argv)) == 2
    assert capsys.readouterr().err.startswith("te-fx bench: ")
    assert not (tmp_path / "report.md").exists()


def test_a_read_only_output_folder_fails_before_measuring(tmp_path, capsys):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        try:
            (out / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes into read-only folders (root)")
        argv = ["--profile", "smoke", "--device", "cpu", "--out", str(out)]
        assert run(build_parser().parse_args(argv)) == 2
        assert capsys.readouterr().err.startswith(f"te-fx bench: --out {out}: cannot be used as the output folder")
    finally:
        out.chmod(0o755)
    assert not any(out.iterdir())


def test_without_matplotlib_the_report_has_no_plots(tmp_path, capsys, monkeypatch):
    """The README's plain install has no matplotlib: the run says so up front and writes everything but the plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails as if it were not installed
    argv = ["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--reps", "2", "--only", "kernels",
            "--seq", "16"]  # fmt: skip
    assert run(build_parser().parse_args(argv)) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("te-fx bench: matplotlib is not installed")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.md", "results.json"]
    assert "![" not in (tmp_path / "report.md").read_text()


def test_the_arguments_name_every_profile_and_dtype():
    from bench.args import DTYPE_NAMES, PROFILE_NAMES
    from bench.run import DTYPES, PROFILES

    assert set(PROFILE_NAMES) == set(PROFILES) and set(DTYPE_NAMES) == set(DTYPES)


@pytest.mark.parametrize("reps", ["0", "-3"])
def test_non_positive_repetitions_are_a_usage_error(reps):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--reps", reps])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("case", full_models(), ids=lambda case: case.name)
def test_every_model_of_the_gpu_profiles_builds_and_trains(case):
    """The GPU profiles' real-size configs, shrunk in width, run a training step with an attention_mask: a config
    that transformers rejects or cannot run (Qwen2 once got sliding layer types without a window) fails here, not
    minutes into a GPU run."""
    config, _, _ = shrink_config(case.config())
    config.vocab_size = 128
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    ids = torch.randint(0, config.vocab_size, (1, 16))
    loss = model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
