"""bench/tables.py: the result tables of the README and docs/ are what bench/results/*.json give."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES_PY = os.path.join(ROOT, "bench", "tables.py")

_spec = importlib.util.spec_from_file_location("bench_tables", TABLES_PY)
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def test_repository_tables_match_the_results_files():
    """Fails when a table in README.md or docs/ was edited by hand or a results file changed
    without `python bench/tables.py`."""
    proc = subprocess.run([sys.executable, TABLES_PY, "--check"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_summary_and_every_results_file_are_used():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "<!-- table:summary@" in readme
    text = readme
    for path in tables.default_files(ROOT)[1:]:
        with open(path, encoding="utf-8") as f:
            text += f.read()
    for name in os.listdir(tables.RESULTS):
        if name.endswith(".json"):
            assert name[:-5] in text, f"bench/results/{name} feeds no table"


# ---------------------------------------------------------------------------------------------
# the generator on a small synthetic results file


def _semi24_rows(dense_ms=(2.0, 8.0), fp32_ms=(1.0, 4.0), fp16_ms=(0.5, 5.0)):
    rows = []
    for i, m in enumerate((1, 8)):
        for impl, v in (("dense fp32 nn.Linear", dense_ms[i]), ("pycompress SemiSparseLinear fp32", fp32_ms[i]),
                        ("pycompress SemiSparseLinear fp16", fp16_ms[i])):
            rows.append({"kernel": "semi24", "case": f"K=64 N=32 M={m}", "impl": impl, "K": 64, "N": 32, "M": m,
                         "ms": v})
    return rows


def _sparse_rows():
    rows = []
    for impl, runs in (("dense fp32 nn.Linear", [4.0, 6.0, 5.0]), ("torch CSR sparse.mm", [2.0, 2.0, 2.0]),
                       ("pycompress SparseLinear", [1.0, 1.0, 2.0])):
        rows.append({"kernel": "sparse", "case": "K=64 N=32 s=90% M=1", "impl": impl, "K": 64, "N": 32,
                     "sparsity": 0.9, "M": 1, "ms": sorted(runs)[1], "ms_runs": runs})
    return rows


def _write(results_dir, stem="testbox", semi24=None, sparse=None):
    data = {
        "meta": {"device": "Test CPU", "device_type": "cpu", "torch": "2.13.0+cpu", "cpu_isa": "avx2",
                 "threads": 2, "date": "2026-12-01T10:00:00+00:00", "runs": 1, "threading_env": {},
                 "cpu_id": "GenuineTest family 1 model 2 stepping 3"},
        "kernels": {"semi24": semi24 or _semi24_rows(), "sparse": sparse or _sparse_rows()},
        "kernel_dates": {"semi24": "2026-12-01T10:05:00+00:00", "sparse": "2026-12-01T11:30:00+00:00"},
        "kernel_env": {"semi24": {}, "sparse": {"OMP_WAIT_POLICY": "ACTIVE"}},
    }
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, stem + ".json"), "w") as f:
        json.dump(data, f)


PAGE = """# Page

Text before.

<!-- table:semi24@testbox begin -->
stale
<!-- table:semi24@testbox end -->

