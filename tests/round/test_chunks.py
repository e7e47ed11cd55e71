"""Chunked messages' grouping (fl_merge/round/chunks.py): a model's tensors in its order, cut
into groups of at most chunk-mib MiB; a tensor larger than that is one line, before any
process starts (fl_merge/config/base_fit.py)."""

from __future__ import annotations

import pytest
import torch

from fl_merge.config.base_fit import check_fits_base
from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.round.chunks import (MIB, ChunkSizeError, ChunkTraffic, chunk_groups, chunk_limit,
                                   largest_tensor, reply_limit)


def layout(sizes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in sizes.items()}


# Bytes: a 40, b 24 (fp16), c 60, d 8, e 100, f 0 (an empty tensor), g 4 (int32 scalar).
MODEL = layout({"a": ((10,), torch.float32), "b": ((3, 4), torch.float16), "c": ((15,), torch.float32),
                "d": ((2,), torch.float32), "e": ((25,), torch.float32), "f": ((0,), torch.float32),
                "g": ((), torch.int32)})


def test_groups_fill_in_order_until_the_next_tensor_would_not_fit():
    # Packed by hand, limit 100: a+b = 64 (+c would be 124) | c+d = 68 (+e 168) | e+f+g = 104?
    # no: e+f = 100, +g 104 > 100 | g.
    assert chunk_groups(MODEL, 100) == [["a", "b"], ["c", "d"], ["e", "f"], ["g"]]
    # Limit 132: a+b+c = 124 (+d 132 fits exactly) | e+f+g = 104.
    assert chunk_groups(MODEL, 132) == [["a", "b", "c", "d"], ["e", "f", "g"]]
    assert chunk_groups(MODEL, 10**9) == [list(MODEL)]  # one group holds it all
    assert chunk_groups({}, 100) == []  # no tensors, no messages


def test_every_group_respects_the_limit_and_keeps_every_name_once_in_order():
    model = layout({f"t{i}": ((i % 7 + 1, 3), torch.float32) for i in range(40)})
    for limit in (84, 100, 250, 1000):
        groups = chunk_groups(model, limit)
        assert [k for g in groups for k in g] == list(model)
        assert all(sum(model[k].numel() * 4 for k in g) <= limit for g in groups)
        # greedy: no group could have taken the next group's first tensor
        for g, nxt in zip(groups, groups[1:]):
            assert sum(model[k].numel() * 4 for k in g) + model[nxt[0]].numel() * 4 > limit


def test_a_tensor_larger_than_the_limit_names_itself_its_size_and_the_smallest_chunk_mib():
    big = layout({"small": ((4,), torch.float32), "huge": ((300_000,), torch.float32),
                  "big": ((200_000,), torch.float32)})
    with pytest.raises(ChunkSizeError) as e:
        chunk_groups(big, chunk_limit(0.5))
    msg = str(e.value)
    assert msg == ("chunk-mib=0.5 is smaller than the base model's tensor 'huge' "
                   "(1200000 bytes, 1.14441 MiB): set chunk-mib to at least 1.145")
    assert len(chunk_groups(big, chunk_limit(1.145))) == 2  # the advice works: small + huge | big
    with pytest.raises(ChunkSizeError):
        chunk_groups(big, chunk_limit(1.144))  # and is the smallest in thousandths of a MiB


def test_chunk_limit_is_mib_in_bytes():
    assert chunk_limit(0) == 0 and chunk_limit(1) == MIB and chunk_limit(0.25) == MIB // 4


def test_traffic_counts_messages_and_the_largest_one():
    t = ChunkTraffic(100)
    t.add("theta0", 60, 2)
    t.add("get", 0, 3)
    t.add("update", 40)
    t.add("update", 50)
    t.reply_limit = 50
    assert t.record() == {"chunk-bytes": 100, "reply-bytes": 50,
                          "messages": {"theta0": 2, "get": 3, "update": 2},
                          "tensor-bytes": {"theta0": 120, "get": 0, "update": 90},
                          "largest-tensor-bytes": {"theta0": 60, "get": 0, "update": 50},
                          "largest-message-tensor-bytes": 60, "nodes": 0}


@pytest.mark.parametrize("limit, largest, asked, want", [
    (256, 125, None, 128),  # the 1.25 GiB run in MiB: 256 MiB chunks, fp16 embedding 125 MiB -> 128
    (256, 200, None, 200),  # a tensor above half a chunk raises it: it still travels in one reply
    (256, 256, None, 256),  # one that fills a chunk: the chunk
    (256, 300, None, 256),  # never above the chunk (chunk_groups then names the tensor, as before)
    (255, 0, None, 128),  # half, rounded up
    (1, 0, None, 1),
    (256, 10, 64, 64),  # what the server asked for
    (256, 100, 64, 100),  # raised to the client's own largest tensor
    (256, 10, 1000, 256),  # and capped at the chunk
])
def test_the_reply_limit_is_half_a_chunk_raised_to_the_largest_tensor(limit, largest, asked, want):
    assert reply_limit(limit, largest, asked) == want


