import random

import numpy as np
import torch

from fscompile.augment import OPS, augment_text, build_transfer_set
from fscompile.config import DEFAULT_STEPS, DistillConfig
from fscompile.data import Example
from fscompile.distill import (
    EpochSampler,
    attention_loss,
    distill,
    hidden_loss,
    kd_loss,
    set_dropout,
    text_steps,
)
from fscompile.models.text import derive_student, load_teacher, parse_layers, prune_ffn

SHOTS = [Example("the film was wonderful and warm", 1), Example("a dull and tedious film", 0),
         Example("great value and fast delivery", 1), Example("the parcel arrived late and crushed", 0)]


def test_kd_loss_zero_iff_equal():
    t = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    assert kd_loss(t, t, 2.0).abs() < 1e-6
    assert kd_loss(torch.zeros_like(t), t, 2.0) > 1e-3


def test_hidden_and_attention_losses_ignore_padding():
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = h.clone()
    noisy[0, 3:] += 10.0  # changes only on padded positions
    assert hidden_loss(noisy, h, mask) < 1e-6
    assert hidden_loss(h + 1.0, h, mask) > 0.1
    a = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    assert attention_loss(a, a, mask).abs() < 1e-6
    assert attention_loss(torch.softmax(torch.randn(2, 2, 5, 5), -1), a, mask) > 0


def test_augmentations_are_seeded_and_change_text():
    for op in OPS:
        a = augment_text("one two three four five six seven", "alpha beta gamma", op, random.Random(3), "[MASK]")
        b = augment_text("one two three four five six seven", "alpha beta gamma", op, random.Random(3), "[MASK]")
        assert a == b and a.strip()
    assert "[MASK]" in augment_text("one two three", "", "mask", random.Random(0), "[MASK]")


def test_nearest_words_follow_the_embedding_table(tiny_teacher):
    from fscompile.augment import Lexicon, nearest_words, vocabulary_words

    teacher = load_teacher(str(tiny_teacher))
    tok = teacher.tokenizer
    words = vocabulary_words(tok)
    a, b = words[0], words[1]
    table = torch.randn(len(tok), 16)
    table[tok.convert_tokens_to_ids(b)] = 3 * table[tok.convert_tokens_to_ids(a)]  # same direction: cosine 1
    near = nearest_words(tok, table, {a.upper() + ",", "notaword123"}, words, k=3)
    assert list(near) == [a] and near[a][0] == b and a not in near[a] and len(near[a]) == 3
    out = augment_text(f"the {a} one", "", "near", random.Random(0), "[MASK]", Lexicon(words, near))
    assert out.split()[1] in near[a]
    # without neighbours for any word, "near" leaves the text as it is
    assert augment_text("xyz qqq", "", "near", random.Random(0), "[MASK]", Lexicon(words, near)) == "xyz qqq"


def test_transfer_set_contents():
    ts = build_transfer_set(SHOTS, per_shot=3, seed=0, mask_token="[MASK]", unlabeled=["raw text"])
    assert len(ts) == 4 + 12 + 1 and ts.origin.count("shot") == 4 and ts.origin[-1] == "unlabeled"
    assert ts.texts[:4] == [s.text for s in SHOTS]
    # raw text longer than the shots is cut to a contiguous window as long as the longest; shorter stays whole
    long = " ".join(f"w{i}" for i in range(200))
    ts = build_transfer_set(SHOTS, per_shot=0, seed=0, mask_token="[MASK]", unlabeled=[long] * 20 + ["a b"])
    cut = ts.texts[len(SHOTS):-1]
    assert {len(t.split()) for t in cut} == {6} and all(f" {t} " in f" {long} " for t in cut)
    assert len(set(cut)) > 1 and ts.texts[-1] == "a b"  # windows start at random places


