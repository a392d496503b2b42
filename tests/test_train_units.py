"""Uptraining on tiny random llamas: objectives, trainable selection, layerwise transfer, Trainer loss and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_attn_swap import attention_sites, swap_attention
from hf_attn_swap.train import (
    BlockDataset,
    UptrainConfig,
    UptrainTrainer,
    attention_mse,
    capture_attention_outputs,
    check_teacher,
    distill_kl,
    layerwise_transfer,
    select_trainable,
    trainable_names,
)
from hf_attn_swap.train.trainer import collate

torch.set_num_threads(2)


def tiny(seed: int = 0, vocab: int = 96, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def data(n: int = 16, length: int = 32, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A learnable pattern (repeating ramps) so that the loss can fall quickly.
    start = torch.randint(0, vocab, (n, 1), generator=g)
    return (start + torch.arange(length)) % vocab


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, num_train_epochs=1,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                remove_unused_columns=False, disable_tqdm=True, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


# ---------------------------------------------------------------- objectives
def test_distill_kl_zero_for_identical_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert distill_kl(a, a).item() == pytest.approx(0.0, abs=1e-6)  # fp32
    assert distill_kl(a + torch.randn_like(a), a).item() > 1e-3
    assert distill_kl(a, a, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_check_teacher_rejects_other_vocabulary():
    with pytest.raises(ValueError, match="different vocabularies"):
        check_teacher(tiny(vocab=96), tiny(vocab=128))


# ---------------------------------------------------------------- trainable selection
@pytest.mark.parametrize("which", ["all", "attention", "kv", "lora"])
def test_each_trainable_choice_freezes_what_it_says(which):
    model = select_trainable(tiny(), which)
    names = trainable_names(model)
    assert names
    if which == "all":
        assert len(names) == len(list(model.parameters()))
    elif which == "attention":
        assert all(".self_attn." in n for n in names)
        assert {n.split(".self_attn.")[1].split(".")[0] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    elif which == "kv":
        assert all(n.endswith(("k_proj.weight", "v_proj.weight")) for n in names)
        assert len(names) == 2 * 2  # two layers
    else:
        assert all("lora_" in n for n in names)
        assert any("q_proj" in n for n in names) and any("o_proj" in n for n in names)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_unknown_trainable_lists_the_options():
    with pytest.raises(ValueError, match="allowed: all, attention, kv, feature_map, lora"):
        select_trainable(tiny(), "mlp")


class FrozenLinear(torch.nn.Module):
    """A projection whose weight is a buffer: nothing in it can be trained."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        UptrainConfig(tokens=0, layerwise_tokens=0)
    teacher = tiny()
    student = copy.deepcopy(teacher)
    for site in attention_sites(student):
        site.module.k_proj = FrozenLinear(site.module.k_proj)
        site.module.v_proj = FrozenLinear(site.module.v_proj)
    with pytest.raises(ValueError, match="nothing to train"):
        select_trainable(student, "kv")
    with pytest.raises(ValueError, match="nothing to train"):
        layerwise_transfer(student, teacher, data(4, 16), trainable="kv", steps=1, batch_rows=2)


# ---------------------------------------------------------------- config
def test_config_round_trip_and_validation(tmp_path):
    cfg = UptrainConfig(lr=3e-4, trainable="kv", tokens=2048)
    for name in ("c.json", "c.yaml"):
        cfg.save(tmp_path / name)
        assert UptrainConfig.load(tmp_path / name) == cfg
    assert cfg.override(["lr=1e-3", "tokens=null", "alpha=0.001"]).budget_tokens() == 2_000_000_000
    with pytest.raises(ValueError, match="trainable must be one of all, attention, kv, feature_map, lora, got .everything."):
        UptrainConfig(trainable="everything")
    with pytest.raises(ValueError, match="either as tokens or as alpha"):
        UptrainConfig(tokens=10, alpha=0.1)
    with pytest.raises(ValueError, match="pretrain_tokens"):
        UptrainConfig(model="/some/dir", tokens=None, alpha=0.01).budget_tokens()
    with pytest.raises(ValueError, match="unknown key 'learning_rate'.*allowed in the top level: model, variant"):
        cfg.override(["learning_rate=1"])
    with pytest.raises(ValueError, match=r"unknown key 'kl_wieght' \(did you mean 'kl_weight'\?\)"):
        UptrainConfig.from_dict({"kl_wieght": 2.0})


