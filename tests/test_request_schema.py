"""The one request schema (``cxr_sr.sampling.REQUEST_PARAMS``) and everything derived from it.

Every interface that names sampling keys (SamplingOptions, the server's parser, the client's
keywords, the ``cxr-sr`` and ``benchmarks.perf`` flags, PerfSettings) is checked against the
schema, so a key cannot be added, dropped or renamed in one place only. The Triton sampler
model runs here with a stand-in ``triton_python_backend_utils`` to show that one bad request
in a batch gets its own INVALID_ARG while the others are served.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
import types
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from benchmarks.perf import PerfSettings, perf_command
from benchmarks.perf import parse_args as perf_parse_args
from cxr_sr import SamplingOptions, Schedule, serving
from cxr_sr.client.cli import upscale_parser
from cxr_sr.client.triton import SRClient, sampling_parameters
from cxr_sr.sampling import OPTION_PARAMS, ORIGIN_PARAMS, REQUEST_PARAMS, SEED, Param
from cxr_sr.serving import (
    FLAG_PARAMS,
    REQUEST_KEYS,
    TRITON_RESERVED,
    add_arguments,
    namespace_parameters,
    parse_parameters,
    request_parameters,
)

T = 1000
DEFAULTS = SamplingOptions()


def _example(p: Param):
    """A valid value of ``p`` that differs from SamplingOptions' default and seed 0."""
    if p.choices:
        default = getattr(DEFAULTS, p.name)
        return next(c for c in p.choices if c != default)
    if p.kind is int:
        return int(p.low) + 2
    return (p.low + p.high) / 2 + 0.125


def _parse(params: dict, **kwargs):
    """As the sampler sees it: Triton hands over the parameters as a JSON string."""
    return parse_parameters(json.dumps(params), DEFAULTS, T, **kwargs)


# --- the schema itself ---------------------------------------------------------------


def test_schema_covers_sampling_options_and_the_seed():
    assert [p.name for p in OPTION_PARAMS] == [f.name for f in fields(SamplingOptions)]
    options = tuple(f.name for f in fields(SamplingOptions))
    assert (*options, "seed", "origin_y", "origin_x") == REQUEST_KEYS
    assert [p.name for p in FLAG_PARAMS] == [*options, "seed"]  # the origin is set by tilers
    assert len(set(REQUEST_KEYS)) == len(REQUEST_KEYS)
    for p in REQUEST_PARAMS:
        assert p.help and p.kind in (int, float, str, bool)
        if p.choices:
            assert p.kind is str
        p.validate(_example(p))
    for f in fields(SamplingOptions):  # the dataclass defaults satisfy the schema
        next(p for p in OPTION_PARAMS if p.name == f.name).validate(f.default)


def test_sampling_options_are_validated_by_the_schema():
    for p in OPTION_PARAMS:
        with pytest.raises(ValueError, match=p.name):
            SamplingOptions(**{p.name: "nonsense" if p.kind is not str else 3})


# --- client -> server round trip ------------------------------------------------------


@pytest.mark.parametrize("param", REQUEST_PARAMS, ids=lambda p: p.name)
def test_every_key_round_trips_client_to_server(param):
    value = _example(param)
    wire = sampling_parameters(**{param.name: value})
    assert wire == {param.name: value}
    options, seed, origin = _parse(wire)
    if param is SEED:
        assert seed == value and options == DEFAULTS and origin == (0, 0)
    elif param in ORIGIN_PARAMS:
        assert origin[ORIGIN_PARAMS.index(param)] == value and sum(origin) == value
        assert options == DEFAULTS and seed == SEED.default
    else:
        assert getattr(options, param.name) == value and seed == SEED.default
        assert options == DEFAULTS.replace(**{param.name: value}) and origin == (0, 0)


