"""Bad input, faults and hostile files: every command fails cleanly and loses nothing.

Each case runs a command through the CLI in a fresh directory and checks the contract of a
failure: exit code 1 (2 for bad usage, 130 on Ctrl-C), exactly one `Error: ...` line on stderr
that names the file, tensor or node at fault, no traceback and no "internal error", and the
directory byte for byte as before: no output, no temporary file, no input changed.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnq import BnqError
from bnq import cli as cli_module
from bnq.cli import cli
from bnq.io import write_atomic

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_NPZ = ROOT / "samples" / "digits_cnn.npz"
SAMPLE_ONNX = ROOT / "samples" / "digits_cnn.onnx"


# ---------------------------------------------------------------------------------------------
# models and data

def small_model(*, opset: int = 17, bn_attrs: dict | None = None, var=(1.0, 2.0),
                params_as_inputs: bool = False, with_bn: bool = True, head: bool = True,
                dynamic: bool = False) -> onnx.ModelProto:
    """x [N,1,4,4] -> Conv -> Relu -> BatchNormalization "bn" -> Relu [-> GlobalAveragePool ->
    Flatten]: the BN follows a Relu, so it is fused (not folded) and survives into calibration."""
    rng = np.random.default_rng(0)
    params = {"g": np.array([1.0, -0.5], np.float32), "b": np.array([0.1, 0.2], np.float32),
              "m": np.array([0.0, 0.3], np.float32), "v": np.array(var, np.float32)}
    initializers = [numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
                                            "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu0")]
    last = "r"
    if with_bn:
        nodes += [helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["bn_out"],
                                   name="bn", **(bn_attrs or {})),
                  helper.make_node("Relu", ["bn_out"], ["features"], name="relu")]
        last = "features"
        initializers += [numpy_helper.from_array(a, k) for k, a in params.items()]
    shape = ["N", 1, "H", "W"] if dynamic else ["N", 1, 4, 4]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    if params_as_inputs:  # overridable defaults: initializers that are graph inputs too
        inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, [2]) for k in params]
    if head:
        nodes += [helper.make_node("GlobalAveragePool", [last], ["p"], name="pool"),
                  helper.make_node("Flatten", ["p"], ["y"], name="flat")]
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    else:
        output = helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", 2, "H", "W"])
    graph = helper.make_graph(nodes, "small", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def training_model() -> onnx.ModelProto:
    """BatchNormalization with training_mode=1 and its running statistics outputs (valid ONNX)."""
    model = small_model(bn_attrs={"training_mode": 1})
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.output.extend(["running_mean", "running_var"])
    onnx.checker.check_model(model, full_check=True)
    return model


def samples(n: int, seed: int = 0, shape=(1, 4, 4), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(dtype)


class Evil:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_array(marker: Path, shape=(2, 1, 4, 4)) -> np.ndarray:
    array = np.zeros(shape, dtype=object)
    array.flat[0] = Evil(marker)
    return array


def _header_only(path: Path, shape) -> None:
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": shape})


def sparse_npy(path: Path, shape: tuple[int, ...]) -> None:
    """A .npy whose header declares `shape` float32, its data a hole (no disk, no memory)."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
        size = handle.tell() + int(np.prod(shape)) * 4
    os.truncate(path, size)


def npz_with_graph(path: Path, change) -> None:
    """The shipped .npz sample with `change(graph, arrays)` applied."""
    arrays = dict(np.load(SAMPLE_NPZ))
    graph = json.loads(str(arrays["__graph__"]))
    change(graph, arrays)
    arrays["__graph__"] = np.array(json.dumps(graph))
    np.savez(path, **arrays)


# ---------------------------------------------------------------------------------------------
# running the CLI and checking the contract

