"""The evidence scripts (python/lr_stability.py, bench/retraction_ablation.py) run end to end in
their smallest mode, write outputs that parse, and mark diverged runs."""
import json
import math

from _recipes import load, load_bench


def _table_rows(md: str) -> list[list[str]]:
    """Body rows of the first markdown table in ``md`` (header and rule dropped)."""
    lines = md.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[first + 2:end]]


def test_lr_stability_summary_marks_divergence():
    mod = load("lr_stability")
    ok = mod.summarize([3.0, 2.8, 2.6, 2.5, 2.4, 2.3], smooth=2, start=3.0)
    assert not ok["diverged"] and ok["reason"] == ""
    assert math.isclose(ok["best"], 2.35, rel_tol=1e-12)  # min of the 2-step running mean
    nan = mod.summarize([3.0, 2.5, 2.0, math.nan], smooth=2, start=3.0)
    assert nan["diverged"] and nan["reason"] == "nan" and math.isclose(nan["best"], 2.25, rel_tol=1e-12)
    inf = mod.summarize([3.0, math.inf], smooth=2, start=3.0)
    assert inf["diverged"] and inf["reason"] == "nan" and inf["best"] == 3.0
    up = mod.summarize([3.0, 2.0, 4.0, 5.0, 6.0], smooth=2, start=3.0)  # dipped, then ends above start
    assert up["diverged"] and up["reason"] == "above start" and up["best"] == 2.5
    first = mod.summarize([math.nan], smooth=2, start=3.0)
    assert first["diverged"] and math.isnan(first["best"])
    # the table marks the diverged ones
    rows = []
    for lr, s in ((1e-3, ok), (1.0, nan)):
        s.update(method="adamw", lr=lr, smooth=2, blowup=3.0, planned=6)
        rows.append(s)
    table = mod.markdown_table(rows, ["adamw"], [1e-3, 1.0])
    body = _table_rows(table)
    assert [r[0] for r in body] == ["0.001", "1"]
    assert "×" not in body[0][1] and body[1][1].startswith("× div (NaN")


def test_lr_stability_smoke(tmp_path):
    mod = load("lr_stability")
    assert mod.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    png, md, js = (tmp_path / f"lr_stability.{ext}" for ext in ("png", "md", "json"))
    assert png.exists() and png.stat().st_size > 1000
    data = json.loads(js.read_text())
    methods, lrs = data["methods"], data["lrs"]
    assert lrs == [1e-3, 1.0] and "adamw" in methods and "stiefel-adamw-polar" in methods
    assert len(data["results"]) == len(methods) * len(lrs)
    for r in data["results"]:
        assert r["method"] in methods and r["lr"] in lrs and len(r["losses"]) >= 1
        assert isinstance(r["diverged"], bool)
    text = md.read_text()
    assert text.startswith("# Learning rate vs best training loss") and "Command: `" in text
    body = _table_rows(text)
    assert len(body) == len(lrs) and all(len(row) == 1 + len(methods) for row in body)
    for row in body:
        for cell in row[1:]:
            assert cell.startswith("× div") or math.isfinite(float(cell))


def test_retraction_ablation_smoke(tmp_path):
    mod = load_bench("retraction_ablation")
    assert mod.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    for suffix in ("_time.png", "_error.png"):
        assert (tmp_path / f"retraction_ablation{suffix}").stat().st_size > 1000
    report = json.loads((tmp_path / "retraction_ablation.json").read_text())
    ns, rs = report["ns"], report["rs"]
    rows = report["rows"]
    assert len(rows) == len(ns) * len(rs) * len(mod.RETRACTIONS) * len(mod.FORMS)
    for row in rows:
        assert row["time_s"] > 0
        for err in row["err"].values():
            assert math.isfinite(err)
        if row["form"] == "gram":  # the optimizer's step: orthonormal to 1e-5 in float32 (tests/README.md)
            assert max(row["err"].values()) <= 1e-5, row
    md = (tmp_path / "retraction_ablation.md").read_text()
    assert "Command: `python bench/retraction_ablation.py --smoke" in md
    body = _table_rows(md)  # first table: times at the first (dtype, r)
    assert len(body) == len(mod.RETRACTIONS) * len(mod.FORMS)
    assert all(len(r) == 2 + len(ns) and float(r[2]) > 0 for r in body)
