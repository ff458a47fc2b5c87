"""Export the ONNX test fixtures in this folder from tiny PyTorch models.

Run from anywhere: ``python tests/models/make_models.py`` (needs torch; onnxscript for the
dynamo export). Regenerate the files with this script, never edit them by hand. Weights come
from ``torch.manual_seed`` and every BatchNorm gets random statistics from
``np.random.default_rng`` (some gammas negative), so no BN is close to the identity and folding
or fusing it wrongly shows up in the outputs.

All models take ``input`` with a dynamic batch axis and return ``output``; they are exported with
the legacy exporter at opset 17 with ``do_constant_folding=False`` and ``training=EVAL``, which
keeps every BatchNormalization node (the default settings fold Conv -> BN away). The files:

- ``densenet_block.onnx``: Conv(no bias)-BN-Relu stem, then BN-Relu after Relu and after Concat.
- ``preact_residual.onnx``: BN-Relu on the graph input and after Add; Conv-BN-Relu inside blocks.
- ``conv_bn_relu_stem.onnx``: Conv(bias)-BN-Relu, Conv(no bias)-BN-Relu, Conv-BN without Relu,
  grouped and depthwise Conv-BN-Relu, ConvTranspose-BN-Relu, and a Conv-BN-Relu whose
  running_var equals its weight, which the exporter deduplicates into an Identity node.
- ``bn1d.onnx``: Gemm-BN-Relu (rank 2), Conv1d-BN-Relu and MaxPool-BN-Relu (rank 3).
- ``bn3d.onnx``: Conv3d-BN-Relu and MaxPool3d-BN-Relu (rank 5).
- ``bn_shared.onnx``: negative cases for BN+Relu fusion: BNs read by a Relu and an Add, and BNs
  that are also graph outputs (``conv_bn_output``, ``bn_output``); one of each follows a Conv
  (folding it stays valid), the other is standalone (after Add, after MaxPool).
- ``tiny_densenet.onnx``: DenseNet-121's structure in small (two dense blocks, a transition with
  Conv 1x1 + AvgPool 2x2 between them, global pooling, Linear head).
- ``tiny_mobilenet.onnx``: MobileNetV2's structure in small (Conv-BN-ReLU6, inverted residual
  blocks with depthwise convolutions, a residual Add, global pooling, Linear head).
- ``dynamo_densenet.onnx``: the densenet_block model through ``dynamo=True, optimize=False`` at
  opset 18 (its lowest native one). Unlike the legacy export, a Conv without bias (the stem's,
  which BN follows, among them) gets a computed zero bias (Shape -> Expand of a CastLike'd
  Constant), BN has no training_mode attribute, nodes carry metadata_props, and the graph has
  value_info for every intermediate tensor.
"""

import collections
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's lowest native opset; 17 would go through a converter


def randomize_batch_norms(model, rng):
    """Give every BatchNorm non-trivial statistics and affine parameters, in eval mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.from_numpy(rng.normal(0.0, 0.5, n).astype(np.float32)))
            module.running_var.copy_(torch.from_numpy(rng.uniform(0.25, 2.0, n).astype(np.float32)))
            gamma = rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n, p=[0.25, 0.75])
            module.weight.data.copy_(torch.from_numpy(gamma.astype(np.float32)))
            module.bias.data.copy_(torch.from_numpy(rng.normal(0.0, 0.5, n).astype(np.float32)))
    return model.eval()


class DenseNetBlock(nn.Module):
    def __init__(self, stem=8, growth=4):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()
        )
        self.bn0 = nn.BatchNorm2d(stem)  # after the stem's Relu
        self.conv0 = nn.Conv2d(stem, growth, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem + growth)  # after Concat
        self.conv1 = nn.Conv2d(stem + growth, growth, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem + 2 * growth)  # after Concat
        self.transition = nn.Conv2d(stem + 2 * growth, 8, 1)

    def forward(self, x):
        s = self.stem(x)
        f0 = self.conv0(torch.relu(self.bn0(s)))
        f1 = self.conv1(torch.relu(self.bn1(torch.cat([s, f0], 1))))
        y = torch.relu(self.bn2(torch.cat([s, f0, f1], 1)))
        return nn.functional.avg_pool2d(self.transition(y), 2)


class PreActBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)  # Conv -> BN -> Relu: foldable
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(y)))


class PreActResidual(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.block1 = PreActBlock(channels)  # its bn1 reads the graph input
        self.block2 = PreActBlock(channels)  # its bn1 reads an Add
        self.bn = nn.BatchNorm2d(channels)  # after an Add

    def forward(self, x):
        return torch.relu(self.bn(self.block2(self.block1(x))))


class ConvBnReluStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_bias = nn.Conv2d(4, 8, 3, padding=1)
        self.bn_bias = nn.BatchNorm2d(8)
        self.conv_no_bias = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_no_bias = nn.BatchNorm2d(8)
        self.conv_no_relu = nn.Conv2d(8, 8, 1)
        self.bn_no_relu = nn.BatchNorm2d(8)
        self.conv_grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn_grouped = nn.BatchNorm2d(8)
        self.conv_depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(8)
        self.conv_transpose = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn_transpose = nn.BatchNorm2d(6)
        self.conv_shared_param = nn.Conv2d(6, 4, 3, padding=1)
        self.bn_shared_param = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn_bias(self.conv_bias(x)))
        x = torch.relu(self.bn_no_bias(self.conv_no_bias(x)))
        x = self.bn_no_relu(self.conv_no_relu(x))
        x = torch.relu(self.bn_grouped(self.conv_grouped(x)))
        x = torch.relu(self.bn_depthwise(self.conv_depthwise(x)))
        x = torch.relu(self.bn_transpose(self.conv_transpose(x)))
        return torch.relu(self.bn_shared_param(self.conv_shared_param(x)))

    def share_bn_parameter(self):
        """Make one BN's running_var equal its (positive) weight: the exporter deduplicates them."""
        bn = self.bn_shared_param
        bn.weight.data.abs_()
        bn.running_var.copy_(bn.weight.data)
        return self