# ---------------------------------------------------------------- layerwise attention transfer
def test_layerwise_transfer_lowers_attention_mse():
    teacher = tiny()
    student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    ids = data(8, 32)
    res = layerwise_transfer(student, teacher, ids, steps=40, lr=1e-2, batch_rows=4)
    assert len(res.layers) == 2
    for s in res.layers:
        assert s.rel_before > 1e-3
        assert s.mse_after < 0.5 * s.mse_before, s
    # Only the attention modules changed.
    for (n, a), b in zip(student.named_parameters(), teacher.parameters()):
        if ".self_attn." not in n:
            assert torch.equal(a, b), n


def test_capture_keeps_exactly_what_the_teacher_modules_saw_and_said():
    """The preallocated capture holds, batch after batch, each attention module's input and output as the teacher
    computed them (compared with a plain hook that keeps every batch and concatenates)."""
    from hf_attn_swap.train.layerwise import capture_teacher

    teacher = tiny(layers=3)
    batches = list(data(6, 16).split(2))
    seen = {i: ([], []) for i in (0, 2)}

    def keep(i):
        def hook(_m, _args, kwargs, out):  # returns None: the output goes on unchanged
            seen[i][0].append(kwargs["hidden_states"].clone())
            seen[i][1].append(out[0].clone())
        return hook

    handles = [attention_sites(teacher)[i].module.register_forward_hook(keep(i), with_kwargs=True) for i in seen]
    try:
        xs, ys = capture_teacher(teacher, batches, [0, 2])
    finally:
        for h in handles:
            h.remove()
    for j, i in enumerate(seen):
        assert xs[j].shape == (6, 16, 32) and xs[j].dtype == torch.float32
        assert torch.equal(xs[j], torch.cat(seen[i][0])) and torch.equal(ys[j], torch.cat(seen[i][1]))
    assert not torch.equal(ys[0], ys[1])


def test_layerwise_refuses_a_capture_larger_than_free_memory_before_the_teacher_runs(monkeypatch):
    from hf_attn_swap import preflight
    from hf_attn_swap.train.layerwise import capture_bytes

    teacher = tiny()
    student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ids = data(8, 32)
    need = capture_bytes(8 * 32, 32, 2)  # 2 layers' inputs and outputs, float32
    assert need == 8 * 32 * 32 * 4 * 4
    monkeypatch.setattr(preflight, "available_bytes", lambda device: need)  # 90% of it is allowed: not enough
    ran = []
    teacher.register_forward_hook(lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=r"GiB of teacher activations \(256 tokens x 32 features x 2 layers.*"
                                         r"lower layerwise_tokens to at most 230\b"):
        layerwise_transfer(student, teacher, ids, steps=2, batch_rows=4)
    assert not ran
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 2 * need)
    assert layerwise_transfer(student, teacher, ids, steps=2, batch_rows=4).layers


def test_layerwise_blocks_train_whole_decoder_layers_to_the_teachers_change_of_the_residual_stream():
    """trainable="block": each decoder layer (attention, MLP, norms) learns what the teacher layer adds to its input;
    the error it reports is that of a real forward of the layer, the embeddings, final norm and teacher stay as they
    were, and a layer's MLP moves (the attention alone is trainable="attention")."""
    from hf_attn_swap.train.layerwise import layer_stack

    teacher = tiny()
    before = copy.deepcopy(teacher.state_dict())
    student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    ids = data(8, 32)
    res = layerwise_transfer(student, teacher, ids, steps=40, lr=1e-2, batch_rows=4, trainable="block")
    assert [s.layer for s in res.layers] == [0, 1] and res.tokens == 8 * 32
    for s in res.layers:
        assert s.rel_before > 1e-3 and s.mse_after < 0.5 * s.mse_before, s
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    for (n, a), b in zip(student.named_parameters(), teacher.parameters()):
        if not n.startswith("model.layers."):
            assert torch.equal(a, b), n
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    # the reported error after training: layer 1 fed the teacher's own input, against the teacher layer's output
    seen = {}

    def grab_in(_m, a, k):
        seen.setdefault("x", k.get("hidden_states", a[0] if a else None))
        seen.setdefault("kw", {n: v for n, v in k.items() if n != "hidden_states"})

    def grab_out(_m, a, k, out):
        seen.setdefault("y", out[0] if isinstance(out, tuple) else out)

    hooks = [teacher.model.layers[1].register_forward_pre_hook(grab_in, with_kwargs=True),
             teacher.model.layers[1].register_forward_hook(grab_out, with_kwargs=True)]
    with torch.no_grad():
        teacher(input_ids=ids[:4], use_cache=False)
        for h in hooks:
            h.remove()
        out = student.model.layers[1](seen["x"], **seen["kw"])  # same masks and RoPE tables: same shapes, positions
    out = out[0] if isinstance(out, tuple) else out
    assert float((out - seen["y"]).pow(2).mean()) == pytest.approx(res.layers[1].mse_after, rel=1e-4)
    assert len(layer_stack(student)) == 2
    with pytest.raises(ValueError, match="inputs='student' is not supported"):
        layerwise_transfer(student, teacher, ids, steps=1, batch_rows=4, trainable="block", inputs="student")
    with pytest.raises(ValueError, match="layerwise_inputs='teacher'"):
        UptrainConfig(layerwise_trainable="block", layerwise_inputs="student")


