"""Cached teacher top-k logits for distillation: same loss as the live teacher, reuse, mismatch, GA."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from datasets import Dataset
from transformers import TrainingArguments, default_data_collator

import optipfair_train.heal.teacher_cache as teacher_cache_module
from optipfair_train.heal import (
    DistillationTrainer,
    TeacherCacheMismatch,
    add_example_ids,
    build_teacher_cache,
    distillation_loss,
    teacher_fingerprint,
    topk_distillation_loss,
)

VOCAB = 104


def _dataset(n: int = 8, seq_len: int = 16, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(4, VOCAB, (n, seq_len), generator=g).tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len] * n, "labels": rows})


def _args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: a GA scaling error must show in the update
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        use_cpu=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def _batch(dataset: Dataset, rows: list[int]) -> dict[str, torch.Tensor]:
    return default_data_collator([dataset[i] for i in rows])


def _top(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, ...]:
    top = teacher.topk(k, dim=-1)
    return top.values, top.indices, torch.logsumexp(teacher / temperature, dim=-1)


def test_topk_loss_with_k_equal_to_vocabulary_is_the_full_loss():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 3] = -100
    full = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.7)
    top = topk_distillation_loss(student, *_top(teacher, 7, 2.0), labels, temperature=2.0, alpha=0.7)
    torch.testing.assert_close(top, full)


def test_a_student_equal_to_its_teacher_has_zero_topk_divergence():
    """With the tail bucket the divergence is 0 at student == teacher for any k; without it (the teacher
    renormalised over its top-k) it was not, and minimising it crushed every token outside the top-k."""
    logits = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(1)) * 3
    labels = torch.zeros(2, 6, dtype=torch.long)
    for k in (1, 5, 20):
        loss = topk_distillation_loss(logits, *_top(logits, k, 2.0), labels, temperature=2.0, alpha=1.0)
        torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-5, rtol=0)
    # and a student that moves mass from the tail onto the top-k is penalised
    sharper = logits.clone()
    top5 = logits.topk(5, dim=-1).indices
    sharper.scatter_add_(-1, top5, torch.full_like(top5, 4.0, dtype=logits.dtype))
    assert topk_distillation_loss(sharper, *_top(logits, 5, 2.0), labels, temperature=2.0, alpha=1.0) > 0.1


def test_topk_loss_by_hand():
    # one labelled position, vocabulary 4, k=2, T=1, alpha=1: teacher logits (2, 1, 0, 0), student uniform.
    # Outcomes: token 0, token 1, tail (tokens 2 and 3): p = (e^2, e, 2) / Z, q = (1/4, 1/4, 1/2).
    student = torch.zeros(1, 2, 4)
    teacher = torch.tensor([[[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 2]])
    e = torch.tensor(1.0).exp()
    p = torch.stack([e**2, e, torch.tensor(2.0)]) / (e**2 + e + 2)
    q = torch.tensor([0.25, 0.25, 0.5])
    expected = (p * (p.log() - q.log())).sum()
    loss = topk_distillation_loss(student, *_top(teacher, 2, 1.0), labels, temperature=1.0, alpha=1.0)
    torch.testing.assert_close(loss, expected)


def test_cached_loss_equals_online_topk_loss(tmp_path):
    teacher, student = make_tiny_model(seed=0), make_tiny_model(seed=1)
    dataset = add_example_ids(_dataset())
    exact = build_teacher_cache(teacher, dataset, tmp_path / "c32", k=8, value_dtype=torch.float32)
    half = build_teacher_cache(teacher, dataset, tmp_path / "c16", k=8, show_progress=False)
    assert exact.values.shape == (8, 16, 8) and half.values.dtype == torch.float16
    assert half.indices.dtype == torch.int32 and half.bytes_per_token == 8 * 6 + 4 + 4
    batch = _batch(dataset, [5, 2, 7, 0])  # shuffled order: the lookup follows example_id
    online = DistillationTrainer(
        model=student, teacher=teacher, top_k=8, args=_args(tmp_path), train_dataset=dataset
    )
    expected = online.compute_loss(student, dict(batch))
    for cache, tolerance in ((exact, 1e-6), (half, 2e-3)):
        cached = DistillationTrainer(model=student, teacher_cache=cache, args=_args(tmp_path), train_dataset=dataset)
        torch.testing.assert_close(cached.compute_loss(student, dict(batch)), expected, rtol=tolerance, atol=tolerance)
    full = DistillationTrainer(model=student, teacher=teacher, args=_args(tmp_path), train_dataset=dataset)
    assert not torch.isclose(full.compute_loss(student, dict(batch)), expected)  # top-8 of 104 is not the full KL


def test_cache_is_reused_after_a_restart_and_rebuilt_for_other_inputs(tmp_path, monkeypatch):
    teacher = make_tiny_model(seed=0)
    dataset = add_example_ids(_dataset())
    first = build_teacher_cache(teacher, dataset, tmp_path, k=8)
    calls = []
    original = teacher_cache_module._teacher_topk
    monkeypatch.setattr(
        teacher_cache_module, "_teacher_topk", lambda *a, **kw: calls.append(a[2]) or original(*a, **kw)
    )
    again = build_teacher_cache(make_tiny_model(seed=0), dataset, tmp_path, k=8)  # same teacher, new object
    assert calls == [] and torch.equal(again.values, first.values) and torch.equal(again.indices, first.indices)
    build_teacher_cache(teacher, dataset, tmp_path, k=4)
    build_teacher_cache(teacher, _dataset(seed=1), tmp_path, k=8)
    build_teacher_cache(make_tiny_model(seed=2), dataset, tmp_path, k=8)
    assert calls == [4, 8, 8]
    assert len(list(tmp_path.glob("topk-*.safetensors"))) == 4 and not list(tmp_path.glob("*.tmp"))


def test_mismatched_cache_is_refused(tmp_path):
    teacher = make_tiny_model(seed=0)
    dataset = add_example_ids(_dataset())
    cache = build_teacher_cache(teacher, dataset, tmp_path, k=8)
    other = add_example_ids(_dataset(seed=1))
    with pytest.raises(TeacherCacheMismatch, match="differ from the ones the teacher cache was built"):
        cache.lookup(torch.tensor([0, 1]), torch.tensor(other["input_ids"][:2]))
    with pytest.raises(TeacherCacheMismatch, match="outside the cache's 8 blocks"):
        cache.lookup(torch.tensor([8]), torch.tensor(dataset["input_ids"][:1]))
    with pytest.raises(TeacherCacheMismatch, match="built for teacher"):
        cache.check(fingerprint=teacher_fingerprint(make_tiny_model(seed=3)))
    cache.check(fingerprint=teacher_fingerprint(teacher), k=8)
    with pytest.raises(TeacherCacheMismatch, match="top-8 logits, not top-4"):
        cache.check(k=4)
    with pytest.raises(ValueError, match="top_k=4 but the teacher cache holds top-8"):
        DistillationTrainer(model=teacher, teacher_cache=cache, top_k=4, args=_args(tmp_path))
    with pytest.raises(ValueError, match="exactly one of teacher= or teacher_cache="):
        DistillationTrainer(model=teacher, args=_args(tmp_path))
    student = make_tiny_model(seed=1)
    trainer = DistillationTrainer(model=student, teacher_cache=cache, args=_args(tmp_path), train_dataset=other)
    with pytest.raises(KeyError, match="add_example_ids"):
        trainer.compute_loss(student, {k: v for k, v in _batch(other, [0]).items() if k != "example_id"})
    with pytest.raises(ValueError, match="k must be a positive integer"):
        build_teacher_cache(teacher, dataset, tmp_path, k=0)


def _train_one_step(tmp_path, cache, dataset, **args) -> dict[str, torch.Tensor]:
    student = make_tiny_model(seed=1).train()
    trainer = DistillationTrainer(
        model=student, teacher_cache=cache, args=_args(tmp_path, **args), train_dataset=dataset
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_cached_training_with_shuffling_and_gradient_accumulation(tmp_path):
    teacher = make_tiny_model(seed=0)
    dataset = add_example_ids(_dataset())
    cache = build_teacher_cache(teacher, dataset, tmp_path / "cache", k=8)
    before = make_tiny_model(seed=1).state_dict()
    # remove_unused_columns=True (the default) would drop example_id; the trainer keeps it
    whole = _train_one_step(tmp_path, cache, dataset, per_device_train_batch_size=4)
    accumulated = _train_one_step(
        tmp_path, cache, dataset, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(whole[name], before[name])  # the step moved the weights
    for key in whole:  # same 4 examples, same update: the loss is divided by GA exactly once
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-5)