def test_unlabeled_hold_out_for_early_stopping():
    from fscompile.augment import TransferSet
    from fscompile.tasks.text import hold_out_unlabeled

    pool = [f"raw text {i}" for i in range(40)]
    ts = build_transfer_set(SHOTS, per_shot=2, seed=0, mask_token="[MASK]", unlabeled=pool)
    train, held = hold_out_unlabeled(ts, seed=0)
    # a quarter of the pool, never a shot or a variant, and never trained on
    assert len(held) == 10 and set(held.origin) == {"unlabeled"} and held.pairs is None
    assert len(train) == len(ts) - 10 and not set(train.texts) & set(held.texts)
    assert sorted(train.texts + held.texts) == sorted(ts.texts) and train.origin.count("shot") == 4
    assert hold_out_unlabeled(ts, seed=0)[1].texts == held.texts  # seeded
    assert len(hold_out_unlabeled(ts, seed=0, size=6)[1]) == 6
    assert hold_out_unlabeled(ts, seed=0, size=0) == (ts, None)
    shots_only = build_transfer_set(SHOTS, per_shot=2, seed=0, mask_token="[MASK]")
    assert hold_out_unlabeled(shots_only, seed=0) == (shots_only, None)
    # pairs stay aligned with their texts
    paired = TransferSet(["a", "b", "c", "d", "e"], ["A", "B", "C", "D", "E"], ["shot"] + ["unlabeled"] * 4)
    train, held = hold_out_unlabeled(paired, seed=1)
    assert len(held) == 1 and held.pairs == [held.texts[0].upper()]
    assert [t.upper() for t in train.texts] == train.pairs


def test_parse_layers():
    assert parse_layers("every-other", 6) == [1, 3, 5]
    assert parse_layers(None, 6) == [1, 3, 5]
    assert parse_layers("2", 6) == 2
    assert parse_layers("0,2,4", 6) == [0, 2, 4]


def test_student_copies_teacher_layers(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher))
    student, keep = derive_student(teacher, "0,3")
    assert keep == [0, 3] and len(student.layers()) == 2 and student.config.num_hidden_layers == 2
    for s_layer, t_idx in zip(student.layers(), keep):
        for (_, a), (_, b) in zip(s_layer.named_parameters(), teacher.layers()[t_idx].named_parameters()):
            assert torch.equal(a, b)
    assert len(teacher.layers()) == 4  # the teacher itself is untouched


def test_prune_ffn_shrinks_matrices(tiny_teacher):
    student, _ = derive_student(load_teacher(str(tiny_teacher)), "every-other")
    info = prune_ffn(student, 0.25)
    assert info["ffn_channels_after"] == 2 * 48
    assert student.layers()[0].intermediate.dense.weight.shape == (48, 32)
    x = student.encode(["great film"])
    assert student.module(**x).logits.shape == (1, 2)


def test_prune_heads_shrinks_attention_and_survives_save_export_and_fusion(tiny_teacher, tmp_path):
    """Whole heads go (2 -> 1 per block): Q/K/V lose the head's rows, the output projection its
    columns; the pruned model reloads from disk, and ORT's fused attention (told the new head
    count) computes what PyTorch does."""
    import numpy as np

    from fscompile.backends.onnxruntime import OrtRunner, fuse
    from fscompile.models.text import load_torch, prune_heads

    student, _ = derive_student(load_teacher(str(tiny_teacher)), "every-other")
    x = student.encode(["great film", "a dull and tedious mess of a movie"])
    info = prune_heads(student, 0.5)
    assert info == {"heads_before": 4, "heads_after": 2}
    att = student.layers()[0].attention
    assert att.self.query.weight.shape == (16, 32) and att.output.dense.weight.shape == (32, 16)
    assert student.attention_geometry() == (1, 16)
    with torch.no_grad():
        ref = student.module(**x).logits
    student.save_torch(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(load_torch(tmp_path / "s").module(**x).logits, ref)
    student.export_onnx(tmp_path / "raw.onnx")
    fused = fuse(tmp_path / "raw.onnx", tmp_path / "fused.onnx", student)
    assert fused.get("Attention") == 2
    got = OrtRunner(tmp_path / "fused.onnx")({k: v.numpy() for k, v in x.items()})
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)


def test_distillation_moves_student_towards_teacher(tiny_headless):
    teacher = load_teacher(str(tiny_headless), ["negative", "positive"])
    torch.manual_seed(0)
    with torch.no_grad():  # a large random head: an opinionated, input-dependent teacher
        teacher.module.head.weight.copy_(torch.randn_like(teacher.module.head.weight) * 20)
    student, keep = derive_student(teacher, [3])
    with torch.no_grad():  # random tiny layers barely act: perturb the student so there is a gap
        for p in student.layers().parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ts = build_transfer_set(SHOTS, per_shot=4, seed=0, mask_token="[MASK]")
    x = student.encode(ts.texts)

    def gap():
        with torch.no_grad():
            return kd_loss(student.module(**x).logits, teacher.module(**x).logits, 1.0).item()

    before = gap()
    assert before > 1e-3
    stats = distill(teacher, student, ts, keep, DistillConfig(steps=60, lr=1e-3, batch_size=8), seed=0)
    assert stats.steps == 60 and stats.layer_map == [(0, 3)]
    assert gap() < before * 0.5