def snapshot(directory: Path) -> dict[str, object]:
    """Every file under `directory` (hidden temporary files too) and its bytes (its size and
    modification time when it is a multi-gigabyte sparse file)."""
    def content(path: Path) -> object:
        stat = path.stat()
        return (stat.st_size, stat.st_mtime_ns) if stat.st_size > 1 << 24 else path.read_bytes()

    return {str(p.relative_to(directory)): content(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def bnq(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


# The address space of a case run in its own process: a memory bomb that gets past bnq's
# estimates fails the test (MemoryError, an internal error) instead of taking the machine.
ADDRESS_SPACE = 4 << 30


def bnq_process(*args, stdout=subprocess.PIPE, timeout: float = 120,
                signal_after=None) -> subprocess.CompletedProcess:
    """Run `bnq *args` as a separate process, as a user would, under ADDRESS_SPACE and a time
    limit (a hang fails the test); `signal_after(process)` may signal it while it runs."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    command = [sys.executable, "-c", "from bnq.cli import main; main()", *map(str, args)]
    with subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True,
                          preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(ROOT)}) as process:
        try:
            if signal_after is not None:
                signal_after(process)
            out, err = process.communicate(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
    return subprocess.CompletedProcess(command, process.returncode, out or "", err)


def assert_fails_cleanly(directory: Path, args: list, names: tuple[str, ...], *,
                         code: int = 1, isolated: bool = False) -> str:
    """Run `bnq *args` in `directory` (`isolated`: in its own process, see `bnq_process`);
    check the failure contract and that the one error line names each of `names`. Returns
    that line."""
    before = snapshot(directory)
    if isolated:
        process = bnq_process(*args)
        exit_code, stdout, stderr, exception = (process.returncode, process.stdout,
                                                process.stderr, None)
    else:
        result = bnq(*args)
        exit_code, stdout, stderr, exception = (result.exit_code, result.stdout, result.stderr,
                                                result.exception)
    assert exit_code == code, (exit_code, stdout, stderr, exception)
    assert "Traceback" not in stderr + stdout and "internal error" not in stderr, stderr
    if code == 1:
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
        for name in names:
            assert name in lines[0], (name, lines[0])
    assert stdout == ""
    assert snapshot(directory) == before, "a file was written, left behind or changed"
    return stderr.strip()


def assert_works(args: list):
    result = bnq(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Error" not in result.stderr
    return result


@pytest.fixture
def work(tmp_path):
    """A directory with a good float model, its quantized version, and good sample data."""
    onnx.save(small_model(), tmp_path / "good.onnx")
    np.save(tmp_path / "good.npy", samples(20))
    assert_works(["calibrate", tmp_path / "good.onnx", "-d", tmp_path / "good.npy",
                  "-o", tmp_path / "quantized.onnx"])
    return tmp_path


def commands_reading_model(work: Path, model: Path) -> list[list]:
    """Every command, with `model` in each place a command reads a model."""
    good, data, quantized = work / "good.onnx", work / "good.npy", work / "quantized.onnx"
    return [["fuse", model, "-o", work / "out.onnx"],
            ["calibrate", model, "-d", data, "-o", work / "out.onnx"],
            ["evaluate", model, "-r", good, "-d", data],
            ["evaluate", quantized, "-r", model, "-d", data]]


# ---------------------------------------------------------------------------------------------
# model files

def _truncated(path: Path) -> None:
    raw = small_model().SerializeToString()
    path.write_bytes(raw[:len(raw) // 2])


def _not_checked(path: Path) -> None:
    model = small_model()
    model.graph.node[0].input[1] = "nowhere"  # reads a tensor nothing makes
    onnx.save(model, path)


def _inconsistent_types(path: Path) -> None:
    model = small_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.zeros((2, 1, 3, 3), np.float64), "w"))  # a double weight for a float input
    onnx.save(model, path)


def _external_data(location: str):
    def write(path: Path) -> None:
        model = small_model()
        weight = model.graph.initializer[0]
        weight.ClearField("raw_data")
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in {"location": location, "offset": "0", "length": "72"}.items():
            weight.external_data.add(key=key, value=value)
        path.write_bytes(model.SerializeToString())
    return write


def _negative_variance(path: Path) -> None:
    onnx.save(small_model(var=(-1.0, 1.0)), path)


def _nan_variance(path: Path) -> None:
    onnx.save(small_model(var=(np.nan, 1.0)), path)


def _channel_mismatch(path: Path) -> None:
    model = small_model(dynamic=True)
    conv_bn = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
               helper.make_node("BatchNormalization", ["c", "g3", "b3", "m3", "v3"], ["y"],
                                name="bn3")]
    del model.graph.node[:]
    model.graph.node.extend(conv_bn)
    model.graph.initializer.extend(numpy_helper.from_array(np.ones(3, np.float32), name)
                                   for name in ("g3", "b3", "m3", "v3"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                          ["N", "C", "H", "W"]))
    onnx.save(model, path)


BAD_ONNX = {
    "missing": (None, "no such model file"),
    "empty": (lambda p: p.write_bytes(b""), "not an ONNX model"),
    "truncated": (_truncated, "not an ONNX model"),
    "random-bytes": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(777)),
                     "not an ONNX model"),
    "tensor-proto": (lambda p: p.write_bytes(numpy_helper.from_array(
        np.ones(3, np.float32), "t").SerializeToString()), "not an ONNX model"),
    "graph-proto": (lambda p: p.write_bytes(small_model().graph.SerializeToString()),
                    "not an ONNX model"),
    "fails-checker": (_not_checked, "nowhere"),
    "inconsistent-types": (_inconsistent_types, "conv"),
    "opset-6": (lambda p: onnx.save(small_model(opset=6), p), "opset 6"),
    "external-data-absolute": (_external_data("/etc/passwd"), "/etc/passwd"),
    "external-data-outside": (_external_data("../../etc/passwd"), "outside"),
    "external-data-missing": (_external_data("weights.bin"), "weights.bin"),
    "negative-variance": (_negative_variance, "'v' holds negative values"),
    "nan-variance": (_nan_variance, "'v' holds NaN"),
    "channel-mismatch": (_channel_mismatch, "bn3"),
    "unknown-suffix": (lambda p: None, "unknown model format"),
}


@pytest.mark.parametrize("case", BAD_ONNX)
def test_bad_onnx_models_fail_cleanly_in_every_command(work, case):
    write, message = BAD_ONNX[case]
    model = work / ("model.txt" if case == "unknown-suffix" else "model.onnx")
    if write is not None:
        write(model)
    commands = commands_reading_model(work, model)
    if "variance" in case:  # a valid model that fusion refuses: the message names the node
        commands, names = commands[:2], ("BatchNormalization bn",)
    else:
        names = (model.name,)
    for args in commands:
        line = assert_fails_cleanly(work, args, names)
        assert message in line, line


def _pickled_npz(path: Path) -> None:
    arrays = dict(np.load(SAMPLE_NPZ))
    np.savez(path, **arrays, evil=evil_array(path.parent / "UNPICKLED"), allow_pickle=True)


def _graph_change(change):
    return lambda path: npz_with_graph(path, change)


def _drop_array(key: str):
    return lambda path: npz_with_graph(path, lambda graph, arrays: arrays.pop(key))


def _retype_array(key: str, dtype):
    def change(graph, arrays):
        arrays[key] = arrays[key].astype(dtype)
    return lambda path: npz_with_graph(path, change)


def _huge_member(path: Path) -> None:
    """A member whose header declares 4 GiB: refused from the header, nothing allocated."""
    npz_with_graph(path, lambda graph, arrays: None)
    with zipfile.ZipFile(path, "a") as archive, archive.open("huge.npy", "w") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (1 << 30,)})


def _set(path_in_graph, value):
    def change(graph, arrays):
        target = graph
        for step in path_in_graph[:-1]:
            target = target[step]
        target[path_in_graph[-1]] = value
    return _graph_change(change)


BAD_NPZ = {
    "empty": (lambda p: p.write_bytes(b""), "not a .npz file"),
    "random-bytes": (lambda p: p.write_bytes(np.random.default_rng(2).bytes(999)),
                     "not a .npz file"),
    "a-npy-inside": (lambda p: p.write_bytes((ROOT / "samples" / "calib.npz").read_bytes()),
                     "no '__graph__' key"),
    "pickled-object-array": (_pickled_npz, "'evil' holds a pickled object array"),
    "pickled-graph": (lambda p: np.savez(p, __graph__=np.array([{"x": 1}], dtype=object)),
                      "pickled"),
    "missing-weight": (_drop_array("stem.0.weight"), "'stem.0.weight'"),
    "missing-bn-statistic": (_drop_array("stem.1.running_var"), "'stem.1.running_var'"),
    "unknown-array": (_set(["nodes", 0, "inputs", 1], "ghost"), "'ghost'"),
    "unknown-op": (_set(["nodes", 0, "op"], "Frobnicate"), "Frobnicate"),
    "unknown-attribute-array": (_set(["nodes", 0, "attrs", "pads"], {"array": "nowhere"}),
                                "'nowhere'"),
    "unknown-output": (_set(["outputs", 0, "name"], "ghost_out"), "'ghost_out'"),
    "graph-not-json": (lambda p: np.savez(p, __graph__=np.array("{not json")), "not valid JSON"),
    "graph-a-list": (lambda p: np.savez(p, __graph__=np.array("[1, 2]")), "must be an object"),
    "graph-bytes": (lambda p: np.savez(p, __graph__=np.array(b"{}")), "0-d string array"),
    "no-nodes": (_graph_change(lambda g, a: g.pop("nodes")), "'nodes'"),
    "opset-string": (_set(["opset"], "x"), "'opset'"),
    "opset-huge": (_set(["opset"], 10**12), "'opset'"),
    "opset-old": (_set(["opset"], 5), "opset 5"),
    "domain-int": (_set(["nodes", 0, "domain"], 5), "nodes[0].domain"),
    "inputs-a-string": (_set(["nodes", 0, "inputs"], "input"), "nodes[0].inputs"),
    "shape-float": (_set(["inputs", 0, "shape"], ["N", 1.5, 8, 8]), "inputs[0].shape"),
    "dtype-unknown": (_set(["inputs", 0, "dtype"], "float99"), "'float99'"),
    "dtype-object": (_set(["inputs", 0, "dtype"], "object"), "'object'"),
    "attribute-nested": (_set(["nodes", 0, "attrs", "pads"], [[1]]), "'pads'"),
    "attribute-huge-int": (_set(["nodes", 0, "attrs", "pads"], 2**70), "'pads'"),
    "attribute-wrong-type": (_set(["nodes", 0, "attrs", "pads"], 1.5), "pads"),
    "weight-float64": (_retype_array("stem.0.weight", np.float64), "/stem/stem.0/Conv"),
    "weight-int32": (_retype_array("stem.0.weight", np.int32), "/stem/stem.0/Conv"),
    "weight-complex": (_retype_array("stem.0.weight", np.complex64), "'stem.0.weight'"),
    "weight-empty": (_graph_change(lambda g, a: a.update({"stem.0.weight": np.zeros(
        0, np.float32)})), "/stem/stem.1/BatchNormalization"),
    "huge-member": (_huge_member, "'huge'"),
}


@pytest.mark.parametrize("case", BAD_NPZ)
def test_bad_npz_models_fail_cleanly_in_every_command(work, case):
    write, message = BAD_NPZ[case]
    model = work / "model.npz"
    write(model)
    for args in commands_reading_model(work, model):
        line = assert_fails_cleanly(work, args, (model.name,))
        assert message in line, line
    assert not (work / "UNPICKLED").exists()


def test_the_pickle_marker_works(tmp_path):
    """The proof that nothing was unpickled is only a proof if unpickling does make the marker."""
    np.save(tmp_path / "evil.npy", evil_array(tmp_path / "UNPICKLED"), allow_pickle=True)
    np.load(tmp_path / "evil.npy", allow_pickle=True)
    assert (tmp_path / "UNPICKLED").exists()


def test_big_endian_npz_arrays_are_the_same_numbers(work):
    npz_with_graph(work / "be.npz", lambda graph, arrays: arrays.update(
        {k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items() if k != "__graph__"}))
    assert_works(["fuse", work / "be.npz", "-o", work / "be.onnx"])
    assert_works(["fuse", SAMPLE_NPZ, "-o", work / "le.onnx"])
    be, le = onnx.load(work / "be.onnx"), onnx.load(work / "le.onnx")
    assert be.graph.initializer == le.graph.initializer


# ---------------------------------------------------------------------------------------------
# models that are valid but unusual

def test_training_mode_bn_is_kept_with_its_reason(work):
    onnx.save(training_model(), work / "train.onnx")
    result = assert_works(["fuse", work / "train.onnx", "-o", work / "fused.onnx", "--json"])
    report = json.loads(result.stdout)
    assert report["kept"] == 1 and report["fused"] == report["folded"] == 0
    assert report["actions"] == [{"node": "bn", "outcome": "kept",
                                  "detail": "training_mode=1: export the model in eval mode"}]
    onnx.checker.check_model(onnx.load(work / "fused.onnx"), full_check=True)


def test_calibrating_a_training_mode_bn_fails_clearly(work):
    onnx.save(training_model(), work / "train.onnx")
    line = assert_fails_cleanly(work, ["calibrate", work / "train.onnx", "-d", work / "good.npy",
                                       "-o", work / "q.onnx"], ("bn", "training"))
    assert "eval mode" in line


def test_bn_parameters_that_are_graph_inputs_are_kept_and_the_rest_calibrates(work):
    onnx.save(small_model(params_as_inputs=True), work / "inputs.onnx")
    report = json.loads(assert_works(["fuse", work / "inputs.onnx", "-o", work / "f.onnx",
                                      "--json"]).stdout)
    assert report["kept"] == 1
    assert "'g' is computed at run time" in report["actions"][0]["detail"]
    # the initializers are defaults the caller may override, not inputs the data must feed
    assert_works(["calibrate", work / "inputs.onnx", "-d", work / "good.npy", "-o",
                  work / "q.onnx"])
    assert_works(["evaluate", work / "q.onnx", "-r", work / "inputs.onnx", "-d",
                  work / "good.npy"])


def test_a_model_without_batch_norm_says_nothing_to_fuse(work):
    onnx.save(small_model(with_bn=False), work / "plain.onnx")
    result = assert_works(["fuse", work / "plain.onnx", "-o", work / "f.onnx"])
    assert "nothing to fuse" in result.stdout
    assert (work / "f.onnx").exists()
    assert_works(["calibrate", work / "plain.onnx", "-d", work / "good.npy", "-o",
                  work / "q.onnx"])


def test_folding_that_would_overflow_keeps_the_bn(work):
    model = small_model()
    conv_bn = helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["r"], name="bn0")
    model.graph.node[1].CopyFrom(conv_bn)  # Conv -> bn0 (folds) -> bn -> Relu
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.full((2, 1, 3, 3), 1e30, np.float32), "w"))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        np.array([1e10, 1.0], np.float32), "g"))  # 1e30 * 1e10 is no float32
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, work / "huge.onnx")
    report = json.loads(assert_works(["fuse", work / "huge.onnx", "-o", work / "f.onnx",
                                      "--json"]).stdout)
    assert report["actions"][0]["outcome"] == "kept"
    assert "overflows float32" in report["actions"][0]["detail"]
    fused = onnx.load(work / "f.onnx")
    assert all(np.all(np.isfinite(numpy_helper.to_array(t))) for t in fused.graph.initializer)


def test_names_that_are_not_utf8_fuse_to_onnx_but_not_to_npz(work):
    """Found by the fuzzer: protobuf hands such a name out as bytes, which JSON cannot hold."""
    raw = small_model().SerializeToString()
    raw = raw.replace(b"relu0", b"\x80elu0", 1).replace(b"\x1a\x02bn", b"\x1a\x02\xffn", 1)
    (work / "latin.onnx").write_bytes(raw)
    assert "\\xffn" in assert_works(["fuse", work / "latin.onnx", "-o", work / "f.onnx"]).stdout
    report = json.loads(assert_works(["fuse", work / "latin.onnx", "-o", work / "g.onnx",
                                      "--json"]).stdout)
    assert report["actions"][0]["node"] == "\\xffn"
    assert_fails_cleanly(work, ["fuse", work / "latin.onnx", "-o", work / "f.npz"],
                         ("not valid UTF-8", "elu0"))


def test_an_input_without_a_tensor_type_is_refused_by_the_data_commands(work):
    model = small_model()  # an unused input: the checker's type inference never sees it
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.UNDEFINED, [1]))
    onnx.save(model, work / "untyped.onnx")
    for args in float_model_commands(work, work / "untyped.onnx"):
        assert_fails_cleanly(work, args, ("'extra'", "element type"))


def float_model_commands(work: Path, model: Path) -> list[list]:
    """The commands that read `model` as a float model with the good samples."""
    return [["calibrate", model, "-d", work / "good.npy", "-o", work / "q.onnx"],
            ["evaluate", work / "quantized.onnx", "-r", model, "-d", work / "good.npy"]]


# ---------------------------------------------------------------------------------------------
# sample data

def _write_npy(array_fn):
    return lambda p: np.save(p, array_fn())


def _nan_at(index: int, value: float):
    def make():
        x = samples(10)
        x[index, 0, 1, 1] = value
        return x
    return make


def _truncated_npy(path: Path) -> None:
    np.save(path, samples(10))
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])


BAD_DATA = {
    "missing": ("d.npy", None, "no such data file"),
    "unknown-suffix": ("d.csv", lambda p: p.write_text("1,2,3"), "unknown data format"),
    "empty-file": ("d.npy", lambda p: p.write_bytes(b""), "not a NumPy array"),
    "random-bytes": ("d.npy", lambda p: p.write_bytes(np.random.default_rng(3).bytes(300)),
                     "not a NumPy array"),
    "truncated": ("d.npy", _truncated_npy, "truncated"),
    "wrong-shape": ("d.npy", _write_npy(lambda: samples(5, shape=(1, 5, 5))), "[1, 5, 5]"),
    "wrong-rank": ("d.npy", _write_npy(lambda: samples(5, shape=(16,))), "'x'"),
    "int-dtype": ("d.npy", _write_npy(lambda: np.ones((5, 1, 4, 4), np.int64)), "int64"),
    "bool-dtype": ("d.npy", _write_npy(lambda: np.ones((5, 1, 4, 4), bool)), "bool"),
    "complex-dtype": ("d.npy", _write_npy(lambda: np.ones((5, 1, 4, 4), np.complex64)),
                      "complex64"),
    "nan": ("d.npy", _write_npy(_nan_at(7, np.nan)), "sample 7"),
    "infinity": ("d.npy", _write_npy(_nan_at(2, -np.inf)), "sample 2"),
    "zero-samples": ("d.npy", _write_npy(lambda: samples(0)), "no samples"),
    "0-d": ("d.npy", _write_npy(lambda: np.float32(1)), "0-d"),
    "fortran-order": ("d.npy", _write_npy(lambda: np.asfortranarray(samples(5))), "Fortran"),
    "npz-wrong-key": ("d.npz", lambda p: np.savez(p, a=samples(3), b=samples(3)), "'x'"),
    "npz-uneven": ("d.npz", lambda p: np.savez(p, x=samples(3), labels=np.arange(4)),
                   "different numbers of samples"),
    "npz-not-zip": ("d.npz", lambda p: p.write_bytes(b"PK nope"), "not a .npz file"),
    "empty-directory": ("d", lambda p: p.mkdir(), "no .npz, .npy or JPEG/PNG files"),
    "directory-one-bad": ("d", lambda p: (p.mkdir(), np.save(p / "a.npy", samples(3)),
                                          np.save(p / "b.npy", samples(3, shape=(2, 4, 4)))),
                          "b.npy"),
    # 10**12 samples declared in a header and nothing behind it: refused before any batch
    "declared-huge": ("d.npy", lambda p: _header_only(p, (10**12, 1, 4, 4)), "truncated"),
    "negative-dimension": ("d.npy", lambda p: _header_only(p, (-3, 1, 4, 4)), "negative"),
}


def data_commands(work: Path, data: Path) -> list[list]:
    return [["calibrate", work / "good.onnx", "-d", data, "-o", work / "out.onnx"],
            ["evaluate", work / "quantized.onnx", "-r", work / "good.onnx", "-d", data]]


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_sample_data_fails_cleanly(work, case):
    name, write, message = BAD_DATA[case]
    data = work / name
    if write is not None:
        write(data)
    commands = data_commands(work, data)
    if case == "npz-uneven":  # only evaluate reads the labels
        commands = commands[1:]
    for args in commands:
        line = assert_fails_cleanly(work, args, (name,))
        assert message in line, line


@pytest.mark.parametrize("where", ["npy", "npz"])
def test_pickled_sample_data_is_refused_never_unpickled(work, where):
    marker = work / "UNPICKLED"
    data = work / f"d.{where}"
    if where == "npy":
        np.save(data, evil_array(marker), allow_pickle=True)
    else:
        np.savez(data, x=evil_array(marker))
    for args in data_commands(work, data):
        line = assert_fails_cleanly(work, args, (data.name,))
        assert "never unpickles" in line
    np.savez(work / "labels.npz", x=samples(2), labels=evil_array(marker, (2,)))
    line = assert_fails_cleanly(work, data_commands(work, work / "labels.npz")[1],
                                ("labels.npz", "'labels'"))
    assert "never unpickles" in line
    assert not marker.exists()


def test_a_single_sample_works(work):
    np.save(work / "one.npy", samples(1))
    assert_works(["calibrate", work / "good.onnx", "-d", work / "one.npy", "-o", work / "q1.onnx"])
    result = assert_works(["evaluate", work / "q1.onnx", "-r", work / "good.onnx", "-d",
                           work / "one.npy", "--json"])
    assert json.loads(result.stdout)["samples"] == 1
    result = assert_works(["evaluate", work / "q1.onnx", "-r", work / "good.onnx", "-d",
                           work / "one.npy", "--backend", "both", "--json"])
    assert json.loads(result.stdout)["backend_max_lsb_diff"] == 0


def test_evaluate_a_model_whose_fused_node_is_the_output(work):
    onnx.save(small_model(head=False), work / "bare.onnx")
    assert_works(["calibrate", work / "bare.onnx", "-d", work / "good.npy", "-o",
                  work / "q.onnx"])
    assert_works(["evaluate", work / "q.onnx", "-r", work / "bare.onnx", "-d", work / "good.npy"])


def test_bad_labels(work):
    x = samples(5)
    np.savez(work / "two-d.npz", x=x, labels=np.ones((5, 3), np.int64))
    line = assert_fails_cleanly(work, ["evaluate", work / "quantized.onnx", "-r", work / "good.onnx",
                                       "-d", work / "two-d.npz"], ("'labels'",))
    assert "15 labels for a batch of 5" in line


def test_string_labels_are_refused(work):
    np.savez(work / "str.npz", x=samples(5), labels=np.array(["cat"] * 5))
    assert_fails_cleanly(work, ["evaluate", work / "quantized.onnx", "-r", work / "good.onnx",
                                "-d", work / "str.npz"], ("str.npz", "'labels'"))


def test_outputs_of_different_shapes_are_refused(work):
    model = small_model(head=False)
    model.graph.node[-1].output[0] = "y"  # same output name as good.onnx, another shape
    model.graph.output[0].name = "y"
    onnx.save(model, work / "other.onnx")
    assert_fails_cleanly(work, ["evaluate", work / "quantized.onnx", "-r", work / "other.onnx",
                                "-d", work / "good.npy"], ("'y'",))


def test_a_quantized_model_of_another_model_is_refused(work):
    onnx.save(small_model(head=False), work / "other.onnx")
    assert_fails_cleanly(work, ["evaluate", work / "quantized.onnx", "-r", work / "other.onnx",
                                "-d", work / "good.npy"], ("outputs differ",))


# ---------------------------------------------------------------------------------------------
# limits that protect the machine

def test_a_sample_larger_than_1_gib_is_refused_before_reading(work):
    onnx.save(small_model(dynamic=True), work / "dyn.onnx")
    sparse_npy(work / "big.npy", (1, 1, 20000, 20000))  # 1.6 GB declared, stored as a hole
    line = assert_fails_cleanly(work, ["calibrate", work / "dyn.onnx", "-d", work / "big.npy",
                                       "-o", work / "q.onnx"], ("big.npy",))
    assert "more than 1 GiB" in line


def test_a_batch_larger_than_2_gib_is_refused_before_reading(work):
    onnx.save(small_model(dynamic=True), work / "dyn.onnx")
    sparse_npy(work / "many.npy", (2100, 1, 512, 512))  # 1 MiB samples, 2.2 GB in all
    line = assert_fails_cleanly(work, ["calibrate", work / "dyn.onnx", "-d", work / "many.npy",
                                       "-o", work / "q.onnx", "--batch-size", "2100"],
                                ("many.npy",))
    assert "smaller batch size" in line


# ---------------------------------------------------------------------------------------------
# output paths

def test_output_equal_to_an_input_is_refused(work):
    for args in (["fuse", work / "good.onnx", "-o", work / "good.onnx", "--force"],
                 ["fuse", work / "good.onnx", "-o", work / "." / "good.onnx", "--force"],
                 ["calibrate", work / "good.onnx", "-d", work / "good.npy", "-o",
                  work / "good.onnx", "--force"]):
        assert_fails_cleanly(work, args, ("good.onnx", "overwrite the input"))
    os.symlink(work / "good.onnx", work / "link.onnx")
    assert_fails_cleanly(work, ["fuse", work / "good.onnx", "-o", work / "link.onnx", "--force"],
                         ("link.onnx", "overwrite the input"))


@pytest.mark.parametrize("output", ["missing/out.onnx", "a-file/out.onnx", "/proc/out.onnx",
                                    "/proc/self/out.onnx", "out.txt", "out"])
def test_unwritable_outputs_are_refused(work, output):
    (work / "a-file").write_bytes(b"x")
    target = Path(output) if output.startswith("/") else work / output
    for args in (["fuse", work / "good.onnx", "-o", target],
                 ["calibrate", work / "good.onnx", "-d", work / "good.npy", "-o", target]):
        assert_fails_cleanly(work, args, (str(target),))
    assert not Path("/proc/out.onnx").exists()


def test_an_output_directory_is_a_usage_error(work):
    assert_fails_cleanly(work, ["fuse", work / "good.onnx", "-o", work], (), code=2)


def test_an_existing_output_is_kept_unless_force(work):
    existing = work / "existing.onnx"
    existing.write_bytes(b"precious")
    for args in (["fuse", work / "good.onnx", "-o", existing],
                 ["calibrate", work / "good.onnx", "-d", work / "good.npy", "-o", existing]):
        assert_fails_cleanly(work, args, ("existing.onnx", "--force"))
        assert_works([*args, "--force"])
        onnx.checker.check_model(onnx.load(existing), full_check=True)
        existing.write_bytes(b"precious")


@pytest.mark.parametrize("command", ["fuse", "calibrate"])
def test_a_failure_half_way_through_writing_leaves_nothing(work, command):
    """A real half-way failure: bnq runs with a file size limit (RLIMIT_FSIZE) below the size
    of its output, so the kernel accepts the first bytes and refuses the rest (EFBIG, as a
    full disk refuses with ENOSPC). The temporary file goes, the error is one line."""
    output = work / ("out.onnx" if command == "fuse" else "out.npz")
    args = ([command, SAMPLE_ONNX, "-o", output] if command == "fuse" else
            [command, SAMPLE_ONNX, "-d", ROOT / "samples" / "calib.npz", "-o", output,
             "--num-samples", "8"])
    assert_works([*args, "--force"])
    size = output.stat().st_size
    output.unlink()
    before = snapshot(work)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    result = subprocess.run(
        [sys.executable, "-c", "from bnq.cli import main; main()", *map(str, args)],
        capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(output) in lines[0] and "File too large" in lines[0], lines[0]
    assert result.stdout == ""
    assert snapshot(work) == before, "a file was written, left behind or changed"


def test_bad_usage_exits_2_and_writes_nothing(work):
    for args in (["calibrate", work / "good.onnx", "-d", work / "good.npy", "-o",
                  work / "q.onnx", "--batch-size", "0"],
                 ["calibrate", work / "good.onnx", "-d", work / "good.npy", "-o",
                  work / "q.onnx", "--num-samples", "0"],
                 ["calibrate", work / "good.onnx", "-d", work / "good.npy", "-o",
                  work / "q.onnx", "--method", "magic"],
                 ["evaluate", work / "quantized.onnx", "-d", work / "good.npy"],
                 ["fuse", work / "good.onnx"]):
        assert_fails_cleanly(work, args, (), code=2)


# ---------------------------------------------------------------------------------------------
# Ctrl-C and signals

@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated"),
                                                (signal.SIGHUP, 129, "terminated")])
def test_a_signal_during_calibrate_leaves_nothing(tmp_path, signum, code, word):
    onnx.save(small_model(), tmp_path / "m.onnx")
    np.save(tmp_path / "many.npy", samples(60000))  # ~20 s at one sample per batch
    output = tmp_path / "out"
    output.mkdir()

    def interrupt(process):
        _wait_until_reading(process.pid, tmp_path / "many.npy")
        process.send_signal(signum)

    result = bnq_process("calibrate", tmp_path / "m.onnx", "-d", tmp_path / "many.npy", "-o",
                         output / "q.onnx", "--batch-size", "1", signal_after=interrupt)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert word in result.stderr
    assert list(output.iterdir()) == []  # neither the output nor a temporary file


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_in_the_middle_of_a_write_leaves_no_temporary_file(tmp_path, signum):
    previous = signal.signal(signum, cli_module._terminate)  # as `bnq` (cli.main) sets it up
    try:
        with pytest.raises(cli_module.Terminated):
            write_atomic(tmp_path / "out.onnx",
                         lambda handle: (handle.write(b"half"), os.kill(os.getpid(), signum)))
    finally:
        signal.signal(signum, previous)
    assert list(tmp_path.iterdir()) == []


def _wait_until_reading(pid: int, data: Path, timeout: float = 60) -> None:
    """Until process `pid` has `data` open for its batches (then it is calibrating)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            open_files = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except (FileNotFoundError, ProcessLookupError):
            open_files = set()
        if str(data) in open_files:
            time.sleep(0.5)  # the header check opens it too: let the batches start
            return
        time.sleep(0.02)
    raise AssertionError(f"bnq never opened {data}")


# ---------------------------------------------------------------------------------------------
# files that are not what their names say: special files are refused before anything opens them

def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _loop(path: Path) -> None:
    os.symlink(path.with_name("other" + path.suffix), path)
    os.symlink(path, path.with_name("other" + path.suffix))


def _flipped_byte(write, offset: int):
    """`write` a good file, then flip one bit of its byte at `offset` (a CRC now fails)."""
    def damage(path: Path) -> None:
        write(path)
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 1
        path.write_bytes(bytes(raw))
    return damage


NOT_FILES = {
    "fifo": (_fifo, "FIFO"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "broken-symlink": (lambda p: os.symlink(p.with_name("nowhere"), p), "broken symbolic link"),
    "symlink-loop": (_loop, "loop of symbolic links"),
}


@pytest.mark.parametrize("case", NOT_FILES)
def test_a_model_that_is_not_a_regular_file_is_refused(work, case):
    write, message = NOT_FILES[case]
    write(work / "model.onnx")
    code = 2 if case == "directory" else 1  # click's path check: a usage error
    for args in commands_reading_model(work, work / "model.onnx")[:2]:
        line = assert_fails_cleanly(work, args, ("model.onnx",), isolated=case == "fifo",
                                    code=code)
        assert message in line, line


@pytest.mark.parametrize("case", NOT_FILES)
@pytest.mark.parametrize("inside", [False, True], ids=["given", "in-a-directory"])
def test_data_that_is_not_a_regular_file_is_refused(work, case, inside):
    write, message = NOT_FILES[case]
    data = work / "d"
    if inside:  # a good file first, then the bad entry under a .npy name
        data.mkdir()
        np.save(data / "a.npy", samples(3))
        write(data / "b.npy")
    else:
        write(work / "d.npy")
        data = work / "d.npy"
        if case == "directory":  # a data directory, that happens to be named d.npy
            message = "holds no .npz, .npy or JPEG/PNG files"
    for args in data_commands(work, data):
        line = assert_fails_cleanly(work, args, ("b.npy" if inside else "d.npy",),
                                    isolated=case == "fifo")
        assert message in line, line


def test_corrupt_archives_are_refused(work):
    """A flipped byte in the stored data of a member: zipfile notices at its end (bad CRC)."""
    _flipped_byte(lambda p: np.savez(p, x=samples(20)), 300)(work / "d.npz")
    for args in data_commands(work, work / "d.npz"):
        assert "corrupt" in assert_fails_cleanly(work, args, ("d.npz", "'x'"))
    _flipped_byte(lambda p: p.write_bytes(SAMPLE_NPZ.read_bytes()), 2000)(work / "m.npz")
    for args in commands_reading_model(work, work / "m.npz"):
        assert "Bad CRC" in assert_fails_cleanly(work, args, ("m.npz",))


@pytest.mark.parametrize("empty_first", [False, True])
def test_a_file_without_samples_is_skipped_not_the_end_of_the_data(work, empty_first):
    data = work / "d"
    data.mkdir()
    np.save(data / "a.npy", samples(0 if empty_first else 7))
    np.save(data / "b.npy", samples(7 if empty_first else 0, seed=1))
    np.save(data / "c.npy", samples(5, seed=2))
    report = json.loads(assert_works(["calibrate", work / "good.onnx", "-d", data, "-o",
                                      work / "q.onnx", "--json", "--batch-size", "4"]).stdout)
    assert report["samples"] == 12 and report["batches"] == 4
    report = json.loads(assert_works(["evaluate", work / "q.onnx", "-r", work / "good.onnx",
                                      "-d", data, "--json"]).stdout)
    assert report["samples"] == 12


# ---------------------------------------------------------------------------------------------
# writing the output

def test_a_250_character_output_name_works(work):
    long = "m" * 245  # + ".onnx" = 250, near the 255 bytes a file name may have
    assert_works(["fuse", work / "good.onnx", "-o", work / f"{long}.onnx"])
    assert_works(["calibrate", work / "good.onnx", "-d", work / "good.npy", "-o",
                  work / f"{long}.npz"])
    onnx.checker.check_model(onnx.load(work / f"{long}.onnx"), full_check=True)
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


def test_names_longer_than_the_system_allows_are_refused(work):
    long = "m" * 300
    assert_fails_cleanly(work, ["fuse", work / "good.onnx", "-o", work / f"{long}.onnx"],
                         ("File name too long",))
    assert_fails_cleanly(work, ["fuse", work / f"{long}.onnx", "-o", work / "o.onnx"],
                         ("File name too long",))
    assert_fails_cleanly(work, data_commands(work, work / f"{long}.npy")[0],
                         ("File name too long",))


def test_a_hard_link_to_the_input_is_the_input(work):
    os.link(work / "good.onnx", work / "same.onnx")
    assert_fails_cleanly(work, ["fuse", work / "good.onnx", "-o", work / "same.onnx", "--force"],
                         ("same.onnx", "overwrite the input"))


def test_an_output_that_appears_while_writing_is_not_replaced(tmp_path):
    """Two runs racing for one name: the file of the first appears after the second's check;
    the second fails at its final step instead of replacing it, and leaves no temporary file."""
    target = tmp_path / "out.onnx"

    def write(handle):
        handle.write(b"second")
        target.write_bytes(b"first")  # the other run finishes meanwhile

    with pytest.raises(BnqError, match="already exists"):
        write_atomic(target, write)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert target.read_bytes() == b"first"
    write_atomic(target, lambda handle: handle.write(b"forced"), overwrite=True)
    assert target.read_bytes() == b"forced"


def test_without_hard_links_the_output_is_still_written_once(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("bnq.io.os.link", no_links)
    write_atomic(tmp_path / "out.onnx", lambda handle: handle.write(b"first"))
    with pytest.raises(BnqError, match="already exists"):
        write_atomic(tmp_path / "out.onnx", lambda handle: handle.write(b"second"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert (tmp_path / "out.onnx").read_bytes() == b"first"


# ---------------------------------------------------------------------------------------------
# standard streams

def test_a_closed_stdout_still_does_the_work(work):
    command = [sys.executable, "-c", "from bnq.cli import main; main()", "fuse",
               str(work / "good.onnx"), "-o", str(work / "f.onnx")]
    result = subprocess.run(f"{' '.join(map(shlex.quote, command))} >&-", shell=True, text=True,
                            stderr=subprocess.PIPE, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    onnx.checker.check_model(onnx.load(work / "f.onnx"), full_check=True)


@pytest.mark.parametrize("args", [["fuse", "{good}", "-o", "{out}"],
                                  ["evaluate", "{quantized}", "-r", "{good}", "-d", "{data}"],
                                  ["evaluate", "{quantized}", "-r", "{good}", "-d", "{data}",
                                   "--json"]])
def test_a_reader_that_went_away_is_no_error(work, args):
    """`bnq ... | head`: the pipe closes before the report is written; the work is done."""
    read, write = os.pipe()
    os.close(read)
    paths = {"good": work / "good.onnx", "out": work / "f.onnx", "data": work / "good.npy",
             "quantized": work / "quantized.onnx"}
    with os.fdopen(write, "w") as pipe:
        result = bnq_process(*(a.format(**paths) for a in args), stdout=pipe)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    if args[0] == "fuse":
        onnx.checker.check_model(onnx.load(work / "f.onnx"), full_check=True)


def test_a_full_stdout_is_a_clear_error(work):
    with open("/dev/full", "w") as full:
        result = bnq_process("evaluate", work / "quantized.onnx", "-r", work / "good.onnx", "-d",
                             work / "good.npy", stdout=full)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: standard output: cannot write the report (No space left on device)"]


# ---------------------------------------------------------------------------------------------
# usage errors exit 2

@pytest.mark.parametrize("value", ["101", "49.9", "nan", "inf", "-inf"])
def test_a_percentile_out_of_range_is_a_usage_error(work, value):
    line = assert_fails_cleanly(work, ["calibrate", work / "good.onnx", "-d", work / "good.npy",
                                       "-o", work / "q.onnx", "--method", "percentile",
                                       "--percentile", value], (), code=2)
    assert "--percentile" in line


# ---------------------------------------------------------------------------------------------
# messages that blame the right thing

def _conv_weight(value):
    def write(path: Path) -> None:
        model = small_model()
        weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
        weight[0, 0, 0, 0] = value
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "w"))
        onnx.save(model, path)
    return write


def _overflowing(path: Path) -> None:
    model = small_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.full((2, 1, 3, 3), 3e38, np.float32), "w"))  # finite weights, infinite sums
    onnx.save(model, path)


def _no_channels(path: Path) -> None:
    """A Conv with 0 output channels and a BatchNormalization over them: a valid model."""
    model = small_model()
    for tensor in model.graph.initializer:
        shape = (0, 1, 3, 3) if tensor.name == "w" else (0,)
        tensor.CopyFrom(numpy_helper.from_array(np.zeros(shape, np.float32), tensor.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 0
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


BLAME = {
    "nan-weight": (_conv_weight(np.nan), ("Conv conv", "'w'", "NaN or infinity")),
    "inf-weight": (_conv_weight(np.inf), ("Conv conv", "'w'", "NaN or infinity")),
    "nan-epsilon": (lambda p: onnx.save(small_model(bn_attrs={"epsilon": float("nan")}), p),
                    ("BatchNormalization bn", "epsilon is nan")),
    "inf-epsilon": (lambda p: onnx.save(small_model(bn_attrs={"epsilon": float("inf")}), p),
                    ("BatchNormalization bn", "epsilon is inf")),
    "overflow": (_overflowing, ("'r'", "Relu relu0", "overflows")),
    "no-channels": (_no_channels, ("BatchNormalization bn", "0 channels")),
}


@pytest.mark.parametrize("case", BLAME)
def test_messages_blame_the_model_not_the_data(work, case):
    write, names = BLAME[case]
    write(work / "model.onnx")
    line = assert_fails_cleanly(work, ["calibrate", work / "model.onnx", "-d", work / "good.npy",
                                       "-o", work / "q.onnx"], names)
    assert "calibration data" not in line and "seen no data" not in line


# ---------------------------------------------------------------------------------------------
# memory bombs: sizes estimated from shapes and dtypes, refused past BNQ_MAX_BYTES, unallocated

def constant_of_shape_model(shape) -> onnx.ModelProto:
    """A few hundred bytes that ask for a tensor of `shape` float32 while constants fold."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="cos",
                              value=numpy_helper.from_array(np.zeros(1, np.float32))),
             helper.make_node("Add", ["x", "big"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [shape[0], 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [numpy_helper.from_array(np.array(shape, np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def padded_model(pads: int) -> onnx.ModelProto:
    model = small_model()
    model.graph.node[0].attribute[0].ints[:] = [pads] * 4
    return model


def test_a_constant_of_shape_bomb_is_refused_unallocated(work):
    onnx.save(constant_of_shape_model((3, 1 << 29)), work / "bomb.onnx")  # 6 GiB of zeros
    assert (work / "bomb.onnx").stat().st_size < 400
    np.save(work / "x.npy", np.zeros((3, 1), np.float32))
    for args in (["fuse", work / "bomb.onnx", "-o", work / "f.onnx"],
                 ["calibrate", work / "bomb.onnx", "-d", work / "x.npy", "-o", work / "q.onnx"]):
        line = assert_fails_cleanly(work, args, ("node cos", "6.0 GiB", "BNQ_MAX_BYTES"),
                                    isolated=True)
        assert "limit of 2.0 GiB" in line


@pytest.mark.parametrize("batch, names", [("32", ("tensor 'r'", "[20, 2, 10002, 10002]",
                                                  "smaller batch size")),
                                          ("1", ("Conv conv", "work buffer", "3.4 GiB"))])
def test_huge_pads_are_refused_before_running(work, batch, names):
    """A Conv whose pads of 5000 make 10002 x 10002 outputs of a 4 x 4 input: its output at
    batch 20 (15 GiB; a --memory-limit that large keeps the batch whole), or at batch 1
    onnxruntime's im2col buffer (3.4 GiB)."""
    onnx.save(padded_model(5000), work / "pads.onnx")
    whole = ["--memory-limit", "100GiB"]
    for args in (["calibrate", work / "pads.onnx", "-d", work / "good.npy", "-o",
                  work / "q.onnx", "--batch-size", batch, *whole],
                 ["evaluate", work / "quantized.onnx", "-r", work / "pads.onnx", "-d",
                  work / "good.npy", "--batch-size", batch, *whole]):
        assert_fails_cleanly(work, args, names, isolated=True)


def test_the_limit_can_be_raised_and_lowered(work, monkeypatch):
    onnx.save(constant_of_shape_model((3, 1 << 18)), work / "c.onnx")  # 3 MiB: fine
    assert_works(["fuse", work / "c.onnx", "-o", work / "f.onnx"])
    monkeypatch.setenv("BNQ_MAX_BYTES", "1M")
    assert_fails_cleanly(work, ["fuse", work / "c.onnx", "-o", work / "g.onnx"],
                         ("node cos", "limit of 1.0 MiB", "BNQ_MAX_BYTES=1G"))
    monkeypatch.setenv("BNQ_MAX_BYTES", "4M")
    assert_works(["fuse", work / "c.onnx", "-o", work / "g.onnx"])
    monkeypatch.setenv("BNQ_MAX_BYTES", "lots")
    assert_fails_cleanly(work, ["fuse", work / "c.onnx", "-o", work / "h.onnx"],
                         ("BNQ_MAX_BYTES='lots'",))


def test_model_files_and_npz_arrays_are_sized_before_reading(work, monkeypatch):
    """Both under the limit of their bytes: the .onnx file (read whole), and the total of the
    arrays of an .npz model (each member is also checked against its own header)."""
    monkeypatch.setenv("BNQ_MAX_BYTES", "50K")
    line = assert_fails_cleanly(work, ["fuse", SAMPLE_ONNX, "-o", work / "f.onnx"],
                                ("digits_cnn.onnx", "the model file"))
    assert "limit of 50.0 KiB" in line
    line = assert_fails_cleanly(work, ["fuse", SAMPLE_NPZ, "-o", work / "f.onnx"],
                                ("digits_cnn.npz", "the arrays of the model"))
    assert "limit of 50.0 KiB" in line


@pytest.mark.parametrize("args, names, code", [
    (["--kernel", "--shape", "64,64,560,560"], ("[64, 64, 560, 560]", "19.1 GiB"), 1),
    (["{model}", "--batch-size", "100000000"], ("'x'", "--batch-size", "11.9 GiB"), 1),
    (["{model}", "--threads", "4000"], ("--threads",), 2)])
def test_bench_refuses_what_would_exhaust_the_machine(work, args, names, code):
    args = [a.format(model=work / "good.onnx") for a in args]
    assert_fails_cleanly(work, ["bench", *args], names, code=code, isolated=True)


# ---------------------------------------------------------------------------------------------
# fixed input shapes and onnxruntime's errors

def fixed_batch_model(size: int) -> onnx.ModelProto:
    model = small_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = size
    return model


def test_a_model_with_a_fixed_batch_of_1_just_works(work):
    onnx.save(fixed_batch_model(1), work / "b1.onnx")
    report = json.loads(assert_works(["calibrate", work / "b1.onnx", "-d", work / "good.npy",
                                      "-o", work / "q1.onnx", "--json"]).stdout)
    assert report["samples"] == 20
    for backend in ("onnxruntime", "numpy"):
        report = json.loads(assert_works(["evaluate", work / "q1.onnx", "-r", work / "b1.onnx",
                                          "-d", work / "good.npy", "--backend", backend,
                                          "--json"]).stdout)
        assert report["samples"] == 20
    assert_works(["bench", work / "b1.onnx", work / "q1.onnx", "--batch-size", "4", "--repeats",
                  "2", "--warmup", "0", "--threads", "1"])


def test_other_fixed_batches_run_in_chunks_when_the_samples_split(work):
    onnx.save(fixed_batch_model(4), work / "b4.onnx")
    report = json.loads(assert_works(["calibrate", work / "b4.onnx", "-d", work / "good.npy",
                                      "-o", work / "q4.onnx", "--json"]).stdout)
    assert report["samples"] == 20
    np.save(work / "odd.npy", samples(18))
    line = assert_fails_cleanly(work, ["calibrate", work / "b4.onnx", "-d", work / "odd.npy",
                                       "-o", work / "q.onnx"], ("exactly 4 samples",))
    assert "multiple of 4" in line


def _unknown_op(path: Path) -> None:
    model = small_model()
    model.graph.node[1].domain, model.graph.node[1].op_type = "foo", "Bar"
    model.opset_import.append(helper.make_opsetid("foo", 1))
    onnx.save(model, path)


def _float_type(dtype, elem_type):
    def write(path: Path) -> None:
        model = small_model()
        for tensor in model.graph.initializer:
            tensor.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(dtype), tensor.name))
        for value in (model.graph.input[0], model.graph.output[0]):
            value.type.tensor_type.elem_type = elem_type
        onnx.save(model, path)
    return write


def _no_padding(path: Path) -> None:
    model = small_model(dynamic=True)
    model.graph.node[0].attribute[0].ints[:] = [0, 0, 0, 0]
    onnx.save(model, path)


RUNTIME = {
    "unknown-op": (_unknown_op, "good.npy", ("onnxruntime cannot load the model", "foo:Bar")),
    "opset-99": (lambda p: onnx.save(small_model(opset=99), p), "good.npy",
                 ("model.onnx", "opset 99")),
    "float64": (_float_type(np.float64, TensorProto.DOUBLE), "good.npy",
                ("'x'", "float64", "float32")),
    "float16": (_float_type(np.float16, TensorProto.FLOAT16), "half.npy",
                ("'x'", "float16", "float32")),
    "samples-smaller-than-the-kernel": (_no_padding, "tiny.npy",
                                        ("Conv conv", "smaller than its window", "[1, 2, 2]")),
    "already-quantized": (lambda p: p.write_bytes((p.parent / "quantized.onnx").read_bytes()),
                          "good.npy", ("quantized already", "QuantizeLinear")),
    "bn-parameter-a-graph-input": (lambda p: onnx.save(_parameter_input(), p), "per-sample.npz",
                                   ("'g'", "no batch axis", "initializer")),
    "bn-parameter-a-graph-input-one-value-per-sample": (
        lambda p: onnx.save(_parameter_input(), p), "scalars.npz",
        ("onnxruntime cannot run the model", "input: g")),
}


def _parameter_input() -> onnx.ModelProto:
    """The BN's scale `g` a graph input without a default: the data must feed it."""
    model = small_model()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "g"))
    model.graph.input.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [2]))
    return model


