"""Fuzzing: mutated models fail cleanly or fuse correctly, and nothing else happens.

Valid small models (a hand-built Conv / BatchNormalization / Relu graph and the shipped
`samples/digits_cnn.onnx`) are mutated three ways, and each mutant goes through `bnq fuse`:

* bytes of the `.onnx` file: flipped, truncated, inserted, deleted;
* the ONNX structure: a node input dropped, an attribute's type changed or one added, an
  initializer deleted or made a graph input, a tensor's dtype, dims or values changed (NaN,
  negative or zero BN statistics), an output renamed or added, the opset changed, nodes
  reordered, retyped or duplicated;
* `.npz` models: the JSON graph description (a field deleted or replaced by another JSON value)
  and the arrays (dropped, retyped, reshaped).

The contract: the library (`bnq.load_model` then `bnq.fuse` then `bnq.save_model`) raises only
`BnqError`, and a model that fuses gives the mutant's outputs in onnxruntime (random inputs,
to float rounding); the CLI exits 0 with a model that passes the full ONNX checker, or exits 1 with
exactly one `Error: ...` line and no "internal error", leaving no output or temporary file; and
no example takes longer than the hypothesis deadline (no hang).

By default each property runs a few dozen examples, to keep the suite fast. For a longer run set
`BNQ_FUZZ_EXAMPLES`, the number of examples per property:

    BNQ_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import io
import json
import os
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import max_relative_error, random_feeds, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnq import BnqError, fuse, load_model, save_model
from bnq.cli import cli
from bnq.npz import to_npz_arrays

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("BNQ_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=20), derandomize="BNQ_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


def small_model() -> onnx.ModelProto:
    """x -> Conv -> BatchNormalization -> Relu -> BatchNormalization -> Relu -> Gemm: one fold,
    one fusion, one of each attribute type (ints, float, int)."""
    rng = np.random.default_rng(0)

    def bn(prefix: str) -> list:
        return [numpy_helper.from_array(rng.uniform(0.5, 1.5, 2).astype(np.float32), f"{prefix}{k}")
                for k in ("g", "b", "m", "v")]

    nodes = [
        helper.make_node("Conv", ["x", "w", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "1g", "1b", "1m", "1v"], ["b1"], name="bn1",
                         epsilon=1e-3),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("BatchNormalization", ["r1", "2g", "2b", "2m", "2v"], ["b2"], name="bn2"),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "gw"], ["y"], name="gemm", transB=1),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "cb"),
        *bn("1"), *bn("2"),
        numpy_helper.from_array(rng.standard_normal((3, 32)).astype(np.float32), "gw"),
    ]
    graph = helper.make_graph(
        nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


BASES = {"small": small_model(), "digits": onnx.load(ROOT / "samples" / "digits_cnn.onnx")}
BASE_BYTES = {name: model.SerializeToString() for name, model in BASES.items()}


# ---------------------------------------------------------------------------------------------
# the contract

def library_contract(path: Path, out: Path) -> bool:
    """load, fuse and save raise nothing but BnqError; a model that fuses computes what the
    mutant computes (when onnxruntime runs the mutant). Returns whether outputs were compared."""
    try:
        model = load_model(path)
        fused, _ = fuse(model)
        save_model(fused, out, overwrite=True)
        save_model(fused, out.with_suffix(".npz"), overwrite=True)
    except BnqError as error:
        assert "\n" not in str(error), str(error)
        return False
    finally:
        for leftover in (out, out.with_suffix(".npz")):
            leftover.unlink(missing_ok=True)
    return same_outputs(model, fused)


def same_outputs(model: onnx.ModelProto, fused: onnx.ModelProto) -> bool:
    """The fused model's outputs equal the mutant's in onnxruntime (to float rounding: folding
    reorders products), NaN and infinities in the same places. False when onnxruntime cannot
    run the mutant itself (a mutated type or shape): nothing to compare with."""
    try:
        feeds = random_feeds(model, np.random.default_rng(0))
        expected = run_ort(model, feeds)
    except Exception:  # noqa: BLE001 - whatever onnxruntime or numpy refuses
        return False
    actual = run_ort(fused, feeds)
    assert len(actual) == len(expected)
    for reference, got in zip(expected, actual):
        assert reference.shape == got.shape and reference.dtype == got.dtype
        finite = np.isfinite(reference)
        np.testing.assert_array_equal(np.isnan(reference), np.isnan(got))
        np.testing.assert_array_equal(reference[np.isinf(reference)], got[np.isinf(reference)])
        assert max_relative_error(reference[finite], got[finite]) <= 1e-4
    return True


def cli_contract(path: Path) -> None:
    """`bnq fuse` exits 0 with a checked model, or 1 with one error line and nothing written."""
    before = sorted(path.parent.iterdir())
    out = path.parent / "fused.onnx"
    result = CliRunner().invoke(cli, ["fuse", str(path), "-o", str(out)])
    assert "internal error" not in result.output and "Traceback" not in result.output, \
        result.output
    if result.exit_code == 0:
        onnx.checker.check_model(onnx.load(out), full_check=True)
        out.unlink()
    else:
        assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert sorted(path.parent.iterdir()) == before  # no output, no temporary file


def check(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    cli_contract(path)
    library_contract(path, path.parent / "library.onnx")
    assert path.read_bytes() == data  # the input is never touched


class Mutant(bytes):
    """A mutated file, shown in hypothesis' reports by how it was made, not by its bytes."""

    how: str = ""

    def __repr__(self) -> str:
        return f"Mutant({self.how}, {len(self)} bytes)"