Text after.
"""


def test_table_states_device_date_and_figures(tmp_path):
    _write(tmp_path)
    out = tables.render("semi24@testbox", str(tmp_path))
    assert "Test CPU (GenuineTest family 1 model 2 stepping 3)" in out
    assert "CPU path `avx2`" in out and "2 threads" in out and "torch 2.13.0+cpu" in out
    assert "2026-12-01 10:05 UTC" in out and "`bench/results/testbox.json`" in out
    assert "| 64 × 32 | 1 | 2.00 | 1.00 (2.00×) | 0.500 (4.00×) |" in out
    assert "| 64 × 32 | 8 | 8.00 | 4.00 (2.00×) | 5.00 (1.60×) |" in out


def test_run_ranges_and_threading_settings(tmp_path):
    _write(tmp_path)
    out = tables.render("sparse@testbox", str(tmp_path))
    assert "median of 3 fresh-process runs" in out and "`OMP_WAIT_POLICY=ACTIVE`" in out
    # dense / ours per run: 4, 6, 2.5; CSR / ours: 2, 2, 1
    assert "| 64×32 | 1 | 5.00 | 2.00 | 1.00 | 5.00× (2.50–6.00) | 2.00× (1.00–2.00) |  |" in out


def test_update_rewrites_between_markers_only(tmp_path):
    _write(tmp_path)
    new, changed = tables.update_text(PAGE, "page.md", str(tmp_path))
    assert changed == ["semi24@testbox"]
    assert "stale" not in new
    assert new.startswith("# Page\n\nText before.\n\n<!-- table:semi24@testbox begin -->\n*Test CPU")
    assert new.endswith("|\n<!-- table:semi24@testbox end -->\n\nText after.\n")
    again, changed = tables.update_text(new, "page.md", str(tmp_path))
    assert again == new and changed == []


def test_a_changed_figure_changes_the_table(tmp_path):
    _write(tmp_path)
    before, _ = tables.update_text(PAGE, "page.md", str(tmp_path))
    _write(tmp_path, semi24=_semi24_rows(fp16_ms=(0.25, 5.0)))
    after, changed = tables.update_text(before, "page.md", str(tmp_path))
    assert changed == ["semi24@testbox"]
    assert "0.500 (4.00×)" in before and "0.500 (4.00×)" not in after
    assert "0.250 (8.00×)" in after


def test_check_mode_exit_codes(tmp_path, capsys):
    results = tmp_path / "results"
    _write(results)
    page = tmp_path / "page.md"
    page.write_text(PAGE, encoding="utf-8")
    assert tables.main(["--check", "--results", str(results), str(page)]) == 1
    assert "semi24@testbox" in capsys.readouterr().err
    assert page.read_text(encoding="utf-8") == PAGE  # --check changes nothing
    assert tables.main(["--results", str(results), str(page)]) == 0
    assert tables.main(["--check", "--results", str(results), str(page)]) == 0
    # a hand edit of a generated figure is drift
    page.write_text(page.read_text(encoding="utf-8").replace("0.500 (4.00×)", "0.400 (5.00×)"), encoding="utf-8")
    assert tables.main(["--check", "--results", str(results), str(page)]) == 1
    # a new measurement in the JSON is drift too
    tables.main(["--results", str(results), str(page)])
    _write(results, semi24=_semi24_rows(dense_ms=(3.0, 8.0)))
    assert tables.main(["--check", "--results", str(results), str(page)]) == 1


@pytest.mark.parametrize("text, message", [
    ("<!-- table:semi24@testbox begin -->\n", "has no end marker"),
    ("x\n<!-- table:semi24@testbox end -->\n", "without a begin marker"),
    ("<!-- table:semi24@testbox begin -->\n<!-- table:sparse@testbox end -->\n", "closes table 'semi24@testbox'"),
    ("<!-- table:semi24@testbox begin -->\n<!-- table:sparse@testbox begin -->\n", "begins inside table"),
    ("<!-- table:nosuchkind@testbox begin -->\n<!-- table:nosuchkind@testbox end -->\n",
     "unknown table kind 'nosuchkind'"),
    ("<!-- table:semi24 begin -->\n<!-- table:semi24 end -->\n", "names no results file"),
    ("<!-- table:semi24@nosuchfile begin -->\n<!-- table:semi24@nosuchfile end -->\n",
     "no results file .*nosuchfile.json"),
    ("<!-- table:kd@testbox begin -->\n<!-- table:kd@testbox end -->\n", "testbox.json has no 'kd' results"),
])
def test_bad_markers_and_names_give_clear_errors(tmp_path, text, message):
    _write(tmp_path)
    with pytest.raises(tables.TableError, match="page.md:[0-9]+: .*" + message):
        tables.update_text(text, "page.md", str(tmp_path))


def test_unknown_kind_lists_the_known_ones(tmp_path):
    _write(tmp_path)
    with pytest.raises(tables.TableError) as e:
        tables.render("nosuchkind@testbox", str(tmp_path))
    for kind in ("summary", "int8", "sparse", "kd", "onnx"):
        assert kind in str(e.value)


def test_error_exit_status_and_message(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("<!-- table:semi24@testbox begin -->\n", encoding="utf-8")
    assert tables.main(["--check", "--results", str(tmp_path), str(page)]) == 2
    assert "has no end marker" in capsys.readouterr().err


def test_markers_inside_code_fences_are_left_alone(tmp_path):
    _write(tmp_path)
    text = "```\n<!-- table:semi24@testbox begin -->\nexample\n<!-- table:semi24@testbox end -->\n```\n"
    new, changed = tables.update_text(text, "page.md", str(tmp_path))
    assert new == text and changed == []


def test_missing_row_names_case_and_impl(tmp_path):
    rows = [r for r in _semi24_rows() if not (r["M"] == 8 and r["impl"] == "dense fp32 nn.Linear")]
    _write(tmp_path, semi24=rows)
    with pytest.raises(tables.TableError, match="case 'K=64 N=32 M=8' and impl 'dense fp32 nn.Linear'"):
        tables.render("semi24@testbox", str(tmp_path))


def test_summary_links_are_relative_to_the_page(tmp_path):
    _write(tmp_path)
    assert "](docs/sparse.md)" in tables.render("summary@testbox", str(tmp_path), "")
    assert "](sparse.md)" in tables.render("summary@testbox", str(tmp_path), "docs")


# ---------------------------------------------------------------------------------------------
# the CNN pruning tables: the targets column and the prunability table's failures


def _cnn_prune_rows(ours_ms=(10.0, 4.0), tp_ms=(11.0, 4.5), rel=2e-7, ratio=0.26):
    rows = []
    for impl, runs, extra in (("dense", [20.0, 22.0, 21.0], {"param ratio": 1.0, "FLOP ratio": 1.0}),
                              ("pycompress 50% compact", [ours_ms[0]] * 3, {"param ratio": ratio, "FLOP ratio": 0.27,
                                                                            "rel err": rel}),
                              ("Torch-Pruning 50%", [tp_ms[0]] * 3, {"param ratio": ratio, "FLOP ratio": 0.27})):
        row = {"kernel": "cnn_prune", "case": "ResNet-18 B=8 224x224", "impl": impl, "ms": sorted(runs)[1],
               "ms_runs": runs, "params (M)": 11.7 * extra["param ratio"], "GFLOP": 29.0 * extra["FLOP ratio"],
               **extra}
        rows.append(row)
    core = {"dense": 12.0, "pycompress 50% compact": ours_ms[1], "Torch-Pruning 50%": tp_ms[1]}
    rows += [{**r, "impl": f"{r['impl']} {tables.PER_CORE}", "ms": core[r["impl"]], "ms_runs": None}
             for r in list(rows)]
    return rows


def _write_kernel(results_dir, kernel, rows, stem="testbox", **meta):
    data = {"meta": {"device": "Test CPU", "device_type": "cpu", "torch": "2.13.0+cpu", "cpu_isa": "avx2",
                     "threads": 2, "date": "2026-12-01T10:00:00+00:00", **meta},
            "kernels": {kernel: rows}, "kernel_dates": {kernel: "2026-12-01T10:05:00+00:00"},
            "kernel_load": {kernel: [0.5, 3.25]}}
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, stem + ".json"), "w") as f:
        json.dump(data, f)


def test_cnn_prune_table_judges_the_targets_on_both_timings(tmp_path):
    _write_kernel(tmp_path, "cnn_prune", _cnn_prune_rows())
    out = tables.render("cnn-prune@testbox", str(tmp_path))
    assert "load average 0.5 at the start, 3.2 at the end" in out
    # wall: 21 / 10 = 2.10x dense, 11 / 10 = 1.10x Torch-Pruning; 1 thread: 3.00x, 1.12x
    assert ("| pycompress 50% compact | 10.0 | 2.10× (2.00–2.20) | 1.10× (1.10–1.10) | 4.00 (3.00×, 1.12× TP) | 3.04 (0.260) "
            "| 7.83 (0.270) | 2.0e-07 | wall: 4/4; 1 thread: 4/4 |") in out
    assert "Torch-Pruning's" not in out.split("targets held")[1]  # no shape comparison recorded
    rows = _cnn_prune_rows(ours_ms=(15.0, 5.0), rel=3e-5, ratio=0.7)
    rows[1]["same shapes as Torch-Pruning"] = False
    _write_kernel(tmp_path, "cnn_prune", rows)
    out = tables.render("cnn-prune@testbox", str(tmp_path))
    assert ("wall: 0/4 (missed: rel. error ≤ 1e-5, params ≤ 0.6×, ≥ 1.6× dense, ≥ 1× Torch-Pruning); "
            "1 thread: 1/4 (missed: rel. error ≤ 1e-5, params ≤ 0.6×, ≥ 1× Torch-Pruning); "
            "layer shapes ≠ Torch-Pruning's |") in out


def test_zoo_prune_table_shows_failures_and_reasons(tmp_path):
    base = {"kernel": "zoo_prune", "batch": 8}
    rows = [{**base, "case": "Net-A", "impl": "dense", "model": "torchvision.a", "ms": 8.0},
            {**base, "case": "Net-A", "impl": "pycompress 50% compact", "model": "torchvision.a", "status": "ok",
             "ms": 4.0, "groups": 10, "groups_pruned": 8, "channels": 100, "channels_pruned": 40, "rel err": 1e-7,
             "param ratio": 0.3, "MAC ratio": 0.28, "kept_reasons": ["model input (×1)", "a | b (×2)"],
             "compact_reasons": []},
            {**base, "case": "Net-B", "impl": "pycompress 50% compact", "model": "timm.b", "status": "prune failed",
             "error": "ValueError: cannot trace"}]
    _write_kernel(tmp_path, "zoo_prune", rows, torchvision="0.29.1", timm="1.0.31")
    out = tables.render("zoo-prune@testbox", str(tmp_path))
    assert "torchvision 0.29.1, timm 1.0.31" in out and "batch 8" in out
    assert ("| Net-A (`torchvision.a`) | 8 / 10 groups, 40 / 100 channels | 1.0e-07 | 0.300 | 0.280 | 8.00 → 4.00 "
            "| 2.00× | model input (×1); a \\| b (×2) |") in out
    assert "| Net-B (`timm.b`) | **prune failed**: `ValueError: cannot trace` |" in out


def test_isa_int8_table_gives_each_code_path_against_torch_ao(tmp_path):
    rows = []
    for impl, isa, ms, cpu in (("torch.ao dynamic int8", None, 2.0, 3.0), ("pycompress w8a8 [avx512]", "avx512", 1.6, 2.5),
                               ("pycompress w8a8 [amx]", "amx", 0.5, 1.0)):
        rows.append({"kernel": "isa_int8", "case": "M=16 K=64 N=32", "M": 16, "K": 64, "N": 32, "impl": impl,
                     "isa": isa, "ms": ms, "ms_rounds_min": ms * 0.9, "ms_rounds_max": ms * 1.5,
                     "vs torch.ao": 2.0 / ms, "cpu_ms_1thread": cpu})
    _write_kernel(tmp_path, "isa_int8", rows, isas=["avx512", "amx"], rounds=9)
    out = tables.render("isa-int8@testbox", str(tmp_path))
    assert "median of 9 rounds" in out and "finished 2026-12-01 10:05 UTC" in out
    assert "| 64 × 32 | 16 | 2.00 [1.80–3.00] | 1.60 [1.44–2.40] | 1.25× / 1.20× | 0.500 [0.450–0.750] | 4.00× / 3.00× |" in out
    _write_kernel(tmp_path, "isa_int8", rows[1:], isas=["avx512", "amx"], rounds=9)
    with pytest.raises(tables.TableError, match="no 'torch.ao dynamic int8' row"):
        tables.render("isa-int8@testbox", str(tmp_path))


def test_zoo_quant_table_shows_conversions_and_failures(tmp_path):
    ok = {"kernel": "zoo_quant", "case": "Net-A", "impl": "pycompress w8a8", "status": "ok", "model": "torchvision.a",
          "converted": {"Int8Conv2d": 20, "Int8Linear": 1}, "skipped": {"head": "excluded"}, "int8_conv_macs": 0.975,
          "uint8_edges": 27, "residual_blocks": 8, "logit_cosine_mean": 0.999931, "logit_cosine_min": 0.99992,
          "worst_layer_cosine": 0.99642, "validate_passed": True, "save_load_exact": False}
    bad = {"kernel": "zoo_quant", "case": "Net-B", "impl": "pycompress w8a8", "status": "failed", "model": "timm.b",
           "error": "Traceback ...\nValueError: cannot trace"}
    _write_kernel(tmp_path, "zoo_quant", [ok, bad], torchvision="0.29.1", timm="1.0.31", mode="w8a8", batch=4)
    out = tables.render("zoo-quant@testbox", str(tmp_path))
    assert "torchvision 0.29.1, timm 1.0.31" in out and "on 4 other random" in out
    assert ("| Net-A (`torchvision.a`) | 20 Int8Conv2d, 1 Int8Linear; 1 left in float | 97.5 % | 27 | 8 "
            "| 0.99993 (0.99992) | 0.9964 | yes | **no** |") in out
    assert "| Net-B (`timm.b`) | **failed**: `ValueError: cannot trace` | – |" in out
