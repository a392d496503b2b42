"""``uptrain`` under ``accelerate launch`` with 2 CPU processes (gloo) on a tiny random llama with SmolLM2's tokenizer.

The per-layer stage split across processes by layer must give exactly the weights of a 1-process run; only the main
process writes; an output folder holding another run is refused on every process before any work; the end-to-end
stage runs data-parallel, finishes, writes once and resumes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama

from hf_attn_swap.checkpoint import load_swapped
from hf_attn_swap.train import UptrainConfig, layerwise_transfer, uptrain

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random llama (4 layers, so each of 2 processes owns 2) saved with SmolLM2's real tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny4"), layers=4)


def config(base: Path, out: Path, **kw) -> UptrainConfig:
    # threads=1: both runs reduce in the same order, so "equal to a 1-process run" can mean bit-equal.
    opts = dict(model=str(base), variant="mqa", variant_options={"strategy": "fit"}, conversion_tokens=256,
                corpus="shakespeare", eval_windows=1, eval_context=64, layerwise_tokens=512, layerwise_steps=5,
                layerwise_rows=2, block_size=64, tokens=0, batch_size=2, lr=1e-3, save_steps=2, logging_steps=1,
                output_dir=str(out), progress=False, threads=1)
    opts.update(kw)
    return UptrainConfig(**opts)


def _free_port() -> int:
    with socket.socket() as s:  # helpers and CI jobs run side by side: never the default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: UptrainConfig, tmp_path: Path, *extra: str, processes: int = 2) -> tuple[subprocess.CompletedProcess,
                                                                                         dict[int, list]]:
    """``accelerate launch`` the CLI's uptrain on ``cfg``; returns the run and each rank's writes."""
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.json"
    cfg.save(path)
    log = tmp_path / f"writes-{path.stem}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DIST_TEST_OUT=cfg.output_dir,
               DIST_TEST_LOG=str(log))
    # --multi_gpu, not --cpu: accelerate's --cpu launcher starts one process (several need mpirun); --multi_gpu starts
    # them through torch.distributed.run, and on a machine without CUDA uptrain forms a gloo group on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(WORKER), "uptrain", "--config", str(path), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    writes = {int(p.stem[4:]): json.loads(p.read_text()) for p in log.glob("rank*.json")}
    return proc, writes


def only_trainer_folders(events: list, out: Path) -> bool:
    """No file written, renamed or removed: the one thing a non-main process does under the run folder is the HF
    Trainer's ``os.makedirs(checkpoint-N, exist_ok=True)`` before the main process saves into it (transformers does
    that on every process, for the backends where every process saves a shard)."""
    return all(ev == "os.mkdir" and Path(p).parent == out and Path(p).name.startswith("checkpoint-")
               for ev, p in events)


def test_layer_seeding_makes_a_layer_independent_of_the_others_trained(base):
    """The property the split rests on: training layer 2 alone gives the weights it gets among all four."""
    from hf_attn_swap import swap_attention
    from hf_attn_swap.api import attention_sites
    from hf_attn_swap.zoo import load_model

    teacher, _ = load_model(str(base))
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    students = []
    for layers in (None, [2]):
        s = load_model(str(base))[0]
        swap_attention(s, "mqa", strategy="mean")
        r = layerwise_transfer(s, teacher, ids, layers=layers, steps=3, batch_rows=2, seed=7)
        students.append((s, r))
    (every, r_all), (alone, r_one) = students
    for (name, a), b in zip(attention_sites(every)[2].module.state_dict().items(),
                            attention_sites(alone)[2].module.state_dict().values()):
        assert torch.equal(a, b), name
    assert [s.mse_after for s in r_all.layers if s.layer == 2] == [r_one.layers[0].mse_after]
    # and training did something, so the equality above is not two untouched copies
    assert r_one.layers[0].mse_after < r_one.layers[0].mse_before


@pytest.mark.parametrize("model_type,spec", [
    ("llama", {"0": ["linear", {"feature_map": "hedgehog", "window": 4}], "1": ["mqa", {"strategy": "fit"}]}),
    ("gpt2", {"0-": ["gqa", {"groups": 2, "strategy": "fit"}]}),
])
def test_other_processes_rebuild_the_main_process_conversion_exactly(model_type, spec):
    """What a non-main process does with the broadcast (swap record, state dict): the same model as the main
    process's calibrated conversion, for a per-layer plan with learned feature maps and for a sidecar-only family."""
    import copy

    from hf_attn_swap import swap_attention
    from hf_attn_swap.api import swap_record
    from hf_attn_swap.train.stages import rebuild_swap

    from tiny_models import output, tiny

    main = tiny(model_type)
    other = copy.deepcopy(main)
    calib = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    swap_attention(main, {k: tuple(v) for k, v in spec.items()}, calibration=calib)
    rebuild_swap(other, swap_record(main).to_dict(), main.state_dict())
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(output(other, ids), output(main, ids), rtol=0, atol=0)
    assert swap_record(other).to_dict() == swap_record(main).to_dict()


