"""The ``torch.onnx`` exporters the ONNX tests can use here: the dynamo one where this torch has it
with custom translation tables and onnxscript is installed, and always the TorchScript one."""

from __future__ import annotations


def available_exporters() -> list[str]:
    from pycompress.export import onnx as onnx_export

    if not onnx_export._exporter_supports_dynamo():
        return ["torchscript"]
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return ["torchscript"]
    return ["dynamo", "torchscript"]