@pytest.mark.parametrize("case", RUNTIME)
def test_models_onnxruntime_cannot_run_fail_in_one_line(work, case):
    write, data, names = RUNTIME[case]
    np.save(work / "half.npy", samples(5, dtype=np.float16))
    np.save(work / "tiny.npy", samples(5, shape=(1, 2, 2)))
    np.savez(work / "per-sample.npz", x=samples(4), g=np.ones((4, 2), np.float32))
    np.savez(work / "scalars.npz", x=samples(4), g=np.ones(4, np.float32))
    write(work / "model.onnx")
    assert_fails_cleanly(work, ["calibrate", work / "model.onnx", "-d", work / data, "-o",
                                work / "q.onnx"], names)
    if case in ("float64", "samples-smaller-than-the-kernel"):  # the reference of evaluate too
        line = assert_fails_cleanly(work, ["evaluate", work / "quantized.onnx", "-r",
                                           work / "model.onnx", "-d", work / data], ())
        assert ("onnxruntime cannot" in line or "smaller than its window" in line) \
            and "conv" in line.lower(), line


def test_a_batch_of_images_is_sized_before_decoding(work, monkeypatch):
    pytest.importorskip("PIL")
    monkeypatch.setenv("BNQ_MAX_BYTES", "3K")  # 32 images of 4 x 4 float32, twice: 4 KiB
    assert (work / "good.onnx").stat().st_size < 3 << 10
    line = assert_fails_cleanly(work, ["calibrate", work / "good.onnx", "-d",
                                       ROOT / "samples" / "digits" / "calib", "-o",
                                       work / "q.onnx"], ("calib", "batch of 32 images"))
    assert "smaller batch size" in line


