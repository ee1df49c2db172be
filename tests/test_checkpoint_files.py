"""Checkpoint files: exact round trips, strict templates, atomic writes, corruption and pickle refusal."""

from __future__ import annotations

import io
import os
import pickle

import msgpack
import pytest
import torch

import fbrain
from fbrain import checkpoint, optim
from fbrain.checkpoint import serialization
from conftest import ConvNet, batches, regression_loss, trees_equal, mlp

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]


def trained_state(steps=3):
    model = ConvNet(0)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, amsgrad=True))
    state = fbrain.TrainState.create(model, opt, seed=5)
    step = fbrain.make_train_step(regression_loss(model), opt, precision="fp16")
    from conftest import conv_batches
    for batch in conv_batches(steps):
        state, _ = step(state, batch)
    return state


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    source = torch.randn(3, 5, generator=g) * 100
    tensor = source.to(dtype) if dtype is not torch.bool else source > 0
    tree = {"t": tensor, "scalar": tensor[0, 0].clone(), "empty": tensor[:0], "strided": tensor.t()}
    back = checkpoint.from_bytes(checkpoint.to_bytes(tree))
    assert trees_equal(back, {k: v.contiguous() for k, v in tree.items()})


def test_a_train_state_round_trips_exactly(tmp_path):
    state = trained_state()
    path = tmp_path / "state.fbrain"
    checkpoint.save(path, state)
    back = checkpoint.load(path, template=state)
    assert isinstance(back, fbrain.TrainState)
    assert trees_equal(back, state)
    assert trees_equal(checkpoint.load(path), state)  # also without a template
    assert back.rng.device.type == "cpu"


def test_plain_values_round_trip():
    tree = {"a": [1, 2.5, "x", None, True, b"raw"], "t": (1, (2, 3)), "nested": {"k": {"j": -7}}}
    assert checkpoint.from_bytes(checkpoint.to_bytes(tree)) == tree


def test_large_tensors_are_written_in_chunks(monkeypatch):
    monkeypatch.setattr(serialization, "CHUNK_BYTES", 1000)
    tree = {"big": torch.arange(2000, dtype=torch.float32), "small": torch.ones(3)}
    data = checkpoint.to_bytes(tree)
    bins = [obj for obj in msgpack.Unpacker(io.BytesIO(data[:-serialization.TRAILER_BYTES]), raw=True)
            if isinstance(obj, bytes)]
    assert sorted(len(b) for b in bins) == [12, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000]
    assert trees_equal(checkpoint.from_bytes(data), tree)


def test_tensor_bytes_are_aligned_and_loaded_without_copy(tmp_path):
    path = tmp_path / "s.fbrain"
    checkpoint.save(path, {"a": torch.ones(3), "b": torch.zeros(5, dtype=torch.float64)})
    back = checkpoint.load(path)
    assert back["a"].data_ptr() % 64 == back["b"].data_ptr() % 64  # same alignment within one buffer
    back["a"].add_(1)  # loaded tensors are writable
    assert torch.equal(back["a"], torch.full((3,), 2.0))


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.replace(params={**s.params, "conv.weight": torch.zeros(64, 1, 5)}),
     r"params\['conv.weight'\]: shape \(64, 1, 5\) expected, file has \(4, 1, 5\)"),
    (lambda s: s.replace(params={**s.params, "head.bias": s.params["head.bias"].double()}),
     r"params\['head.bias'\]: dtype torch.float64 expected, file has torch.float32"),
    (lambda s: s.replace(params={k: v for k, v in s.params.items() if k != "head.bias"}),
     r"params: keys differ from the template: missing \[\], unexpected \['head.bias'\]"),
    (lambda s: s.replace(buffers={**s.buffers, "extra": torch.zeros(1)}),
     r"buffers: keys differ from the template: missing \['extra'\]"),
    (lambda s: s.replace(opt_state=(s.opt_state[0],)),
     r"opt_state: tuple of length 1 expected, file has tuple of length 2"),
])
def test_restoring_into_a_template_is_strict_and_names_the_path(tmp_path, edit, message):
    state = trained_state(1)
    path = tmp_path / "s.fbrain"
    checkpoint.save(path, state)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(path, template=edit(state))


def test_optimizer_moment_mismatch_names_the_full_path(tmp_path):
    state = trained_state(1)
    checkpoint.save(tmp_path / "s", state)
    mu = dict(state.opt_state[1].mu)
    mu["conv.weight"] = torch.zeros(32, 1, 16)
    template = state.replace(opt_state=(state.opt_state[0], state.opt_state[1]._replace(mu=mu)))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"opt_state\[1\]\.mu\['conv.weight'\]: shape \(32, 1, 16\) expected, file has \(4, 1, 5\)"):
        checkpoint.load(tmp_path / "s", template=template)