class BatchNorm1dModel(nn.Module):
    def __init__(self, channels=4, length=12):
        super().__init__()
        self.conv = nn.Conv1d(channels, 8, 3, padding=1)
        self.bn_conv = nn.BatchNorm1d(8)  # rank 3, after Conv
        self.bn_pool = nn.BatchNorm1d(8)  # rank 3, after MaxPool
        self.fc = nn.Linear(8 * length // 2, 16)
        self.bn_fc = nn.BatchNorm1d(16)  # rank 2, after Gemm
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn_conv(self.conv(x)))
        x = torch.relu(self.bn_pool(nn.functional.max_pool1d(x, 2)))
        x = torch.relu(self.bn_fc(self.fc(torch.flatten(x, 1))))
        return self.head(x)


class BatchNorm3dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.bn_conv = nn.BatchNorm3d(4)
        self.bn_pool = nn.BatchNorm3d(4)  # after MaxPool

    def forward(self, x):
        x = torch.relu(self.bn_conv(self.conv(x)))
        return torch.relu(self.bn_pool(nn.functional.max_pool3d(x, 2)))


class SharedBatchNorm(nn.Module):
    """BNs whose output is read by more than the Relu: none may be fused with it.

    The two after a Conv may still be folded into it; the two standalone ones must stay BN.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn_fold_two_readers = nn.BatchNorm2d(6)  # Conv -> BN -> Relu and Add
        self.bn_two_readers = nn.BatchNorm2d(6)  # Add -> BN -> Relu and Add
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn_fold_graph_output = nn.BatchNorm2d(6)  # Conv -> BN -> Relu and graph output
        self.bn_graph_output = nn.BatchNorm2d(6)  # MaxPool -> BN -> Relu and graph output

    def forward(self, x):
        y = self.bn_fold_two_readers(self.conv1(x))
        u = self.bn_two_readers(torch.relu(y) + y)
        w = self.bn_fold_graph_output(self.conv2(torch.relu(u) + u))
        p = self.bn_graph_output(nn.functional.max_pool2d(torch.relu(w), 2))
        return torch.relu(p), w, p


class TinyDenseNet(nn.Module):
    """DenseNet-121's shape in small: Conv-BN-Relu stem, MaxPool, dense layers (BN-Relu-Conv1x1-
    BN-Relu-Conv3x3 on the Concat of every earlier output), a transition (BN-Relu-Conv1x1-
    AvgPool 2x2) between two blocks, a final BN-Relu, global pooling and a Linear head."""

    def __init__(self, stem=8, growth=4, layers=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU(), nn.MaxPool2d(2))
        channels = stem
        self.block1, channels = self.block(channels, growth, layers), channels + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                                        nn.Conv2d(channels, channels // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        channels //= 2
        self.block2, channels = self.block(channels, growth, layers), channels + layers * growth
        self.norm = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)

    @staticmethod
    def block(channels, growth, layers):
        return nn.ModuleList(nn.Sequential(
            nn.BatchNorm2d(channels + i * growth), nn.ReLU(),
            nn.Conv2d(channels + i * growth, 2 * growth, 1, bias=False),
            nn.BatchNorm2d(2 * growth), nn.ReLU(),
            nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)) for i in range(layers))

    def forward(self, x):
        features = [self.stem(x)]
        for block in (self.block1, self.block2):
            for layer in block:
                features.append(layer(torch.cat(features, 1)))
            if block is self.block1:
                features = [self.transition(torch.cat(features, 1))]
        y = torch.relu(self.norm(torch.cat(features, 1)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class TinyMobileNet(nn.Module):
    """MobileNetV2's shape in small: Conv-BN-ReLU6 stem, an inverted residual block (pointwise
    expansion, depthwise 3x3, linear pointwise projection, each with BN; ReLU6 after the first two)
    with its residual Add, another block without, global pooling and a Linear head."""

    def __init__(self, channels=8, expand=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU6())
        self.blocks = nn.ModuleList(self.inverted(channels, channels * expand) for _ in range(2))
        self.head = nn.Linear(channels, 10)

    @staticmethod
    def inverted(channels, hidden):
        return nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.blocks[0](x)
        x = self.blocks[1](x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# name -> (model factory, example input shape, output names)
FIXTURES = {
    "densenet_block": (DenseNetBlock, (2, 3, 8, 8), ["output"]),
    "preact_residual": (PreActResidual, (2, 4, 6, 6), ["output"]),
    "conv_bn_relu_stem": (ConvBnReluStem, (2, 4, 6, 6), ["output"]),
    "bn1d": (BatchNorm1dModel, (2, 4, 12), ["output"]),
    "bn3d": (BatchNorm3dModel, (2, 2, 4, 6, 6), ["output"]),
    "bn_shared": (SharedBatchNorm, (2, 4, 6, 6), ["output", "conv_bn_output", "bn_output"]),
    "tiny_densenet": (TinyDenseNet, (2, 3, 16, 16), ["output"]),
    "tiny_mobilenet": (TinyMobileNet, (2, 3, 16, 16), ["output"]),
}


def build(name):
    factory, shape, _ = FIXTURES[name]
    torch.manual_seed(SEED)
    model = factory()
    with torch.no_grad():
        randomize_batch_norms(model, np.random.default_rng(SEED))
        if isinstance(model, ConvBnReluStem):
            model.share_bn_parameter()
    x = np.random.default_rng(SEED + 1).normal(size=shape).astype(np.float32)
    return model, torch.from_numpy(x)


def export_legacy(model, x, path, output_names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            opset_version=OPSET,
            input_names=["input"],
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in ["input", *output_names]},
        )


def export_dynamo(model, x, path):
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        optimize=False,
        opset_version=DYNAMO_OPSET,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    program.save(str(path))
    # Each node carries its Python stack trace, absolute paths and line numbers included: drop
    # it so the file does not change with the checkout's location. Other metadata stays.
    model = onnx.load(path)
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, path)


def verify(path, model, x):
    """Run the full checker and compare onnxruntime with torch on a batch of another size."""
    onnx.checker.check_model(onnx.load(path), full_check=True)
    x = torch.cat([x, -x[:1]])  # batch 3, not the exported 2: the batch axis must be dynamic
    with torch.no_grad():
        expected = model(x)
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"input": x.numpy()})
    return max(float(np.abs(a - e).max()) for a, e in zip(actual, expected, strict=True))


def describe(path):
    """Op counts and, for each BatchNormalization, what produces its input and what reads it."""
    graph = onnx.load(path).graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    for out in graph.output:
        consumers[out.name].append("<graph output>")
    counts = collections.Counter(node.op_type for node in graph.node)
    lines = ["  ops: " + ", ".join(f"{op} {n}" for op, n in sorted(counts.items()))]
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        source = producers.get(node.input[0])
        source = source.op_type if source else "<graph input>"
        kind = "foldable" if source in ("Conv", "ConvTranspose", "Gemm") else "standalone"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        params = [producers[p].op_type if p in producers else "init" for p in node.input[1:]]
        lines.append(
            f"  BN {node.name}: {source} -> BN -> {consumers[node.output[0]]} [{kind}] "
            f"attrs={ {k: round(v, 6) if isinstance(v, float) else v for k, v in attrs.items()} } "
            f"params={params}"
        )
    return "\n".join(lines)


def main():
    torch.set_num_threads(1)
    for name, (_, _, output_names) in FIXTURES.items():
        model, x = build(name)
        path = HERE / f"{name}.onnx"
        export_legacy(model, x, path, output_names)
        diff = verify(path, model, x)
        print(f"{path.name}: {path.stat().st_size / 1024:.1f} KiB, ort vs torch {diff:.1e}")
        print(describe(path))

    model, x = build("densenet_block")
    path = HERE / "dynamo_densenet.onnx"
    try:
        export_dynamo(model, x, path)
    except Exception as error:  # the dynamo exporter needs onnxscript and may fail offline
        print(f"skipped {path.name}: dynamo export failed: {type(error).__name__}: {error}")
    else:
        diff = verify(path, model, x)
        print(f"{path.name}: {path.stat().st_size / 1024:.1f} KiB, ort vs torch {diff:.1e}")
        print(describe(path))

    total = sum(p.stat().st_size for p in HERE.glob("*.onnx"))
    print(f"total: {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