# ---------------------------------------------------------------------------------------------
# graph structure

def bn_in_if_model() -> onnx.ModelProto:
    """The BatchNormalization + Relu of `small_model` inside both branches of an If, reading
    the Relu output and the BN parameters from the enclosing graph."""
    model = small_model()

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], [f"{name}_bn"],
                              name=f"{name}_bn"),
             helper.make_node("Relu", [f"{name}_bn"], [f"{name}_out"], name=f"{name}_relu")],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])

    nodes = [n for n in model.graph.node if n.name not in ("bn", "relu")]
    nodes.insert(2, helper.make_node("If", ["cond"], ["features"], name="if",
                                     then_branch=branch("then"), else_branch=branch("else")))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    onnx.checker.check_model(model, full_check=True)
    return model


def bn_in_loop_model() -> onnx.ModelProto:
    """The BatchNormalization + Relu of `small_model` in the body of a Loop run once, which
    reads the Relu output and the BN parameters from the enclosing graph (a scan output, then
    Squeeze of the iteration axis)."""
    model = small_model()
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["body_bn"],
                          name="body_bn"),
         helper.make_node("Relu", ["body_bn"], ["body_out"], name="body_relu")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("body_out", TensorProto.FLOAT, None)])
    nodes = [n for n in model.graph.node if n.name not in ("bn", "relu")]
    nodes[2:2] = [helper.make_node("Loop", ["once", "cond"], ["stacked"], name="loop", body=body),
                  helper.make_node("Squeeze", ["stacked", "axis0"], ["features"], name="squeeze")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "once"),
                                    numpy_helper.from_array(np.array(True), "cond"),
                                    numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    onnx.checker.check_model(model, full_check=True)
    return model


