"""Build bnq's shipped sample: a small DenseNet-style CNN trained on sklearn's digits.

Run from anywhere: ``python samples/make_samples.py``. It needs torch and scikit-learn, which are
development tools here, not runtime dependencies of bnq. Everything is seeded and runs on one
thread with deterministic algorithms, so a rerun writes the same files.

Outputs (next to this script):

- ``digits_cnn.onnx``: opset 17, input ``input`` float32 (batch, 1, 8, 8) in [0, 1], output
  ``logits`` (batch, 10), dynamic batch axis. Every BatchNormalization is kept: the stem's
  Conv -> BatchNormalization -> Relu is foldable, the others are standalone (after Relu, Concat,
  AveragePool and Add), which is what bnq's fused BN-ReLU op is for.
- ``calib.npz``: ``input`` float32 (256, 1, 8, 8), drawn from the training split.
- ``eval.npz``: ``input`` float32 (500, 1, 8, 8) and ``labels`` int64 (500,), the test split.
- ``digits_cnn.npz``: the same model in bnq's ``.npz`` format, when ``bnq.io.save_model`` exists.

Architecture (activations are 8 x 8 until the transition, 4 x 4 after it)::

    stem        Conv3x3(1->16) BN ReLU
    dense block 3 x [BN ReLU Conv3x3(->8)] on the Concat of all previous features (16 -> 40 ch)
    transition  BN ReLU Conv1x1(40->24) AvgPool2
    residual    x + Conv3x3(ReLU(BN(Conv3x3(ReLU(BN(x))))))   (pre-activation, 24 ch)
    head        BN ReLU GlobalAveragePool Flatten Linear(24->10)
"""

import collections
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
N_TEST = 500
N_CALIB = 256
EPOCHS = 40
BATCH = 64
OPSET = 17


class DenseLayer(nn.Module):
    def __init__(self, in_channels, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


class PreActBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(y)))


class DigitsCNN(nn.Module):
    def __init__(self, stem=16, growth=8, layers=3, transition=24, classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()
        )
        self.dense = nn.ModuleList(DenseLayer(stem + i * growth, growth) for i in range(layers))
        dense_out = stem + layers * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(dense_out),
            nn.ReLU(),
            nn.Conv2d(dense_out, transition, 1, bias=False),
            nn.AvgPool2d(2),
        )
        self.residual = PreActBlock(transition)
        self.head = nn.Sequential(
            nn.BatchNorm2d(transition),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(transition, classes),
        )

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.dense:
            # The first layer sees the stem alone: a one-input Concat would be a no-op.
            inputs = features[0] if len(features) == 1 else torch.cat(features, 1)
            features.append(layer(inputs))
        x = self.transition(torch.cat(features, 1))
        return self.head(self.residual(x))


def load_split():
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    test, train = order[:N_TEST], order[N_TEST:]
    return images[train], labels[train], images[test], labels[test]


def train(model, x, y):
    rng = np.random.default_rng(SEED + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(EPOCHS):
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y), BATCH):
            batch = order[start : start + BATCH]
            if len(batch) < 2:  # BatchNorm needs more than one value per channel in training
                continue
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def export(model, path):
    # With dynamo=False, do_constant_folding=False is what keeps Conv -> BatchNormalization
    # unfolded (the default folds it); training=EVAL writes BN with training_mode=0.
    # The legacy exporter warns that it is deprecated; it is the one users' models come from.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def check_graph(path, model):
    """Fail unless every BatchNorm2d survived export, in inference mode, where it belongs."""
    graph = onnx.load(path).graph
    onnx.checker.check_model(onnx.load(path), full_check=True)
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    batch_norms = [n for n in graph.node if n.op_type == "BatchNormalization"]
    expected = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if len(batch_norms) != expected:
        raise SystemExit(f"{path.name}: {len(batch_norms)} BatchNormalization, expected {expected}")
    for node in batch_norms:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("training_mode", 0) != 0:
            raise SystemExit(f"{path.name}: {node.name} has training_mode={attrs['training_mode']}")
    for node in graph.node:
        if node.op_type == "Concat" and "BatchNormalization" not in consumers[node.output[0]]:
            raise SystemExit(f"{path.name}: Concat {node.name} does not feed a BatchNormalization")
    stem_conv = next(n for n in graph.node if n.op_type == "Conv")
    if consumers[stem_conv.output[0]] != ["BatchNormalization"]:
        raise SystemExit(f"{path.name}: stem Conv feeds {consumers[stem_conv.output[0]]}, not BN")
    return collections.Counter(n.op_type for n in graph.node)


def accuracy(logits, labels):
    return float((np.argmax(logits, axis=1) == labels).mean())


def main():
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    x_train, y_train, x_test, y_test = load_split()
    model = train(DigitsCNN(), x_train, y_train)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()

    onnx_path = HERE / "digits_cnn.onnx"
    export(model, onnx_path)
    op_counts = check_graph(onnx_path, model)

    calib = x_train[np.random.default_rng(SEED + 2).choice(len(x_train), N_CALIB, replace=False)]
    np.savez_compressed(HERE / "calib.npz", input=calib)
    np.savez_compressed(HERE / "eval.npz", input=x_test, labels=y_test)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": x_test})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    if max_diff > 1e-4:
        raise SystemExit(f"onnxruntime differs from torch by {max_diff:.2e}")

    sys.path.insert(0, str(HERE.parent))
    try:
        from bnq.io import load_model, save_model
    except ImportError as error:
        npz_note = f"skipped digits_cnn.npz: bnq.io.save_model unavailable ({error}); rerun later"
    else:
        save_model(load_model(onnx_path), HERE / "digits_cnn.npz", overwrite=True)
        npz_note = "wrote digits_cnn.npz with bnq.io.save_model"

    print(f"test accuracy: torch {accuracy(torch_logits, y_test):.4f}, "
          f"onnxruntime {accuracy(ort_logits, y_test):.4f} ({len(y_test)} images)")
    print(f"onnxruntime vs torch max abs diff: {max_diff:.2e}")
    print("ops:", ", ".join(f"{op} {n}" for op, n in sorted(op_counts.items())))
    print(npz_note)
    for path in sorted(HERE.glob("*.onnx")) + sorted(HERE.glob("*.npz")):
        print(f"{path.name}: {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
