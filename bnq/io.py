"""Reading and writing models: ONNX files and bnq's `.npz` model format.

The `.npz` format holds a model as plain arrays plus one JSON description, so that weights from any
framework can be written with a few lines of NumPy and read back without unpickling anything:

* key `__graph__`: a 0-d string array with the JSON graph (schema below);
* every other key: a constant tensor (a Conv weight, BatchNormalization statistics, ...) named as
  the tensors that the nodes read.

    {"format": "bnq.npz", "version": 1,
     "opset": 17,                                      # default ONNX domain version
     "inputs":  [{"name": "input", "dtype": "float32", "shape": ["N", 1, 8, 8]}],
     "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 10]}],
     "nodes": [{"op": "Conv", "inputs": ["input", "w", "b"], "outputs": ["c"],
                "name": "conv1", "attrs": {"pads": [1, 1, 1, 1]}},
               {"op": "BatchNormRelu", "domain": "bnq", ...}]}

Any ONNX operator whose attributes are numbers, strings, lists of them or tensors can be written:
an int is INT, a float FLOAT, a string STRING, a list of those INTS / FLOATS / STRINGS, and
`{"array": KEY}` a TENSOR stored under KEY. Shapes list ints, strings (named dynamic dimensions)
or null. `domain` defaults to the ONNX domain and `name` to none. Nodes of bnq's own domain get
their function bodies attached when the model is read.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from bnq import ops
from bnq.errors import BnqError, ModelError
from bnq.graph import MIN_OPSET, default_opset, node_label

GRAPH_KEY = "__graph__"
NPZ_FORMAT = "bnq.npz"
NPZ_VERSION = 1
MODEL_SUFFIXES = (".onnx", ".npz")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an `.onnx` or `.npz` model and check that it is a well-formed model bnq can work on."""
    path = Path(path)
    _model_suffix(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    model = _read_onnx(path) if path.suffix.lower() == ".onnx" else _read_npz(path)
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(f"{path}: opset {opset} is older than {MIN_OPSET}, the oldest bnq reads; "
                         "upgrade it with onnx.version_converter")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise ModelError(f"{path}: not a valid ONNX model: {_first_line(error)}") from error
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write `model` as `.onnx` or `.npz` (by extension), atomically: all of it or nothing."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        data = model.SerializeToString()
        write_atomic(path, lambda handle: handle.write(data), overwrite=overwrite)
    else:
        _model_suffix(path)
        arrays = to_npz_arrays(model)
        write_atomic(path, lambda handle: np.savez(handle, **arrays), overwrite=overwrite)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any], *, overwrite: bool = False) -> None:
    """Write a file through a temporary sibling and a rename, so readers never see half of it."""
    if path.exists() and not overwrite:
        raise BnqError(f"{path} already exists (use --force to overwrite it)")
    if not path.parent.is_dir():
        raise BnqError(f"{path}: the directory {path.parent} does not exist")
    try:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    except OSError as error:
        raise BnqError(f"{path}: cannot write there ({error.strerror})") from error
    try:
        with handle:
            write(handle)
        os.chmod(handle.name, 0o666 & ~_umask())  # as open() would have made it, not 0600
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike], *,
                      overwrite: bool) -> Path:
    """Refuse an output that is one of the inputs, or that exists when `overwrite` is off."""
    output = Path(output)
    for source in inputs:
        if output.resolve() == Path(source).resolve():
            raise BnqError(f"{output}: the output would overwrite the input; choose another path")
    if output.exists() and not overwrite:
        raise BnqError(f"{output} already exists (use --force to overwrite it)")
    _model_suffix(output)
    if not output.parent.is_dir():
        raise BnqError(f"{output}: the directory {output.parent} does not exist")
    return output


def _model_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise ModelError(f"{path}: unknown model format {suffix or '(no extension)'!r}; "
                         "use .onnx or .npz")
    return suffix


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as error:
        raise ModelError(f"{path}: not an ONNX model ({_first_line(error)})") from error
    if not model.HasField("graph") or not model.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph or no opset)")
    return model


# ---------------------------------------------------------------------------------------------
# .npz <-> ModelProto