def bn_relu_of_rank(rank: int) -> onnx.ModelProto:
    shape = ["N", 2] + [2] * (rank - 2)
    params = {"g": [1.0, 0.5], "b": [0.1, 0.2], "m": [0.0, 0.3], "v": [1.0, 2.0]}
    return make_model([helper.make_node("Mul", ["x", "half"], ["c"], name="mul"),
                       helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"],
                                        name="bn"),
                       helper.make_node("Relu", ["n"], ["y"], name="relu")],
                      ("x", shape), ("y", shape),
                      {"half": np.array(0.5, np.float32)}
                      | {k: np.array(v, np.float32) for k, v in params.items()})


def make_model(nodes, inputs, output, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info(inputs[0], TensorProto.FLOAT, inputs[1])],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
        [numpy_helper.from_array(array, name) for name, array in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def local_function_model() -> onnx.ModelProto:
    """A model-local function of the user's own domain, at opset 17 (calibrate converts to 19)."""
    model = small_model()
    model.graph.node.insert(2, helper.make_node("Double", ["r"], ["r2"], domain="mine",
                                                name="double"))
    next(n for n in model.graph.node if n.name == "bn").input[0] = "r2"
    model.functions.append(helper.make_function(
        "mine", "Double", ["X"], ["Y"], [helper.make_node("Add", ["X", "X"], ["Y"])],
        [helper.make_opsetid("", 17)]))
    model.opset_import.append(helper.make_opsetid("mine", 1))
    onnx.checker.check_model(model, full_check=True)
    return model


STRUCTURES = {
    "bn-inside-if": (bn_in_if_model, (1, 4, 4)),
    "bn-inside-loop": (bn_in_loop_model, (1, 4, 4)),
    "local-function-opset-17": (local_function_model, (1, 4, 4)),
    "rank-2": (lambda: bn_relu_of_rank(2), (2,)),
    "rank-6": (lambda: bn_relu_of_rank(6), (2, 2, 2, 2, 2)),
}


@pytest.mark.parametrize("case", STRUCTURES)
def test_unusual_graphs_calibrate_and_evaluate_on_both_backends(work, case):
    build, shape = STRUCTURES[case]
    onnx.save(build(), work / "m.onnx")
    np.save(work / "d.npy", samples(12, shape=shape))
    assert_works(["calibrate", work / "m.onnx", "-d", work / "d.npy", "-o", work / "q.onnx"])
    quantized = onnx.load(work / "q.onnx")
    onnx.checker.check_model(quantized, full_check=True)
    fused = sum(node.op_type == "QLinearBatchNormRelu" for node in quantized.graph.node)
    assert fused == (0 if case.startswith("bn-inside") else 1)  # a subgraph's BN stays float
    report = json.loads(assert_works(["evaluate", work / "q.onnx", "-r", work / "m.onnx", "-d",
                                      work / "d.npy", "--backend", "both", "--json"]).stdout)
    assert report["backend_max_lsb_diff"] == (0 if fused else None)
    assert report["outputs"][0]["sqnr_db"] > 25
    numpy_backend = ["evaluate", work / "q.onnx", "-r", work / "m.onnx", "-d", work / "d.npy",
                     "--backend", "numpy", "--json"]
    if case == "bn-inside-loop":  # onnx 1.23's reference evaluator: Squeeze fails after Loop
        assert_fails_cleanly(work, numpy_backend, ("reference evaluator", "squeeze"))
        return
    numpy = json.loads(assert_works(numpy_backend).stdout)
    assert numpy["outputs"][0]["sqnr_db"] == report["outputs"][0]["sqnr_db"]


def test_a_quantized_model_is_not_quantized_again(work):
    line = assert_fails_cleanly(work, ["calibrate", work / "quantized.onnx", "-d",
                                       work / "good.npy", "-o", work / "q2.onnx"],
                                ("quantized already", "QuantizeLinear"))
    assert "float model" in line


# ---------------------------------------------------------------------------------------------
# evaluate

def _head(nodes, output, shape, initializers=()):
    model = small_model()
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, shape))
    return model


