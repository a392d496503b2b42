"""README.md and results/*.md quote their JSON exactly, and every API name the README uses exists."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from hf_attn_swap import readme

ROOT = Path(__file__).resolve().parents[1]
RESULT_JSONS = {
    "results/eval_default/results.json", "results/eval_default/run.json", "results/gqa_strategies.json",
    "results/variants.json", "results/uptrain_smollm2_mqa.json", "results/uptrain_smollm2_hybrid.json",
    "results/uptrain_smollm2_hedgehog.json",
}


def _blocks(path: Path) -> list[re.Match[str]]:
    return list(readme.BLOCK.finditer(path.read_text()))


GENERATED_MD = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "results").rglob("*.md")
                      if "<!-- generated:" in p.read_text())


@pytest.mark.parametrize("name", ["README.md", *GENERATED_MD])
def test_generated_parts_equal_their_json(name):
    path = ROOT / name
    text = path.read_text()
    assert readme.render(text, path.parent, ROOT) == text, f"{name} is stale: run python -m hf_attn_swap.readme"


def test_readme_quotes_every_results_file_through_markers():
    """The README's tables and figures are generated, not typed: each results JSON feeds at least one marker, and
    the headline table is one of them (removing the markers would make the check above vacuous)."""
    used = {str((ROOT / m["json"]).resolve().relative_to(ROOT)) for m in _blocks(ROOT / "README.md")}
    assert RESULT_JSONS <= used
    table = next(m for m in _blocks(ROOT / "README.md") if m["what"] == "eval_summary")
    assert table["body"].count("\n| ") >= 7  # header + 6 variants at least
    # the numbers the issue found copied wrongly by hand are now the JSON's
    records = json.loads((ROOT / "results/eval_default/results.json").read_text())
    linear = next(r for r in records if r["variant"] == "linear")
    assert f"| {linear['perplexity']:,.0f} |" in table["body"]
    hybrid_md = (ROOT / "results/uptrain_smollm2_hybrid.md").read_text()
    hedgehog = json.loads((ROOT / "results/uptrain_smollm2_hedgehog.json").read_text())
    assert f"<!-- generated: uptrain_smollm2_hedgehog.json = domains.sotu.end_to_end |.0f -->" \
           f"{hedgehog['domains']['sotu']['end_to_end']:.0f}<!-- end generated -->" in hybrid_md


def test_check_fails_with_a_diff_on_a_hand_edited_number(tmp_path, capsys):
    rows = [{"name": "a", "ppl": 12.345}, {"name": "b", "ppl": 2721.24}]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    good = "ppl <!-- generated: r.json = rows[name=b].ppl |,.0f -->2,721<!-- end generated --> here\n"
    md = tmp_path / "doc.md"
    md.write_text(good)
    assert readme.main(["--check", str(md), "--root", str(tmp_path)]) == 0
    md.write_text(good.replace("2,721", "2,722"))
    assert readme.main(["--check", str(md), "--root", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "-ppl <!-- generated: r.json = rows[name=b].ppl |,.0f -->2,722" in out.out
    assert "+ppl <!-- generated: r.json = rows[name=b].ppl |,.0f -->2,721" in out.out
    assert "2,722" in md.read_text()  # --check changes nothing
    assert readme.main([str(md), "--root", str(tmp_path)]) == 0
    assert md.read_text() == good


def test_block_renderer_rewrites_only_between_markers(tmp_path):
    data = {"command": "python x.py", "ppl_original": 40.0, "ppl_converted": 160.0, "ppl_uptrained": 80.0,
            "recovery": 0.5, "tokens": 10, "seconds": 3.0,
            "curve": [{"stage": "converted", "ppl": 160.0, "tokens": 0, "seconds": 1.0},
                      {"stage": "end_to_end", "ppl": 80.0, "tokens": 10, "seconds": 3.0}]}
    (tmp_path / "u.json").write_text(json.dumps(data))
    text = "# Title\n<!-- generated: u.json uptrain_table -->\nstale\n<!-- end generated -->\nmy prose: 1.5x\n"
    new = readme.render(text, tmp_path, tmp_path)
    assert new.startswith("# Title\n<!-- generated: u.json uptrain_table -->\n`python x.py`\n")
    assert new.endswith("<!-- end generated -->\nmy prose: 1.5x\n")
    assert "| end_to_end | 80.00 | 0.500 | 10 | 3 |" in new  # ln(160/80) / ln(160/40) = 0.5 of the gap
    assert readme.render(new, tmp_path, tmp_path) == new  # idempotent


def test_pick_paths():
    data = {"a": [{"k": 1, "s": "x", "v": 10}, {"k": 2, "s": "x", "v": 20}, {"k": 2, "s": "y", "v": 30}]}
    assert readme.pick(data, "a[1].v") == 20
    assert readme.pick(data, "a[k=2].v") == 20
    assert readme.pick(data, "a[k=2,s=y].v") == 30
    assert readme.pick([{"variant": "linear", "p": 3}], "[variant=linear].p") == 3
    # a numeric key of a mapping (JSON object keys are strings: per-layer tables)
    assert readme.pick({"layers": {"12": {"held_out": 0.25}}}, "layers[12].held_out") == 0.25
    with pytest.raises(readme.GeneratedError, match="matches nothing"):
        readme.pick({"layers": {"12": 1}}, "layers[4]")


@pytest.mark.parametrize("marker, says", [
    ("<!-- generated: r.json = rows[name=zz].ppl |.1f -->1<!-- end generated -->", "matches nothing"),
    ("<!-- generated: r.json = rows[0].ppl |.1q -->1<!-- end generated -->", "cannot format"),
    ("<!-- generated: missing.json = x |.1f -->1<!-- end generated -->", "does not exist"),
    ("<!-- generated: r.json no_such_renderer -->\n1\n<!-- end generated -->", "unknown renderer"),
])
def test_bad_marker_is_one_clear_line_and_leaves_the_file(tmp_path, capsys, marker, says):
    (tmp_path / "r.json").write_text(json.dumps({"rows": [{"name": "a", "ppl": 1.0}]}))
    md = tmp_path / "doc.md"
    md.write_text(f"x {marker} y\n")
    before = md.read_bytes()
    assert readme.main([str(md), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert md.read_bytes() == before


# ------------------------------------------------------------------------------------------------------------------
# API names in the README
# ------------------------------------------------------------------------------------------------------------------

_DOTTED = re.compile(r"(?<![\w/.])hf_attn_swap(?:\.[A-Za-z_]\w*)+")
_FROM_IMPORT = re.compile(r"from (hf_attn_swap(?:\.\w+)*) import ([\w, ]+)")
_FILE_SUFFIXES = {"json", "py", "c", "md", "yaml"}  # hf_attn_swap.json is the sidecar file, not an attribute


def api_names(text: str) -> set[str]:
    """Every ``hf_attn_swap.x.y`` and ``from hf_attn_swap.x import y`` the text names."""
    names = {m.group(0) for m in _DOTTED.finditer(text) if m.group(0).rsplit(".", 1)[1] not in _FILE_SUFFIXES}
    for module, imported in _FROM_IMPORT.findall(text):
        names |= {f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()}
    return names


def unresolved(names: set[str]) -> list[str]:
    """Names that are neither an importable module nor an attribute of one."""
    bad = []
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                bad.append(name)
            break
        else:
            bad.append(name)
    return bad


def test_every_api_name_in_the_readme_resolves():
    names = api_names((ROOT / "README.md").read_text())
    assert {"hf_attn_swap.checkpoint.load_swapped", "hf_attn_swap.swap_attention", "hf_attn_swap.zoo.load_model",
            "hf_attn_swap.train.uptrain"} <= names  # the scan sees prose, code blocks and imports
    assert unresolved(names) == []


def test_the_name_check_catches_a_missing_name():
    text = "use `hf_attn_swap.from_pretrained`, or:\nfrom hf_attn_swap.checkpoint import load_swapped, nope\n"
    assert unresolved(api_names(text)) == ["hf_attn_swap.checkpoint.nope", "hf_attn_swap.from_pretrained"]