def to_npz_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The `.npz` arrays of `model`: its constants plus the JSON description under `__graph__`."""
    graph = model.graph
    foreign = [f.name for f in model.functions if f.domain != ops.DOMAIN]
    if foreign:
        raise ModelError(f"the model defines local functions ({', '.join(foreign)}) that the .npz "
                         "format cannot express; keep it as .onnx")
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    nodes = []
    for index, node in enumerate(graph.node):
        entry: dict[str, Any] = {"op": node.op_type, "inputs": list(node.input),
                                 "outputs": list(node.output)}
        if node.name:
            entry["name"] = node.name
        if node.domain not in ("", "ai.onnx"):
            entry["domain"] = node.domain
        attrs = {}
        for attribute in node.attribute:
            attrs[attribute.name] = _attribute_to_json(node, index, attribute, arrays)
        if attrs:
            entry["attrs"] = attrs
        nodes.append(entry)
    description = {
        "format": NPZ_FORMAT, "version": NPZ_VERSION, "opset": default_opset(model),
        "inputs": [_value_to_json(v) for v in graph.input if v.name not in arrays],
        "outputs": [_value_to_json(v) for v in graph.output],
        "nodes": nodes,
    }
    if GRAPH_KEY in arrays:
        raise ModelError(f"the model has a tensor named {GRAPH_KEY!r}, which the .npz format reserves")
    arrays[GRAPH_KEY] = np.array(json.dumps(description, indent=1))
    return arrays


def _attribute_to_json(node: onnx.NodeProto, index: int, attribute: onnx.AttributeProto,
                       arrays: dict[str, np.ndarray]) -> Any:
    kind = attribute.type
    if kind == onnx.AttributeProto.TENSOR:
        key = f"@{index}.{attribute.name}"
        arrays[key] = numpy_helper.to_array(attribute.t)
        return {"array": key}
    if kind in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS):
        value = helper.get_attribute_value(attribute)
        return float(value) if kind == onnx.AttributeProto.FLOAT else [float(v) for v in value]
    if kind in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS):
        return helper.get_attribute_value(attribute) if kind == onnx.AttributeProto.INT else \
            list(helper.get_attribute_value(attribute))
    if kind == onnx.AttributeProto.STRING:
        return attribute.s.decode()
    if kind == onnx.AttributeProto.STRINGS:
        return [s.decode() for s in attribute.strings]
    raise ModelError(f"node {node_label(node)}: attribute {attribute.name!r} of type "
                     f"{onnx.AttributeProto.AttributeType.Name(kind)} cannot be written to .npz; "
                     "keep the model as .onnx")


def _value_to_json(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor_type = value.type.tensor_type
    shape = None
    if tensor_type.HasField("shape"):
        shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                 for dim in tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _read_npz(path: Path) -> onnx.ModelProto:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ModelError(f"{path}: holds a pickled object array, which bnq never loads; "
                             "save plain numeric arrays") from error
        raise ModelError(f"{path}: not a readable .npz file ({_first_line(error)})") from error
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ModelError(f"{path}: not a .npz file ({_first_line(error)})") from error
    return from_npz_arrays(arrays, source=str(path))


def from_npz_arrays(arrays: dict[str, np.ndarray], source: str = "the .npz model") -> onnx.ModelProto:
    """Build a ModelProto from `.npz` arrays (see the module docstring for the schema)."""
    arrays = dict(arrays)
    raw = arrays.pop(GRAPH_KEY, None)
    if raw is None:
        raise ModelError(f"{source}: no {GRAPH_KEY!r} key; a bnq .npz model needs its JSON graph there")
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise ModelError(f"{source}: {GRAPH_KEY!r} must be a 0-d string array holding JSON")
    try:
        description = json.loads(str(raw))
    except json.JSONDecodeError as error:
        raise ModelError(f"{source}: {GRAPH_KEY!r} is not valid JSON ({error})") from error
    try:
        return _model_from_description(description, arrays, source)
    except (KeyError, TypeError, AttributeError) as error:
        raise ModelError(f"{source}: malformed graph description ({type(error).__name__}: "
                         f"{error})") from error


def _model_from_description(description: dict, arrays: dict[str, np.ndarray],
                            source: str) -> onnx.ModelProto:
    if description.get("format") != NPZ_FORMAT or description.get("version") != NPZ_VERSION:
        raise ModelError(f"{source}: not a {NPZ_FORMAT} version {NPZ_VERSION} description")
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ModelError(f"{source}: array {key!r} has dtype {array.dtype}; "
                             "only numeric arrays are model tensors")
    opset = int(description["opset"])
    known = {value["name"] for value in description["inputs"]} | {
        key for key in arrays if not key.startswith("@")}
    nodes = []
    for index, entry in enumerate(description["nodes"]):
        op, domain = entry["op"], entry.get("domain", "")
        label = entry.get("name") or f"#{index} ({op})"
        if not _known_op(op, domain, opset):
            raise ModelError(f"{source}: node {label}: unknown operator {domain + '.' if domain else ''}"
                             f"{op} at opset {opset}")
        for name in entry["inputs"]:
            if name and name not in known:
                raise ModelError(f"{source}: node {label} reads {name!r}, which is no array, graph "
                                 "input or earlier node output")
        node = helper.make_node(op, entry["inputs"], entry["outputs"], name=entry.get("name"),
                                domain=domain or None)
        node.attribute.extend(_attribute_from_json(name, value, arrays, source, label)
                              for name, value in entry.get("attrs", {}).items())
        nodes.append(node)
        known.update(entry["outputs"])
    for value in description["outputs"]:
        if value["name"] not in known:
            raise ModelError(f"{source}: graph output {value['name']!r} is produced by no node")
    initializers = [numpy_helper.from_array(array, key) for key, array in arrays.items()
                    if not key.startswith("@")]
    graph = helper.make_graph(nodes, "bnq", [_value_from_json(v) for v in description["inputs"]],
                              [_value_from_json(v) for v in description["outputs"]], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="bnq")
    return ops.attach_functions(model)


def _known_op(op: str, domain: str, opset: int) -> bool:
    if domain == ops.DOMAIN:
        return op in ops.FUNCTIONS
    try:
        onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return False
    return True


def _attribute_from_json(name: str, value: Any, arrays: dict[str, np.ndarray], source: str,
                         label: str) -> onnx.AttributeProto:
    if isinstance(value, dict):
        key = value["array"]
        if key not in arrays:
            raise ModelError(f"{source}: node {label} refers to array {key!r}, which is not in the file")
        return helper.make_attribute(name, numpy_helper.from_array(arrays[key]))
    if value == []:
        return helper.make_attribute(name, [], attr_type=onnx.AttributeProto.INTS)
    try:
        return helper.make_attribute(name, value)
    except (TypeError, ValueError) as error:
        raise ModelError(f"{source}: node {label}: attribute {name!r} = {value!r} is not a number, "
                         "string, list of them or {\"array\": KEY}") from error


def _value_from_json(value: dict[str, Any]) -> onnx.ValueInfoProto:
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(value["dtype"]))
    return helper.make_tensor_value_info(value["name"], elem_type, value.get("shape"))