@pytest.mark.parametrize("args, why", [
    ((0, 10), "the chunk limit must be positive, got 0 bytes"),
    ((100, -1), "a tensor's bytes cannot be negative, got -1"),
    ((100, 10, 0), "chunk-reply-bytes must be a positive number of bytes, got 0")])
def test_a_bad_reply_limit_input_is_one_line(args, why):
    with pytest.raises(ValueError) as e:
        reply_limit(*args)
    assert str(e.value) == why


def test_groups_cut_at_the_reply_limit_fit_it_wherever_the_chunk_limit_works():
    assert largest_tensor(MODEL) == 100 and largest_tensor({}) == 0  # e: 25 float32
    # limit 132 (two groups above); half is 66, raised to e's 100. Packed by hand at 100:
    # a+b = 64 (+c 124) | c+d = 68 (+e 168) | e+f = 100 (+g 104) | g
    assert reply_limit(132, largest_tensor(MODEL)) == 100
    assert chunk_groups(MODEL, 100) == [["a", "b"], ["c", "d"], ["e", "f"], ["g"]]
    # limit 400 (one group of all 236 bytes): half (200) holds e. Packed by hand at 200:
    # a+b+c+d = 132 (+e 232) | e+f+g = 104
    assert chunk_groups(MODEL, 400) == [list(MODEL)]
    assert reply_limit(400, 100) == 200
    assert chunk_groups(MODEL, 200) == [["a", "b", "c", "d"], ["e", "f", "g"]]
    # for every limit that holds the largest tensor, the reply limit does too (no new failure)
    for limit in range(100, 400, 7):
        r = reply_limit(limit, 100)
        assert 100 <= r <= limit and r in (100, (limit + 1) // 2)
        assert [k for g in chunk_groups(MODEL, r) for k in g] == list(MODEL)


def test_a_chunk_mib_below_the_base_models_largest_tensor_is_one_line_before_anything_starts(theta0):
    cfg = RunConfig.from_flower({"chunk-mib": 0.5}).resolve()
    with pytest.raises(ConfigError) as e:
        check_fits_base(cfg, theta0)
    assert str(e.value) == ("chunk-mib=0.5 is smaller than the base model's tensor 'backbone.7.weight' "
                            "(802816 bytes, 0.765625 MiB): set chunk-mib to at least 0.766")
    check_fits_base(RunConfig.from_flower({"chunk-mib": 0.766}).resolve(), theta0)  # fits


@pytest.mark.parametrize("value, why", [
    (-1, "chunk-mib must be 0 (off) or a positive number of MiB, got -1.0"),
    ("inf", "chunk-mib: 'inf' is not a finite number"), ("nan", "chunk-mib: 'nan' is not a finite number")])
def test_a_negative_or_infinite_chunk_mib_is_one_line(value, why):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_flower({"chunk-mib": value}).resolve()
    assert str(e.value) == why


def test_chunking_with_whole_model_phases_is_one_line():
    with pytest.raises(ConfigError, match="^chunk-mib does not cover learn-coefficients or ensemble yet"):
        RunConfig.from_flower({"chunk-mib": 1, "ensemble": True}).resolve()



def test_regmean_gram_matrices_must_fit_a_chunk_too(theta0):
    # mnist-cnn's largest Linear is backbone.7.weight [128, 1568]: its clients' Gram is
    # [1568, 1568] float32 = 1568 * 1568 * 4 = 9834496 bytes = 9.37890625 MiB
    assert tuple(theta0["backbone.7.weight"].shape) == (128, 1568)
    cfg = RunConfig.from_flower({"chunk-mib": 0.766, "method": "regmean"}).resolve()
    with pytest.raises(ConfigError) as e:
        check_fits_base(cfg, theta0)
    assert str(e.value) == ("chunk-mib=0.766 is smaller than the Gram matrix RegMean's clients send for "
                            "'backbone.7.weight' ([1568, 1568] float32, 9.37891 MiB): set chunk-mib to at least 9.379")
    check_fits_base(RunConfig.from_flower({"chunk-mib": 9.379, "method": "regmean"}).resolve(), theta0)
    check_fits_base(RunConfig.from_flower({"chunk-mib": 0.766, "method": "fedavg"}).resolve(), theta0)


def test_an_fp16_models_float32_delta_must_fit_a_chunk_too():
    # a [512, 512] fp16 weight is 0.5 MiB; its Delta (float32, as the task vectors) is 1 MiB
    base = {"backbone.w": torch.empty((512, 512), dtype=torch.float16, device="meta"),
            "backbone.b": torch.empty((512,), dtype=torch.float16, device="meta")}
    cfg = RunConfig.from_flower({"chunk-mib": 0.6, "merge-keys": "backbone.*"}).resolve()
    with pytest.raises(ConfigError) as e:
        check_fits_base(cfg, base)
    assert str(e.value) == ("chunk-mib=0.6 is smaller than the float32 merged update's tensor "
                            "'backbone.w' (1048576 bytes, 1 MiB): set chunk-mib to at least 1")
    check_fits_base(RunConfig.from_flower({"chunk-mib": 1.0, "merge-keys": "backbone.*"}).resolve(), base)
