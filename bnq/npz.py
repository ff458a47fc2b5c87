"""bnq's `.npz` model format: a model as plain NumPy arrays, read without trusting them.

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

A `.npz` is read without trusting it: every array's header is checked before its data is read (no
object arrays, so nothing is unpickled; no more bytes than the member holds or than an ONNX model
can, MAX_TENSOR_BYTES), and the description is checked against the schema field by field.
"""

from __future__ import annotations

import json
import math
import reprlib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnq import ops
from bnq.errors import BnqError, ModelError, one_line
from bnq.graph import default_opset, node_label, numpy_dtype, tensor_array
from bnq.limits import check_size

GRAPH_KEY = "__graph__"
NPZ_FORMAT = "bnq.npz"
NPZ_VERSION = 1
MAX_TENSOR_BYTES = 2**31  # protobuf's limit: a larger tensor cannot be in a model at all


def to_npz_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The `.npz` arrays of `model`: its constants plus the JSON description under `__graph__`."""
    graph = model.graph
    foreign = [f.name for f in model.functions if f.domain != ops.DOMAIN]
    if foreign:
        raise ModelError(f"the model defines local functions ({', '.join(foreign)}) that the .npz "
                         "format cannot express; keep it as .onnx")
    arrays = {tensor.name: tensor_array(tensor, f"initializer {tensor.name!r}")
              for tensor in graph.initializer}
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
    arrays[GRAPH_KEY] = np.array(json.dumps(description, indent=1, default=_not_utf8))
    return arrays


def _not_utf8(value: Any) -> None:
    """json.dumps' fallback: protobuf hands out a name that is not valid UTF-8 as bytes."""
    raise ModelError(f"the model has a name that is not valid UTF-8 ({reprlib.repr(value)}), "
                     "which the .npz format cannot hold; keep the model as .onnx")


def _attribute_to_json(node: onnx.NodeProto, index: int, attribute: onnx.AttributeProto,
                       arrays: dict[str, np.ndarray]) -> Any:
    kind = attribute.type
    if kind == onnx.AttributeProto.TENSOR:
        key = f"@{index}.{attribute.name}"
        arrays[key] = tensor_array(attribute.t, f"node {node_label(node)}: attribute "
                                               f"{attribute.name!r}")
        return {"array": key}
    if kind in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS):
        value = helper.get_attribute_value(attribute)
        return float(value) if kind == onnx.AttributeProto.FLOAT else [float(v) for v in value]
    if kind in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS):
        return helper.get_attribute_value(attribute) if kind == onnx.AttributeProto.INT else \
            list(helper.get_attribute_value(attribute))
    try:
        if kind == onnx.AttributeProto.STRING:
            return attribute.s.decode()
        if kind == onnx.AttributeProto.STRINGS:
            return [s.decode() for s in attribute.strings]
    except UnicodeDecodeError as error:
        raise ModelError(f"node {node_label(node)}: attribute {attribute.name!r} is not valid "
                         "UTF-8, which the .npz format cannot hold; keep the model as .onnx") \
            from error
    raise ModelError(f"node {node_label(node)}: attribute {attribute.name!r} of type "
                     f"{onnx.AttributeProto.AttributeType.Name(kind)} cannot be written to .npz; "
                     "keep the model as .onnx")


def _value_to_json(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor_type = value.type.tensor_type
    shape = None
    if tensor_type.HasField("shape"):
        shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                 for dim in tensor_type.shape.dim]
    dtype = numpy_dtype(tensor_type.elem_type)
    if dtype is None or dtype.kind not in "biuf":
        raise ModelError(f"graph input or output {value.name!r} has element type "
                         f"{tensor_type.elem_type}, which the .npz format cannot hold (numeric "
                         "tensors only); keep the model as .onnx")
    return {"name": value.name, "dtype": dtype.name, "shape": shape}


