"""Heat and HeatHistory: host-side math, persistence and the heat map (no device involved)."""

from __future__ import annotations

import pytest
import torch

from streamkit_eplb import Heat, HeatHistory


def make_heat(load, window=0, invalid=None) -> Heat:
    load = torch.as_tensor(load, dtype=torch.int64)
    return Heat(load, None if invalid is None else torch.as_tensor(invalid, dtype=torch.int64), window)


# L=2 layers, world=2 ranks, E=3 local experts
LOAD = [
    [[1, 2, 3], [4, 5, 6]],
    [[0, 0, 0], [0, 0, 0]],
]


def test_shape_properties_and_total():
    heat = make_heat(LOAD, window=3)
    assert (heat.num_layers, heat.world_size, heat.num_experts, heat.window) == (2, 2, 3, 3)
    assert heat.total().tolist() == [[5, 7, 9], [0, 0, 0]]
    assert heat.rank_load().tolist() == [[6, 15], [0, 0]]
    assert heat.invalid.tolist() == [[0, 0], [0, 0]]
    assert "window=3" in repr(heat) and "tokens=21" in repr(heat)


def test_balancedness_is_mean_over_max_of_rank_load():
    heat = make_heat(LOAD)
    b = heat.balancedness()
    assert b.dtype == torch.float64 and b.shape == (2,)
    assert b[0].item() == pytest.approx((6 + 15) / 2 / 15)
    assert b[1].item() == 1.0  # no load at all: balanced by definition


def test_balancedness_with_ep_size_groups_physical_experts_by_hosting_rank():
    # world 1 recorded 4 physical experts; EP ranks host [0, 1] and [2, 3]
    heat = make_heat([[[10, 0, 5, 5]]])
    assert heat.balancedness(ep_size=2)[0].item() == pytest.approx(1.0)
    heat = make_heat([[[30, 10, 0, 0]]])
    assert heat.balancedness(ep_size=2)[0].item() == pytest.approx(0.5)
    assert heat.balancedness(ep_size=1)[0].item() == 1.0
    with pytest.raises(ValueError, match="divisible"):
        heat.balancedness(ep_size=3)
    with pytest.raises(ValueError, match="ep_size"):
        heat.balancedness(ep_size=0)


def test_logical_sums_replicas_from_global_physical_ids():
    # world 2, 4 physical experts (global ids), physical 3 is a replica of logical 0
    heat = make_heat([[[1, 2, 3, 4], [10, 20, 30, 40]]])
    out = heat.logical(torch.tensor([0, 1, 2, 0]), 3)
    assert out.tolist() == [[11 + 44, 22, 33]]
    assert out.dtype == torch.int64
    # a per-layer map, as vLLM's physical_to_logical_map (L, P)
    assert heat.logical(torch.tensor([[2, 1, 0, 0]]), 3).tolist() == [[33 + 44, 22, 11]]


def test_logical_from_local_experts_per_rank():
    # vllm-ascend layout: each rank recorded its 2 local experts; physical id = rank * 2 + e
    heat = make_heat([[[1, 2], [3, 4]]])
    out = heat.logical([0, 1, 1, 0], 2)  # 4 = world * E physical experts
    assert out.tolist() == [[1 + 4, 2 + 3]]


def test_logical_rejects_bad_maps():
    heat = make_heat([[[1, 2, 3]]])
    with pytest.raises(ValueError, match="physical experts"):
        heat.logical([0, 1], 2)
    with pytest.raises(ValueError, match=r"\[0, num_logical=2\)"):
        heat.logical([0, 1, 2], 2)
    with pytest.raises(ValueError, match="num_logical"):
        heat.logical([0, 0, 0], 0)
    with pytest.raises(TypeError, match="integer"):
        heat.logical(torch.tensor([0.0, 1.0, 0.0]), 2)
    with pytest.raises(ValueError, match="num_layers"):
        heat.logical(torch.zeros(2, 3, dtype=torch.int64), 2)


