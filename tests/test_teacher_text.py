"""Teacher-written healing text: sampled from the teacher, its top-k logits are the distillation cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import optipfair_train.heal.teacher_text as teacher_text_module
from optipfair_train.heal import build_teacher_cache, sample_teacher_text
from optipfair_train.heal.teacher_cache import TeacherCache

SPECIAL = {0, 1, 2, 3}


def _teacher() -> torch.nn.Module:
    return make_tiny_model("llama", seed=3).eval()


def test_blocks_have_the_asked_shape_never_start_special_and_repeat_with_the_seed(tmp_path):
    teacher = _teacher()
    a = sample_teacher_text(teacher, tmp_path / "a", 6, 10, k=8, special_ids=SPECIAL, seed=5, batch_size=4)
    b = sample_teacher_text(teacher, tmp_path / "b", 6, 10, k=8, special_ids=SPECIAL, seed=5, batch_size=4)
    c = sample_teacher_text(teacher, tmp_path / "c", 6, 10, k=8, special_ids=SPECIAL, seed=6, batch_size=4)
    assert a.shape == (6, 10)
    assert not set(a[:, 0].tolist()) & SPECIAL
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_tokens_follow_the_teacher_distribution():
    """A teacher whose next token is certain (logit of id 7 raised by 1e4) makes every sampled token after
    the first a 7: the sampler draws from the teacher's distribution."""
    teacher = _teacher()
    certain = torch.nn.functional.one_hot(torch.tensor(7), teacher.config.vocab_size).float() * 1e4
    teacher.lm_head.register_forward_hook(lambda module, args, out: out + certain)
    ids = teacher_text_module._sample_batch(teacher, torch.tensor([4, 5]), 6, 3, torch.Generator().manual_seed(0))[0]
    assert ids[:, 0].tolist() == [4, 5]
    assert ids[:, 1:].eq(7).all()


def test_recorded_logits_equal_a_teacher_pass_and_build_teacher_cache_reuses_them(tmp_path, monkeypatch):
    teacher = _teacher()
    tokens = sample_teacher_text(teacher, tmp_path, 5, 12, k=8, special_ids=SPECIAL, seed=1, batch_size=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith("topk-") for name in files) and any(name.startswith("text-") for name in files)
    with torch.no_grad():
        logits = teacher(input_ids=tokens.long()).logits.float()
    full = logits.topk(8, dim=-1)

    def no_teacher_pass(*args, **kwargs):
        raise AssertionError("build_teacher_cache ran the teacher although the sampled cache was there")

    monkeypatch.setattr("optipfair_train.heal.teacher_cache._teacher_topk", no_teacher_pass)
    cache = build_teacher_cache(teacher, tokens, tmp_path, k=8)
    assert isinstance(cache, TeacherCache)
    assert torch.equal(cache.tokens, tokens)
    torch.testing.assert_close(cache.values.float(), full.values, atol=2e-2, rtol=1e-3)
    assert torch.equal(cache.indices.long(), full.indices)
    torch.testing.assert_close(cache.log_normaliser, torch.logsumexp(logits / 2.0, dim=-1), atol=1e-4, rtol=1e-5)


def test_a_second_call_reads_the_text_instead_of_sampling(tmp_path, monkeypatch):
    teacher = _teacher()
    first = sample_teacher_text(teacher, tmp_path, 4, 8, k=4, special_ids=SPECIAL, seed=2)
    monkeypatch.setattr(teacher_text_module, "_sample_batch", lambda *a, **k: pytest.fail("sampled again"))
    assert torch.equal(sample_teacher_text(teacher, tmp_path, 4, 8, k=4, special_ids=SPECIAL, seed=2), first)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_sequences=0, seq_len=8), "num_sequences"),
        (dict(num_sequences=2, seq_len=1), "seq_len"),
        (dict(num_sequences=2, seq_len=8, k=0), "k must be"),
    ],
)
def test_bad_sizes_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_teacher_text(_teacher(), tmp_path, **kwargs)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