def mutant(data: bytes, how: list) -> Mutant:
    made = Mutant(data)
    made.how = " + ".join(map(str, how))
    return made


# ---------------------------------------------------------------------------------------------
# byte mutations

@st.composite
def byte_mutants(draw) -> bytes:
    base = draw(st.sampled_from(sorted(BASE_BYTES)))
    data, how = bytearray(BASE_BYTES[base]), [base]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        how.append(f"{kind}@{at}")
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x08, 0x0A, 0x12, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 64))]
    return mutant(bytes(data), how)


@FUZZ
@given(data=byte_mutants())
def test_byte_mutants_of_onnx_files(tmp_path, data):
    check(tmp_path / "model.onnx", data)


# ---------------------------------------------------------------------------------------------
# structural mutations

ELEM_TYPES = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64,
              TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING,
              TensorProto.UNDEFINED, 999]


def _drop_node_input(model, draw):
    node = draw(st.sampled_from(list(model.graph.node)))
    if node.input:
        index = draw(st.integers(0, len(node.input) - 1))
        if draw(st.booleans()):
            node.input[index] = ""  # an optional input left out
        else:
            del node.input[index]


def _change_attribute_type(model, draw):
    nodes = [n for n in model.graph.node if n.attribute]
    if not nodes:
        return
    attribute = draw(st.sampled_from(list(draw(st.sampled_from(nodes)).attribute)))
    value = draw(st.sampled_from([1.5, 7, -1, 0, 2**40, "text", [1, 2], [0.5], ["a"], []]))
    replacement = helper.make_attribute(attribute.name, value) if value != [] else \
        helper.make_attribute(attribute.name, [], attr_type=onnx.AttributeProto.FLOATS)
    attribute.CopyFrom(replacement)


def _add_attribute(model, draw):
    node = draw(st.sampled_from(list(model.graph.node)))
    name = draw(st.sampled_from(["training_mode", "spatial", "epsilon", "group", "transB",
                                 "axis", "momentum", "bogus"]))
    node.attribute.append(helper.make_attribute(name, draw(st.sampled_from([0, 1, 2, 1e-30,
                                                                            -1.0]))))


def _delete_initializer(model, draw):
    if model.graph.initializer:
        del model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]


def _change_initializer(model, draw):
    if not model.graph.initializer:
        return
    tensor = draw(st.sampled_from(list(model.graph.initializer)))
    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError):  # an earlier mutation broke it already
        return
    kind = draw(st.sampled_from(["dtype", "dims", "values", "empty"]))
    if kind == "dtype":
        tensor.data_type = draw(st.sampled_from(ELEM_TYPES))
    elif kind == "dims":
        del tensor.dims[:]
        tensor.dims.extend(draw(st.lists(st.integers(0, 40), max_size=4)))
    elif kind == "values":
        value = draw(st.sampled_from([np.nan, np.inf, -1.0, 0.0, 1e38]))
        tensor.CopyFrom(numpy_helper.from_array(np.full_like(array, value) if array.dtype.kind == "f"
                                                else array, tensor.name))
    else:
        tensor.CopyFrom(numpy_helper.from_array(np.zeros((0,), array.dtype), tensor.name))


def _change_value_type(model, draw):
    values = list(model.graph.input) + list(model.graph.output)
    value = draw(st.sampled_from(values))
    if draw(st.booleans()):
        value.type.tensor_type.elem_type = draw(st.sampled_from(ELEM_TYPES))
    else:
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for dim in draw(st.lists(st.one_of(st.integers(0, 9), st.just("N")), max_size=5)):
            shape.dim.add(**({"dim_param": dim} if isinstance(dim, str) else {"dim_value": dim}))


def _rename_output(model, draw):
    name = draw(st.sampled_from(["renamed", "x", "w", "y", ""]))
    if draw(st.booleans()):
        node = draw(st.sampled_from(list(model.graph.node)))
        node.output[0] = name
    else:
        model.graph.output[0].name = name


def _change_opset(model, draw):
    model.opset_import[0].version = draw(st.sampled_from([1, 6, 7, 9, 13, 15, 21, 99]))


def _reorder_nodes(model, draw):
    nodes = list(model.graph.node)
    order = draw(st.permutations(range(len(nodes))))
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)


def _change_op(model, draw):
    node = draw(st.sampled_from(list(model.graph.node)))
    node.op_type = draw(st.sampled_from(["BatchNormalization", "Relu", "Conv", "Gemm",
                                         "ConvTranspose", "Identity", "NoSuchOp"]))
    if draw(st.booleans()):
        node.domain = draw(st.sampled_from(["bnq", "com.microsoft", "nowhere"]))