def test_heat_validates_its_tensors():
    with pytest.raises(TypeError, match="int64"):
        Heat(torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="num_layers, world_size, num_experts"):
        Heat(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="invalid"):
        Heat(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="window"):
        Heat(torch.zeros(1, 1, 1, dtype=torch.int64), window=-1)


def test_save_and_load_file_roundtrip(tmp_path):
    heat = make_heat(LOAD, window=7, invalid=[[1, 0], [0, 2]])
    path = tmp_path / "heat.pt"
    heat.save(path)
    back = Heat.load_file(path)
    assert back == heat
    assert back.window == 7 and back.invalid.tolist() == [[1, 0], [0, 2]]
    assert back.load.dtype == torch.int64


def test_load_file_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"load": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a valid Heat file: .*other.pt: not a file written by Heat.save"):
        Heat.load_file(path)
    torch.save({"format": "streamkit_eplb.Heat", "version": 99}, path)
    with pytest.raises(ValueError, match="not a valid Heat file: .*version 99"):
        Heat.load_file(path)


def test_heatmap_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "heat.png"
    make_heat(torch.arange(2 * 3 * 5).reshape(2, 3, 5)).heatmap(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_history_keeps_the_last_size_windows():
    history = HeatHistory(2)
    for w in range(4):
        history.add(make_heat([[[w, 1]]], window=w))
    assert len(history) == 2
    assert [h.window for h in history] == [2, 3]
    total = history.sum()
    assert total.load.tolist() == [[[5, 2]]] and total.window == 3
    assert history.balancedness().tolist() == [1.0]
    assert "windows=[2, 3]" in repr(history)
    history.clear()
    assert len(history) == 0


def test_history_errors():
    with pytest.raises(ValueError, match="size"):
        HeatHistory(0)
    history = HeatHistory(3)
    with pytest.raises(ValueError, match="empty"):
        history.sum()
    with pytest.raises(TypeError, match="Heat"):
        history.add(torch.zeros(1, 1, 1, dtype=torch.int64))
    history.add(make_heat([[[1, 2]]]))
    with pytest.raises(ValueError, match="shape"):
        history.add(make_heat([[[1, 2, 3]]]))


# -- v2: malformed files, negative loads, placements, passes ---------------------------------


class _NotAllowed:  # a pickled class: weights_only=True refuses it
    pass


@pytest.mark.parametrize(
    "content",
    ["garbage", "pickle", "missing", "negative", "window", "shape"],
)
def test_every_malformed_file_is_one_clear_value_error(tmp_path, content):
    import pickle

    path = tmp_path / f"{content}.pt"
    good = {"format": "streamkit_eplb.Heat", "version": 2, "load": torch.zeros(1, 1, 2, dtype=torch.int64),
            "invalid": torch.zeros(1, 1, dtype=torch.int64), "window": 0, "passes": None, "placement_version": 0,
            "phy2log": None, "reduce": "gather", "num_ranks": 1}
    if content == "garbage":
        path.write_bytes(b"\x00\x01 not a torch file")
    elif content == "pickle":
        path.write_bytes(pickle.dumps({"format": _NotAllowed()}))
    else:
        data = dict(good)
        if content == "missing":
            del data["invalid"]
        elif content == "negative":
            data["load"] = torch.tensor([[[1, -3]]])
        elif content == "window":
            data["window"] = "zero"
        else:
            data["load"] = torch.zeros(2, 2, dtype=torch.int64)
        torch.save(data, path)
    with pytest.raises(ValueError) as info:
        Heat.load_file(path)
    message = str(info.value)
    assert message.startswith(f"not a valid Heat file: {path}: ")
    assert "weights_only" not in message and "weights_only=False" not in message
    torch.save(good, path)
    assert Heat.load_file(path).load.shape == (1, 1, 2)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Heat.load_file(tmp_path / "nope.pt")


def test_negative_loads_are_refused():
    with pytest.raises(ValueError, match="negative"):
        Heat(torch.tensor([[[1, -1]]]))
    with pytest.raises(ValueError, match="negative"):
        Heat(torch.tensor([[[1, 1]]]), torch.tensor([[-2]]))


def test_v1_files_still_load(tmp_path):
    path = tmp_path / "v1.pt"
    load = torch.arange(6, dtype=torch.int64).reshape(1, 2, 3)
    torch.save({"format": "streamkit_eplb.Heat", "version": 1, "load": load,
                "invalid": torch.zeros(1, 2, dtype=torch.int64), "window": 4}, path)
    heat = Heat.load_file(path)
    assert torch.equal(heat.load, load) and heat.window == 4 and heat.placement_version == 0 and heat.passes is None


def test_save_roundtrip_keeps_passes_and_placement(tmp_path):
    passes = torch.tensor([[[[1, 0]]], [[[2, 3]]]])
    heat = Heat(passes.sum(0), None, 5, passes=passes, placement_version=2, phy2log=torch.tensor([[1, 0]]))
    heat.save(tmp_path / "h.pt")
    back = Heat.load_file(tmp_path / "h.pt")
    assert back == heat and back.placement_version == 2 and back.phy2log.tolist() == [[1, 0]]
    assert back.logical().tolist() == [[3, 3]]


def test_fold_refuses_heats_of_different_placements():
    a = Heat(torch.tensor([[[1, 2]]]), placement_version=0, phy2log=torch.tensor([[0, 1]]))
    b = Heat(torch.tensor([[[3, 4]]]), window=1, placement_version=1, phy2log=torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="placement version 1.*cannot be summed"):
        Heat.fold([a, b])
    assert Heat.fold([a, a]).load.tolist() == [[[2, 4]]]


def test_history_starts_a_new_window_at_a_placement_change():
    history = HeatHistory(4)
    old = [Heat(torch.tensor([[[w, 1]]]), window=w, placement_version=0) for w in range(3)]
    assert [history.add(h) for h in old] == [False, False, False]
    new = Heat(torch.tensor([[[7, 7]]]), window=3, placement_version=1, phy2log=torch.tensor([[1, 0]]))
    assert history.add(new) is True
    assert len(history) == 1 and history.placement_version == 1
    assert history.sum().load.tolist() == [[[7, 7]]]


def test_heatmap_stays_readable_at_256_and_1024_ranks(tmp_path):
    pytest.importorskip("matplotlib")
    import struct

    for ranks in (256, 1024):
        gen = torch.Generator().manual_seed(ranks)
        heat = Heat(torch.randint(0, 50, (3, ranks, 9), generator=gen))
        path = tmp_path / f"heat{ranks}.png"
        heat.heatmap(path)
        data = path.read_bytes()
        width, height = struct.unpack(">II", data[16:24])  # the PNG IHDR chunk
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert width <= 1800 and height <= 1000, (ranks, width, height)
    small = Heat(torch.randint(0, 50, (3, 2, 4)))
    from streamkit_eplb._plot import aggregate, slot_matrix

    summed = Heat(torch.randint(0, 50, (3, 1, 8)), reduce="sum", num_ranks=4)
    assert slot_matrix(summed, None)[1] == 4  # global slots of a sum heat: split over the group's ranks

    matrix, ranks, _ = slot_matrix(small, None)
    assert matrix.shape == (3, 8) and ranks == 2
    assert aggregate(matrix, 2, 256)[1] == [4]  # the EP split between rank 0's and rank 1's slots
    totals, splits, note = aggregate(torch.ones(3, 2304, dtype=torch.int64), 256, 256)
    assert totals.shape == (3, 256) and splits == [] and "one column per rank" in note
    binned, _, note = aggregate(torch.ones(3, 1024 * 9, dtype=torch.int64), 1024, 256)
    assert binned.shape == (3, 256) and int(binned.sum()) == 3 * 1024 * 9 and "4 ranks" in note
