"""pycompress: compress trained PyTorch models — prune, quantize, distill — and prove it.

The compiled kernels are registered as ``torch.ops.pycompress.*``; ``pycompress.ops`` holds
their validated wrappers and ``pycompress.nn`` the drop-in modules.
"""

from pycompress._version import __version__
from pycompress import _ext, nn, ops
from pycompress._ext import active_cpu_isa, cpu_features, has_cuda_kernels, set_cpu_isa
from pycompress.pruning.prune import prune
from pycompress.pruning.gradual import GradualPruning
from pycompress.pruning.deploy import deploy_pruned
from pycompress.pruning.compact import CompactionReport, compact
from pycompress.quantization.quantize import QuantizationResult, quantize
from pycompress.evaluation.validate import ValidationReport, validate
from pycompress.evaluation.evaluate import EvaluationReport, compare, evaluate
from pycompress.recipe import CompressionReport, compress
from pycompress.export.serialization import load, save
from pycompress.distillation import distributed
from pycompress.distillation.finetune import finetune
from pycompress.distillation.distill import distill, precompute_teacher_logits, TeacherLogitsDataset
from pycompress.export.onnx import export_onnx  # onnx / onnxruntime are imported on first call

__all__ = [
    "__version__",
    "ops",
    "nn",
    "cpu_features",
    "active_cpu_isa",
    "set_cpu_isa",
    "has_cuda_kernels",
    "prune",
    "GradualPruning",
    "deploy_pruned",
    "compact",
    "CompactionReport",
    "quantize",
    "QuantizationResult",
    "validate",
    "ValidationReport",
    "evaluate",
    "compare",
    "EvaluationReport",
    "compress",
    "CompressionReport",
    "save",
    "load",
    "distributed",
    "finetune",
    "distill",
    "precompute_teacher_logits",
    "TeacherLogitsDataset",
    "export_onnx",
]