def test_loading_onto_another_device(tmp_path):
    state = trained_state(1)
    checkpoint.save(tmp_path / "s", state)
    back = checkpoint.load(tmp_path / "s", device="meta")
    assert back.params["conv.weight"].device.type == "meta"
    assert back.rng.device.type == "cpu"


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["tensor bytes", "tree", "trailer"])
def test_a_corrupted_file_is_detected_and_named(tmp_path, where):
    path = tmp_path / "s.fbrain"
    checkpoint.save(path, {"w": torch.arange(100.0), "n": 3})
    size = path.stat().st_size
    flip_byte(path, {"tensor bytes": 200, "tree": size - 25, "trailer": size - 3}[where])
    with pytest.raises(checkpoint.CheckpointError, match=f"{path}: corrupted checkpoint"):
        checkpoint.load(path)


def test_a_truncated_file_is_detected_and_named(tmp_path):
    path = tmp_path / "s.fbrain"
    checkpoint.save(path, {"w": torch.arange(100.0)})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(checkpoint.CheckpointError, match=f"{path}: truncated checkpoint"):
        checkpoint.load(path)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_and_torch_save_files_are_refused(tmp_path):
    pickled = tmp_path / "p.pkl"
    pickled.write_bytes(pickle.dumps(Boom()))
    torched = tmp_path / "t.ckpt"
    torch.save({"w": torch.ones(2)}, torched)
    for path in (pickled, torched):
        with pytest.raises(checkpoint.CheckpointError, match="never unpickles"):
            checkpoint.load(path)


def test_foreign_extension_types_and_unregistered_names_are_refused():
    good = checkpoint.to_bytes({"w": 1})
    header_end = len(serialization._HEADER)

    def with_tree(obj):
        body = good[:header_end] + msgpack.packb(obj)
        return body + serialization.trailer(header_end, __import__("zlib").crc32(body))

    with pytest.raises(checkpoint.CheckpointError, match="extension type 42 is not fbrain's"):
        checkpoint.from_bytes(with_tree({"x": msgpack.ExtType(42, b"payload")}))
    named = msgpack.ExtType(3, msgpack.packb(["os.system", {"command": "true"}]))
    with pytest.raises(checkpoint.CheckpointError, match="'os.system' is not registered"):
        checkpoint.from_bytes(with_tree({"x": named}))
    # A registered type with fields it cannot have is a CheckpointError too (recovery falls back on it).
    for fields in ({"value": "0.9"}, {"value": float("nan")}, {"other": 1.0}, {}):
        static = msgpack.ExtType(3, msgpack.packb(["fbrain.optim.hyperparams.Static", fields]))
        with pytest.raises(checkpoint.CheckpointError, match="Static with fields it cannot have"):
            checkpoint.from_bytes(with_tree({"x": static}))


def test_hyperparameters_saved_as_tensors_by_older_versions_load_as_static_numbers(tmp_path):
    model = mlp(0)
    opt = optim.adamw(1e-3, betas=(0.8, 0.99), weight_decay=0.1)
    state = fbrain.TrainState.create(model, opt)
    # What fbrain wrote before hyperparameters were Static numbers: every one a float64 0-dim tensor.
    old = state.replace(opt_state=state.opt_state._replace(hyperparams={
        k: torch.tensor(float(v), dtype=torch.float64) for k, v in optim.get_hyperparams(state.opt_state).items()}))
    checkpoint.save(tmp_path / "old.ckpt", old)
    loaded = checkpoint.load(tmp_path / "old.ckpt", state)
    assert trees_equal(loaded, state)
    assert loaded.opt_state.hyperparams["beta1"] == optim.Static(0.8)
    nan = old.replace(opt_state=old.opt_state._replace(hyperparams={**old.opt_state.hyperparams,
                                                                    "eps": torch.tensor(float("nan"))}))
    checkpoint.save(tmp_path / "nan.ckpt", nan)
    with pytest.raises(checkpoint.CheckpointError, match=r"hyperparams\['eps'\].*finite"):
        checkpoint.load(tmp_path / "nan.ckpt", state)


def test_saving_something_unsupported_is_named():
    with pytest.raises(checkpoint.CheckpointError, match=r"\['bad'\]: cannot save a set"):
        checkpoint.to_bytes({"bad": {1, 2}})
    with pytest.raises(checkpoint.CheckpointError, match="keys must be strings"):
        checkpoint.to_bytes({1: 2})