def read_npy_header(handle: IO[bytes], where: str,
                    error: type[BnqError]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from the header of the `.npy` stream `where`, which is left
    at the start of the data. Reads no data; refuses, as `error`, a stream that is no `.npy`
    array and an object array (which only unpickling could read)."""
    try:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read_header(handle)
        if any(dim < 0 for dim in shape):
            raise ValueError(f"negative dimension in shape {list(shape)}")
    except ValueError as cause:
        raise error(f"{where} is not a NumPy array ({one_line(cause)})") from cause
    if dtype.hasobject:
        raise error(f"{where} holds a pickled object array, which bnq never unpickles; save plain "
                    "numeric arrays")
    return tuple(shape), fortran, dtype


def read_npz(path: Path) -> onnx.ModelProto:
    """The model in the `.npz` file at `path`, read without trusting it (module docstring)."""
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            # each member holds no more than its size in the directory (checked as it is read)
            check_size(sum(info.file_size for info in archive.infolist()),
                       f"{path}: the arrays of the model", ModelError)
            arrays = {info.filename.removesuffix(".npy"): _read_member(path, archive, info)
                      for info in archive.infolist()}
    except BnqError:
        raise
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as error:
        raise ModelError(f"{path}: not a readable .npz file ({one_line(error)})") from error
    return from_npz_arrays(arrays, source=str(path))


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One array of the archive, its header checked before any data is read: never an object
    array (which would be unpickled), never more bytes than the member holds or a model can."""
    where = f"{path}: array {info.filename.removesuffix('.npy')!r}"
    with archive.open(info) as handle:
        shape, _, dtype = read_npy_header(handle, where, ModelError)
        size = math.prod(shape) * dtype.itemsize
        if size > MAX_TENSOR_BYTES:
            raise ModelError(f"{where} declares shape {list(shape)} ({size} bytes), more than an "
                             "ONNX model can hold (2 GiB); refusing")
        if size > info.file_size - handle.tell():
            raise ModelError(f"{where} is truncated: its header declares shape {list(shape)} "
                             f"({size} bytes) but it holds fewer")
    with archive.open(info) as handle:
        return np.lib.format.read_array(handle, allow_pickle=False)


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
    except (json.JSONDecodeError, RecursionError) as error:
        raise ModelError(f"{source}: {GRAPH_KEY!r} is not valid JSON ({one_line(error)})") from error
    _check_description(description, source)
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ModelError(f"{source}: array {key!r} has dtype {array.dtype}; "
                             "only numeric arrays are model tensors")
    # ONNX stores little-endian; a big-endian array is the same numbers in another byte order
    arrays = {key: array.astype(array.dtype.newbyteorder("=")) for key, array in arrays.items()}
    return _model_from_description(description, arrays, source)


def _is_list_of(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _is_shape(value: Any) -> bool:
    return value is None or isinstance(value, list) and all(
        dim is None or isinstance(dim, str) or (type(dim) is int and 0 <= dim < 2**63)
        for dim in value)


# field -> (required, test, what it must be), for the values and nodes of the description
_VALUE_SCHEMA = {"name": (True, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
                 "dtype": (True, lambda v: isinstance(v, str), "a NumPy dtype name"),
                 "shape": (False, _is_shape, "null or a list of ints >= 0, strings or nulls")}
_NODE_SCHEMA = {"op": (True, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
                "inputs": (True, _is_list_of(str), "a list of strings"),
                "outputs": (True, _is_list_of(str), "a list of strings"),
                "name": (False, lambda v: isinstance(v, str), "a string"),
                "domain": (False, lambda v: isinstance(v, str), "a string"),
                "attrs": (False, lambda v: isinstance(v, dict), "an object")}


def _check_description(description: Any, source: str) -> None:
    """Refuse a description that does not follow the schema, naming the field at fault."""
    def fail(what: str) -> None:
        raise ModelError(f"{source}: malformed graph description in {GRAPH_KEY!r}: {what} "
                         "(see the .npz format in the README)")

    if not isinstance(description, dict):
        fail("the JSON must be an object")
    if description.get("format") != NPZ_FORMAT or description.get("version") != NPZ_VERSION:
        raise ModelError(f"{source}: not a {NPZ_FORMAT} version {NPZ_VERSION} description")
    opset, newest = description.get("opset"), onnx.defs.onnx_opset_version()
    if type(opset) is not int or not 1 <= opset <= newest:
        fail(f"'opset' must be an ONNX opset number from 1 to {newest}, not {reprlib.repr(opset)}")
    for section, schema in (("inputs", _VALUE_SCHEMA), ("outputs", _VALUE_SCHEMA),
                            ("nodes", _NODE_SCHEMA)):
        entries = description.get(section)
        if not isinstance(entries, list):
            fail(f"{section!r} must be a list")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                fail(f"{section}[{index}] must be an object")
            for field, (required, test, shape) in schema.items():
                if (required or field in entry) and not test(entry.get(field)):
                    fail(f"{section}[{index}].{field} must be {shape}, not "
                         f"{reprlib.repr(entry.get(field))}")


def _model_from_description(description: dict, arrays: dict[str, np.ndarray],
                            source: str) -> onnx.ModelProto:
    opset = description["opset"]
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
    graph = helper.make_graph(nodes, "bnq",
                              [_value_from_json(v, source) for v in description["inputs"]],
                              [_value_from_json(v, source) for v in description["outputs"]],
                              initializers)
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
        key = value.get("array")
        if list(value) != ["array"] or not isinstance(key, str):
            raise ModelError(f"{source}: node {label}: attribute {name!r} = {reprlib.repr(value)}: a tensor "
                             "attribute is written {\"array\": KEY}")
        if key not in arrays:
            raise ModelError(f"{source}: node {label} refers to array {key!r}, which is not in the file")
        return helper.make_attribute(name, numpy_helper.from_array(arrays[key]))
    if value == []:
        return helper.make_attribute(name, [], attr_type=onnx.AttributeProto.INTS)
    try:
        return helper.make_attribute(name, value)
    except (TypeError, ValueError) as error:
        raise ModelError(f"{source}: node {label}: attribute {name!r} = {reprlib.repr(value)} is not a number, "
                         "string, list of them or {\"array\": KEY}") from error


def _value_from_json(value: dict[str, Any], source: str) -> onnx.ValueInfoProto:
    try:
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biuf":
            raise TypeError(f"{dtype} is not a numeric dtype")
        elem_type = helper.np_dtype_to_tensor_dtype(dtype)
    except (TypeError, ValueError) as error:
        raise ModelError(f"{source}: graph input or output {value['name']!r}: dtype "
                         f"{value['dtype']!r} is not a numeric tensor type ({one_line(error)})") \
            from error
    return helper.make_tensor_value_info(value["name"], elem_type, value.get("shape"))