def test_scalar_and_empty_outputs_are_evaluated(work):
    scalar = _head([helper.make_node("ReduceMean", ["y"], ["s"], keepdims=0, name="mean")],
                   "s", [])
    empty = _head([helper.make_node("Slice", ["y", "zero", "zero", "one"], ["z"], name="slice")],
                  "z", ["N", 0], [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                                  numpy_helper.from_array(np.array([1], np.int64), "one")])
    for name, model in (("scalar", scalar), ("empty", empty)):
        onnx.save(model, work / f"{name}.onnx")
        assert_works(["calibrate", work / f"{name}.onnx", "-d", work / "good.npy", "-o",
                      work / f"{name}_q.onnx"])
        report = json.loads(assert_works(["evaluate", work / f"{name}_q.onnx", "-r",
                                          work / f"{name}.onnx", "-d", work / "good.npy",
                                          "--json"]).stdout)
        assert report["samples"] == 20 and report["top1_accuracy"] is None


def test_a_model_without_inputs_is_refused(work):
    model = small_model()
    model.graph.initializer.append(numpy_helper.from_array(samples(2), "x"))
    model.graph.input.remove(model.graph.input[0])
    onnx.save(model, work / "none.onnx")
    for args in float_model_commands(work, work / "none.onnx"):
        assert_fails_cleanly(work, args, ("good.npy", "no inputs"))