def test_all_keys_together_round_trip():
    given = {p.name: _example(p) for p in REQUEST_PARAMS}
    given["steps"] = 3  # within T * strength for any example strength
    given["origin_x"] = 5
    options, seed, origin = _parse(sampling_parameters(**given))
    assert seed == given.pop("seed")
    assert origin == (given.pop("origin_y"), given.pop("origin_x")) == (2, 5)
    assert options == SamplingOptions(**given)


def test_absent_keys_take_the_checkpoint_defaults_and_seed_0():
    ckpt = SamplingOptions(steps=2, sampler="ddpm", spacing="leading")
    for raw in (None, "", "{}"):
        assert parse_parameters(raw, ckpt, T) == (ckpt, 0, (0, 0))


def test_perf_analyzer_string_values_parse_like_the_numbers():
    """perf_analyzer sends floats as strings: the server reads them as the numbers."""
    given = {p.name: _example(p) for p in REQUEST_PARAMS}
    given["steps"] = 3
    cmd = perf_command(
        Path("perf_analyzer"),
        model="cxr_sr",
        url="127.0.0.1:1",
        concurrency=1,
        input_data=Path("in.json"),
        csv_path=Path("out.csv"),
        settings=PerfSettings(parameters=given),
    )
    sent = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--request-parameter"]
    assert [s.split(":")[0] for s in sent] == list(given)
    kinds = {"int": int, "string": str, "bool": bool}
    raw = {}
    for s in sent:
        key, value, kind = s.split(":")
        assert kind in kinds
        raw[key] = value  # perf_analyzer puts int/bool/string on the wire; strings suffice here
    assert _parse(raw) == _parse(given)


# --- rejection ---------------------------------------------------------------------------


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="unknown request parameter 'spcing'") as err:
        _parse({"steps": 2, "spcing": "leading"})
    assert "spacing" in str(err.value)  # the message lists the known keys
    with pytest.raises(ValueError, match="'bar', 'foo'"):
        _parse({"foo": 1, "bar": 2})
    with pytest.raises(ValueError, match="'spcing'"):
        request_parameters({"spcing": "leading"})
    with pytest.raises(TypeError, match="spcing"):
        sampling_parameters(spcing="leading")
    with pytest.raises(TypeError, match="spcing"):
        SRClient("127.0.0.1:1").super_resolve(np.zeros((1, 1, 64, 64), np.float32), spcing="x")


def test_triton_reserved_and_ignored_keys_are_let_through():
    raw = {key: 1 for key in TRITON_RESERVED} | {"triton_x": 1, "x-request-id": "abc"}
    assert _parse(raw, ignore=("x-request-id",)) == (DEFAULTS, 0, (0, 0))
    with pytest.raises(ValueError, match="x-request-id"):
        _parse(raw)


# None means "not given" to the client; the server alone knows T
CLIENT_CANNOT_TELL = ({"steps": None}, {"steps": 300, "strength": 0.25})