def _duplicate_node(model, draw):
    node = draw(st.sampled_from(list(model.graph.node)))
    model.graph.node.append(node)


def _initializer_to_input(model, draw):
    """A parameter becomes an overridable default (also a graph input) or a plain input."""
    if not model.graph.initializer:
        return
    index = draw(st.integers(0, len(model.graph.initializer) - 1))
    tensor = model.graph.initializer[index]
    model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                           list(tensor.dims)))
    if draw(st.booleans()):
        del model.graph.initializer[index]


def _expose_tensor(model, draw):
    """An intermediate tensor becomes a graph output too: a second reader of it."""
    node = draw(st.sampled_from(list(model.graph.node)))
    if node.output and node.output[0] not in {v.name for v in model.graph.output}:
        model.graph.output.append(helper.make_tensor_value_info(node.output[0],
                                                                TensorProto.FLOAT, None))


def _change_bn_statistics(model, draw):
    """BatchNormalization parameters the checker accepts but arithmetic may not."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    constants = {t.name: t for t in model.graph.initializer}
    if not bns:
        return
    name = draw(st.sampled_from(list(draw(st.sampled_from(bns)).input[1:5])))
    if name in constants:
        array = numpy_helper.to_array(constants[name]).copy()
        array[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from(
            [0.0, -1.0, np.nan, np.inf, 1e38, 1e-38, -0.0]))
        constants[name].CopyFrom(numpy_helper.from_array(array, name))


# checker-clean mutations first: shrinking tries earlier list entries first
MUTATIONS = [_change_bn_statistics, _initializer_to_input, _expose_tensor, _add_attribute,
             _change_initializer, _drop_node_input, _change_attribute_type, _delete_initializer,
             _change_value_type, _rename_output, _change_opset, _reorder_nodes, _change_op,
             _duplicate_node]


@st.composite
def structural_mutants(draw) -> bytes:
    base = draw(st.sampled_from(sorted(BASES)))
    model = onnx.ModelProto()
    model.CopyFrom(BASES[base])
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=2))
    for mutation in mutations:
        mutation(model, draw)
    return mutant(model.SerializeToString(), [base, *(m.__name__ for m in mutations)])


@FUZZ
@given(data=structural_mutants())
def test_structural_mutants_of_onnx_models(tmp_path, data):
    check(tmp_path / "model.onnx", data)


# ---------------------------------------------------------------------------------------------
# .npz mutations

NPZ_BASES = {name: to_npz_arrays(model) for name, model in BASES.items()}
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 2**65), st.floats(allow_nan=False),
              st.sampled_from(["", "x", "w", "float32", "Conv", "bnq", "N"])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(["array", "name", "op"]), children,
                                               max_size=2)),
    max_leaves=6)


def _paths(value, prefix=()):
    """Every path into a JSON value, as tuples of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


@st.composite
def npz_mutants(draw) -> bytes:
    base = draw(st.sampled_from(sorted(NPZ_BASES)))
    arrays, how = dict(NPZ_BASES[base]), [base]
    graph = json.loads(str(arrays["__graph__"]))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["json-replace", "json-delete", "array-drop", "array-dtype",
                                     "array-shape"]))
        how.append(kind)
        keys = sorted(k for k in arrays if k != "__graph__")
        if kind.startswith("json"):
            path = draw(st.sampled_from(list(_paths(graph))[1:]))
            parent = graph
            for step in path[:-1]:
                parent = parent[step]
            if kind == "json-delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(JSON_VALUES)
        elif keys:
            key = draw(st.sampled_from(keys))
            if kind == "array-drop":
                del arrays[key]
            elif kind == "array-dtype" and arrays[key].dtype.kind in "biufc":
                dtype = draw(st.sampled_from(["float64", "float16", "int32", "uint8", "bool",
                                              ">f4", "complex64", "U3"]))
                with warnings.catch_warnings():  # complex to real drops the imaginary part
                    warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
                    arrays[key] = arrays[key].astype(dtype)
            elif kind == "array-shape":
                arrays[key] = arrays[key].reshape(-1)[:draw(st.integers(0, 8))]
    arrays["__graph__"] = np.array(json.dumps(graph))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return mutant(buffer.getvalue(), how)


@FUZZ
@given(data=npz_mutants())
def test_npz_model_mutants(tmp_path, data):
    check(tmp_path / "model.npz", data)


@pytest.mark.parametrize("name", sorted(BASES))
def test_the_unmutated_models_fuse(tmp_path, name):
    """The fuzzing starts from models that work, so a failure is the mutation's doing."""
    check(tmp_path / "model.onnx", BASE_BYTES[name])
    assert library_contract(tmp_path / "model.onnx", tmp_path / "library.onnx")  # compared
    fused, report = fuse(BASES[name])
    assert report.count("folded") + report.count("fused") >= 2