def test_a_model_input_named_labels_is_an_input(work):
    model = small_model()
    model.graph.input[0].name = "labels"
    model.graph.node[0].input[0] = "labels"
    onnx.save(model, work / "lab.onnx")
    np.savez(work / "lab.npz", labels=samples(20))
    assert_works(["calibrate", work / "lab.onnx", "-d", work / "lab.npz", "-o", work / "q.onnx"])
    report = json.loads(assert_works(["evaluate", work / "q.onnx", "-r", work / "lab.onnx", "-d",
                                      work / "lab.npz", "--json"]).stdout)
    assert report["samples"] == 20 and report["top1_accuracy"] is None


def test_swapped_or_float_models_are_refused(work):
    good, quantized, data = work / "good.onnx", work / "quantized.onnx", work / "good.npy"
    assert_fails_cleanly(work, ["evaluate", good, "-r", quantized, "-d", data],
                         (str(quantized), "is quantized", "reference"))
    assert_fails_cleanly(work, ["evaluate", good, "-r", good, "-d", data],
                         (str(good), "no quantized nodes"))


def test_a_wrong_labels_key_is_an_error_not_a_missing_row(work):
    np.savez(work / "l.npz", x=samples(20), labels=np.arange(20) % 2)
    args = ["evaluate", work / "quantized.onnx", "-r", work / "good.onnx", "-d", work / "l.npz"]
    assert_fails_cleanly(work, [*args, "--labels", "label"], ("l.npz", "--labels 'label'"))
    assert_fails_cleanly(work, [*args, "--labels", "x"], ("l.npz", "--labels 'x'"))
    report = json.loads(assert_works([*args, "--json"]).stdout)
    assert report["top1_accuracy"] is not None


def test_cosine_of_an_all_zero_output_is_0_not_1():
    from bnq.metrics import ErrorSums

    sums = ErrorSums()
    sums.update(np.ones((4, 3), np.float32), np.zeros((4, 3), np.float32))
    assert sums.cosine() == 0.0
    both = ErrorSums()
    both.update(np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32))
    assert both.cosine() == 1.0
