"""Recipes in python/ run end to end in a reduced smoke mode."""
from _recipes import load


def test_lr_stability_smoke(tmp_path, capsys):
    mod = load("lr_stability")
    png = tmp_path / "lr.png"
    assert mod.main(["--n", "12", "--r", "3", "--steps", "150", "--lrs", "0.01,0.5", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Stiefel-AdamW" in out and "div" in out  # Euclidean GD diverges at lr 0.5
    # Stiefel methods stay bounded at the large learning rate
    row = [line for line in out.splitlines() if line.strip().startswith("0.5 |")][0]
    cells = [c.strip() for c in row.split("|")[1:]]
    assert cells[0] == "div" and cells[1] != "div" and cells[3] != "div"
    assert png.exists() and png.stat().st_size > 1000
