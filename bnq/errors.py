"""Errors bnq raises. Every message is written for the user: it names the file, tensor, node or
argument at fault and, where there is one, what to do about it."""


class BnqError(Exception):
    """Base class of every error bnq raises on purpose; the CLI prints it as one line."""


class ModelError(BnqError):
    """A model file or graph that bnq cannot read or does not support."""


class DataError(BnqError):
    """Sample data that does not fit the model (shape, dtype, missing keys, non-finite values)."""


class ArgumentError(BnqError, ValueError):
    """A bad argument to a public function (wrong rank, channel mismatch, bad scale...)."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """The text of a foreign exception (onnx, protobuf, numpy) fit to quote in a one-line
    message: whitespace and line breaks collapsed, cut at `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class MissingExtraError(BnqError):
    """A feature that needs an optional extra (`pip install 'bnq[images]'`...) not installed."""