def test_a_failed_save_leaves_the_previous_file_and_no_leftovers(tmp_path, monkeypatch):
    path = tmp_path / "s.fbrain"
    checkpoint.save(path, {"w": torch.zeros(10)})
    before = path.read_bytes()

    def failing(tree, out):
        out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("fbrain.checkpoint.files.write", failing)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"w": torch.ones(10)})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.fbrain"]


def test_saving_over_a_file_first_releases_its_cached_pages_and_keeps_it_until_the_rename(tmp_path, monkeypatch):
    from fbrain.checkpoint import files

    path = tmp_path / "s.fbrain"
    checkpoint.save(path, {"w": torch.zeros(10)})
    released, original = [], files.release_cached_pages

    def spy(target):
        released.append(target)
        original(target)
        assert checkpoint.load(target)["w"].eq(0).all()  # the old version is whole and readable

    monkeypatch.setattr(files, "release_cached_pages", spy)
    checkpoint.save(path, {"w": torch.ones(10)})
    assert released == [str(path)]
    assert checkpoint.load(path)["w"].eq(1).all()
    original(str(tmp_path / "missing.fbrain"))  # no file: nothing to do


def test_loading_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.fbrain"):
        checkpoint.load(tmp_path / "nope.fbrain")


def test_resuming_from_a_saved_state_continues_bit_for_bit(tmp_path):
    model = mlp(0, dropout=0.3)
    opt = optim.adam(1e-2)
    step = fbrain.make_train_step(regression_loss(model), opt)
    data = batches(6)
    straight = fbrain.TrainState.create(model, opt)
    for batch in data:
        straight, _ = step(straight, batch)
    resumed = fbrain.TrainState.create(model, opt)
    for batch in data[:3]:
        resumed, _ = step(resumed, batch)
    checkpoint.save(tmp_path / "mid", resumed)
    resumed = checkpoint.load(tmp_path / "mid", template=resumed)
    for batch in data[3:]:
        resumed, _ = step(resumed, batch)
    assert trees_equal(resumed, straight)


@pytest.mark.parametrize("make_opt", [lambda: optim.adam(1e-2), lambda: optim.adamw(1e-2, weight_decay=0.1),
                                      lambda: optim.sgd(0.1, momentum=0.9, nesterov=True)],
                         ids=["adam", "adamw", "sgd-nesterov"])
def test_a_loaded_state_continues_bit_for_bit_like_the_straight_run(tmp_path, make_opt):
    # A loaded state's hyperparameters are new tensors; they must take the same optimizer path
    # (the fused CPU kernels) as the state that was saved, or the resumed run drifts in the last bit.
    model = mlp(0)
    opt = make_opt()
    step = fbrain.make_train_step(regression_loss(model), opt)
    data = batches(6)
    state = fbrain.TrainState.create(model, opt, seed=1)
    for batch in data[:3]:
        state, _ = step(state, batch)
    checkpoint.save(tmp_path / "state.ckpt", state)
    straight = state
    for batch in data[3:]:
        straight, _ = step(straight, batch)
    resumed = checkpoint.load(tmp_path / "state.ckpt", template=state)
    for batch in data[3:]:
        resumed, _ = step(resumed, batch)
    assert trees_equal(resumed, straight)


def test_files_are_read_straight_into_their_tensors_with_the_same_result(tmp_path, monkeypatch):
    # Small chunks and pieces, so tensors span several bin objects and several checksum pieces.
    from fbrain.checkpoint import crc, reading
    monkeypatch.setattr(serialization, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(crc, "PIECE_BYTES", 96)
    g = torch.Generator().manual_seed(0)
    tree = {
        "state": trained_state(),
        "by_dtype": {str(d): (torch.rand(37, generator=g) * 100).to(d) for d in ALL_DTYPES},
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "big": torch.randn(1500, generator=g),
        "plain": ("text", 7, None, [1.5, True]),
    }
    path = tmp_path / "s.fbrain"
    checkpoint.save(path, tree)
    streamed = reading.read_file(str(path))
    whole = reading.read(bytearray(path.read_bytes()), str(path))
    assert trees_equal(streamed, whole) and trees_equal(streamed, tree)


def test_a_corrupted_tensor_byte_fails_the_streaming_checksum(tmp_path):
    from fbrain.checkpoint import reading
    path = tmp_path / "s.fbrain"
    checkpoint.save(path, {"w": torch.arange(100.0)})
    flip_byte(path, 200)
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        reading.read_file(str(path))