@pytest.mark.parametrize(
    "params,key",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": "4.0"}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"steps": True}, "steps"),  # JSON true is not 1
        ({"steps": None}, "steps"),
        ({"steps": 300, "strength": 0.25}, "steps"),  # more than T * strength
        ({"eta": -0.1}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"eta": False}, "eta"),  # JSON false is not 0
        ({"eta": "nan"}, "eta"),
        ({"eta": "inf"}, "eta"),
        ({"eta": [0.5]}, "eta"),
        ({"strength": 0}, "strength"),
        ({"strength": "0"}, "strength"),
        ({"sampler": "euler"}, "sampler"),
        ({"sampler": 1}, "sampler"),
        ({"sampler": "false"}, "sampler"),
        ({"start": True}, "start"),
        ({"spacing": "middle"}, "spacing"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": "1e3"}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"origin_y": -1}, "origin_y"),
        ({"origin_x": 2**20 + 1}, "origin_x"),
        ({"origin_x": "1.5"}, "origin_x"),
        ({"origin_y": True}, "origin_y"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(params, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        _parse(params)
    if params not in CLIENT_CANNOT_TELL:
        with pytest.raises(ValueError, match=key):  # the client refuses before sending
            request_parameters(params)


def test_not_json_or_not_an_object_is_rejected():
    with pytest.raises(ValueError, match="JSON"):
        parse_parameters("{steps: 2", DEFAULTS, T)
    with pytest.raises(ValueError, match="object"):
        parse_parameters("[1, 2]", DEFAULTS, T)


def test_strings_are_parsed_strictly_and_normalised():
    assert _parse({"sampler": " DDPM ", "steps": " 3 ", "eta": "0.25"})[0] == DEFAULTS.replace(
        sampler="ddpm", steps=3, eta=0.25
    )
    assert sampling_parameters(eta=1, seed=np.int64(5)) == {"eta": 1.0, "seed": 5}
    assert type(sampling_parameters(eta=1)["eta"]) is float
    assert type(sampling_parameters(seed=np.int64(5))["seed"]) is int


def test_bool_parameters_do_not_fall_into_bool_of_a_string():
    flag = Param("flag", bool, "a switch")
    assert flag.parse("false") is False and flag.parse(" False ") is False
    assert flag.parse("true") is True and flag.parse(True) is True
    assert flag.parse(np.bool_(False)) is False
    for bad in ("no", "0", "", 0, 1, None, "yes"):
        with pytest.raises(ValueError, match="'flag' must be a boolean"):
            flag.parse(bad)
    parser = argparse.ArgumentParser()
    parser.add_argument("--flag", type=serving._argparse_type(flag))
    assert parser.parse_args(["--flag", "false"]).flag is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--flag", "no"])


# --- derived interfaces are exactly the schema ------------------------------------------


def _sampling_flags(parser) -> dict[str, object]:
    group = next(g for g in parser._action_groups if g.title.startswith("sampling"))
    return {a.dest: a for a in group._group_actions}


def test_cli_flags_are_the_schema_keys():
    """One flag per key a person sets; the tile origin is set by tiling code, not a flag."""
    flags = _sampling_flags(upscale_parser())
    assert tuple(flags) == tuple(p.name for p in FLAG_PARAMS)
    assert not any(p.flag for p in ORIGIN_PARAMS)
    for p in FLAG_PARAMS:
        action = flags[p.name]
        assert action.option_strings == [f"--{p.name.replace('_', '-')}"]
        assert p.help in action.help and action.default is None
    args = upscale_parser().parse_args(
        ["x.png", "--out", "o", "--spacing", "leading", "--eta", "0.5", "--seed", "3"]
    )
    assert namespace_parameters(args) == {"spacing": "leading", "eta": 0.5, "seed": 3}


def test_cli_rejects_a_bad_value_with_the_schema_message(capsys):
    with pytest.raises(SystemExit):
        upscale_parser().parse_args(["x.png", "--out", "o", "--strength", "0"])
    assert "'strength' must be a number in (0, 1]" in capsys.readouterr().err


def test_perf_flags_and_settings_are_the_schema_keys():
    parser = argparse.ArgumentParser()
    add_arguments(parser, {"steps": 1, "seed": 0})
    assert tuple(_sampling_flags(parser)) == tuple(p.name for p in FLAG_PARAMS)
    args = perf_parse_args(["--spacing", "leading", "--sampler", "ddpm"])
    settings = PerfSettings(parameters=namespace_parameters(args))
    assert settings.parameters == {"steps": 1, "sampler": "ddpm", "spacing": "leading", "seed": 0}
    assert PerfSettings().parameters == {"steps": 1, "seed": 0}
    with pytest.raises(ValueError, match="'spcing'"):
        PerfSettings(parameters={"spcing": "leading"})
    with pytest.raises(ValueError, match="'spcing'"):
        add_arguments(argparse.ArgumentParser(), {"spcing": "leading"})


def test_client_keywords_are_the_schema_keys():
    for fn in (SRClient.super_resolve, sampling_parameters):
        sig = inspect.signature(fn)
        keywords = [
            n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        assert tuple(keywords) == REQUEST_KEYS
        assert all(sig.parameters[k].default is None for k in keywords)
        for k in keywords:
            assert f"{k}:" in fn.__doc__


def test_row_chunks_bound_the_pixels_of_a_call():
    """A dynamic batch of large images runs in several calls of at most max_pixels."""
    assert serving.row_chunks(8, 64 * 64, 8 * 64 * 64) == [slice(0, 8)]
    assert serving.row_chunks(3, 256 * 256, 8 * 64 * 64) == [slice(i, i + 1) for i in range(3)]
    assert serving.row_chunks(5, 128 * 128, 8 * 64 * 64) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert serving.row_chunks(5, 10, None) == [slice(0, 5)]


def test_row_chunks_also_bound_the_rows_of_a_call():
    """max_rows (a model's max batch) caps a call as the pixel budget does; the tighter wins."""
    assert serving.row_chunks(5, 10, None, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert serving.row_chunks(8, 64 * 64, 8 * 64 * 64, 4) == [slice(0, 4), slice(4, 8)]
    assert serving.row_chunks(3, 256 * 256, 8 * 64 * 64, 4) == [slice(i, i + 1) for i in range(3)]
    assert serving.chunk_rows(10, None) is None and serving.chunk_rows(10, None, 6) == 6


def test_image_shapes_outside_the_served_sides_are_named():
    assert serving.check_image_shape("LR", (2, 1, 16, 256), 16, 256) is None
    msg = serving.check_image_shape("LR", (1, 1, 15, 300), 16, 256)
    assert "15x300" in msg and "[16, 256]" in msg and "tiled by the client" in msg
    assert "[N, 1, H, W]" in serving.check_image_shape("LR", (1, 3, 32, 32), 16, 256)
    assert "[N, 1, H, W]" in serving.check_image_shape("LR", (32, 32), 16, 256)


# --- the sampler model: one bad request, the rest of the batch served --------------------


class _TritonError:
    INVALID_ARG, INTERNAL, CANCELLED = "INVALID_ARG", "INTERNAL", "CANCELLED"

    def __init__(self, message, code):
        self._message, self.code = message, code

    def message(self):
        return self._message


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _Request:
    def __init__(self, z_lr, params, cancelled=False):
        self.z_lr, self.params, self.cancelled = z_lr, json.dumps(params), cancelled

    def parameters(self):
        return self.params

    def is_cancelled(self):
        return self.cancelled


@pytest.fixture()
def sampler_model(tmp_path, monkeypatch):
    """The sampler's TritonPythonModel with a stand-in pb_utils and a closed-form denoiser."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TritonError, pb.InferenceResponse, pb.Tensor = _TritonError, _Response, _Tensor
    pb.get_input_tensor_by_name = lambda request, name: _Tensor(name, request.z_lr)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    source = Path(__file__).resolve().parents[1] / "model_repository" / "sampler" / "1"
    spec = importlib.util.spec_from_file_location("sampler_model_under_test", source / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    version = tmp_path / "sampler" / "1"
    version.mkdir(parents=True)
    Schedule().save(version)
    (version / "sampling.json").write_text(json.dumps(SamplingOptions(steps=2).__dict__))
    config = {
        "max_batch_size": 4,
        "parameters": {
            "unet_model": {"string_value": "unet"},
            "unet_inputs": {"string_value": "x_t,t,z_lr"},
            "unet_output": {"string_value": "out"},
            "ignored_parameters": {"string_value": "x-request-id, traceparent"},
        },
    }
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path / "sampler"),
            "model_version": "1",
        }
    )
    # any deterministic network that depends on x_t and t will do (no BLS: the trace unused)
    model._denoise = lambda x, t, z_lr, trace=None: (
        0.9 * x + 1e-3 * t[:, None, None, None] * z_lr
    ).astype(np.float32)
    return model


def test_sampler_without_torch_names_the_fix(sampler_model, monkeypatch):
    """A repository whose loop runs on torch, loaded by a server without torch, fails its
    load with what to install or how to rebuild, not a bare ModuleNotFoundError."""
    arrays = type(sampler_model.arrays)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(RuntimeError, match=r"needs torch.*cxr-sr\[torch\].*--gpu-loop numpy"):
        arrays("torch-cuda")
    assert arrays("numpy").torch is None  # the host loop needs none


def test_sampler_rejects_only_the_bad_request_of_a_batch(sampler_model):
    z = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    requests = [
        _Request(z[:1], {"steps": 2, "seed": 1}),
        _Request(z[1:2], {"steps": 2, "seed": 1, "spcing": "leading"}),
        _Request(z[2:], {"steps": 2, "seed": 1, "spacing": "leading", "x-request-id": "a"}),
        _Request(z[:1], {"steps": 0}),
    ]
    good, unknown, leading, bad = sampler_model.execute(requests)
    assert good.error is None and good.outputs["z"].shape == (1, 4, 8, 8)
    assert leading.error is None and leading.outputs["z"].shape == (1, 4, 8, 8)
    assert unknown.error.code == "INVALID_ARG" and "'spcing'" in unknown.error.message()
    assert bad.error.code == "INVALID_ARG" and "'steps'" in bad.error.message()


def test_sampler_honours_spacing(sampler_model):
    z = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    outs = {
        spacing: sampler_model.execute(
            [_Request(z, {"steps": 3, "seed": 2, "start": "noise", "spacing": spacing})]
        )[0].outputs["z"]
        for spacing in ("trailing", "leading")
    }
    assert not np.array_equal(outs["trailing"], outs["leading"])
    again = sampler_model.execute([_Request(z, {"steps": 3, "seed": 2, "start": "noise"})])
    np.testing.assert_array_equal(again[0].outputs["z"], outs["trailing"])  # the default


def test_sampler_places_a_tile_noise_by_its_origin(sampler_model):
    """With the fixture's per-pixel denoiser the loop is local: a tile request (origin in LR
    pixels; f = 4, so latent = LR pixels) returns that window of the whole image's latent."""
    z = np.random.default_rng(2).standard_normal((1, 4, 12, 20)).astype(np.float32)
    params = {"steps": 3, "seed": 5, "sampler": "ddpm", "start": "noise"}
    whole, tile = sampler_model.execute(
        [
            _Request(z, params),
            _Request(z[:, :, 4:12, 6:16], {**params, "origin_y": 4, "origin_x": 6}),
        ]
    )
    np.testing.assert_array_equal(tile.outputs["z"], whole.outputs["z"][:, :, 4:12, 6:16])


def test_sampler_refuses_latents_outside_its_sides_and_misaligned_origins(sampler_model):
    sampler_model.latent_sides = (8, 16)
    sampler_model.vae_factor = 8  # one latent pixel per 2 LR pixels
    z = np.zeros((1, 4, 8, 8), np.float32)
    ok, small, odd = sampler_model.execute(
        [
            _Request(z, {"steps": 1, "origin_y": 4}),
            _Request(z[:, :, :4, :4], {"steps": 1}),
            _Request(z, {"steps": 1, "origin_x": 3}),
        ]
    )
    assert ok.error is None
    assert small.error.code == "INVALID_ARG" and "4x4" in small.error.message()
    assert odd.error.code == "INVALID_ARG" and "'origin_x' must be a multiple of 2" in (
        odd.error.message()
    )


def test_batch_buckets_are_powers_of_two_up_to_the_cap():
    """The fused layout on CUDA runs a dynamic batch at its bucket's size: few shapes."""
    buckets = [serving.batch_bucket(n, 64) for n in range(1, 65)]
    assert sorted(set(buckets)) == [1, 2, 4, 8, 16, 32, 64]
    assert all(b >= n for n, b in zip(range(1, 65), buckets, strict=True))
    assert serving.batch_bucket(5, 6) == 6  # capped: a chunk never grows past its budget
    assert serving.batch_bucket(9, 6) == 9  # more rows than the cap: run as they are