def test_layerwise_on_student_inputs_trains_layer_0_as_before_and_later_layers_on_the_students_own_states():
    """inputs="student": layer 0 sees what it saw before (nothing precedes it), so it trains to the same weights; the
    inputs of layer 1 are what a whole forward of the student (layer 0 already trained) feeds its attention."""
    from hf_attn_swap.train.layerwise import _StudentStack

    teacher = tiny()
    ids = data(8, 32)
    a = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    b = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    layerwise_transfer(a, teacher, ids, steps=5, lr=1e-2, batch_rows=4)
    res = layerwise_transfer(b, teacher, ids, steps=5, lr=1e-2, batch_rows=4, inputs="student")
    sa, sb = attention_sites(a), attention_sites(b)
    assert all(torch.equal(x, y) for x, y in zip(sa[0].module.parameters(), sb[0].module.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(sa[1].module.parameters(), sb[1].module.parameters()))
    assert [s.layer for s in res.layers] == [0, 1]
    # the stack's inputs for layer 1 == a whole-model forward's, on the student as it is now
    seen = []
    h = sb[1].module.register_forward_pre_hook(lambda m, a_, k: seen.append(k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        b(input_ids=ids, use_cache=False)
    h.remove()
    stack = _StudentStack(b, sb, list(ids.split(4)), 1)
    torch.testing.assert_close(stack.inputs_of(1), seen[0].reshape(-1, *seen[0].shape[1:]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown layerwise inputs 'own'; allowed: teacher, student"):
        layerwise_transfer(b, teacher, ids, steps=1, batch_rows=4, inputs="own")


def test_layerwise_on_steps_sees_each_layer_at_the_start_every_k_steps_and_the_end():
    """The hook bench/layerwise_overfit.py draws its curves with: called under no_grad with the module being trained,
    and calling it changes nothing about the training."""
    teacher = tiny()
    ids = data(8, 32)
    seen = []

    def on_steps(layer, done, module):
        assert not torch.is_grad_enabled() and module is attention_sites(student)[layer].module
        seen.append((layer, done))

    plain = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    a = layerwise_transfer(plain, teacher, ids, steps=5, lr=1e-2, batch_rows=4)
    b = layerwise_transfer(student, teacher, ids, steps=5, lr=1e-2, batch_rows=4, on_steps=on_steps, on_steps_every=2)
    assert seen == [(0, 0), (0, 2), (0, 4), (0, 5), (1, 0), (1, 2), (1, 4), (1, 5)]
    assert [s.mse_after for s in a.layers] == [s.mse_after for s in b.layers]
    for x, y in zip(plain.parameters(), student.parameters()):
        assert torch.equal(x, y)


def test_attention_transfer_objective_lowers_attention_mse(tmp_path):
    teacher = tiny()
    student = select_trainable(swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean"), "attention")

    def mse() -> float:
        with torch.no_grad(), capture_attention_outputs(student) as s, capture_attention_outputs(teacher) as t:
            student(input_ids=data(8, 32)), teacher(input_ids=data(8, 32))
            return float(attention_mse(s, t))

    before = mse()
    tr = UptrainTrainer(model=student, args=args(tmp_path, max_steps=15, learning_rate=3e-3),
                        train_dataset=BlockDataset(data(16, 32)),
                        data_collator=collate, teacher=teacher, lm_weight=0.0, attn_weight=1.0)
    tr.train()
    assert mse() < 0.7 * before  # measured: 0.61 -> ~0.25


def test_variant_without_attention_output_is_a_clear_error():
    teacher = tiny()
    student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    site = attention_sites(student)[0].module
    site.forward = lambda *a, **k: (None, None)  # an attention that hands nothing on
    with pytest.raises(ValueError, match="no output tensor"):
        layerwise_transfer(student, teacher, data(4, 16), steps=1, batch_rows=2)


# ---------------------------------------------------------------- end-to-end Trainer
def test_loss_decreases_over_a_few_steps(tmp_path):
    model = select_trainable(tiny(), "all")
    tr = UptrainTrainer(model=model, args=args(tmp_path, max_steps=12), train_dataset=BlockDataset(data(48, 32)),
                        data_collator=collate, lm_weight=1.0)
    tr.train()
    losses = [e["loss"] for e in tr.state.log_history if "loss" in e]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert all("lm_loss" in e for e in tr.state.log_history if "loss" in e)


def test_distillation_loss_decreases(tmp_path):
    teacher = tiny()
    student = select_trainable(swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean"), "attention")
    tr = UptrainTrainer(model=student, args=args(tmp_path, max_steps=10, learning_rate=1e-3),
                        train_dataset=BlockDataset(data(40, 32)), data_collator=collate, teacher=teacher,
                        lm_weight=0.0, kl_weight=1.0)
    tr.train()
    kl = [e["kl_loss"] for e in tr.state.log_history if "kl_loss" in e]
    assert sum(kl[-3:]) / 3 < 0.7 * kl[0], kl  # measured: 4.2e-4 -> ~1.6e-4


def test_resume_continues_exactly(tmp_path):
    def run(out, steps_stop=None, resume=None):
        model = select_trainable(tiny(), "all")
        a = args(out, max_steps=8, save_strategy="steps", save_steps=4, learning_rate=5e-3)
        tr = UptrainTrainer(model=model, args=a, train_dataset=BlockDataset(data(48, 32)), data_collator=collate,
                            lm_weight=1.0)
        tr.train(resume_from_checkpoint=resume)
        return model, tr

    full, tr_full = run(tmp_path / "a")
    resumed, tr_res = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    assert tr_res.state.global_step == 8
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)  # fp32, same ops in the same order
    la = [e["loss"] for e in tr_full.state.log_history if "loss" in e][4:]
    lb = [e["loss"] for e in tr_res.state.log_history if "loss" in e][-4:]
    assert la == pytest.approx(lb, abs=1e-6)


def test_trainer_rejects_missing_teacher_and_zero_weights(tmp_path):
    with pytest.raises(ValueError, match="need a teacher"):
        UptrainTrainer(model=tiny(), args=args(tmp_path), train_dataset=BlockDataset(data()), kl_weight=1.0,
                       lm_weight=0.0)
    with pytest.raises(ValueError, match="weights are 0"):
        UptrainTrainer(model=tiny(), args=args(tmp_path), train_dataset=BlockDataset(data()), lm_weight=0.0)
    with pytest.raises(ValueError, match="different vocabularies"):
        UptrainTrainer(model=tiny(), args=args(tmp_path), train_dataset=BlockDataset(data()), teacher=tiny(vocab=128),
                       kl_weight=1.0)
    with pytest.raises(ValueError, match="empty or too short"):
        BlockDataset(torch.zeros(0, 32, dtype=torch.long))


def test_hedgehog_attention_transfer_trains_only_the_feature_maps():
    teacher = tiny()
    student = swap_attention(copy.deepcopy(teacher), "linear", feature_map="hedgehog")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = layerwise_transfer(student, teacher, data(8, 32), trainable="feature_map", steps=30, lr=1e-2, batch_rows=4)
    for s in res.layers:
        assert s.mse_after < s.mse_before, s
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("hf_attn_swap_feature_map" in n for n in changed), changed
