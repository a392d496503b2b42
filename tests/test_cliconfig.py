"""The one config system (hf_attn_swap/cliconfig.py) behind every command and recipe: unknown keys, typed overrides,
precedence, generated --help (fast, torch-free, every option listed), and early errors that load nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_attn_swap import cliconfig
from hf_attn_swap.cli import build_parser, main
from hf_attn_swap.cliconfig import ConfigError, config_fields, config_from_args, is_section
from hf_attn_swap.commands.convert import ConvertConfig
from hf_attn_swap.eval.config import EvalConfig, load_config
from hf_attn_swap.train.config import UptrainConfig

ROOT = Path(__file__).resolve().parents[1]


def flags_of(cls: type, prefix: str = "") -> list[str]:
    """Every option flag the CLI must list for ``cls`` (sections as dotted flags)."""
    out = []
    for f, tp in config_fields(cls):
        if is_section(tp):
            out += flags_of(tp, prefix + f.name + ".")
        else:
            out.append("--" + (prefix + f.name).replace("_", "-"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# unknown keys: refused with the closest valid name, from a file and from an override, in both configs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_unknown_key_in_a_file_is_refused_with_the_closest_name(tmp_path, suffix):
    up = tmp_path / f"up{suffix}"
    up.write_text(json.dumps({"kl_wieght": 2, "tokens": 100}))  # JSON is valid YAML too
    with pytest.raises(ConfigError, match=r"unknown key 'kl_wieght' \(did you mean 'kl_weight'\?\)"):
        UptrainConfig.load(up)
    ev = tmp_path / f"ev{suffix}"
    ev.write_text(json.dumps({"perplexity": {"contxt": 256}}))
    with pytest.raises(ConfigError, match=r"unknown key 'perplexity.contxt' \(did you mean 'perplexity.context'\?\)"):
        load_config(ev)


def test_unknown_key_in_an_override_is_refused_with_the_closest_name():
    with pytest.raises(ConfigError, match=r"did you mean 'kl_weight'"):
        UptrainConfig().override(["kl_wieght=2"])
    with pytest.raises(ConfigError, match=r"did you mean 'speed.decode_steps'"):
        load_config(None, ["speed.decode_step=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; allowed in the top level: model, variants"):
        load_config(None, ["zzz=1"])  # nothing close: no suggestion, the allowed keys


def test_cli_refuses_a_misspelt_key_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["uptrain", f"output_dir={out}", "kl_wieght=2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "did you mean 'kl_weight'" in err
    assert not out.exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------------------------------
# typed overrides: parsed by the field's type, not guessed
# ---------------------------------------------------------------------------------------------------------------------


def test_overrides_are_parsed_by_type():
    cfg = UptrainConfig().override(["lr=1e-4", "layerwise_lr=2", "tokens=null", "alpha=0.001", "progress=false",
                                    "variant_options={feature_map: hedgehog, window: 64}", "variant_options.window=32",
                                    "eval_corpus=none", "model=1e-4"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.layerwise_lr == 2.0 and isinstance(cfg.layerwise_lr, float)  # an int written for a float field
    assert cfg.tokens is None and cfg.progress is False and cfg.eval_corpus is None
    assert cfg.variant_options == {"feature_map": "hedgehog", "window": 32}
    assert cfg.model == "1e-4"  # a str field keeps the text: no YAML guessing
    ev = load_config(None, ["speed.prefill_lengths=[16,32]", "speed.decode_contexts=64", "passkey.depths=0,0.5",
                            "perplexity.stride=null", "plot=no", "variants=gqa:groups=1,strategy=fit,linear"])
    assert ev.speed.prefill_lengths == [16, 32] and ev.speed.decode_contexts == [64]
    assert ev.passkey.depths == [0.0, 0.5] and ev.perplexity.stride is None and ev.plot is False
    assert ev.variants == ["gqa:groups=1,strategy=fit", "linear"]


@pytest.mark.parametrize("item, message", [
    ("tokens=1.5", r"tokens must be int \| null, got '1.5'"),
    ("lr=fast", r"lr must be float, got 'fast'"),
    ("progress=maybe", r"progress must be bool \(true or false\), got 'maybe'"),
    ("lr=null", r"lr must be float, got 'null'"),
    ("lr=0", r"lr must be float > 0, got 0.0"),
    ("trainable=mlp", r"trainable must be one of all, attention, kv, feature_map, lora, got 'mlp'"),
    ("lr", r"override 'lr' is not key=value"),
])
def test_bad_override_values_say_what_is_allowed(item, message):
    with pytest.raises(ConfigError, match=message):
        UptrainConfig().override([item])


def test_yaml_1_1_floats_and_direct_construction_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nlayerwise_lr: 3\ntokens: 4096\n")  # YAML 1.1 reads 1e-4 as text
    cfg = UptrainConfig.load(path)
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and isinstance(cfg.layerwise_lr, float)
    with pytest.raises(ConfigError, match=r"speed.decode_contexts\[0\] must be int, got 'long'"):
        EvalConfig(speed={"decode_contexts": ["long"]})
    with pytest.raises(ConfigError, match="calib_tokens must be int >= 1, got 0"):
        ConvertConfig(calib_tokens=0)


def test_precedence_defaults_file_flags_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-3\ntokens: 5000\nseed: 7\nthreads: 2\n")
    argv = ["uptrain", "--config", str(path), "--lr", "2e-3", "--tokens", "6000", "tokens=7000"]
    args = build_parser().parse_args(argv)
    cfg = config_from_args(UptrainConfig, args)
    assert cfg.seed == 7 and cfg.threads == 2  # file over defaults
    assert cfg.lr == 2e-3  # flag over file
    assert cfg.tokens == 7000  # trailing override over flag
    assert cfg.kl_weight == UptrainConfig().kl_weight  # untouched default
    args = build_parser().parse_args(["eval", "--context", "128", "--speed.threads", "2", "--threads", "3",
                                      "--no-passkey", "--perplexity.max_tokens", "256"])
    ev = config_from_args(EvalConfig, args, ["eval_threads=3", "speed.threads=3", "passkey.enabled=false"])
    assert ev.perplexity.context == 128 and ev.perplexity.max_tokens == 256  # short alias, underscore spelling
    assert ev.speed.threads == 2 and ev.eval_threads == 3  # the specific flag beats --threads
    assert ev.passkey.enabled is False


def test_saved_configs_load_back(tmp_path):
    """What a run writes (uptrain_result.json's config, eval's run.json config, --print-config) loads again."""
    cfg = UptrainConfig().override(["lr=1e-4", "plan={'0-1': [linear, {feature_map: hedgehog}]}"])
    assert UptrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    ev = load_config(ROOT / "recipes" / "configs" / "eval_long_context.yaml")
    (tmp_path / "run.json").write_text(json.dumps({"config": ev.to_dict()}))
    assert EvalConfig.from_dict(json.loads((tmp_path / "run.json").read_text())["config"]) == ev
    (tmp_path / "printed.yaml").write_text(cliconfig.dump_yaml(ev))
    assert load_config(tmp_path / "printed.yaml") == ev


def _committed_run_configs() -> list[Path]:
    """Results files that carry a run's whole config (top-level ``config`` mapping, or ``meta.config``)."""
    def has_config(data) -> bool:
        return isinstance(data, dict) and (isinstance(data.get("config"), dict)
                                           or isinstance((data.get("meta") or {}).get("config"), dict))

    return [p for p in sorted((ROOT / "results").rglob("*.json")) if has_config(json.loads(p.read_text()))]