def test_text_steps_follow_the_inputs_length():
    assert text_steps([20] * 50) == DEFAULT_STEPS  # short inputs: the plan's 1000
    assert text_steps([96] * 50) == DEFAULT_STEPS // 2  # twice 48 tokens: half the steps
    assert text_steps([512] * 50) == 300  # never below the floor
    assert DistillConfig().resolved(text_steps([96])).steps == 500
    assert DistillConfig(steps=7).resolved(text_steps([96])).steps == 7  # --steps wins
    assert DistillConfig().resolved().steps == DEFAULT_STEPS


def test_distillation_is_deterministic(tiny_teacher):
    def once():
        teacher = load_teacher(str(tiny_teacher))
        student, keep = derive_student(teacher, [2])
        ts = build_transfer_set(SHOTS, per_shot=2, seed=0, mask_token="[MASK]")
        distill(teacher, student, ts, keep, DistillConfig(steps=5, batch_size=4), seed=3)
        return student.layers()[0].attention.self.query.weight.detach().clone()

    assert torch.equal(once(), once())


def test_length_grouped_sampler_covers_each_epoch_and_pads_less():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=1000).tolist()
    grouped = EpochSampler(1000, 16, np.random.default_rng(1), lengths, window=10)
    plain = EpochSampler(1000, 16, np.random.default_rng(1))

    def padded(sampler, n):
        return sum(max(lengths[i] for i in b) * len(b) for b in (sampler.next() for _ in range(n)))

    epoch = [grouped.next() for _ in range(63)]  # 1000 = 62 batches of 16 + one of 8
    seen = sorted(i for b in epoch for i in b)
    assert seen == list(range(1000)) and all(len(b) <= 16 for b in epoch)
    assert padded(grouped, 200) < 0.7 * padded(plain, 200)
    # batches are not in length order: the order of the epoch stays random
    maxima = [max(lengths[i] for i in b) for b in epoch]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    again = EpochSampler(1000, 16, np.random.default_rng(1), lengths, window=10)
    assert [again.next() for _ in range(63)] == epoch


def test_distillation_without_dropout_restores_rates(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher))
    student, keep = derive_student(teacher, [2])
    rates = set_dropout(student.module, None)
    assert rates and any(r > 0 for r in rates)
    ts = build_transfer_set(SHOTS, per_shot=2, seed=0, mask_token="[MASK]")
    stats = distill(teacher, student, ts, keep, DistillConfig(steps=3, batch_size=4, dropout=False, evals=0), seed=0)
    assert stats.steps == 3 and set_dropout(student.module, None) == rates  # the saved model keeps its rates


def test_factorized_embeddings_roundtrip(tiny_teacher, tmp_path):
    from fscompile.models.text import (
        FactorizedEmbedding,
        factorize_embeddings,
        load_torch,
        save_torch,
    )

    student, _ = derive_student(load_teacher(str(tiny_teacher)), [1, 3])
    full = student.module.base.get_input_embeddings().weight.detach().clone()
    info = factorize_embeddings(student, 28)  # most of the energy of a 32-wide embedding
    emb = student.module.base.get_input_embeddings()
    assert isinstance(emb, FactorizedEmbedding) and info["parameters_after"] < info["parameters_before"]
    approx = emb.up(emb.low.weight).detach()
    assert (approx - full).norm() < 0.35 * full.norm() and info["energy_kept"] > 0.9
    save_torch(student, tmp_path / "s")
    again = load_torch(tmp_path / "s")
    x = student.encode(["great film", "a dull film"])
    with torch.no_grad():
        assert torch.allclose(again.module(**x).logits, student.module(**x).logits, atol=1e-6)


def test_select_layers_by_measured_effect(tiny_teacher):
    from fscompile.models.text import select_layers

    teacher = load_teacher(str(tiny_teacher))
    with torch.no_grad():  # make layer 1 decisive: the selection must keep it
        teacher.layers()[1].output.dense.weight.mul_(200.0)
    probe = teacher.encode([s.text for s in SHOTS] * 4)
    keep, trace = select_layers(teacher, 2, probe)
    assert len(keep) == 2 and 1 in keep and len(trace) == 2
    assert all(t["dropped"] != 1 for t in trace)


def test_learning_rate_default_rises_with_unlabeled_text():
    from fscompile.config import DistillConfig
    from fscompile.distill import text_lr

    assert text_lr(DistillConfig()) == 5e-5
    assert text_lr(DistillConfig(unlabeled="pool.txt")) == 2e-4
    assert text_lr(DistillConfig(unlabeled="pool.txt", lr=1e-5)) == 1e-5  # an explicit --lr wins