@pytest.mark.parametrize("trainable", ["attention", "block"])
def test_per_layer_stage_on_two_processes_equals_one_process_and_only_rank0_writes(base, tmp_path, trainable):
    """Also for whole decoder layers (trainable "block"), whose MLPs and norms the processes must exchange too."""
    two = tmp_path / "two"
    # a mean-pooled start leaves every layer something to win back in 5 steps (fit is already near the optimum)
    cfg = config(base, two, variant_options={"strategy": "mean"}, layerwise_trainable=trainable)
    proc, writes = launch(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((two / "uptrain_result.json").read_text())
    assert saved["processes"] == 2
    # each rank trained only its layers (layer i -> rank i % 2), and every layer was trained
    assert [(s["layer"], s["rank"]) for s in saved["layerwise"]["layers"]] == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert all(s["mse_after"] < s["mse_before"] for s in saved["layerwise"]["layers"])
    # one writer: rank 1 made no write under the run folder; rank 0 wrote the model and the result
    assert set(writes) == {0, 1} and writes[1] == []
    assert proc.stdout.count('"ppl_uptrained"') == 1  # one summary printed, by the main process
    assert any(p.endswith("uptrain_result.json") for _, p in writes[0])
    assert any("final" in p for _, p in writes[0])

    one = uptrain(config(base, tmp_path / "one", variant_options={"strategy": "mean"},  # the same stage in one process
                         layerwise_trainable=trainable))
    got = load_swapped(two / "final").state_dict()
    want = one.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs between 1 and 2 processes"
    mine = json.loads((tmp_path / "one" / "uptrain_result.json").read_text())
    assert mine["processes"] == 1 and {s["rank"] for s in mine["layerwise"]["layers"]} == {0}
    assert [s["mse_after"] for s in mine["layerwise"]["layers"]] == [s["mse_after"] for s in saved["layerwise"]["layers"]]
    assert mine["ppl_converted"] == saved["ppl_converted"]  # one conversion, broadcast: the same converted model


def test_output_folder_check_in_one_process(base, tmp_path):
    """The same rule without a launcher (hf_attn_swap.outputs' run rule): refused before the model is loaded, the folder
    unchanged; --resume or overwrite pass."""
    from hf_attn_swap.train.stages import RunContext

    out = tmp_path / "taken"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(ValueError, match=r"holds a previous run \(checkpoint-4/\): pass --resume"):
        uptrain(config(base, out, model=str(tmp_path / "no-such-model")))  # would fail later if it got that far
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    RunContext(out, resume=True).check_output_dir()
    RunContext(out).check_output_dir(overwrite=True)
    RunContext(tmp_path / "fresh").check_output_dir()


def test_output_folder_with_another_run_is_refused_on_every_process_before_any_work(base, tmp_path):
    out = tmp_path / "taken"
    (out / "final").mkdir(parents=True)
    (out / "uptrain_result.json").write_text('{"ppl_uptrained": 50.0}\n')
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    proc, writes = launch(config(base, out), tmp_path)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "holds a previous run" in ln]
    assert len(lines) == 2, proc.stderr[-3000:]  # one line from each process
    assert all(ln.startswith("hf-attn-swap uptrain: error:") and "--resume" in ln for ln in lines)
    assert "Traceback" not in "\n".join(ln for ln in proc.stderr.splitlines() if "hf-attn-swap" in ln)
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert writes == {0: [], 1: []}


def test_a_conversion_failing_on_the_main_process_stops_every_process(base, tmp_path):
    """The conversion runs on the main process only: when it fails there, the other process must not wait forever
    for the broadcast; both stop with one line and nothing is written."""
    out = tmp_path / "never"
    proc, writes = launch(config(base, out, conversion_tokens=0), tmp_path)  # fit without calibration text
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hf-attn-swap uptrain: error:")]
    assert len(lines) == 2 and all("needs calibration text" in ln for ln in lines), proc.stderr[-3000:]
    assert sum("conversion failed on the main process" in ln for ln in lines) == 1  # what the other process says
    assert not out.exists() and writes == {0: [], 1: []}


def test_end_to_end_on_two_processes_finishes_writes_once_and_resumes(base, tmp_path):
    out = tmp_path / "e2e"
    # 16 blocks of 64 tokens, 2 per process per step: 4 data-parallel steps, checkpoints at 2 and 4.
    cfg = config(base, out, layerwise_tokens=256, layerwise_steps=2, tokens=1024, eval_windows=1)
    proc, writes = launch(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "uptrain_result.json").read_text())
    assert [c["stage"] for c in saved["curve"]] == ["converted", "layerwise", "end_to_end"]
    steps = [e["step"] for e in saved["train_log"] if "loss" in e]
    assert steps == [1, 2, 3, 4]  # 1024 tokens / (2 processes x 2 rows x 64): data-parallel, not repeated
    assert {"stage1", "final", "checkpoint-2", "checkpoint-4", "uptrain_result.json"} <= {p.name for p in out.iterdir()}
    assert only_trainer_folders(writes[1], out) and writes[0]
    assert any("checkpoint-4" in p for _, p in writes[0]) and any("stage1" in p for _, p in writes[0])

    first = load_swapped(out / "final").state_dict()
    proc, writes = launch(cfg, tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert only_trainer_folders(writes[1], out)
    again = json.loads((out / "uptrain_result.json").read_text())
    assert [c["stage"] for c in again["curve"]] == ["end_to_end"]  # stage 1 reloaded, nothing retrained
    assert again["ppl_converted"] == saved["ppl_converted"]
    resumed = load_swapped(out / "final").state_dict()
    for name, t in first.items():
        torch.testing.assert_close(resumed[name], t, rtol=0, atol=1e-6)


def test_fsdp_configs_are_accelerate_configs():
    """recipes/configs/fsdp_*.yaml load with accelerate's own loader as FSDP2, and start with their launch command."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    configs = sorted((ROOT / "recipes" / "configs").glob("fsdp_*.yaml"))
    assert configs
    for path in configs:
        cfg = ClusterConfig.from_yaml_file(str(path))
        assert cfg.distributed_type == DistributedType.FSDP and cfg.fsdp_config["fsdp_version"] == 2, path.name
        first = path.read_text().splitlines()[0]
        assert f"--config_file recipes/configs/{path.name} recipes/uptrain.py" in first, path.name