@pytest.mark.parametrize("path", _committed_run_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_run_configs_still_load(path):
    """Configs saved by earlier runs (results/*.json, results/*/run.json) load under the strict loader."""
    data = json.loads(path.read_text())
    config = data["config"] if "config" in data else data["meta"]["config"]
    if "kl_weight" in config:
        cls = UptrainConfig
    elif "num_heads" in config and "corpora" in config:
        from hf_attn_swap.train.pretrain import PretrainConfig as cls
    elif "kv_heads" in config and "alphas" in config:  # recipes/gqa_paper.py's own config
        import importlib.util

        spec = importlib.util.spec_from_file_location("_gqa_paper", ROOT / "recipes" / "gqa_paper.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
        spec.loader.exec_module(module)
        cls = module.GqaPaperConfig
    else:
        cls = EvalConfig
    loaded = cls.from_dict(config) if hasattr(cls, "from_dict") else cliconfig.from_dict(cls, config)
    assert cliconfig.to_dict(loaded).keys() >= config.keys()


def test_missing_or_broken_config_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        UptrainConfig.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


# ---------------------------------------------------------------------------------------------------------------------
# --help: fast because torch and transformers are never imported, and complete
# ---------------------------------------------------------------------------------------------------------------------


def _help(*argv: str) -> tuple[str, set[str]]:
    """Run ``python -X importtime -m hf_attn_swap.cli ARGV --help`` and return its stdout and the imported modules."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hf_attn_swap.cli", *argv, "--help"],
                          capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "COLUMNS": "300"})  # one line per option: phrases are not wrapped
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc.stdout, modules


@pytest.mark.parametrize("command", [[], ["uptrain"], ["eval"], ["convert"], ["variants"]],
                         ids=lambda c: c[0] if c else "top")
def test_help_imports_neither_torch_nor_transformers(command):
    out, modules = _help(*command)
    assert "hf_attn_swap.cli" in modules or "hf_attn_swap.commands" in modules  # importtime did record our imports
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "transformers", "accelerate", "numpy")}
    assert not heavy, sorted(heavy)[:5]
    assert "examples:\n" in out and "hf-attn-swap" in out.split("examples:\n")[1]  # examples in every help


def test_help_lists_every_option_with_type_and_default():
    out, _ = _help("uptrain")
    for flag in flags_of(UptrainConfig):
        assert flag + " " in out, flag
    assert "--lr float" in out and "default: 5e-05" in out and "one of: all, attention, kv, feature_map, lora" in out
    out, _ = _help("eval")
    for flag in flags_of(EvalConfig):
        assert flag + " " in out, flag
    assert "--perplexity.context int, --context int" in out and "default: error; one of: error, skip" in out
    out, _ = _help("convert")
    assert all(flag + " " in out for flag in flags_of(ConvertConfig))
    assert "--threads int|null" in out and "default: 1" in out


@pytest.mark.parametrize("recipe, cls", [("eval_ppl_speed.py", EvalConfig), ("uptrain.py", UptrainConfig)])
def test_recipes_share_the_config_and_its_help(recipe, cls):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "recipes" / recipe), "--help"],
                          capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "COLUMNS": "300", "PYTHONPATH": str(ROOT)})  # this checkout's package
    assert all(flag + " " in proc.stdout for flag in flags_of(cls))
    assert not [line for line in proc.stderr.splitlines() if line.rstrip().endswith(("| torch", "| transformers"))]


# ---------------------------------------------------------------------------------------------------------------------
# early errors and the variants listing
# ---------------------------------------------------------------------------------------------------------------------


def test_eval_unknown_variant_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import hf_attn_swap.zoo as zoo

    def no_loading(*a, **k):
        raise AssertionError("the model loader must not run for a bad variant list")

    monkeypatch.setattr(zoo, "load_model", no_loading)
    out = tmp_path / "eval"
    rc = main(["eval", "--variants", "nonsense", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "variant 'nonsense' is not registered (registered: flash, gqa, linear, mqa" in err
    assert "missing=skip" in err  # the explicit opt-in is named
    assert not out.exists()
    # the opt-in still records and goes on: it gets as far as loading the model
    with pytest.raises(AssertionError, match="must not run"):
        main(["eval", "--variants", "nonsense", "--missing", "skip", "--out", str(out)])


def test_variants_lists_types_defaults_and_allowed_values(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    assert "strategy (str, default \"mean\"; one of: mean, first, random, fit, align, refit)" in out
    assert "window (int, default 4096): visible tokens including the current one" in out
    assert "kernel (str, default \"auto\"; one of: auto, torch, fla)" in out
    assert main(["variants", "--name", "flash", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == ["flash"] and table["flash"]["options"][0]["allowed"][0] == "auto"
    assert main(["variants", "--name", "nope"]) == 2


def test_docstring_attributes_feed_the_help():
    @dataclasses.dataclass
    class Opts:
        """Options.

        Attributes:
            alpha: first line
                continued here.
            beta: ``literal`` text.
        """

        alpha: int = 1
        beta: str = "x"

    assert cliconfig.docstring_attributes(Opts) == {"alpha": "first line continued here.", "beta": "``literal`` text."}
    assert cliconfig.help_of(Opts, dataclasses.fields(Opts)[1]) == "literal text."
